"""A user's mistakes end in one clear line, exit status 2 and no traceback, from every CLI.

Each case runs the real console entry point as a subprocess (``python -m atoken....``) with small
inputs. The trainer's cases are all found by ``training/preflight.py`` before any model is built
(no case here builds a model: each one takes the seconds of Python's start-up and imports).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from atoken.tools.make_image_shards import write_image_shards
from tests.unit.test_evaluate import tiny_inference_dir

TRAIN = "atoken.training.train"


def run(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``env``: variables to set, or to remove (value None)."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env={k: v for k, v in full_env.items() if v is not None}, timeout=timeout)


def imports_model(module: str, *args: str, cwd: Path) -> bool:
    """Whether running ``module`` imported the model's code at all (python -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    return "atoken.model.autoencoder" in proc.stderr


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a user error: status 2, stderr one ``error: ...`` line (no traceback) holding ``needles``."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two real photos as MDS image shards."""
    root = tmp_path_factory.mktemp("data")
    for name, img in (("astronaut.png", skimage.data.astronaut()), ("coffee.png", skimage.data.coffee())):
        Image.fromarray(img).resize((96, 96)).save(root / name)
    out = root / "shards"
    assert write_image_shards(root, str(out), progress=False)[0] == 2
    return out


def demo(shards: Path, run_dir: Path, *sets: str) -> list[str]:
    args = ["--config", "demo", "--set", f"data.remote={shards}", "--set", f"run_dir={run_dir}"]
    return args + [a for s in sets for a in ("--set", s)]


@pytest.mark.slow
def test_train_without_a_data_path_fails_at_once(tmp_path):
    """The default config (so400m) with no data: refused before the model is built."""
    proc = run(TRAIN, "--set", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    one_line_error(proc, "no data given", "data.streams.<name>.remote")
    assert not (tmp_path / "run").exists()
    assert not imports_model(TRAIN, "--set", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)  # nothing built


@pytest.mark.parametrize("sets, needles", [
    (["data.remote={tmp}/nowhere"], ["stream 'image_rec'", "nowhere", "no such folder"]),
    (["data.token_budget=32"], ["stream 'image_rec'", "token_budget=32", "max_res=128"]),
    (["data.min_res=60"], ["stream 'image_rec'", "multiples of 16", "min_res=60"]),
    (["precision=fp16"], ["precision must be one of", "'fp16'"]),
    (["checkpoint.resume={tmp}"], ["checkpoint.resume=", "is not a checkpoint directory"]),
    (["run_dir={tmp}/a_file"], ["run_dir=", "a_file", "is a file"]),
    (["log.eval_images={tmp}/no_images"], ["log.eval_images=", "no such folder"]),
    (["checkpoint.init_from={tmp}"], ["checkpoint.init_from=", "no complete checkpoint"]),
])
@pytest.mark.slow
def test_train_refuses_mistakes_before_building_anything(sets, needles, shards, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    sets = [s.replace("{tmp}", str(tmp_path)) for s in sets]
    one_line_error(run(TRAIN, *demo(shards, tmp_path / "run", *sets), cwd=tmp_path),
                   *[n.replace("{tmp}", str(tmp_path)) for n in needles])


@pytest.mark.slow
def test_train_names_the_s3_bucket_without_credentials(shards, tmp_path):
    # No credentials anywhere boto3 looks (variables, ~/.aws, instance metadata is not reached first).
    env = {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
           "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "HOME": str(tmp_path),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    proc = run(TRAIN, *demo(shards, tmp_path / "run", "data.remote=s3://some-bucket/images"), cwd=tmp_path, env=env)
    one_line_error(proc, "bucket 'some-bucket'", "no credentials")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "inference"
    tiny_inference_dir(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_named_by_reconstruct_and_evaluate(damage, model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)  # then its weights damaged
    data = (model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 4096)
    photo = tmp_path / "photo.png"
    Image.fromarray(skimage.data.astronaut()[:64, :64]).save(photo)
    for module, args in (("atoken.tools.reconstruct", [str(broken), str(photo), "--out", str(tmp_path / "r")]),
                         ("atoken.tools.evaluate", [str(broken), "--images", str(photo), "--out", str(tmp_path / "e"),
                                                    "--no-progress"])):
        one_line_error(run(module, *args, cwd=tmp_path), str(broken / "model.safetensors"), "atoken-convert")


@pytest.mark.slow
def test_reconstruct_reports_the_good_files_and_names_the_bad_one(model_dir, tmp_path):
    good = []
    for name, img in (("astronaut.png", skimage.data.astronaut()), ("coffee.png", skimage.data.coffee())):
        good.append(tmp_path / name)
        Image.fromarray(img).resize((48, 48)).save(good[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(good[0].read_bytes()[:200])  # a truncated PNG
    proc = run("atoken.tools.reconstruct", str(model_dir), str(good[0]), str(bad), str(good[1]),
               "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    psnr_lines = [line.split(":")[0] for line in proc.stdout.splitlines() if "PSNR" in line]
    assert psnr_lines == ["astronaut.png", "coffee.png"]
    assert "2 reconstructed, 1 unreadable" in proc.stdout
    assert proc.stderr.strip().startswith("error: ") and str(bad) in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.png", "coffee.png"]


@pytest.mark.slow
def test_convert_names_a_checkpoint_without_its_model_states(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "layout.json").write_text(json.dumps({"tp": 1, "dp": 1, "zero_stage": 1, "params": {}}))
    (ckpt.parent / "latest").write_text("step_00000010\n")
    proc = run("atoken.tools.convert", str(tmp_path / "run"), "--out", str(tmp_path / "inference"), cwd=tmp_path)
    one_line_error(proc, str(ckpt), "no *model_states.pt", "another checkpoints/step_*")


@pytest.mark.slow
def test_shard_writer_refuses_an_output_that_is_a_file(tmp_path):
    Image.fromarray(skimage.data.astronaut()[:32, :32]).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.write_text("a file")
    proc = run("atoken.tools.make_image_shards", str(tmp_path), str(out), "--no-progress", cwd=tmp_path)
    one_line_error(proc, str(out), "is an existing file")
