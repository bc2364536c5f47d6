"""The training-step benchmark: its analytic FLOP count against torch's own counter, and the
script end to end on CPU (the numbers it reports are consistent with each other)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from atoken.model import AToken, preset
from atoken.model import attention as attn_mod
from atoken.model.config import PATCH_DIM
from attention import measured_ms_line
from common import image_sizes, packed_batch  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
from train_step import train_flops

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_analytic_flops_equal_torch_flop_counter():
    """Forward + backward of the tiny model on a mixed batch, counted by ``FlopCounterMode`` with
    SDPA's math path (which it decomposes into counted matmuls). The analytic count is the usual
    6 * N * weights, which also charges the patch embedding for an input gradient nobody computes
    (its input is data): that one term is the only difference."""
    cfg = preset("tiny")
    batch = packed_batch(image_sizes(512, 0, 64, 256), 0)
    model = AToken(cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        out = model(batch, sample=False)
        (out.recon.abs().mean() + out.posterior.kl().mean()).backward()
    n = batch.num_tokens
    assert len(batch.seqlens) > 2 and len(set(batch.seqlens)) > 1  # mixed lengths
    analytic = train_flops(cfg, batch.seqlens)
    assert counter.get_total_flops() == analytic["total"] - 2 * n * PATCH_DIM * cfg.encoder.width
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.bmm"] == analytic["attention"]  # attention's matmuls are the only bmm


@pytest.mark.slow
def test_train_step_script_on_cpu(tmp_path):
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--models", "tiny", "--tokens", "256",
                           "--warmup", "1", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    (r,) = rep["results"]
    assert rep["precision"] == "fp32" and rep["device"]["type"] == "cpu" and rep["command"]
    assert r["tokens"] == 256 == sum(rep["seqlens"]) and r["samples"] == len(rep["seqlens"]) > 1
    assert r["flops"]["total"] == train_flops(preset("tiny"), rep["seqlens"])["total"]
    assert r["mfu"] == pytest.approx(r["flops"]["total"] / (r["step_s"] * rep["peak_flops"]))
    assert r["optimizer"] == "torch.optim.adamw.AdamW" and r["host_syncs_per_step"]["checked"] is False
    pp = r["packed_vs_padded"]
    lens = rep["seqlens"]
    assert pp["padding_fraction"] == pytest.approx(1 - sum(lens) / (len(lens) * max(lens)))
    assert pp["padded_over_packed"] == pytest.approx(pp["padded_s"] / pp["packed_s"])
    assert pp["max_abs_diff_forward"] < 1e-4  # fp32: packed varlen and padded masked SDPA agree
    assert "| tiny |" in proc.stdout


@pytest.mark.slow
def test_clip_term_script_on_cpu(tmp_path):
    """benchmarks/clip_term.py end to end, shrunk: its difference is the CLIP term's cost."""
    out = tmp_path / "clip_term.json"
    proc = subprocess.run([sys.executable, str(BENCH / "clip_term.py"), "--teachers", "tiny", "--tokens", "64",
                           "--size", "32", "--warmup", "0", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    (r,) = rep["teachers"]
    assert r["teacher"] == "tiny" and r["clip_s"] == pytest.approx(r["with_clip_s"] - rep["rest_s"])
    assert sum(h * w for h, w in rep["settings"]["sizes"]) == 64 * 256  # the micro-batch's 64 tokens of 16x16


def test_auto_attention_ranking_is_the_committed_measurement():
    """model/attention.py's MEASURED_MS (auto's order) is the committed GPU run's, not a guess."""
    rep = json.loads((BENCH.parent / attn_mod.MEASURED_ON).read_text())
    assert measured_ms_line(rep["results"]) == f"MEASURED_MS = {attn_mod.MEASURED_MS}"


@pytest.mark.slow
def test_gpu_session_script_on_cpu(tmp_path):
    """benchmarks/gpu_session.sh end to end in its CPU mode (tiny, 128 tokens, 4 steps): every part runs,
    and the report holds issue 23's fields, each from its own part. ``drift`` is left out (it is
    ``determinism``'s code without the flag; ~1 min): its fields stay null, as for any part not run."""
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "CPU": "1", "PYTHON": sys.executable, "WORK": str(work), "OUT": str(out),
           "SESSION_S": "3000", "OMP_NUM_THREADS": "1"}
    parts = ["shards", "attention", "reference", "train", "determinism", "report"]  # one report, at the end
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), *parts], capture_output=True, text=True,
                          timeout=3000, env=env)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts[-1] = "report1"
    assert [line.split(":")[0] for line in summary.splitlines()] == parts and summary.count("rc=0") == len(parts)
    rep = json.loads((work / "gpu_trainer_cpu.json").read_text())
    assert rep["reference_mfu"] > 0 and rep["trainer_mfu"] > 0
    split = rep["profile"]
    assert sum(split["fractions"].values()) == pytest.approx(1.0)
    assert 0 < split["perceptual_net_fraction"] < rep["perceptual_fraction"] == split["fractions"]["perceptual"] < 1
    assert set(split["labels"]) == {"objective.rec", "objective.rec.perceptual.features", "engine.backward",
                                    "engine.step", "ema.update"}
    assert all(split["fractions"][p] > 0 for p in ("optimizer", "ema", "deepspeed", "matmul", "elementwise"))
    assert rep["attention_backend"] == "sdpa" == rep["attention"]["fastest"]  # CPU: auto's only choice
    assert rep["checkpoint_stall_s"] > 0
    det = rep["determinism"]
    assert rep["deterministic_identical"] is True and det["steps"] == [1, 2, 3] and "loss" in det["compared_fields"]
    assert "deterministic=true" in det["command"] and det["first_different_step"] is None
    assert rep["drift"] is None and rep["default_mode_max_rel_loss_diff"] is None
    with tarfile.open(out / "session.tgz") as tar:
        assert tar.getnames()  # the packed logs and JSONs
@pytest.mark.slow
def test_ingest_throughput_script_on_cpu(tmp_path):
    """benchmarks/ingest_throughput.py end to end, shrunk: both forms converted whole, the arithmetic of the day."""
    out = tmp_path / "ingest.json"
    proc = subprocess.run([sys.executable, str(BENCH / "ingest_throughput.py"), "--samples", "34", "--files", "2",
                           "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"webdataset", "parquet"} and rep["load_average_1_5_15"]["start"]
    for r in rep["results"].values():
        assert r["images"] == 34 and r["images_per_cpu_s"] == pytest.approx(34 / r["cpu_s"], rel=0.02)
    slowest = min(r["images_per_cpu_s"] for r in rep["results"].values())
    assert rep["cores_for_100M_per_day"] == pytest.approx(1e8 / 86400 / slowest, abs=0.06)
