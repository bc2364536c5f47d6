"""Train one curriculum stage: ``python -m atoken.training.train --config stage1 --set key=value``.

Reads top to bottom: config, process group, model and losses, DeepSpeed engine, data, resume, then
the loop (step, log, evaluate, checkpoint). The same entry point runs as one process, under
torchrun, or under srun.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import time
from pathlib import Path

from atoken.model.errors import UserError, cli

from .config import RunConfig, apply_override, load_yaml
from .stages import CONFIGS

# NOTE: torch, DeepSpeed, the model, the data pipeline and the checks are imported in ``main`` after the
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


def micro_step(engine, objective, batch, extras, tasks: tuple[str, ...], noise, amp, before_update=None) -> dict:
    """One packed micro-batch (already on the device) through the engine: forward, the objective's
    terms ("total" among them, still attached to the graph), backward, and ``engine.step()``, which
    steps the optimizer only at the accumulation boundary. The benchmarks time this same function.

    ``before_update(losses)``, given at the step's last micro-batch, runs between its forward and its
    backward; True: the step must not be applied, and its backward goes through ``total * nan``, which
    DeepSpeed's non-finite gradient check turns into a skipped update (training/guards.py)."""
    with amp:
        out = engine(batch, generator=noise, tasks=tasks)
        losses = objective(batch, out, extras, tasks)
    drop = before_update(losses) if before_update is not None else False
    engine.backward(losses["total"] * math.nan if drop else losses["total"])
    engine.step()
    return losses


def train_step(engine, objective, loader, noise, amp, step: int, checks=None, watchdog=None, faults=None
               ) -> tuple[dict, int, list[str], float, list[dict]]:
    """One optimizer step: the task mix's micro-batches in its round-robin order (``loader.order``,
    ``cfg.micro_batches_per_step`` of them), each through the heads and losses of its stream's task.
    Returns detached mean losses, tokens, sample names, the seconds spent waiting for data, and per
    micro-batch its stream, sample indices and names, and whether its loss was finite (a 0-dim tensor).
    ``checks.before_update`` decides, before the last backward, whether the step is applied (guards.py);
    ``watchdog.beat`` counts each micro-batch (watchdog.py); ``faults`` are the tests' (faults.py)."""
    totals, tokens, names, waited, micros = {}, 0, [], 0.0, []
    n = loader.micro_batches_per_step

    def term_of(name: str) -> str:
        return objective.TASK_TERM[loader.loaders[name].stream.task]

    for i in range(n):
        t0 = time.perf_counter()
        micro = next(loader)  # already on the device (the next one's copy queued behind it)
        waited += time.perf_counter() - t0
        if faults is not None:
            faults.inject(step, micro)
        batch, tasks = micro.batch, (micro.stream.task,)
        tokens, names = tokens + batch.num_tokens, names + batch.names

        def account(losses, last=i == n - 1, stream=micro.stream, micro=micro, batch=batch, waited=waited):
            for k, v in losses.items():
                if v.requires_grad:  # NOTE: a term of a task not run is a constant zero: not logged at all
                    totals[k] = totals.get(k, 0.0) + v.detach().float() / n
            # Per stream, its task's own term (reconstruction or semantic), averaged over its micro-batches.
            term = term_of(stream.name)
            key = f"{stream.name}/{term}"
            totals[key] = totals.get(key, 0.0) + losses[term].detach().float() / loader.order.count(stream.name)
            micros.append({"stream": stream.name, "indices": micro.indices or [], "names": batch.names,
                           "finite": losses["total"].detach().isfinite().all()})
            if not (last and checks is not None):
                return False
            per_stream = {name: totals[f"{name}/{term_of(name)}"] for name in loader.loaders
                          if f"{name}/{term_of(name)}" in totals}
            nonfinite = sum((~m["finite"]).int() for m in micros)
            return checks.before_update(per_stream, nonfinite, waited)

        micro_step(engine, objective, batch, micro.extras, tasks, noise, amp, before_update=account)
        if watchdog is not None:
            watchdog.beat(batch.num_tokens)
    return totals, tokens, names, waited, micros


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
    import torch

    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


def evaluate(model, ema, images: dict, device, amp) -> tuple[dict, list]:
    """Held-out PSNR of the EMA weights (what atoken-convert exports by default)."""
    from atoken.model.metrics import psnr
    from atoken.model.tokenizer import Tokenizer

    with ema.applied_to(model), amp:
        recons = Tokenizer(model, device).reconstruct(list(images.values()))
    model.train()
    return {name: psnr(x, y) for (name, x), y in zip(images.items(), recons, strict=True)}, recons


