"""Golden numerics: 20 deterministic steps of the ``demo`` config (``tiny``) on the bundled photos.

Every logged value of every step must equal ``tests/golden/demo_20_steps.json`` bit for bit, so a
refactor that is meant to change no numerics is checked to change none. When a change is *meant* to
change them (a new loss term, another init), regenerate the file and say why in the commit:

    ATOKEN_UPDATE_GOLDEN=1 python -m pytest tests/integration/test_golden.py

The file pins this machine class (x86-64 CPU, 2 threads, the pinned torch): other CPUs or thread
counts round matmuls differently, which is why it is not run on GPUs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atoken.tools.demo import HELD_OUT, bundled_photos
from atoken.tools.make_image_shards import write_image_shards

pytestmark = pytest.mark.slow  # spawns training / subprocess runs (make test-fast leaves it out)

GOLDEN = Path(__file__).parents[1] / "golden" / "demo_20_steps.json"
STEPS = 20
VOLATILE = {"tokens_per_s", "data_wait"}  # wall-clock, not numerics: add any new timing metric here


def test_demo_losses_match_golden_file(tmp_path):
    photos = [p for p in bundled_photos() if p.name != HELD_OUT]
    written, rejected = write_image_shards(photos, str(tmp_path / "shards"), progress=False)
    assert written == len(photos) and not rejected
    run = tmp_path / "run"
    sets = ["deterministic=true", f"steps={STEPS}", "log.every=1", "log.eval_every=1000", "checkpoint.every=1000",
            "log.wandb_mode=disabled", f"run_dir={run}", f"data.remote={tmp_path / 'shards'}",
            f"data.local={tmp_path / 'cache'}"]
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "atoken.training.train", "--config", "demo",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [{k: v for k, v in r.items() if k not in VOLATILE}
               for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    if os.environ.get("ATOKEN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(records, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for want, got in zip(golden, records, strict=True):
        assert got == want, f"step {want['step']}: " + ", ".join(
            f"{k} {want.get(k)!r} -> {got.get(k)!r}" for k in sorted(want.keys() | got.keys())
            if want.get(k) != got.get(k))
