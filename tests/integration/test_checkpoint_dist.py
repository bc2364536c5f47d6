"""Sharded checkpoints across processes: exact ZeRO resume, resume at another layout, a crash while
saving, and consolidation from any layout (issue 3, "Sharded checkpoints").

Three torchrun launches of ``checkpoint_worker.py`` (gloo, CPU) in one module-scoped fixture:
``save`` (2 ranks) -> ``one`` (1 rank) -> ``resume`` (2 ranks); see the worker for what each runs.
Between the first and the last, the run killed halfway through a save is inspected as it was left.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atoken.model import AToken, preset
from atoken.training import checkpoint
from atoken.training.checkpoint import find_weights
from atoken.training.inference_export import convert

pytestmark = pytest.mark.slow  # spawns training / subprocess runs (make test-fast leaves it out)

WORKER = Path(__file__).parents[1] / "helpers" / "checkpoint_worker.py"
K, STEPS = 2, 4


def launch(phase: str, root: Path, nproc: int, expect_ok: bool = True) -> dict:
    env = {**os.environ, "TMPDIR": str(root), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(WORKER), phase, str(root)], capture_output=True, text=True, env=env, timeout=600)
    (root / f"{phase}.log").write_text(proc.stdout + proc.stderr)
    if expect_ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    else:  # the crash at the end of ``save`` takes the launch down
        assert proc.returncode != 0, "the save that should have been killed completed"
    return json.loads((root / f"{phase}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    out = {"root": root, "save": launch("save", root, 2, expect_ok=False)}
    crashed = root / "crash" / "checkpoints"
    out["crash_left"] = {
        "latest": (crashed / "latest").read_text().strip(),
        "complete": sorted(p.name for p in crashed.glob("step_*")),
        "staging": sorted(p.name for p in (crashed / ".staging" / checkpoint.tag_for(2)).iterdir()),
        "auto": checkpoint.resolve("auto", crashed).name,
    }
    out["one"] = launch("one", root, 1)
    out["resume"] = launch("resume", root, 2)
    return out


def losses(record: dict) -> dict[int, float]:
    return {int(k): v for k, v in record["losses"].items()}


def ckpt(runs, name: str, step: int = STEPS) -> Path:
    return runs["root"] / name / "checkpoints" / checkpoint.tag_for(step)


def check_loaded(resumed: dict, straight: dict) -> dict[int, float]:
    """What the worker checked right after loading step K; returns the straight run's later losses.

    Step counter; this rank's EMA == its slice of the saved EMA; live weights == the saved ones;
    ``EMA.applied_to`` computes what a plain model with the saved EMA does; optimizer groups' lr and
    weight decay as the straight run had them at step K.
    """
    assert resumed["step"] == K and resumed["ema_ok"] and resumed["weights_err"] == 0.0
    assert resumed["ema_forward_err"] < 1e-5
    assert resumed["groups"] == straight["groups_at_k"]
    return {s: v for s, v in losses(straight).items() if s > K}


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_resume_is_exact(runs, zero):
    """k steps, save, a fresh process group loads, k more steps == 2k steps straight."""
    straight, resumed = runs["save"][f"dp2_z{zero}"], runs["resume"][f"dp2_z{zero}"]
    want = check_loaded(resumed, straight)
    assert resumed["own_client_state"]  # each rank got its own client state back, not DP rank 0's
    assert losses(resumed) == want  # bitwise: RNG (input jitter), optimizer, schedule all restored
    for which in ("raw", "ema"):
        a = checkpoint.consolidate(ckpt(runs, f"dp2_z{zero}"), which)
        b = checkpoint.consolidate(ckpt(runs, f"dp2_z{zero}_resumed"), which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which


@pytest.mark.parametrize("case, source", [("dp2_z1_to_dp1", "dp2_z1"), ("dp2_z2_to_dp1", "dp2_z2"),
                                          ("dp2_z3_to_dp1", "dp2_z3"), ("dp2_z3_to_dp1_z1", "dp2_z3")])
def test_elastic_dp2_to_dp1(runs, case, source):
    """Saved at DP=2, resumed at DP=1 with mix_rounds=2 over the same two micro-batches (and, last,
    at another ZeRO stage): weights, EMA and optimizer hyperparameters as saved, then the losses
    the DP=2 run went on to produce, up to summation order and the RNG streams (not carried over)."""
    straight, resumed = runs["save"][source], runs["one"][case]
    want = check_loaded(resumed, straight)
    assert losses(resumed) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("case, source, phase, ref_phase", [
    ("tp2_z1_to_tp1", "tp2_z1", "one", "save"), ("tp2_z3_to_tp1", "tp2_z3", "one", "save"),
    ("tp1_z1_to_tp2", "tp1_z1", "resume", "one"), ("tp1_z3_to_tp2", "tp1_z3", "resume", "one")])
def test_elastic_tp(runs, case, source, phase, ref_phase):
    """Saved at TP=2, resumed at TP=1, and back: the next losses match the original layout's."""
    straight, resumed = runs[ref_phase][source], runs[phase][case]
    want = check_loaded(resumed, straight)
    assert losses(resumed) == pytest.approx(want, rel=1e-5)


