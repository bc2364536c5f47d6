"""Images per second per CPU core of atoken-make-image-shards, from WebDataset tars and from Parquet,
and the cores that would convert 100M images in a day at that rate.

    OMP_NUM_THREADS=1 python benchmarks/ingest_throughput.py        # about a minute on an idle CPU

Inputs, made here in a temporary folder: the photos bundled with scikit-image and scikit-learn
(``tools.demo.bundled_photos``: 17 photos, 300x225 to 1024x1024) re-encoded as JPEG (quality 90, as
web crawls mostly are), repeated to ``--samples`` images, with a caption each: as img2dataset tars
(KEY.jpg, KEY.txt, KEY.json; ``--files`` tars) and as Hugging Face-style Parquet files (image struct
{bytes, path}, text; ``--files`` files). Each form is converted with the real writer
(``make_image_shards.convert``, ``--workers 1``: read, full decode with PIL, MDS write, all in this
one process) into a local folder; one untimed warm-up run, then ``--repeats`` timed runs (medians).
``images_per_s_per_core`` is images / wall time; ``images_per_cpu_s`` uses the process's CPU time
(what other processes on a busy machine do not take). ``cores_for_100M_per_day`` = 1e8 / 86400 /
the smaller per-CPU-second rate of the two forms (``..._from_wall_time``: of the wall-time rates): on
paper, a cluster of that many cores with ``--workers`` = cores per task. Reading from S3 adds network time
that is not measured here. The load average is recorded: on a shared machine the wall-time figure
is low; rerun on a quiet one.

Writes ``benchmarks/results/ingest_throughput_cpu.json`` (``--out`` changes it).
"""
from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from atoken.tools.demo import bundled_photos
from atoken.tools.make_image_shards import convert
from common import cpu_info, git_state, write_report


def jpegs(n: int) -> tuple[list[tuple[bytes, str]], float]:
    """``n`` (JPEG bytes, caption), cycling through the bundled photos; and their mean megapixels."""
    base, pixels = [], []
    for p in bundled_photos():
        buf = io.BytesIO()
        img = Image.open(p).convert("RGB")
        img.save(buf, format="JPEG", quality=90)
        base.append((buf.getvalue(), f"a photo: {p.stem}"))
        pixels.append(img.width * img.height)
    return [base[i % len(base)] for i in range(n)], sum(pixels[i % len(base)] for i in range(n)) / n / 1e6


def write_tars(folder: Path, samples: list[tuple[bytes, str]], files: int) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        with tarfile.open(folder / f"{f:05d}.tar", "w") as tar:
            for i in range(f, len(samples), files):
                data, caption = samples[i]
                for name, blob in ((f"{i:09d}.jpg", data), (f"{i:09d}.txt", caption.encode()),
                                   (f"{i:09d}.json", b'{"status": "success"}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))


def write_parquet(folder: Path, samples: list[tuple[bytes, str]], files: int) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        rows = [{"image": {"bytes": samples[i][0], "path": f"{i}.jpg"}, "text": samples[i][1]}
                for i in range(f, len(samples), files)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"train-{f:05d}.parquet", row_group_size=64)


def timed(src: Path, out: Path) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    written, rejected = convert(str(src), str(out), progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert not rejected, rejected[:3]
    return {"images": written, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "images_per_s_per_core": round(written / wall, 1), "images_per_cpu_s": round(written / cpu, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=680, help="images per form (default 680: 40 x 17 photos)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per form; the median is reported (default 3)")
    p.add_argument("--files", type=int, default=4, help="tars / Parquet files per form (default 4)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/ingest_throughput_cpu.json)")
    args = p.parse_args()
    started, load_start = datetime.now(UTC), os.getloadavg()
    samples, megapixels = jpegs(args.samples)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for form, write in (("webdataset", write_tars), ("parquet", write_parquet)):
            write(root / form, samples, args.files)
            timed(root / form, root / f"{form}_warmup")  # imports, first allocations
            runs = [timed(root / form, root / f"{form}_{r}") for r in range(args.repeats)]
            results[form] = {**{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "runs": runs}
            print(form, {k: v for k, v in results[form].items() if k != "runs"}, flush=True)
    per_cpu_s = min(r["images_per_cpu_s"] for r in results.values())
    per_wall_s = min(r["images_per_s_per_core"] for r in results.values())
    report = {
        "benchmark": "ingest_throughput", "timestamp": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(map(shlex.quote, [sys.executable, *sys.argv])), "device": cpu_info(),
        "load_average_1_5_15": {"start": list(load_start), "end": list(os.getloadavg())},
        "versions": {"python": sys.version.split()[0], "pillow": Image.__version__, "pyarrow": pa.__version__,
                     **git_state()},
        "inputs": {"images": args.samples, "files_per_form": args.files, "mean_jpeg_bytes":
                   round(sum(len(d) for d, _ in samples) / len(samples)), "mean_megapixels": round(megapixels, 3),
                   "source": "bundled photos as JPEG q90"},
        "results": results,
        # A core busy all day does images_per_cpu_s x 86400; the wall-time figure includes what other
        # processes on a shared machine took from this one.
        "cores_for_100M_per_day": round(1e8 / 86400 / per_cpu_s, 1),
        "cores_for_100M_per_day_from_wall_time": round(1e8 / 86400 / per_wall_s, 1),
    }
    print("cores for 100M images/day:", report["cores_for_100M_per_day"])
    print("wrote", write_report(report, args.out, "ingest_throughput_cpu.json"))


if __name__ == "__main__":
    main()
