"""Named runs: each function returns a complete ``RunConfig`` (``--config NAME``)."""
from __future__ import annotations

from atoken.data_pipeline.config import DataConfig
from atoken.model.config import preset
from atoken.model.losses import LossConfig

from .config import CheckpointConfig, LogConfig, OptimConfig, RunConfig


def stage1() -> RunConfig:
    """Stage 1 as in DESIGN.md: image reconstruction at 64-512 px, latent C = 32, so400m."""
    return RunConfig(
        name="stage1", run_dir="runs/stage1", stage=1, model=preset("so400m"),
        data=DataConfig(remote="", min_res=64, max_res=512, token_budget=16384),
        steps=200_000,
    )


def demo() -> RunConfig:
    """Stage 1 shrunk to minutes on 2 CPU cores: ``tiny`` on the photos bundled with scikit-image
    and scikit-learn (``tools/demo.py`` writes their shards and fills in ``data.remote``)."""
    return RunConfig(
        name="demo", run_dir="runs/demo", stage=1, model=preset("tiny"),
        data=DataConfig(remote="runs/demo/shards", min_res=64, max_res=128, token_budget=512),
        # LPIPS/Gram at 112 px instead of 224: the perceptual net is most of a CPU step.
        loss=LossConfig(perceptual_size=112),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, ema_decay=0.999),
        checkpoint=CheckpointConfig(every=100, keep=2),
        log=LogConfig(every=10, eval_every=100),
        steps=300, precision="fp32", zero_stage=1,
    )


CONFIGS = {"stage1": stage1, "demo": demo}
