"""The training-step benchmark: its analytic FLOP count against torch's own counter, and the
script end to end on CPU (the numbers it reports are consistent with each other)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from atoken.model import AToken, preset
from atoken.model.config import PATCH_DIM

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
from common import image_sizes, packed_batch  # noqa: E402
from train_step import train_flops  # noqa: E402


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
