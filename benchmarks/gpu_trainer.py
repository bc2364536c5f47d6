"""The trainer itself against its step benchmark (issue 14), phase by phase; ``gpu_trainer.sh`` runs it.

    python benchmarks/gpu_trainer.py all --mode gpu --work /tmp/gt   # a GPU machine (after the .sh installs)
    python benchmarks/gpu_trainer.py all --mode cpu --work /tmp/gt   # the same logic, tiny, on CPU

Phases (``all`` runs them in this order; each writes ``<work>/<phase>.json``, so a GPU session can
run them in separate calls while the machine stays up, then ``report``):
  shards     real photos bundled with scikit-image (and scikit-learn when installed) as MDS shards;
             ``chelsea.png`` held out for the reconstruction check.
  attention  ``benchmarks/attention.py``: every installed varlen kernel (fa4, torch_varlen, cudnn, ...)
             timed on one batch, fwd + bwd; the fastest of ``model.attention``'s backends is the one
             the later phases use when ``--attention`` is ``measured`` (the GPU default). On CPU: the
             backend ``auto`` picks, untimed.
  reference  ``benchmarks/train_step.py`` (the step benchmark, compiled on GPU) at every
             ``--budgets`` value: tokens/s, MFU and peak memory against the micro-batch token budget;
             at ``--budget`` one more step under torch.profiler, split into parts (``step_split.py``:
             perceptual loss, optimizer, DeepSpeed, EMA, attention, matmuls, elementwise).
  train      ``atoken-train`` stage 1 on the shards, ``--steps`` optimizer steps of one micro-batch
             of ``--budget`` tokens, checkpoint every ``--checkpoint-every``. The settings match the
             reference step: image reconstruction only, L1 + KL (LPIPS, Gram and CLIP terms off),
             no understanding head, compiled blocks, bf16 autocast (GPU). Measured from its logs,
             over the steps after ``--warmup`` (compilation): tokens/s (median of the log windows,
             the steps with a checkpoint left out), the fraction of wall time waiting for data, the
             checkpoint stall (seconds ``checkpoint.save`` blocked the loop), peak GPU memory.
  resume     the same run again, killed (SIGKILL) once the step after a checkpoint is logged, then
             started again in its run directory (it resumes from the latest checkpoint); its losses
             after the checkpoint against the straight run's: max relative difference.
  convert    ``atoken-convert`` of the straight run, then the held-out photo reconstructed on the
             device (PSNR).
  determinism  two short runs of the same stage-1 command with ``deterministic=true``, side by side
             (``--pair-steps`` steps of ``--pair-budget`` tokens, blocks not compiled, their
             checkpoints deleted once compared); their metrics.jsonl records
             compared field by field, wall-clock fields left out: identical or the first difference.
  drift      the same pair in the default (non-deterministic) mode: the per-step loss differences of
             two straight runs, the baseline that resume's differences are judged by.
  report     ``benchmarks/results/gpu_trainer_<device>.json`` (``--out`` changes it) with the fields
             issues 14 and 23 name. ``trainer_mfu`` is the reference's FLOPs per token (same model, same
             resolution policy) times the trainer's tokens/s over the peak FLOP/s. A phase that did not
             run leaves its fields null.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELD_OUT = "chelsea.png"
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
                  "motorcycle_right.png", "retina.jpg", "rocket.jpg"]
# Per mode: model, the reference's flags, the trainer's overrides. CPU: the logic at toy size.
MODES = {
    "gpu": {"model": "so400m", "budget": 16384, "budgets": "8192,16384,24576", "steps": 150, "every": 50,
            "warmup": 10, "reference": ["--compile", "--steps", "10", "--warmup", "3", "--lpips"],
            "train": ["parallel.compile=true", "precision=bf16"], "min_res": 64, "max_res": 512,
            "attention": "measured", "pair_steps": 4, "pair_budget": 4096},
    "cpu": {"model": "tiny", "budget": 256, "budgets": "128,256", "steps": 6, "every": 3, "warmup": 1,
            "reference": ["--depth", "1", "--steps", "2", "--warmup", "1", "--device", "cpu", "--lpips",
                          "--perceptual-size", "64"],
            "train": ["model.encoder.depth=1", "model.decoder.depth=1", "precision=fp32", "optim.warmup_steps=2",
                      "loss.perceptual_size=64"],
            "min_res": 32, "max_res": 128, "attention": "auto", "pair_steps": 3, "pair_budget": 128},
}


def run(cmd: list[str], log: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``, its output to ``log``; raise with the log's tail when it fails."""
    print("+", shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return proc


def write(args, phase: str, result: dict) -> None:
    (args.work / f"{phase}.json").write_text(json.dumps(result, indent=1))
    print(f"{phase}: {json.dumps(result)[:600]}", flush=True)


def read(args, phase: str) -> dict:
    return json.loads((args.work / f"{phase}.json").read_text())


def attention_backend(args) -> str:
    """``model.attention`` for the reference and the trainer: ``measured`` takes the attention phase's
    fastest backend (``auto`` before that phase has run); any other value is used as it is."""
    if args.attention != "measured":
        return args.attention
    done = args.work / "attention.json"
    return json.loads(done.read_text())["fastest"] if done.exists() else "auto"


# Fields of metrics.jsonl that are not numerics: wall-clock (tests/test_golden.py's set) and, on CUDA, the
# allocator's peak (two runs side by side may differ in workspaces without differing in any value).
VOLATILE = {"tokens_per_s", "data_wait", "peak_memory_gib"}


# ---------------------------------------------------------------- phases

def shards(args) -> None:
    import skimage.data  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it

    from atoken.tools.make_image_shards import write_image_shards  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it

    photos = [Path(skimage.data.data_dir) / n for n in SKIMAGE_PHOTOS]
    try:
        import sklearn.datasets  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it
        photos += [Path(f) for f in sklearn.datasets.load_sample_images().filenames]
    except ImportError:
        pass
    photos = [p for p in photos if p.exists()]
    folder, holdout = args.work / "photos", args.work / "holdout"
    for d in (folder, holdout, args.work / "shards"):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True) if d != args.work / "shards" else None
    for p in photos:
        shutil.copy(p, (holdout if p.name == HELD_OUT else folder) / p.name)
    written, rejected = write_image_shards(folder, str(args.work / "shards"), progress=False)
    write(args, "shards", {"photos": sorted(p.name for p in folder.iterdir()), "held_out": HELD_OUT,
                           "written": written, "rejected": [str(r) for r in rejected]})


