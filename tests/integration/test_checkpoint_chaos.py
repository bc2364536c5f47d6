"""Chaos: a deterministic ``demo`` run killed with SIGKILL ten times and restarted each time ends
exactly where a straight run ends (issue 23, "Checkpoints that don't stall").

The run saves after every step, in the background. Kill moments are drawn from a seeded RNG: half
of them land while a checkpoint is being written (``.staging`` holds files: the kill is sent the
moment the test sees them), the others at a random delay after the restarted run logged its first
step. Every restart resumes with ``checkpoint.resume=auto``, which must find ``latest`` naming a
complete checkpoint. At the end, every logged step's losses and the final weights, EMA and
optimizer state equal the straight run's bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atoken.tools.demo import HELD_OUT, bundled_photos
from atoken.tools.make_image_shards import write_image_shards
from atoken.training import checkpoint

pytestmark = pytest.mark.slow  # eleven training processes

# Each killed run gets a step or more done (a step takes well under a second here); ten kills went through
# 14 to 20 steps in the runs seen. With 16 steps a run once finished before its tenth kill; 32 leave room.
STEPS = 32
KILLS = 10
SEED = 23
VOLATILE = {"tokens_per_s", "data_wait"}  # wall-clock, not numerics
SHRINK = ["deterministic=true", "model=tiny", "model.encoder.depth=1", "model.decoder.depth=1", "data.min_res=32",
          "data.max_res=64", "data.token_budget=64", "loss.perceptual_size=32", "optim.warmup_steps=4",
          "log.every=1", "log.eval_every=100000", "checkpoint.every=1", "checkpoint.keep=2", f"steps={STEPS}",
          "log.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chaos_shards")
    photos = [p for p in bundled_photos() if p.name != HELD_OUT]
    written, rejected = write_image_shards(photos, str(out / "shards"), progress=False)
    assert written == len(photos) and not rejected
    return out / "shards"


def command(run_dir: Path, shards: Path) -> tuple[list[str], dict]:
    sets = [*SHRINK, f"run_dir={run_dir}", f"data.remote={shards}", f"data.local={run_dir / 'cache'}"]
    env = {**os.environ, "TMPDIR": str(run_dir.parent), "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "atoken.training.train", "--config", "demo",
            *[a for s in sets for a in ("--set", s)]], env


def logged_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill
            out.append(json.loads(line))
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in out if "loss" in r]


def latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def writing(run_dir: Path) -> bool:
    """A background write in flight: a staging checkpoint with files in it."""
    staging = run_dir / "checkpoints" / ".staging"
    try:
        return any(any(d.iterdir()) for d in staging.glob("step_*"))
    except FileNotFoundError:  # renamed into place (committed) while we looked
        return False


def run_killed(cmd, env, run_dir: Path, during_write: bool, delay: float, log) -> str:
    """Start the run; SIGKILL it during a write or ``delay`` s after it logged a step. Returns
    what the kill hit ("write", "step", or "finished" when the run ended first)."""
    before_latest, before_steps = latest(run_dir), len(logged_steps(run_dir))
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if during_write:
                # after the run committed one checkpoint of its own, so that every restart progresses
                if latest(run_dir) != before_latest and writing(run_dir):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return "write"
                time.sleep(0.002)
            elif len(logged_steps(run_dir)) > before_steps or latest(run_dir) != before_latest:
                end = time.monotonic() + delay
                while proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.01)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return "step"
            else:
                time.sleep(0.01)
        assert proc.poll() is not None, "the run neither finished nor got killed in 600 s"
        assert proc.returncode == 0, f"the run failed (exit {proc.returncode}): see {log.name}"
        return "finished"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_at_random_moments_resumes_bit_exact(shards, tmp_path):
    straight_dir, chaos_dir = tmp_path / "straight", tmp_path / "chaos"
    cmd, env = command(straight_dir, shards)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    straight = logged_steps(straight_dir)
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))

    rng = random.Random(SEED)
    cmd, env = command(chaos_dir, shards)
    hits = []
    with open(tmp_path / "chaos.log", "w") as log:
        for _ in range(KILLS):
            hits.append(run_killed(cmd, env, chaos_dir, rng.random() < 0.5, rng.uniform(0.0, 1.5), log))
            if hits[-1] == "finished":
                break
            # whatever the moment, ``latest`` names a complete checkpoint (or none was committed yet):
            # every part of it reads back
            tag = latest(chaos_dir)
            if tag is not None:
                path = chaos_dir / "checkpoints" / tag
                assert checkpoint.client_state(path)["step"] == int(tag.removeprefix("step_")), hits
                assert checkpoint.consolidate(path, "raw").keys() == checkpoint.consolidate(path, "ema").keys()
        if hits[-1] != "finished":
            assert run_killed(cmd, env, chaos_dir, False, float("inf"), log) == "finished"
    assert hits.count("write") >= 3 and len(hits) == KILLS, hits  # really killed mid-write, ten times

    assert logged_steps(chaos_dir) == straight
    final = checkpoint.tag_for(STEPS)
    a, b = straight_dir / "checkpoints" / final, chaos_dir / "checkpoints" / final
    for which in ("raw", "ema"):
        wa, wb = checkpoint.consolidate(a, which), checkpoint.consolidate(b, which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    oa, ob = (torch.load(d / name, map_location="cpu", weights_only=False)["optimizer_state_dict"] for d in (a, b))
    assert _tensors_equal(oa, ob)


def _tensors_equal(x, y) -> bool:
    if torch.is_tensor(x):
        return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_tensors_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_tensors_equal(u, v) for u, v in zip(x, y, strict=True))
    if hasattr(x, "__dict__") and not isinstance(x, type):  # e.g. DeepSpeed's loss scaler: no __eq__
        return type(x) is type(y) and _tensors_equal(vars(x), vars(y))
    return x == y
