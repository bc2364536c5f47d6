"""The guards of a long run (training/guards.py, exchange.py, watchdog.py), with the faults injected the
way they happen: a learning rate that diverges, a sample whose pixels are NaN, a loss spike, a slow
rank (the hung rank under real Slurm: tests/test_cluster.py). The runs are the real trainer in fresh
processes on a shrunk ``demo`` config; the faults come through ``ATOKEN_TEST_FAULTS`` (training/faults.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import skimage.data
import torch

from atoken.model.errors import UserError
from atoken.tools.make_image_shards import write_image_shards
from atoken.training.checkpoint.layout import ema_file
from atoken.training.config import GuardConfig
from atoken.training.distributed import free_port
from atoken.training.guards import NONFINITE, OK, SPIKE, StepGuard, check_finite_weights, first_nonfinite

SHRINK = ["model=tiny", "model.encoder.depth=1", "model.decoder.depth=1", "data.min_res=32", "data.max_res=64",
          "data.token_budget=64", "loss.perceptual_size=32", "optim.warmup_steps=2", "log.every=1",
          "log.eval_every=1000", "log.wandb_mode=disabled"]


def test_guard_verdicts_spikes_and_the_streak_error():
    g = StepGuard(GuardConfig(nonfinite_limit=2, spike_factor=3.0, spike_window=3))
    for loss in (1.0, 0.9, 1.1):
        assert g.verdict(False, {"a": loss}) == (OK, [])  # fewer than spike_window steps known: no spike check
        g.applied({"a": loss})
    assert g.verdict(False, {"a": 2.9})[0] == OK
    verdict, spikes = g.verdict(False, {"a": 3.5})
    assert verdict == SPIKE and spikes[0]["stream"] == "a" and spikes[0]["ratio"] == pytest.approx(3.5)
    assert g.verdict(True, {"a": 1.0})[0] == NONFINITE and g.verdict(False, {"a": math.nan})[0] == NONFINITE
    g.nonfinite(7, "image_rec shard.00000.mds row 3")
    g.applied({"a": 1.0})  # an applied step ends the streak
    g.nonfinite(9, "x")
    with pytest.raises(UserError, match=r"2 non-finite steps in a row \(steps 9, 10;.*data of step 9: x"):
        g.nonfinite(10, "y")
    restored = StepGuard(g.cfg)
    restored.load_state_dict(json.loads(json.dumps(g.state_dict())))  # as checkpointed
    assert restored.state_dict() == g.state_dict()


def test_finite_checks_name_the_tensor():
    state = {"a.weight": torch.ones(3), "b.bias": torch.tensor([1.0, math.inf]), "c": torch.zeros(2)}
    assert first_nonfinite(state.items()) == "b.bias"
    assert first_nonfinite([("a", torch.ones(2)), ("i", torch.arange(3))]) is None
    with pytest.raises(UserError, match=r"ckpt: weight 'b.bias' is not finite \(1 of 2 values"):
        check_finite_weights(state, "ckpt")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    photos = [Path(skimage.data.data_dir) / n for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg",
                                                         "camera.png", "coins.png", "retina.jpg", "brick.png")]
    out = tmp_path_factory.mktemp("photos") / "shards"
    assert write_image_shards(photos, str(out), progress=False)[0] == len(photos)
    return out


def train(run_dir: Path, shards: Path, *extra: str, faults=None, nproc: int = 1) -> subprocess.CompletedProcess:
    sets = [*SHRINK, f"run_dir={run_dir}", f"data.remote={shards}", f"data.local={run_dir / 'cache'}", *extra]
    env = {**os.environ, "TMPDIR": str(run_dir.parent), "OMP_NUM_THREADS": "1"}
    env.pop("ATOKEN_TEST_FAULTS", None)
    if faults:
        env["ATOKEN_TEST_FAULTS"] = json.dumps(faults)
    launch = [sys.executable, "-m", "atoken.training.train"] if nproc == 1 else [
        str(Path(sys.executable).with_name("torchrun")), f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "-m", "atoken.training.train"]
    return subprocess.run([*launch, "--config", "demo", *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, env=env, timeout=900)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps_of(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir / "metrics.jsonl") if "loss" in r}


def finite_checkpoint(ckpt: Path) -> None:
    for f in ckpt.glob("*.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)
        tensors = []

        def walk(x, name, tensors=tensors):
            if torch.is_tensor(x):
                tensors.append((name, x))
            elif isinstance(x, dict):
                for k, v in x.items():
                    walk(v, f"{name}.{k}", tensors)
            elif isinstance(x, (list, tuple)):
                for i, v in enumerate(x):
                    walk(v, f"{name}.{i}", tensors)

        walk(state, f.name)
        assert first_nonfinite(tensors) is None, f"{ckpt}: {first_nonfinite(tensors)}"


@pytest.mark.slow
def test_diverging_lr_stops_within_k_steps_naming_them_and_latest_stays_finite(shards, tmp_path):
    """The issue's command: lr 1e6. Step 1 applies; from step 2 the loss is NaN: steps 2-4 are not
    applied and not checkpointed, the run ends with exit 2 and one line naming the steps and data.
    ``atoken-convert`` then refuses that checkpoint with one EMA value made NaN."""
    run = tmp_path / "run"
    proc = train(run, shards, "optim.lr=1e6", "optim.warmup_steps=1", "steps=12", "checkpoint.every=1")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "3 non-finite steps in a row (steps 2, 3, 4;" in errors[0], errors
    assert "shard.00000.mds row" in errors[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]
    finite_checkpoint(run / "checkpoints" / "step_00000001")
    events = records(run / "events.jsonl")
    nonfinite = [e for e in events if e["event"] == "nonfinite"]
    assert [e["step"] for e in nonfinite] == [2, 3, 4] and all(e["data"][0]["samples"] for e in nonfinite)
    got = steps_of(run)
    assert sorted(got) == [1, 2, 3] and math.isfinite(got[1]["loss"]) and math.isnan(got[2]["loss"])
    assert [e["count"] for e in nonfinite] == [1, 2, 3]

    # atoken-convert refuses non-finite weights, naming the tensor: the finite checkpoint, one EMA value NaN.
    bad = tmp_path / "bad" / "checkpoints"
    shutil.copytree(run / "checkpoints", bad)
    ema = bad / "step_00000001" / ema_file(tp_rank=0, dp_rank=0)  # one rank: it holds the whole EMA
    state = torch.load(ema, map_location="cpu")
    name = sorted(state)[0]
    state[name].view(-1)[0] = math.nan
    torch.save(state, ema)
    proc = subprocess.run([sys.executable, "-m", "atoken.tools.convert", str(bad.parent),
                           "--out", str(tmp_path / "inf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"weight '{name}' is not finite" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "inf" / "model.safetensors").exists()


@pytest.mark.slow
def test_nan_sample_is_skipped_a_spike_rolls_back_and_resume_is_exact(shards, tmp_path):
    """Run A: step 3's first sample is NaN (not applied, named, the run goes on); step 6's pixels x100
    spike the loss (rollback to step 4's checkpoint, step 6's data skipped). Run B resumes A's step-6
    checkpoint, written after the rollback, and must reproduce A's steps 7-8 exactly."""
    a = tmp_path / "a"
    guards = ["steps=8", "checkpoint.every=2", "checkpoint.keep=5", "guards.spike_window=2",
              "guards.spike_policy=rollback"]
    proc = train(a, shards, *guards, faults=[{"kind": "nan", "step": 3}, {"kind": "scale", "step": 6, "factor": 100}])
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = records(a / "events.jsonl")
    kinds = [e["event"] for e in events]
    nonfinite = next(e for e in events if e["event"] == "nonfinite")
    assert nonfinite["step"] == 3 and nonfinite["micro_batches_nonfinite"] == 1
    assert nonfinite["data"][0]["stream"] == "image_rec" and nonfinite["data"][0]["samples"][0][0] == "shard.00000.mds"
    spike = next(e for e in events if e["event"] == "spike")
    assert spike["step"] == 6 and spike["streams"][0]["ratio"] > 3 and spike["policy"] == "rollback"
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["step"] == 6 and rollback["to_step"] == 4 and rollback["skipped_steps"] == [5, 6]
    assert kinds[-1] == "end" and kinds.count("nonfinite") == 1 and kinds.count("spike") == 1
    got = steps_of(a)
    assert sorted(got) == list(range(1, 9))  # each step once: the rolled-back 5-6 were dropped and redone
    assert math.isnan(got[3]["loss"]) and all(math.isfinite(got[s]["loss"]) for s in (1, 2, 4, 5, 6, 7, 8))
    # The skipped step did not advance the LR schedule.
    assert got[3]["lr"] == got[2]["lr"] and got[4]["lr"] != got[3]["lr"]
    # Step 6 after the rollback ran other data than the spiked one, and went on with the data after it.
    assert got[6]["loss"] < 10 * got[4]["loss"]
    for ckpt in (a / "checkpoints").glob("step_*"):
        finite_checkpoint(ckpt)

    b = tmp_path / "b"
    proc = train(b, shards, *guards, f"checkpoint.resume={a / 'checkpoints' / 'step_00000006'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = steps_of(b)
    assert sorted(resumed) == [7, 8]
    for step in (7, 8):
        assert resumed[step]["data"] == got[step]["data"], f"step {step}: other samples after resume"
        assert resumed[step]["loss"] == got[step]["loss"], f"step {step}"


@pytest.mark.slow
def test_slow_rank_is_named_with_its_host_and_ratio(shards, tmp_path):
    """Two gloo ranks; rank 1 sleeps 2 s before each micro-batch: the straggler report names it. A step
    of two micro-batches (mix_rounds=2) shows its progress and, at start, its time against Slurm's warning.
    Rank 0 logs, and its own first micro-batch may take well under a second on a fast machine: progress
    is asked for every millisecond, so the line's appearance does not depend on the machine's speed."""
    run = tmp_path / "run"
    proc = train(run, shards, "steps=4", "mix_rounds=2", "checkpoint.every=100", "watchdog.straggler_every=2",
                 "watchdog.progress_every=0.001", nproc=2, faults=[{"kind": "slow", "rank": 1, "seconds": 2.0}])
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [e for e in records(run / "events.jsonl") if e["event"] == "stragglers"]
    assert [r["steps"] for r in reports] == [[1, 2], [3, 4]]
    for r in reports:
        assert r["slowest_rank"] == 1 and r["host"] and r["ratio"] > 1.15, r
    assert "slowest rank 1 on" in proc.stderr
    assert "a step holds 2 micro-batch(es) at ~" in proc.stderr and "step 1: 1/2 micro-batches" in proc.stderr


@pytest.mark.slow
def test_watchdog_dumps_every_thread_and_exits_124_when_no_micro_batch_completes(tmp_path):
    """A process that stops beating: its stacks (the main thread's sleep included) are written to
    run_dir/hangs/ and it exits 124 within the limit, not at its sleep's end."""
    script = ("import time\nfrom pathlib import Path\nfrom atoken.training.config import WatchdogConfig\n"
              "from atoken.training.watchdog import Watchdog\n"
              f"w = Watchdog(WatchdogConfig(timeout=1.0), Path({str(tmp_path)!r}), 3, per_step=4, rounds=1)\n"
              "w.start_step(7)\nw.beat(100)\n"
              "def stuck_in_a_collective():\n    time.sleep(120)\nstuck_in_a_collective()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, env=env)
    assert proc.returncode == 124 and time.monotonic() - t0 < 60, proc.stderr[-2000:]
    text = (tmp_path / "hangs" / "rank_00003.local.txt").read_text()
    assert "no micro-batch completed" in text and "in step 7, after 1 of its 4 micro-batches" in text
    assert "stuck_in_a_collective" in text and "atoken-watchdog" not in text.split("\n")[0]