def attention(args) -> None:
    import torch  # noqa: PLC0415 - the driver script runs its parts as subprocesses: torch only in those

    from atoken.model import attention as attn  # noqa: PLC0415 - likewise

    probe = torch.empty(1, 16, 72, device="cuda" if torch.cuda.is_available() else "cpu",
                        dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if not torch.cuda.is_available():  # nothing to time: auto's pick on these tensors
        write(args, "attention", {"fastest": attn.get_attention_backend(probe, "auto")[0], "timed": False})
        return
    # Values and gradients against SDPA first (packed mixed lengths, head_dim 72): a backend that fails
    # them is not a candidate, however fast.
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-m", "gpu", "-p", "no:cacheprovider",
                           str(HERE.parent / "tests" / "test_model.py"), "-k", "cuda_backends"],
                          capture_output=True, text=True, cwd=HERE.parent)
    (args.work / "attention_test.log").write_text(test.stdout + test.stderr)
    parity = {name: outcome for outcome, name in re.findall(
        r"^(PASSED|FAILED|SKIPPED|ERROR) \S*cuda_backends_match_sdpa_bf16\[(\w+)\]", test.stdout, re.M)}
    out = args.work / "attention_kernels.json"
    run([sys.executable, str(HERE / "attention.py"), "--out", str(out)], args.work / "attention.log")
    results = json.loads(out.read_text())["results"]
    ms = {n: r["fwd_bwd_s"] * 1e3 for n, r in results.items() if n in attn.BACKENDS and "fwd_bwd_s" in r}
    correct = {n: t for n, t in ms.items() if parity.get(n) == "PASSED"}
    fastest = min(correct, key=correct.get) if correct else "auto"
    write(args, "attention", {"fastest": fastest, "timed": True, "fwd_bwd_ms": ms, "parity_test": parity,
                              "kernels_json": str(out), "errors": {n: r["error"] for n, r in results.items()
                                                                   if "error" in r}})


