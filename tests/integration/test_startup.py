"""Start-up: ``--help`` imports no model (and the light tools not even torch); the DeepSpeed CPU op
is built with the same ninja whether or not the venv is activated."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns training / subprocess runs (make test-fast leaves it out)

LIGHT = ["atoken.tools.convert", "atoken.tools.reconstruct", "atoken.tools.make_image_shards",
         "atoken.tools.make_video_shards", "atoken.tools.make_3d_shards", "atoken.tools.import_siglip2",
         "atoken.tools.evaluate", "atoken.tools.zero_shot", "atoken.tools.merge_shards"]
# These read the typed config (LossConfig lives with the losses, in torch) or report torch versions.
WITH_TORCH = ["atoken.training.train", "atoken.tools.demo"]


def imported_by_help(module: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert f"usage: atoken-{module.rsplit('.', 1)[1].replace('_', '-')}" in proc.stdout  # prog, not python -m
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("module", LIGHT + WITH_TORCH)
def test_help_imports_no_model(module):
    mods = imported_by_help(module)
    assert "atoken.model.autoencoder" not in mods and "torch._dynamo" not in mods
    if module in LIGHT:
        assert "torch" not in mods


def test_extension_build_uses_the_venv_ninja_activated_or_not(tmp_path):
    """torch.utils.cpp_extension runs the ``ninja`` on PATH; a system ninja of another version sees
    the venv ninja's build as stale (and back), so alternating rebuilt DeepSpeed's op each time."""
    venv_ninja = Path(sys.executable).parent / "ninja"
    if not venv_ninja.is_file():
        pytest.skip("no ninja in this Python's bin directory")
    code = ("import shutil; from atoken.training.distributed import prepare_extension_build; "
            "prepare_extension_build(); print(shutil.which('ninja'))")
    for path in ("/usr/bin:/bin", f"{venv_ninja.parent}:/usr/bin:/bin"):  # plain, and activated
        env = {**os.environ, "PATH": path, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(venv_ninja), (path, out.stdout)
