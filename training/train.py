"""Train one curriculum stage: ``python -m atoken.training.train --config stage1 --set key=value``.

The entry (config, checks) and the step; the run itself, top to bottom, is ``loop.run``: process group,
model and losses, DeepSpeed engine, data, resume, then the loop (step, log, evaluate, checkpoint). The
same entry point runs as one process, under torchrun, or under srun.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from atoken.model.errors import cli

from . import determinism
from .config import RunConfig, apply_override, load_yaml
from .stages import CONFIGS

# NOTE: DeepSpeed, the model and the data pipeline (preflight, loop) are imported in ``main`` after the
# arguments are parsed and checked: ``--help`` and a mistake in the command answer in seconds.

log = logging.getLogger("atoken.train")


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(
        prog="atoken-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  atoken-train --config demo\n"
               "  atoken-train --config stage1 --set model=base --set data.remote=s3://bucket/images "
               "--set run_dir=/scratch/runs/s1\n  atoken-train --config runs/s1/config.yaml --set steps=1000")
    p.add_argument("--config", default="stage1",
                   help=f"a named config ({', '.join(sorted(CONFIGS))}) or a YAML file written by a previous run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. optim.lr=1e-4, data.max_res=256, model=tiny (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    try:
        if args.config not in CONFIGS and not Path(args.config).is_file():
            raise ValueError(f"--config {args.config!r} is neither a named config ({', '.join(sorted(CONFIGS))}) "
                             "nor a YAML file")
        cfg = CONFIGS[args.config]() if args.config in CONFIGS else load_yaml(args.config)
        for item in args.overrides:
            apply_override(cfg, item)
    except (ValueError, TypeError, OSError) as e:
        p.error(str(e))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        raise SystemExit(0)
    return cfg


def micro_step(engine, objective, batch, extras, tasks: tuple[str, ...], noise, amp) -> dict:
    """One packed micro-batch (already on the device) through the engine: forward, the objective's
    terms ("total" among them, still attached to the graph), backward, and ``engine.step()``, which
    steps the optimizer only at the accumulation boundary. The benchmarks time this same function."""
    with amp:
        out = engine(batch, generator=noise, tasks=tasks)
        losses = objective(engine.module, batch, out, extras, tasks)
    engine.backward(losses["total"])
    engine.step()
    return losses


def train_step(engine, objective, loader, noise, amp) -> tuple[dict, int, list[str], float]:
    """One optimizer step: the task mix's micro-batches in its round-robin order (``loader.order``,
    ``cfg.micro_batches_per_step`` of them), each through the heads and losses of its stream's task.
    Returns detached mean losses, tokens, sample names and the seconds spent waiting for data."""
    totals, tokens, names, waited = {}, 0, [], 0.0
    n = loader.micro_batches_per_step
    for _ in range(n):
        t0 = time.perf_counter()
        micro = next(loader)  # already on the device (the next one's copy queued behind it)
        waited += time.perf_counter() - t0
        batch, tasks = micro.batch, (micro.stream.task,)
        tokens, names = tokens + batch.num_tokens, names + batch.names
        losses = micro_step(engine, objective, batch, micro.extras, tasks, noise, amp)
        for k, v in losses.items():
            if v.requires_grad:  # NOTE: a term of a task not run is a constant zero: not logged at all
                totals[k] = totals.get(k, 0.0) + v.detach().float() / n
        # Per stream, its task's own term (reconstruction or semantic), averaged over its micro-batches.
        term = "rec" if micro.stream.task == "rec" else "sem"
        key = f"{micro.stream.name}/{term}"
        totals[key] = totals.get(key, 0.0) + losses[term].detach().float() / loader.order.count(micro.stream.name)
    return totals, tokens, names, waited


def data_metrics(loader) -> dict:
    """Packing fill over all streams, and per stream its bad samples and fill."""
    stats = loader.stats()
    budget = sum(st["batches"] * loader.loaders[name].stream.token_budget for name, st in stats.items())
    out = {"pack_fill": sum(st["tokens"] for st in stats.values()) / budget if budget else 0.0}
    for name, st in stats.items():
        out[f"data/{name}/samples_bad"], out[f"data/{name}/fill"] = st["samples_bad"], st["fill"]
    return out


def memory_metrics(device) -> dict:
    """Peak GPU memory allocated so far (CUDA only)."""
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


@cli  # a UserError (preflight's, or any later one) is one line on stderr and exit status 2
def main(argv=None) -> None:
    cfg = parse_args(argv)
    from . import preflight  # noqa: PLC0415 - the checks reach storage and DeepSpeed: after parsing, --help is fast
    # Every mistake that can be found before building anything is found here, in seconds.
    resume_from = preflight.check_run(cfg)
    if cfg.deterministic:
        determinism.enable()
    from .loop import run  # noqa: PLC0415 - the model and DeepSpeed after the checks: a refused run builds nothing
    run(cfg, resume_from)


if __name__ == "__main__":
    main()