def reference(args) -> None:
    m = MODES[args.mode]
    sweep, profile = [], None
    for budget in sorted({*map(int, args.budgets.split(",")), args.budget}):
        out = args.work / f"reference_{budget}.json"
        run([sys.executable, str(HERE / "train_step.py"), "--models", m["model"], "--tokens", str(budget),
             "--no-padded", "--min-res", str(m["min_res"]), "--max-res", str(m["max_res"]), *m["reference"],
             "--trunk-weights", args.trunk_weights, "--attention", attention_backend(args),
             *(["--profile", str(args.work / "profile")] if budget == args.budget else []),
             "--out", str(out)], args.work / f"reference_{budget}.log")
        r = json.loads(out.read_text())
        row = r["results"][0]
        sweep.append({"token_budget": budget, "tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"],
                      "step_s": row["step_s"], "memory": row["memory"], "flops_per_step": row["flops"]["total"],
                      "peak_flops": r["peak_flops"], "attention_backend": r["attention_backend"],
                      "command": r["command"]})
        if "profile" in row:
            profile = {"token_budget": budget, "labels": row["profile_labels"], **row["profile"]["split"],
                       "top": row["profile"]["top"][:15]}
    write(args, "reference", {"sweep": sweep, "profile": profile, "command": shlex.join([sys.executable, *sys.argv])})


def trainer_command(args, run_dir: Path, budget: int | None = None, steps: int | None = None,
                    extra: tuple[str, ...] = ()) -> list[str]:
    m = MODES[args.mode]
    budget, steps = budget or args.budget, steps or args.steps
    sets = [f"model={m['model']}", "model.understanding=false", "data.streams.image_und=null",
            f"data.streams.image_rec.remote={args.work / 'shards'}", f"data.streams.image_rec.token_budget={budget}",
            f"data.streams.image_rec.min_res={m['min_res']}", f"data.streams.image_rec.max_res={m['max_res']}",
            f"loss.trunk_weights={args.trunk_weights}", f"model.attention={attention_backend(args)}",
            "loss.clip_weight=0", "mix_rounds=1",
            f"steps={steps}", f"checkpoint.every={args.checkpoint_every}", "checkpoint.keep=1", "log.every=1",
            "log.wandb_mode=disabled", f"run_dir={run_dir}", *m["train"], *args.set, *extra]
    return [sys.executable, "-m", "atoken.training.train", "--config", "stage1",
            *[a for s in sets for a in ("--set", s)]]


def records(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    steps = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    return steps, [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def train(args) -> None:
    run_dir = args.work / "run_straight"
    cmd = trainer_command(args, run_dir)
    t0 = time.perf_counter()
    run(cmd, args.work / "train.log", env={**os.environ, "TMPDIR": str(args.work)})
    wall = time.perf_counter() - t0
    steps, events = records(run_dir)
    chosen = re.findall(r"attention backend: (\w+)", (args.work / "train.log").read_text())
    # The loop's stall per save: ``stall_s`` where saves are asynchronous (the write goes on in the
    # background), else ``seconds`` (the whole synchronous save).
    saved = {e["step"]: e.get("stall_s", e.get("seconds")) for e in events if e["event"] == "checkpoint"}
    # Steady state: after the compile warm-up; a step whose window held a checkpoint save is left out.
    steady = [r for s, r in sorted(steps.items()) if s > args.warmup and s - 1 not in saved]
    if not steady:
        raise SystemExit(f"no steady steps: {len(steps)} logged, warm-up {args.warmup}")
    write(args, "train", {
        "command": shlex.join(cmd), "wall_s": wall, "steps": len(steps), "steady_steps": len(steady),
        "attention_backend": chosen[0] if chosen else attention_backend(args),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "data_wait_fraction": statistics.mean(r["data_wait"] for r in steady),
        "checkpoint_stall_s": statistics.mean(saved.values()) if saved else None,
        "checkpoint_stall_max_s": max(saved.values()) if saved else None,
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0.0) for r in steps.values()) or None,
        "pack_fill": statistics.mean(r["pack_fill"] for r in steady),
        "losses": {s: r["loss"] for s, r in steps.items()}})