@cli  # a UserError (preflight's, or any later one) is one line on stderr and exit status 2
def main(argv=None) -> None:
    cfg = parse_args(argv)
    # Every mistake that can be found before building anything is found here, in seconds.
    from . import determinism, preflight  # the checks reach storage (streaming) and torch: after parsing

    resume_from = preflight.check_run(cfg)
    if cfg.deterministic:
        determinism.enable()
    import torch

    from atoken.data_pipeline import MixedLoader
    from atoken.data_pipeline.config import cpus_per_task
    from atoken.model import AToken
    from atoken.model.attention import log_attention_backend
    from atoken.model.objective import Objective

    from . import checkpoint, distributed, handoff
    from .batch import describe, step_batches
    from .ema import EMA
    from .engine import precision
    from .exchange import StepExchange
    from .faults import ENV as FAULTS_ENV
    from .faults import Faults
    from .guards import OK, SPIKE, StepChecks, nonfinite_state
    from .holdout import load_images
    from .logger import RunLogger
    from .parallelize import init_parallel, parallelize, prepare_loss
    from .preemption import StopSignals
    from .watchdog import Watchdog

    dist_info = distributed.init()
    signals = StopSignals()  # from here on SIGUSR1/SIGTERM mean: checkpoint after this step, then exit
    logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                        format=f"[%(asctime)s r{dist_info.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_dir, device = Path(cfg.run_dir), dist_info.device
    ckpt_dir = run_dir / "checkpoints"
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        log.info("resolved config:\n%s", cfg.to_yaml())

    dims = init_parallel(cfg.parallel.tp, cfg.parallel.sequence_parallel, cfg.seed)
    # mix_rounds=0 (auto): rounds of the mix per step follow from the data-parallel size (batch.py).
    cfg = cfg.with_rounds(dims.dp)
    loading = (f"data: {cfg.data.workers_per_stream} decode worker(s) per stream ({cpus_per_task()} CPUs for this "
               f"rank), {cfg.data.prefetch} micro-batch(es) packed ahead per stream, copied to {device} one ahead")
    log.info("%s", describe(step_batches(cfg.data.streams, cfg.mix_rounds, dims.dp), dims.dp, cfg.mix_rounds,
                            cfg.reference_gpus, loading))
    torch.manual_seed(cfg.seed)  # the same weights on every rank
    model = AToken(cfg.model)  # plain, built once, on the CPU
    # A run's own checkpoint (``resume_from``) wins; otherwise a later stage starts from the stage
    # before (handoff.py), loaded into the plain model before it is sharded.
    init_record = None
    if resume_from is None and cfg.checkpoint.init_from:
        init_record = handoff.apply(model, cfg.model, cfg.checkpoint.init_from, cfg.checkpoint.init_weights)
    # The semantic losses score against the whole data-parallel micro-batch (gathered over dp_group).
    # The 3D term renders with the model's backend.
    render_backend = cfg.model.gaussian.render_backend if cfg.model.gaussian else None
    objective = Objective.from_config(cfg.loss, group=dims.dp_group if dims.dp > 1 else None,
                                      render_backend=render_backend).to(device)
    # Parallelism is applied here and only here (training/parallelize.py): TP/SP, activation
    # checkpointing, compile, then the DeepSpeed engine (ZeRO over the data-parallel group).
    engine = parallelize(model, dims, cfg, device)
    prepare_loss(objective, cfg, device)  # the perceptual net: channels_last, compiled (on CUDA)
    ema = EMA(model, cfg.optim.ema_decay)
    # Per data-parallel rank from here on; the TP ranks of a group must agree (same batch, same noise).
    torch.manual_seed(cfg.seed + 1 + dims.dp_rank)
    # The posterior's noise has its own stream, checkpointed per rank: whatever else draws from the
    # global RNG (DataLoader iterators do) cannot shift it, so a resumed run samples the same noise.
    noise = torch.Generator(device).manual_seed(cfg.seed + 1 + dims.dp_rank)
    # The streams were checked by preflight (clear errors, not deep in a worker). The ranks of a TP
    # group share a data-parallel rank, so they read the same samples. Decoding and packing run
    # ahead in worker processes and a thread per stream; micro-batches reach the device one ahead.
    loader = MixedLoader(cfg.data, cfg.mix_rounds, rank=dims.dp_rank, world=dims.dp, group=dims.dp_group,
                         device=device)
    amp = precision(cfg, device)
    # The attention kernel, logged once at start (compiled blocks log nothing while traced).
    probe = torch.empty(1, cfg.model.encoder.head_dim, device=device,
                        dtype=amp.fast_dtype if isinstance(amp, torch.autocast) else torch.float32)
    log_attention_backend(probe, cfg.model.attention)

    start = 0
    if resume_from is not None:
        state = checkpoint.load(engine, ema, dims, {"noise": noise}, resume_from)
        start = state["step"]
        loader.load_state_dict(state["data"])  # every DP rank's position in every stream
    logger = RunLogger(cfg, run_dir, start, enabled=dist_info.is_main)
    if init_record:
        logger.event("init_from", **init_record)
    holdout = load_images(cfg.log.eval_images) if cfg.log.eval_images else {}

    def run_eval(step: int) -> None:
        if holdout:  # every rank: with TP the forward is collective; rank 0 logs
            psnrs, recons = evaluate(model, ema, holdout, device, amp)
            logger.eval(step, psnrs, list(holdout.values()), recons)

    # The step's guards (guards.py): one small exchange per step before the update (stop signals,
    # losses, every straggler_every steps the ranks' timings: exchange.py), a per-rank watchdog.
    exchange = StepExchange(list(loader.loaders), cfg.watchdog.straggler_every)
    checks = StepChecks(cfg.guards, exchange, signals, loader, logger.event, dist_info.rank)
    if resume_from is not None:
        checks.guard.load_state_dict(state.get("guards"))
    watchdog = Watchdog(cfg.watchdog, run_dir, dist_info.rank, loader.micro_batches_per_step, cfg.mix_rounds,
                        on_hang=(lambda **kw: logger.event("hang", **kw)) if dist_info.is_main else None)
    faults = Faults(run_dir, dist_info.rank) if os.environ.get(FAULTS_ENV) else None

    if start == 0:
        with watchdog.paused():
            run_eval(0)
    # Checkpoints are written in the background (checkpoint/writer.py): a save blocks the loop only
    # for its snapshot; a failed write stops the run at the next step, with its error.
    writer = checkpoint.Writer()
    step, pending_save = start, False
    while step < cfg.steps:
        step += 1
        writer.check()
        checks.begin(step)
        watchdog.start_step(step)
        losses, tokens, names, waited, micros = train_step(engine, objective, loader, noise, amp, step, checks,
                                                           watchdog, faults)
        try:  # the run's one error after guards.nonfinite_limit non-finite steps in a row
            verdict = checks.after_update(engine.was_step_applied(), micros)
        except UserError:
            watchdog.close()
            writer.wait()  # the last good checkpoint, if one is in flight, is committed before the run stops
            logger.close()
            loader.close()
            raise
        if verdict == OK:
            ema.update(model, step)
        elif verdict == SPIKE and cfg.guards.spike_policy == "rollback":
            with watchdog.paused():
                writer.wait()  # the write in flight may be the last good checkpoint
            good = checkpoint.find(ckpt_dir)
            if good is not None:  # back to the last checkpoint; the data after it, the spike's included, is skipped
                with watchdog.paused():
                    back = checkpoint.load(engine, ema, dims, {"noise": noise}, good)["step"]
                checks.guard.counts["rollbacks"] += 1
                logger.event("rollback", step=step, to_step=back, skipped_steps=[back + 1, step],
                             data_position=loader.state_dict()["streams"])
                logger.rewind(back)
                step = back
                continue
            log.warning("guards.spike_policy=rollback: no checkpoint yet, the spike's step is only skipped")
        last = step == cfg.steps
        metrics = None
        if step % cfg.log.every == 0 or last:
            metrics = {"loss": losses.pop("total").item(), **{k: v.item() for k, v in losses.items()},
                       "lr": max(engine.get_lr()), "tokens": tokens, "samples_bad": loader.samples_bad,
                       **data_metrics(loader), **memory_metrics(device),
                       "data": hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]}
        logger.step(step, tokens, metrics, waited)
        stop = checks.stop  # agreed on the step's exchange: every rank stops after the same step
        with watchdog.paused():
            if step % cfg.log.eval_every == 0 or last:
                run_eval(step)
            # A scheduled checkpoint waits for an applied step (``latest`` stays on the last good one);
            # a stop signal's is written anyway. Nothing non-finite is ever written.
            pending_save = pending_save or step % cfg.checkpoint.every == 0 or last
            if (pending_save and verdict == OK) or stop or last:
                bad = nonfinite_state(engine, ema)
                if bad is not None:
                    logger.event("checkpoint_refused", step=step, tensor=bad)
                    raise UserError(f"step {step}: not checkpointed, {bad} is not finite; latest stays "
                                    f"{checkpoint.latest_tag(ckpt_dir) if ckpt_dir.exists() else None}")
                t0 = time.perf_counter()
                client = {"step": step, "data": loader.state_dict(), "config": cfg.to_dict(),
                          "guards": checks.guard.state_dict()}
                checkpoint.save(engine, ema, dims, {"noise": noise}, client, ckpt_dir, step, cfg.checkpoint.keep,
                                writer)
                logger.event("checkpoint", step=step, seconds=time.perf_counter() - t0)  # the stall, not the write
                pending_save = False
        if stop and not last:
            watchdog.close()
            writer.wait()  # the checkpoint is on disk and ``latest`` names it before the job goes
            logger.event(signals.describe(stop), step=step)  # "requeue" or "stop", after its checkpoint
            logger.close()
            loader.close()
            code = signals.exit_code(stop)
            distributed.shutdown()  # a barrier: the requeue file exists before any rank exits
            raise SystemExit(code)
    watchdog.close()
    writer.wait()
    logger.event("end", step=cfg.steps)
    logger.close()
    loader.close()
    distributed.shutdown()


if __name__ == "__main__":
    main()
