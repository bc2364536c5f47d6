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
        # The perceptual net is most of a CPU step: LPIPS/Gram at 64 px instead of 224. The paper's
        # weights (LPIPS 10, Gram 1000) stall the pixel fidelity of a randomly initialised tiny
        # model for hundreds of steps (measured: held-out PSNR flat after 150 steps, vs +3 dB in
        # 100 steps with LPIPS 1, Gram 10), so the demo uses the lighter ones.
        loss=LossConfig(lpips_weight=1.0, gram_weight=10.0, perceptual_size=64),
        # The encoder's 0.1x LR is for SigLIP2-initialised weights; the demo's encoder is random.
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, encoder_lr_mult=1.0, ema_decay=0.999),
        checkpoint=CheckpointConfig(every=100, keep=2),
        log=LogConfig(every=10, eval_every=100),
        steps=300, precision="fp32", zero_stage=1,
    )


CONFIGS = {"stage1": stage1, "demo": demo}
