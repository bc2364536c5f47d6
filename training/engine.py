"""The DeepSpeed engine: AdamW over named parameter groups, the LR schedule, ZeRO and clipping."""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from atoken.model.params import ParamGroup, optim_groups

from .schedule import lr_factor

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, optim) -> list[dict]:
    """Up to four groups, (encoder | rest) x (decay | no_decay), as the model declares each parameter's
    (``AToken.optim_groups``, model/params.py); frozen parameters are left out."""
    declared = optim_groups(model)
    groups: dict[ParamGroup, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(declared[name], []).append(p)
    return [{"params": ps, "lr": optim.lr * (optim.encoder_lr_mult if g.encoder_lr else 1.0),
             "weight_decay": optim.weight_decay if g.decay else 0.0, "name": g.name}
            for g, ps in sorted(groups.items(), key=lambda item: (item[0].encoder_lr, item[0].decay))]


def make_optimizer(groups, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay, one fused kernel per step on CUDA: apex's ``FusedAdam``
    when apex is importable, else torch's ``AdamW(fused=True)``; on CPU torch's ``AdamW``.
    The choice is logged."""
    cuda = torch.cuda.is_available()
    if cuda:
        try:
            from apex.optimizers import FusedAdam  # noqa: PLC0415 - apex, optional (fused Adam on GPU)
        except Exception as e:  # noqa: BLE001 - ImportError, or an apex built for another torch / CUDA
            why = f"apex unavailable: {type(e).__name__}: {e}"
        else:
            logger.info("optimizer: apex.optimizers.FusedAdam (adam_w_mode)")
            return FusedAdam(groups, lr=lr, betas=betas, weight_decay=weight_decay, adam_w_mode=True)
    else:
        why = "no CUDA"
    logger.info("optimizer: torch.optim.AdamW(fused=%s) (%s)", cuda, why)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=cuda)


def precision(cfg, device: torch.device):
    """bf16 autocast on CUDA (or when asked for), fp32 otherwise (``preflight`` checked the name)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def build_engine(model: nn.Module, cfg, mpu=None):
    """Wrap ``model`` in a DeepSpeed engine with ZeRO stage ``cfg.parallel.zero_stage``.

    The optimizer is ``make_optimizer``'s (not DeepSpeed's JIT-compiled Adam kernels: no build step).
    """
    import deepspeed  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    o = cfg.optim
    opt = make_optimizer(param_groups(model, o), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, warmup=o.warmup_steps, total=cfg.steps, peak=o.lr, floor=o.min_lr))
    ds_config = {
        # One micro-batch is one packed token stream of many samples; DeepSpeed's "batch size" only
        # counts them.
        "train_micro_batch_size_per_gpu": 1,
        # Every micro-batch of the step's task mix (mix_rounds rounds of it) is one accumulation step.
        "gradient_accumulation_steps": cfg.micro_batches_per_step,
        "gradient_clipping": o.grad_clip,
        # Buckets of 5e7 elements (200 MB in fp32) instead of DeepSpeed's 5e8: the default buffer
        # alone is 1.9 GiB per rank whatever the model size (benchmarks/README.md).
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "reduce_bucket_size": 5e7,
                              "allgather_bucket_size": 5e7},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
    }
    device = next(model.parameters()).device
    if device.type == "cuda" and isinstance(precision(cfg, device), torch.autocast):
        # engine.forward turns an outer CUDA autocast off unless its own is on. No lower-precision
        # modules: the default list (Linear, Conv) would also reduce their gradients in bf16.
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config,
                                           mpu=mpu)
    return engine
