"""The installed package, not the checkout: a wheel built from setup.py holds every module.

The first H100 run installed atoken from a wheel, and ``atoken.training.checkpoint`` was missing: setup.py
listed packages by hand, and the editable install the other tests use hides such a gap.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("model", "training", "data_pipeline", "tools")


@pytest.mark.slow
def test_wheel_holds_every_module(tmp_path):
    # From a copy: setuptools reuses a checkout's build/ folder, whose stale files would hide a gap.
    src = tmp_path / "src"
    for top in SUBPACKAGES:
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", src)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-w", str(tmp_path), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("atoken-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    want = {f"atoken/{p.relative_to(ROOT)}" for top in SUBPACKAGES for p in (ROOT / top).rglob("*.py")}
    assert len(want) > 50
    assert not want - held, f"modules missing from the wheel: {sorted(want - held)}"