def resume(args) -> None:
    straight = read(args, "train")["losses"]
    run_dir, cut = args.work / "run_killed", args.checkpoint_every
    cmd = trainer_command(args, run_dir)
    env = {**os.environ, "TMPDIR": str(args.work)}
    print("+", shlex.join(cmd), "(killed after step", cut + 1, ")", flush=True)
    with open(args.work / "resume_killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None:  # kill once the step after the checkpoint is logged
            if metrics.exists() and any(json.loads(line).get("step", 0) > cut
                                        for line in metrics.read_text().splitlines()):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        proc.wait()
    if proc.returncode == 0:
        raise SystemExit("the run to kill finished before it was killed: lower --checkpoint-every")
    run(cmd, args.work / "resume.log", env=env)  # the same command: resumes from the latest checkpoint
    steps, events = records(run_dir)
    resumed_from = [e["step"] for e in events if e["event"] == "resume"]
    after = {s: r["loss"] for s, r in steps.items() if s > cut}
    diffs = {s: abs(loss - straight[str(s)]) / max(abs(straight[str(s)]), 1e-12) for s, loss in after.items()}
    write(args, "resume", {"command": shlex.join(cmd), "killed_after_step": cut + 1, "resumed_from": resumed_from,
                           "compared_steps": sorted(diffs), "max_rel_loss_diff": max(diffs.values()),
                           "losses_straight": {s: straight[str(s)] for s in sorted(after)},
                           "losses_resumed": {s: after[s] for s in sorted(after)}})


def pair(args, name: str, extra: tuple[str, ...]) -> dict:
    """Two runs of one short command, side by side (one H100 holds two so400m runs at 4096 tokens), compared."""
    cmds = [trainer_command(args, args.work / f"run_{name}_{i}", args.pair_budget, args.pair_steps,
                            ("parallel.compile=false", f"checkpoint.every={args.pair_steps}", *extra))
            for i in (1, 2)]
    for i in (1, 2):
        shutil.rmtree(args.work / f"run_{name}_{i}", ignore_errors=True)
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            run(cmds[i - 1], args.work / f"{name}_{i}.log", env={**os.environ, "TMPDIR": str(args.work)})
        except BaseException as e:  # noqa: BLE001 - SystemExit with the log's tail: reported below
            errors.append(e)
    threads = [threading.Thread(target=go, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(str(errors[0]))
    a, b = (records(args.work / f"run_{name}_{i}")[0] for i in (1, 2))
    for i in (1, 2):  # the last step always saves: so400m's 16 GB each, on a 64 GiB disk
        shutil.rmtree(args.work / f"run_{name}_{i}" / "checkpoints", ignore_errors=True)
    diffs = {s: {k: (a[s][k], b[s].get(k)) for k in a[s] if k not in VOLATILE and a[s][k] != b[s].get(k)}
             for s in sorted(a)}
    rel = {s: abs(a[s]["loss"] - b[s]["loss"]) / max(abs(a[s]["loss"]), 1e-12) for s in sorted(a) if s in b}
    first = next((s for s, d in diffs.items() if d), None)
    return {"command": shlex.join(cmds[0]), "steps": sorted(a), "identical": set(a) == set(b) and first is None,
            "compared_fields": sorted({k for r in a.values() for k in r} - VOLATILE),
            "first_different_step": first, "first_difference": diffs.get(first),
            "max_rel_loss_diff": max(rel.values()) if rel else None, "rel_loss_diff": rel}


def _pair_phase(args, phase: str, extra: tuple[str, ...]) -> None:
    try:
        result = pair(args, phase, extra)
    except SystemExit as e:  # a run failed (e.g. an op without a deterministic CUDA kernel): recorded
        write(args, phase, {"identical": None, "error": str(e)[-2000:]})
        raise
    write(args, phase, result)


def determinism(args) -> None:
    _pair_phase(args, "determinism", ("deterministic=true",))


def drift(args) -> None:
    _pair_phase(args, "drift", ())


def convert(args) -> None:
    import torch  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it

    from atoken.model import Tokenizer  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it
    from atoken.tools.file_reconstruction import reconstruct_files  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it
    from atoken.training.inference_export import convert as convert_run  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it

    out = args.work / "inference"
    convert_run(args.work / "run_straight", out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.from_pretrained(out, device=device)
    psnr = reconstruct_files(tok, [args.work / "holdout" / HELD_OUT], args.work / "reconstructions")[HELD_OUT]
    write(args, "convert", {"inference_dir": str(out), "device": device, "held_out": HELD_OUT, "psnr_db": psnr})


def report(args) -> None:
    sys.path.insert(0, str(HERE))
    import torch  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it

    from common import device_slug, git_state, write_report  # noqa: PLC0415 - benchmarks/ is put on sys.path just above

    ref, tr = read(args, "reference"), read(args, "train")
    done = {p: read(args, p) for p in ("resume", "convert", "attention", "determinism", "drift")
            if (args.work / f"{p}.json").exists()}
    at = next(r for r in ref["sweep"] if r["token_budget"] == args.budget)
    flops_per_token = at["flops_per_step"] / args.budget
    info = {"type": "cuda", "name": torch.cuda.get_device_name()} if torch.cuda.is_available() else {"type": "cpu"}
    device = info.get("name", "cpu")
    result = {
        "benchmark": "gpu_trainer", "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device, "mode": args.mode,
        "command": shlex.join(["benchmarks/gpu_trainer.sh", *sys.argv[1:]]),
        "token_budget": args.budget, "reference_tokens_per_s": at["tokens_per_s"], "reference_mfu": at["mfu"],
        "trainer_tokens_per_s": tr["tokens_per_s"],
        "trainer_vs_reference": tr["tokens_per_s"] / at["tokens_per_s"],
        "trainer_mfu": flops_per_token * tr["tokens_per_s"] / at["peak_flops"],
        "perceptual_fraction": (ref.get("profile") or {}).get("perceptual_fraction"),
        "attention_backend": tr.get("attention_backend", at.get("attention_backend")),
        "deterministic_identical": done.get("determinism", {}).get("identical"),
        "default_mode_max_rel_loss_diff": done.get("drift", {}).get("max_rel_loss_diff"),
        "data_wait_fraction": tr["data_wait_fraction"], "checkpoint_stall_s": tr["checkpoint_stall_s"],
        "peak_memory_gib": tr["peak_memory_gib"],
        "resume_max_rel_loss_diff": done.get("resume", {}).get("max_rel_loss_diff"),
        "holdout_psnr_db": done.get("convert", {}).get("psnr_db"),
        "budget_sweep": ref["sweep"], "profile": ref.get("profile"),
        "train": {k: v for k, v in tr.items() if k != "losses"},
        "resume": done.get("resume"), "convert": done.get("convert"), "attention": done.get("attention"),
        "determinism": done.get("determinism"), "drift": done.get("drift"), "versions": {"torch": torch.__version__,
                                                                                 **git_state()},
    }
    out = write_report(result, args.out, f"gpu_trainer_{device_slug(info)}.json")
    print(f"wrote {out}")


PHASES = {"shards": shards, "attention": attention, "reference": reference, "train": train, "resume": resume,
          "convert": convert, "determinism": determinism, "drift": drift, "report": report}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=[*PHASES, "all"])
    p.add_argument("--mode", choices=sorted(MODES), default="gpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_trainer"), help="working folder")
    p.add_argument("--budget", type=int, help="the trainer's tokens per micro-batch (gpu 16384, cpu 256)")
    p.add_argument("--budgets", help="the reference's sweep of token budgets, comma-separated")
    p.add_argument("--steps", type=int, help="optimizer steps of the trainer (gpu 150, cpu 6)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (gpu 50, cpu 3)")
    p.add_argument("--warmup", type=int, help="steps left out of the trainer's speed (gpu 10, cpu 1)")
    p.add_argument("--trunk-weights", default=os.environ.get("ATOKEN_TRUNK_WEIGHTS"),
                   help="the perceptual trunk file (default $ATOKEN_TRUNK_WEIGHTS, else stlpips-pytorch's alex)")
    p.add_argument("--attention", help="model.attention of the reference and the trainer: a backend, auto, or "
                                       "measured (the attention phase's fastest; the gpu default; cpu auto)")
    p.add_argument("--pair-steps", type=int, help="steps of each determinism / drift run (gpu 4, cpu 3)")
    p.add_argument("--pair-budget", type=int, help="tokens per micro-batch of those runs (gpu 4096, cpu 128)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more trainer overrides")
    p.add_argument("--out", help="JSON path (default benchmarks/results/gpu_trainer_<device>.json)")
    args = p.parse_args(argv)
    m = MODES[args.mode]
    for key, default in (("budget", "budget"), ("budgets", "budgets"), ("steps", "steps"),
                         ("checkpoint_every", "every"), ("warmup", "warmup"), ("attention", "attention"),
                         ("pair_steps", "pair_steps"), ("pair_budget", "pair_budget")):
        if getattr(args, key) is None:
            setattr(args, key, m[default])
    if args.trunk_weights is None:
        from atoken.model.perceptual import stlpips_file  # noqa: PLC0415 - the driver runs without torch: the phase that needs it imports it
        args.trunk_weights = stlpips_file("alex")
    if not args.trunk_weights or not Path(args.trunk_weights).is_file():
        p.error(f"no perceptual trunk file ({args.trunk_weights}): pass --trunk-weights or set ATOKEN_TRUNK_WEIGHTS")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for phase in (PHASES if args.phase == "all" else [args.phase]):
        t0 = time.perf_counter()
        PHASES[phase](args)
        print(f"[{phase} done in {time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