def test_crash_while_saving(runs):
    """Rank 1 was SIGKILLed once its files for step 2 were written, before the ranks agreed to commit:
    the half-written save stayed in .staging, ``latest`` kept naming step 1, which ``auto`` chose,
    loaded and continued from; saving step 2 again cleared the debris."""
    left = runs["crash_left"]
    assert left["latest"] == left["auto"] == checkpoint.tag_for(1)
    assert left["complete"] == [checkpoint.tag_for(1)]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in left["staging"]  # really died mid-save
    assert runs["resume"]["crash"] == {"resolved": checkpoint.tag_for(1), "step": 1}
    crashed = runs["root"] / "crash" / "checkpoints"
    assert (crashed / "latest").read_text().strip() == checkpoint.tag_for(2)
    assert not (crashed / ".staging").exists()  # the debris, and the staging folder itself, are gone
    assert checkpoint.resolve("auto", crashed) == crashed / checkpoint.tag_for(2)


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return torch.cat([t.flatten() for t in tensors.values()]).norm().item()


def test_consolidation_from_any_layout(runs, tmp_path):
    """atoken-convert from a TP=2 / ZeRO-3 checkpoint == from the TP=1 run of the same training:
    the plain model's keys and shapes, the same weights (up to TP's summation order), raw and EMA."""
    cfg = preset("tiny")
    cfg.encoder.depth = cfg.decoder.depth = 1
    plain = AToken(cfg).state_dict()
    assert find_weights(runs["root"] / "tp2_z3").path == ckpt(runs, "tp2_z3")
    for which in ("raw", "ema"):
        got = load_file(convert(runs["root"] / "tp2_z3", tmp_path / f"tp2_{which}", weights=which)
                        / "model.safetensors")
        want = load_file(convert(runs["root"] / "tp1_z1", tmp_path / f"tp1_{which}", weights=which)
                         / "model.safetensors")
        assert got.keys() == want.keys() == plain.keys()
        assert all(got[k].shape == plain[k].shape for k in plain)
        # TP changes the summation order: compare the difference with what the last K steps changed.
        before = checkpoint.consolidate(ckpt(runs, "tp1_z1", K), which)
        err = norm({k: got[k] - want[k] for k in want}) / norm({k: want[k] - before[k] for k in want})
        assert err < 1e-2, (which, err)
    # ZeRO-3 at DP=2 consolidates to what ZeRO-1 at DP=2 trained (same run, other partitioning).
    for which in ("raw", "ema"):
        a = checkpoint.consolidate(ckpt(runs, "dp2_z3"), which)
        b = checkpoint.consolidate(ckpt(runs, "dp2_z1"), which)
        assert a.keys() == plain.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
