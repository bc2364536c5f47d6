"""The run itself, after ``train.main`` has parsed and checked the command: process group, model and
losses, DeepSpeed engine, data, resume, then the loop (step, log, evaluate, checkpoint). Reads top to bottom.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from atoken.data_pipeline import MixedLoader
from atoken.data_pipeline.config import cpus_per_task
from atoken.model import AToken
from atoken.model.attention import log_attention_backend
from atoken.model.objective import Objective
from atoken.model.tokenizer import Tokenizer
from atoken.tools.eval.metrics import psnr

from . import checkpoint, distributed, handoff
from .batch import describe, step_batches
from .config import RunConfig
from .ema import EMA
from .engine import precision
from .holdout import load_images
from .logger import RunLogger
from .parallelize import init_parallel, parallelize
from .preemption import StopSignals
from .train import data_metrics, memory_metrics, train_step

log = logging.getLogger("atoken.train")


def evaluate(model, ema, images: dict, device, amp) -> tuple[dict, list]:
    """Held-out PSNR of the EMA weights (what atoken-convert exports by default)."""
    with ema.applied_to(model), amp:
        recons = Tokenizer(model, device).reconstruct(list(images.values()))
    model.train()
    return {name: psnr(x, y) for (name, x), y in zip(images.items(), recons, strict=True)}, recons


def run(cfg: RunConfig, resume_from: Path | None) -> None:
    """Train ``cfg`` (already checked by preflight), from ``resume_from`` when it is a checkpoint."""
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
    objective = Objective.from_config(cfg.loss, group=dims.dp_group if dims.dp > 1 else None).to(device)
    # Parallelism is applied here and only here (training/parallelize.py): TP/SP, activation
    # checkpointing, compile, then the DeepSpeed engine (ZeRO over the data-parallel group).
    engine = parallelize(model, dims, cfg, device)
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
        state = checkpoint.load(engine, ema, {"noise": noise}, resume_from)
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

    if start == 0:
        run_eval(0)
    for step in range(start + 1, cfg.steps + 1):
        losses, tokens, names, waited = train_step(engine, objective, loader, noise, amp)
        ema.update(model, step)
        last = step == cfg.steps
        metrics = None
        if step % cfg.log.every == 0 or last:
            metrics = {"loss": losses.pop("total").item(), **{k: v.item() for k, v in losses.items()},
                       "lr": max(engine.get_lr()), "tokens": tokens, "samples_bad": loader.samples_bad,
                       **data_metrics(loader), **memory_metrics(device),
                       "data": hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]}
        logger.step(step, tokens, metrics, waited)
        if step % cfg.log.eval_every == 0 or last:
            run_eval(step)
        stop = signals.poll()  # collective: every rank stops after the same step
        if step % cfg.checkpoint.every == 0 or last or stop:
            t0 = time.perf_counter()
            client = {"step": step, "data": loader.state_dict(), "config": cfg.to_dict()}
            checkpoint.save(engine, ema, {"noise": noise}, client, ckpt_dir, step, cfg.checkpoint.keep)
            logger.event("checkpoint", step=step, seconds=time.perf_counter() - t0)
        if stop and not last:
            logger.event(signals.describe(stop), step=step)  # "requeue" or "stop", after its checkpoint
            logger.close()
            loader.close()
            code = signals.exit_code(stop)
            distributed.shutdown()  # a barrier: the requeue file exists before any rank exits
            raise SystemExit(code)
    logger.event("end", step=cfg.steps)
    logger.close()
    loader.close()
    distributed.shutdown()
