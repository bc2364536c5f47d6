"""Data pipeline on real photos (skimage / sklearn): shards, resolution policy, packing, resume, bad data."""
from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data as sk
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from streaming import MDSWriter, StreamingDataset

from atoken.data_pipeline import (
    IMAGE_COLUMNS,
    IMAGE_WRITER_COLUMNS,
    DataConfig,
    MixedLoader,
    StreamConfig,
    StreamDataset,
    StreamLoader,
    decoder_for,
    image_sample,
    open_rgb,
    resize_for_training,
    sample_resolution,
    training_size,
)
from atoken.data_pipeline.assets import asset_sample
from atoken.data_pipeline.config import MODALITIES
from atoken.data_pipeline.video import video_sample
from atoken.model.errors import UserError
from atoken.model.patches import grid_coords, unpatchify
from atoken.tools.make_image_shards import main as shards_main
from atoken.tools.make_image_shards import write_image_shards
from tests.helpers import worker_decoders

pytestmark = pytest.mark.usefixtures("stream_env")  # tests/conftest.py: own TMPDIR, shared memory cleaned


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos of different sizes (one grey), name -> uint8 array."""
    imgs = {n: getattr(sk, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera")}
    imgs["china"], imgs["flower"] = load_sample_images().images
    imgs["flower"] = imgs["flower"][:200, :150]  # portrait crop
    imgs["coffee_small"] = imgs["coffee"][100:140, 200:250]  # 40x50: smaller than min_res
    return imgs


def write_photos(photos, folder: Path) -> dict[str, Path]:
    """Half JPEG, half PNG (some in a subfolder); returns name relative to folder -> path."""
    out = {}
    for i, (n, a) in enumerate(sorted(photos.items())):
        name = f"{'sub/' if i % 3 == 0 else ''}{n}.{'jpg' if i % 2 == 0 else 'png'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / name, quality=90)
        out[name] = folder / name
    return out


@pytest.fixture
def shards(photos, tmp_path) -> tuple[Path, dict[str, Path]]:
    files = write_photos(photos, tmp_path / "photos")
    written, rejected = write_image_shards(tmp_path / "photos", str(tmp_path / "shards"), size_limit="300kb",
                                           progress=False)
    assert (written, rejected) == (len(files), [])
    return tmp_path / "shards", files


STREAM_FIELDS = {f.name for f in dataclasses.fields(StreamConfig)}


def cfg_for(remote, **kw) -> DataConfig:
    """One image_rec stream; keyword arguments go to the stream or the DataConfig, by field name."""
    kw = {"min_res": 64, "max_res": 256, "token_budget": 512, "seed": 3, **kw}
    stream = StreamConfig(remote=str(remote), **{k: v for k, v in kw.items() if k in STREAM_FIELDS})
    return DataConfig(streams={"image_rec": stream}, **{k: v for k, v in kw.items() if k not in STREAM_FIELDS})


def build_image_loader(cfg: DataConfig) -> StreamLoader:
    return StreamLoader(cfg.streams["image_rec"], cfg)


# ---------------------------------------------------------------- shards


def test_shards_round_trip(shards):
    out, files = shards
    assert len(list(out.glob("shard.*.mds"))) > 1  # size_limit split them
    ds = StreamingDataset(local=str(out), batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    assert [r["name"] for r in rows] == sorted(files)  # deterministic, sorted order
    for r in rows:
        data = files[r["name"]].read_bytes()
        assert r["image"] == data  # the original bytes, untouched
        with Image.open(files[r["name"]]) as im:
            assert (int(r["width"]), int(r["height"])) == im.size
    assert set(rows[0]) == set(IMAGE_WRITER_COLUMNS)
    assert {(r["caption"], int(r["label"])) for r in rows} == {("", -1)}  # no sidecars, no labels

    # an explicit file list: named relative to the files' common folder
    pick = [next(p for n, p in sorted(files.items()) if "/" in n),
            next(p for n, p in sorted(files.items()) if "/" not in n)]
    assert write_image_shards(pick, str(out.parent / "listed"), progress=False) == (2, [])
    listed = StreamingDataset(local=str(out.parent / "listed"), batch_size=1)
    names = sorted(p.relative_to(out.parent / "photos").as_posix() for p in pick)
    assert [listed[i]["name"] for i in range(2)] == names


def test_worker_processes_write_what_one_process_writes(photos, tmp_path):
    """--workers 2 checks the images in a pool started from the forkserver (data_pipeline/workers.py):
    the same shards, byte for byte, as one process."""
    write_photos(photos, tmp_path / "photos")
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        written, rejected = write_image_shards(tmp_path / "photos", str(out), size_limit="300kb", workers=workers,
                                               progress=False)
        assert (written, rejected) == (len(photos), [])
        outs[workers] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
    assert len(outs[1]) > 2 and outs[1] == outs[2]


def test_captions_and_labels_from_class_folders(photos, tmp_path, capsys):
    written = {cls: write_photos({k: photos[k] for k in names}, tmp_path / "in" / cls)
               for cls, names in {"cat": ("chelsea",), "rocket": ("rocket", "coffee")}.items()}
    next(iter(written["cat"].values())).with_suffix(".txt").write_text("a cat on a rug\n")
    # write_photos puts some images in a further sub-folder: a label comes from the top one.
    assert shards_main([str(tmp_path / "in"), str(tmp_path / "out"), "--labels-from-folders", "--no-progress"]) == 0
    assert "label 0: cat" in capsys.readouterr().out
    ds = StreamingDataset(local=str(tmp_path / "out"), batch_size=1)
    rows = {ds[i]["name"]: ds[i] for i in range(ds.num_samples)}
    assert {n.split("/")[0]: int(r["label"]) for n, r in rows.items()} == {"cat": 0, "rocket": 1}
    captions = {n: r["caption"] for n, r in rows.items() if r["caption"]}
    assert list(captions.values()) == ["a cat on a rug"] and "chelsea" in next(iter(captions))
    # An image outside any class folder cannot be labelled: a clear error, nothing written.
    (tmp_path / "loose").mkdir()
    Image.fromarray(photos["chelsea"]).save(tmp_path / "loose" / "chelsea.png")
    assert shards_main([str(tmp_path / "loose"), str(tmp_path / "out2"), "--labels-from-folders"]) == 2


def test_rejection_and_cli(photos, tmp_path, capsys):
    files = write_photos({k: photos[k] for k in ("chelsea", "coffee", "rocket")}, tmp_path / "in")
    (tmp_path / "in" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    jpg = next(p for n, p in files.items() if n.endswith(".jpg")).read_bytes()
    (tmp_path / "in" / "sub" / "cut.jpg").parent.mkdir(exist_ok=True)
    (tmp_path / "in" / "sub" / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])  # opens fine, fails on load()

    assert shards_main([str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1] == f"wrote {len(files)} samples, rejected 3"
    for name, reason in [("garbage.jpg", "not a recognised image"), ("empty.png", "empty file"),
                         ("sub/cut.jpg", "truncated")]:
        assert f"rejected {name}: " in text and reason in text
    ds = StreamingDataset(local=str(tmp_path / "out"), batch_size=1)
    assert sorted(ds[i]["name"] for i in range(ds.num_samples)) == sorted(files)

    written, rejected = write_image_shards(tmp_path / "in", str(tmp_path / "out2"), progress=False)
    assert written == len(files) and sorted(n for n, _ in rejected) == ["empty.png", "garbage.jpg", "sub/cut.jpg"]

    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("no images here")
    assert shards_main([str(tmp_path / "none"), str(tmp_path / "o3")]) == 2
    assert shards_main([str(tmp_path / "missing"), str(tmp_path / "o4")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad_only").mkdir()
    (tmp_path / "bad_only" / "x.png").write_bytes(b"")
    assert shards_main([str(tmp_path / "bad_only"), str(tmp_path / "o5"), "--no-progress"]) == 1


def test_every_modality_has_its_decode_function():
    """One per modality a stream accepts (video and 3D imported on demand); another is refused by name."""
    assert [decoder_for(m) for m in MODALITIES] == [image_sample, video_sample, asset_sample]
    with pytest.raises(ValueError, match="no decode function registered for modality 'audio'"):
        decoder_for("audio")


# ---------------------------------------------------------------- resolution policy


def test_resolution_policy(photos):
    rng = np.random.default_rng(0)
    draws = [sample_resolution(rng, 64, 512) for _ in range(2000)]
    assert min(draws) == 64 and max(draws) == 512 and all(s % 16 == 0 for s in draws)
    assert max(sample_resolution(rng, 70, 500) for _ in range(500)) <= 496

    for hgt, wid in [(512, 512), (300, 451), (427, 640), (1000, 37), (40, 50), (8, 300), (17, 17), (2000, 1500)]:
        for s in range(64, 513, 16):
            h, w = training_size(hgt, wid, s)
            assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
            assert max(h, w) <= s  # within the sampled range
            # no upscaling beyond the image's own size (except to reach one patch)
            assert h <= max(16, hgt) and w <= max(16, wid)
            if max(hgt, wid) >= s:
                assert max(h, w) == s
            exact = min(1.0, s / max(hgt, wid))
            for got, full in ((h, hgt), (w, wid)):
                if full * exact >= 16:
                    assert abs(got - full * exact) < 16  # aspect ratio kept to within a patch

    for name in ("chelsea", "rocket", "coffee_small", "flower"):
        img = open_rgb(_png(photos[name]))
        for s in (64, 160, 256, 512):
            x = resize_for_training(img, s)
            assert x.shape == (3, *training_size(img.height, img.width, s)) and x.dtype == torch.float32
            assert x.min() >= -1 and x.max() <= 1
            ar, tol = img.width / img.height, (0.35 if min(x.shape[1:]) < 64 else 0.12)  # rounding: < 1 patch
            assert abs(x.shape[2] / x.shape[1] - ar) / ar < tol


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- packing


def test_packing_one_epoch(shards, tmp_path):
    out, files = shards
    cfg = cfg_for(out)
    loader = build_image_loader(cfg)
    stream = cfg.streams["image_rec"]
    names, batches = [], []
    while len(names) < len(files):
        b = next(loader).batch
        batches.append(b)
        names += b.names
    assert sorted(names[:len(files)]) == sorted(files)  # the first epoch: every sample exactly once
    for b in batches:
        assert b.num_tokens <= stream.token_budget
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.num_tokens
        assert b.seqlens == [t * h * w for t, h, w, _ in b.grids]
        assert b.frames == [1] * b.num_samples and b.modalities == ["image"] * b.num_samples
        for i, (t, h, w, _z) in enumerate(b.grids):
            lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
            assert torch.equal(b.coords[lo:hi], grid_coords(t, h, w))
            img = unpatchify(b.to("cpu").features[lo:hi], b.grids[i], frames=1)
            assert img.abs().max() <= 1
            assert max(h, w) * 16 <= stream.max_res
    # greedy: a batch is closed only because the next sample does not fit
    for b, nxt in itertools.pairwise(batches):
        assert b.num_tokens + nxt.seqlens[0] > stream.token_budget
    assert loader.stats()["tokens"] == sum(b.num_tokens for b in batches)
    loader.close()

    with pytest.raises(ValueError,
                       match=r"token_budget=1000 cannot hold its largest sample \(image at max_res=512: 1024 tokens"):
        build_image_loader(cfg_for(out, max_res=512, token_budget=1000))


# ---------------------------------------------------------------- resume


def _batches(loader, n):
    return [next(loader).batch for _ in range(n)]


def test_resume_identical(shards, tmp_path):
    out, files = shards
    n_total = 9  # about 4 epochs of the 9 photos: rollover is covered
    straight = build_image_loader(cfg_for(out, local=str(tmp_path / "c0")))
    ref = _batches(straight, n_total)
    straight.close()
    sizes = {}
    for b in ref:
        for n, g in zip(b.names, b.grids, strict=True):
            sizes.setdefault(n, set()).add(g)
    assert len(sizes) == len(files) and max(map(len, sizes.values())) > 1  # new sizes each epoch
    # resume just before and after the batch spanning the first epoch's end, and later on
    k_cross = 1 + int(np.searchsorted(np.cumsum([b.num_samples for b in ref]), len(files)))
    assert k_cross < n_total
    for j, k in enumerate(sorted({k for k in (1, k_cross - 1, k_cross, n_total - 2) if k >= 1})):
        first = build_image_loader(cfg_for(out, local=str(tmp_path / f"a{j}")))
        part = _batches(first, k)
        state = first.state_dict()
        first.close()
        del first
        # a fresh dataset with its own cache dir; once with worker processes (same order and sizes)
        resumed = build_image_loader(cfg_for(out, local=str(tmp_path / f"b{j}"), num_workers=2 * (j == 1)))
        resumed.load_state_dict(state)
        assert resumed.samples_seen == sum(b.num_samples for b in part)
        got = part + _batches(resumed, n_total - k)
        resumed.close()
        for a, b in zip(ref, got, strict=True):
            assert a.names == b.names and a.grids == b.grids, k
            assert torch.equal(a.features, b.features) and torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_workers_do_not_inherit_a_lock_another_thread_holds(shards, tmp_path):
    """Workers start while another thread holds a lock their decoding needs: a forked worker would
    hold a copy of it forever (data_pipeline/workers.py); theirs is free."""
    out, _ = shards
    loader = build_image_loader(cfg_for(out, local=str(tmp_path / "c"), num_workers=1))
    loader.dataset.decode = worker_decoders.locked
    got = []
    with worker_decoders.LOCK:
        reader = threading.Thread(target=lambda: got.append(next(loader)), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not multiprocessing.active_children():  # the worker has started: the lock was held then
            assert time.monotonic() < deadline, "no DataLoader worker started"
            time.sleep(0.01)
    reader.join(timeout=120)
    assert not reader.is_alive(), "the DataLoader worker waits for a lock it inherited held"
    assert got[0].batch.num_samples > 0
    loader.close()


def test_workers_have_the_environment_of_the_loader_that_started_them(shards, tmp_path, monkeypatch):
    """A forkserver's child has the server's environment, from the server's start (the first loader with
    workers); each loader's workers get its process's environment as it was when they started."""
    out, _ = shards
    for mark in ("first", "second"):
        monkeypatch.setenv(worker_decoders.MARK, mark)
        loader = build_image_loader(cfg_for(out, local=str(tmp_path / mark), num_workers=1))
        loader.dataset.decode = worker_decoders.named_by_environment
        names = next(loader).batch.names
        loader.close()
        assert set(names) == {mark}


# ---------------------------------------------------------------- bad samples


def _write_raw_shards(out: Path, samples: list[tuple[str, bytes]]):
    with MDSWriter(columns=IMAGE_COLUMNS, out=str(out), size_limit=1 << 30) as w:
        for name, data in samples:
            w.write({"image": data, "width": 1, "height": 1, "name": name})


def test_bad_samples(photos, tmp_path, caplog):
    jpgs = {}
    for n in ("astronaut", "chelsea", "coffee", "rocket", "china"):
        buf = io.BytesIO()
        Image.fromarray(photos[n]).save(buf, format="JPEG", quality=90)
        jpgs[n] = buf.getvalue()
    cut = jpgs["rocket"][: len(jpgs["rocket"]) // 2]
    rows = [(f"{n}.jpg", d) for n, d in jpgs.items()]
    rows.insert(2, ("rocket_cut.jpg", cut))  # sample 2 of shard 0
    _write_raw_shards(tmp_path / "mixed", rows)

    cfg = cfg_for(tmp_path / "mixed", shuffle=False)
    ds = StreamDataset(cfg.streams["image_rec"], cfg)
    marker = ds.sample(2, epoch=0)
    assert marker["shard"] == "shard.00000.mds" and marker["index_in_shard"] == 2 and "truncated" in marker["error"]
    del ds

    loader = build_image_loader(cfg_for(tmp_path / "mixed", shuffle=False, max_bad_fraction=0.5))
    names = []
    with caplog.at_level(logging.WARNING, logger="atoken.data_pipeline.loader"):
        while len(names) < len(jpgs):
            names += next(loader).batch.names
    assert names[:len(jpgs)] == [f"{n}.jpg" for n in jpgs]  # the others all arrive, in order
    assert "rocket_cut.jpg" in caplog.text and "shard shard.00000.mds, index 2" in caplog.text
    assert loader.samples_bad == caplog.text.count("skipping undecodable sample 'rocket_cut.jpg'") >= 1
    assert loader.samples_seen == len(names) + loader.samples_bad
    loader.close()

    strict = build_image_loader(cfg_for(tmp_path / "mixed", local=str(tmp_path / "c1"), max_bad_fraction=0.0,
                                        bad_check_min_samples=1))
    with pytest.raises(UserError, match=r"1 of \d+ samples seen were undecodable.*rocket_cut.jpg.*shard.00000.mds"):
        for _ in range(10):
            next(strict)
    strict.close()

    # Only garbage: fails once ALL_BAD_MIN samples were seen, well before bad_check_min_samples.
    _write_raw_shards(tmp_path / "junk", [(f"junk{i}.jpg", b"\xff\xd8" + bytes(i)) for i in range(20)])
    junk = build_image_loader(cfg_for(tmp_path / "junk"))
    with pytest.raises(UserError, match=r"8 of 8 samples seen were undecodable \(100.0% > max_bad_fraction 1.0%\)"):
        next(junk)
    junk.close()
    # Mostly garbage: the fraction rule fires once bad_check_min_samples (100) were seen, epochs rolling over.
    _write_raw_shards(tmp_path / "mostly",
                      [("ok.jpg", jpgs["coffee"])] + [(f"junk{i}.jpg", bytes(i)) for i in range(20)])
    mostly = build_image_loader(cfg_for(tmp_path / "mostly", shuffle=False))  # one good sample first
    with pytest.raises(UserError, match=r"(9\d|100) of 10\d samples seen were undecodable"):
        for _ in range(10):
            next(mostly)
    mostly.close()


# ---------------------------------------------------------------- mix state at another data-parallel size


def test_resume_at_another_world_restarts_oldest_epoch(shards, tmp_path):
    """Positions saved by 2 data-parallel ranks, resumed by 1: the stream restarts the oldest epoch
    either rank was in (repeating, never losing), and the counters of rank 0 carry over."""
    out, _files = shards
    cfg = cfg_for(out)
    rank_states = [{"epoch": 1, "pos": 3, "rank": 0, "world": 2, "samples_seen": 14, "samples_bad": 1,
                    "tokens": 900, "batches": 4},
                   {"epoch": 2, "pos": 1, "rank": 1, "world": 2, "samples_seen": 16, "samples_bad": 0,
                    "tokens": 950, "batches": 4}]
    mixed = MixedLoader(cfg)
    mixed.load_state_dict({"world": 2, "order": mixed.order, "slot": 0, "streams": {"image_rec": rank_states}})
    loader = mixed.loaders["image_rec"]
    assert (loader.epoch, loader.pos, loader.samples_seen, loader.samples_bad) == (1, 0, 14, 1)
    first = next(mixed).batch
    want = [int(i) for i in loader.epoch_ids(1)[:first.num_samples]]
    ds = loader.dataset
    assert first.names == [ds.get_item(i)["name"] for i in want]
    mixed.close()
