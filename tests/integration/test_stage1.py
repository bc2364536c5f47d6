"""Stage 1 as configured (training/stages.py ``stage1``), shrunk to the tiny model: image
reconstruction and image understanding trained together by the real trainer on real captioned photos
(scikit-image, scikit-learn) with a tiny random SigLIP2 teacher and text tower saved locally; then
atoken-convert and atoken-zero-shot on held-out photos of classes not trained on by name."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import sklearn.datasets

from atoken.tools.make_image_shards import write_image_shards
from tests.helpers.siglip2_local import write_tiny_siglip2

pytestmark = pytest.mark.slow  # spawns training / subprocess runs (make test-fast leaves it out)

pytest.importorskip("transformers")
WIDTH, HEADS, MLP = 64, 2, 128
STEPS = 24
# Training photos and their captions (words outside the tiny tokenizer's vocabulary become <unk>).
SKIMAGE = {"astronaut.png": "a photo of a person", "chelsea.png": "a photo of a cat",
           "coffee.png": "a photo of a cup of coffee", "rocket.jpg": "a photo of a rocket",
           "motorcycle_left.png": "a photo of a bike", "hubble_deep_field.jpg": "a photo of stars"}
SKLEARN = {"china.jpg": "a photo of a temple", "flower.jpg": "a photo of a flower"}
# Held out: class folder -> photo (none of them trained on).
HELD_OUT = {"bike": "motorcycle_right.png", "person": "camera.png", "moon": "moon.png"}


def write_data(root: Path) -> tuple[Path, Path]:
    """(captioned training shards, held-out class folders)."""
    photos, held = root / "photos", root / "heldout"
    photos.mkdir()
    for folder, captions in ((Path(skimage.data.data_dir), SKIMAGE),
                             (Path(sklearn.datasets.__file__).parent / "images", SKLEARN)):
        for name, caption in captions.items():
            shutil.copy(folder / name, photos / name)
            (photos / name).with_suffix(".txt").write_text(caption)
    for cls, name in HELD_OUT.items():
        (held / cls).mkdir(parents=True)
        shutil.copy(Path(skimage.data.data_dir) / name, held / cls / name)
    shards = root / "shards"
    assert write_image_shards(photos, str(shards), progress=False)[0] == len(SKIMAGE) + len(SKLEARN)
    return shards, held


def test_stage1_tiny_trains_reconstruction_and_understanding_then_zero_shot(tmp_path):
    shards, held = write_data(tmp_path)
    siglip = write_tiny_siglip2(tmp_path / "siglip2", WIDTH, HEADS, MLP)
    run = tmp_path / "run"
    # Every photo at a longer side of 48 px (6 or 9 tokens): the same packing every epoch.
    image = dict(remote=str(shards), min_res=48, max_res=48)
    sets = ["model=tiny", "model.understanding=true", "model.encoder.depth=1", "model.decoder.depth=1",
            "model.latent_channels=16", *[f"model.{p}.{k}={v}" for p in ("encoder", "decoder")
                                          for k, v in (("width", WIDTH), ("heads", HEADS), ("mlp_width", MLP))],
            *[f"data.streams.image_rec.{k}={v}" for k, v in {**image, "token_budget": 18}.items()],
            *[f"data.streams.image_und.{k}={v}" for k, v in {**image, "token_budget": 36,
                                                               "local": str(tmp_path / "cache_und")}.items()],
            f"loss.text_tower={siglip}", f"loss.teacher={siglip}", "loss.perceptual_size=32",
            "loss.lpips_weight=1.0", "loss.gram_weight=10.0", "data.shuffle=false", "mix_rounds=1",
            "optim.lr=2e-3", "optim.warmup_steps=1", "optim.encoder_lr_mult=1.0", "optim.ema_decay=0.9",
            "precision=fp32", "log.every=1", "log.eval_every=100000", "checkpoint.every=100000", f"steps={STEPS}",
            f"run_dir={run}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "atoken.training.train", "--config", "stage1",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # The start-up statement of the global batch, per stream and in all, against the paper's.
    assert "global batch at 1 data-parallel ranks" in proc.stderr
    for stream, paper in (("image_rec", 4096), ("image_und", 8192), ("all", 12288)):
        assert any(line.split()[:1] == [stream] and str(paper) in line.split() for line in proc.stderr.splitlines()), \
            stream
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    curves = {k: np.array([r[k] for r in rows]) for k in ("image_rec/rec", "image_und/sem", "clip", "distill")}
    assert (curves["clip"] > 0).all() and (curves["distill"] > 0).all()  # both semantic-side terms ran
    # 8 photos, unshuffled, fixed sizes: each stream repeats its micro-batches with a period of at
    # most 8 steps; compare the first 8 steps with the last 8.
    flat = {k: (c[:8].mean(), c[-8:].mean()) for k, c in curves.items() if k.endswith(("/rec", "/sem"))
            and not c[-8:].mean() < c[:8].mean()}
    assert not flat, f"losses that did not fall (first 8 steps, last 8): {flat}"

    model_dir = tmp_path / "tokenizer"
    subprocess.run([sys.executable, "-m", "atoken.tools.convert", str(run), "--out", str(model_dir)],
                   check=True, capture_output=True, env=env, timeout=300)
    out = tmp_path / "zero_shot"
    proc = subprocess.run([sys.executable, "-m", "atoken.tools.zero_shot", "classify", str(model_dir),
                           "--text-tower", str(siglip), "--images", str(held), "--image-res", "64",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    top1 = report["metrics"]["top1"]
    ranks = [item["rank"] for item in report["per_item"]]
    assert report["n"] == len(HELD_OUT) and top1 == pytest.approx(np.mean([r == 1 for r in ranks]))
    # A tiny random teacher: the accuracy says the path works, not how good the model is.
    print(f"held-out zero-shot top-1 after {STEPS} stage-1 steps: {top1:.3f} "
          f"({sum(r == 1 for r in ranks)}/{len(ranks)}; chance {1 / len(HELD_OUT):.3f})")
