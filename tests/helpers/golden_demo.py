"""The golden run: 20 deterministic steps of the ``demo`` config on the bundled photos, and how two
runs' logged values are compared.

A run is bit-exact on the machine that wrote ``golden/demo_20_steps.json`` (same CPU vendor, model
and kernel capability, torch, threads). Elsewhere matmuls and convolutions round differently (MKL and
oneDNN pick kernels by CPU), so the comparison is within a relative tolerance per step, which the file
records together with how it was derived: ``drift`` measures how far each step's values move when only
the kernels change, and ``write`` sets step s's tolerance to ``SAFETY`` times the largest drift measured
at any step up to s. Training amplifies a rounding difference (measured: ~1e-7 at step 1, percents by
step 20), so the early steps carry the sharp check and the late ones a loose one.

    python tests/helpers/golden_demo.py drift   # -> golden/drift_cpu.json: runs under other kernels, thread counts
    python tests/helpers/golden_demo.py write   # regenerate the golden file on this machine (say why in the commit)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from atoken.tools.demo import HELD_OUT, bundled_photos
from atoken.tools.make_image_shards import write_image_shards

GOLDEN_DIR = Path(__file__).parents[1] / "golden"
GOLDEN = GOLDEN_DIR / "demo_20_steps.json"
DRIFT = GOLDEN_DIR / "drift_cpu.json"
STEPS = 20
THREADS = 2
VOLATILE = {"tokens_per_s", "data_wait"}  # wall-clock, not numerics: add any new timing metric here
# Values that no kernel choice can move (step, token counts, fill, the data hash, the schedule's lr):
# compared exactly everywhere. Every other value is a float computed by the model.
EXACT = {"step", "tokens", "samples_bad", "pack_fill", "data", "lr"}
SAFETY = 10.0  # tolerance of step s = SAFETY x the largest drift measured up to step s (see ``drift``)
# Kernel variants of one machine that round differently from its default: each stands for a machine of
# another kind (no AVX-512, another thread count). The cross-vendor drift is measured once by hand and
# given to ``drift`` with --against.
VARIANTS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
            "threads1": {"OMP_NUM_THREADS": "1"}}


def machine() -> dict:
    """What decides the rounding of a CPU run: the processor (by its CPUID, cache and instruction set:
    a virtual machine may name only "AMD EPYC"), torch's kernel choice (MKL blocks by cache size), threads."""
    info = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's
    return {"arch": platform.machine(), "vendor": info.get("vendor_id", ""), "cpu": info.get("model name", ""),
            "family/model/stepping": "/".join(info.get(k, "") for k in ("cpu family", "model", "stepping")),
            "cache": info.get("cache size", ""), "flags": hashlib.sha1(info.get("flags", "").encode()).hexdigest()[:12],
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "threads": THREADS}


def run_demo(workdir: Path, sets: list[str] = (), env: dict | None = None) -> list[dict]:
    """Trains ``STEPS`` deterministic demo steps in ``workdir``; returns each step's logged values."""
    photos = [p for p in bundled_photos() if p.name != HELD_OUT]
    shards = workdir / "shards"
    if not shards.exists():
        written, rejected = write_image_shards(photos, str(shards), progress=False)
        assert written == len(photos) and not rejected
    run = workdir / "run"
    args = ["deterministic=true", f"steps={STEPS}", "log.every=1", "log.eval_every=1000", "checkpoint.every=1000",
            "log.wandb_mode=disabled", f"run_dir={run}", f"data.remote={shards}", f"data.local={workdir / 'cache'}",
            *sets]
    env = {**os.environ, "TMPDIR": str(workdir), "OMP_NUM_THREADS": str(THREADS), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "atoken.training.train", "--config", "demo",
                           *[a for s in args for a in ("--set", s)]], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [{k: v for k, v in r.items() if k not in VOLATILE}
               for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return records


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def mismatches(want: list[dict], got: list[dict], rtol: list[float]) -> list[str]:
    """Every value that differs: exactly (step i's ``rtol[i]`` = 0, or the EXACT fields), else by more
    than rtol[i] relative. One line per step, empty when they agree."""
    if len(want) != len(got):
        return [f"{len(got)} steps logged, {len(want)} expected"]
    out = []
    for w, g, tol in zip(want, got, rtol, strict=True):
        bad = [k for k in sorted(w.keys() | g.keys())
               if (k not in w or k not in g) or (w[k] != g[k] if tol == 0 or k in EXACT
                                                 else rel_diff(w[k], g[k]) > tol)]
        if bad:
            out.append(f"step {w['step']}: " + ", ".join(f"{k} {w.get(k)!r} -> {g.get(k)!r}" for k in bad))
    return out


def drift(want: list[dict], got: list[dict], skip=EXACT) -> list[float]:
    """Per step, the largest relative difference over the float values (those not in ``skip``)."""
    return [max(rel_diff(w[k], g[k]) for k in w if k not in skip) for w, g in zip(want, got, strict=True)]


def load() -> dict:
    return json.loads(GOLDEN.read_text())


def tolerance(golden: dict) -> list[float]:
    """Per step: 0 (bit for bit) on the machine that wrote the golden file, its recorded rtol elsewhere."""
    return [0.0] * len(golden["rtol"]) if golden["machine"] == machine() else golden["rtol"]


def measure_drift(against: list[Path]) -> dict:
    """Runs the golden steps at this machine's default and under each kernel variant; the drift of each
    from the default, and of each ``against`` metrics file (a run on another machine) from it."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = run_demo(Path(tmp) / "default")
        for name, env in VARIANTS.items():
            runs[name] = run_demo(Path(tmp) / name, env=env)
    for path in against:
        other = json.loads(path.read_text())
        runs[f"file:{path.name}"] = other["steps"] if isinstance(other, dict) else other
    for name, run in runs.items():  # the same data, tokens and schedule: only rounding may differ
        assert not mismatches(*[[{k: r[k] for k in EXACT} for r in rs] for rs in (base, run)], [0.0] * STEPS), name
    return {"machine": machine(), "steps": STEPS, "variants": VARIANTS,
            "rel_drift_per_step": {name: drift(base, run) for name, run in runs.items()},
            "command": "python tests/helpers/golden_demo.py drift " + " ".join(f"--against {p}" for p in against)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["drift", "write"])
    p.add_argument("--against", type=Path, action="append", default=[],
                   help="drift: also compare with these runs' values (a golden file written on another machine)")
    args = p.parse_args()
    if args.what == "drift":
        DRIFT.write_text(json.dumps(measure_drift(args.against), indent=1) + "\n")
        print(DRIFT.read_text())
        return
    measured = json.loads(DRIFT.read_text())["rel_drift_per_step"].values()
    worst = [max(max(d[: s + 1]) for d in measured) for s in range(STEPS)]  # the envelope up to step s
    with tempfile.TemporaryDirectory() as tmp:
        steps = run_demo(Path(tmp))
    GOLDEN.write_text(json.dumps({
        "machine": machine(), "rtol": [SAFETY * w for w in worst],
        "rtol_source": f"per step, {SAFETY:g} x the largest drift up to that step in {DRIFT.name}", "steps": steps},
        indent=1) + "\n")
    print(f"wrote {GOLDEN} (rtol {SAFETY * worst[0]:.3g} at step 1 .. {SAFETY * worst[-1]:.3g} at step {STEPS})")


if __name__ == "__main__":
    main()
