"""The named runs, the curriculum's stages and the demo: each function returns a complete
``RunConfig`` (``--config NAME``)."""
from __future__ import annotations

import dataclasses

from atoken.data_pipeline.config import DataConfig, StreamConfig
from atoken.model.config import gaussian_decoder_preset, preset
from atoken.model.losses import LossConfig

from .batch import budget_for
from .config import REFERENCE_GPUS, CheckpointConfig, LogConfig, OptimConfig, RunConfig

# docs/design.md's curriculum. Each stage's streams and their micro-batches per round are its task mix;
# resolutions are the stage's ranges. Each stream states the paper's global batch (samples per
# optimizer step at the Slurm scripts' 256 GPUs), and its token budget is sized to hold that batch at
# 256 GPUs with one round of the mix per step (at least its largest sample; training/batch.py);
# ``mix_rounds=0`` (auto) accumulates rounds to the same step on fewer GPUs. The trainer prints what
# a step holds against these numbers at start.
#
# Global batches (docs/design.md): image understanding 8192; image reconstruction 1024-4096, video
# 512-1024, 3D 256-512, given as ranges. Our reading: the upper end of a range where the stage's
# resolutions are lowest (image rec 4096 / 2048 / 1024 in stages 1 / 2 / 3-4; video 1024 in stage
# 2, 512 from stage 3 on, as its resolution doubles), 3D at 256.
#
# Image understanding (distillation from the frozen SigLIP2 teacher) runs in every stage, at the
# stage-1 range 64-512 px (the teacher is a naflex model trained around 256 px); docs/design.md's mix
# percentages leave it out ("plus image understanding"), so it adds one micro-batch per round.
# The understanding streams need the frozen SigLIP2 text tower and teacher, image reconstruction the
# teacher too (the CLIP/feature term), from local paths: --set loss.text_tower=DIR --set loss.teacher=DIR.
#
# Tokens per micro-batch (``token_budget``, "tokens/micro" in the start-up table) is the one value per
# stream that sets how much a GPU runs at once; set it with --set data.streams.<name>.token_budget=N.
# Here it is sized from the paper's batch as above (stage 1: image_rec 6400, image_und 12800). On one
# H100, atoken-train at stage 1 (so400m, compiled, bf16, image reconstruction only) ran 16384 tokens
# per micro-batch at 40.2k tokens/s with a 55.3 GiB peak (benchmarks/results/gpu_trainer_nvidia_h100_80gb_hbm3.json):
# 16384 fits an H100 with room to spare. Larger budgets are not measured yet (gpu_trainer.sh sweeps
# them; benchmarks/NOTES.md). With mix_rounds=0 a larger budget makes the step
# hold more samples than the paper's; the start-up table prints per stream and in all what it holds.
#
# Data loading (DataConfig defaults): num_workers=-1 gives each stream (CPUs per task - 1) // streams
# decode processes, the CPUs per task being Slurm's (12 in cluster/stage*.slurm: 5 per stream in
# stage 1, 2 in stage 2, 1 in stages 3-4); prefetch=2 packed micro-batches wait per stream.

def _sized(stream: StreamConfig, global_batch: int) -> StreamConfig:
    """``stream`` stating ``global_batch``, its token budget sized for it (comment above)."""
    stream.global_batch = global_batch
    stream.token_budget = budget_for(stream, global_batch, REFERENCE_GPUS)
    return stream


def _image(task: str, max_res: int, global_batch: int, micro_batches: int = 1) -> StreamConfig:
    return _sized(StreamConfig(modality="image", task=task, min_res=64, max_res=max_res,
                               micro_batches=micro_batches), global_batch)


def _video(task: str, max_res: int, micro_batches: int, global_batch: int) -> StreamConfig:
    # Reconstruction tiles of 16-32 frames; understanding at 1 fps, up to 64 frames (docs/design.md).
    return _sized(StreamConfig(modality="video", task=task, min_res=64, max_res=max_res, micro_batches=micro_batches),
                  global_batch)


def _asset(task: str, micro_batches: int, global_batch: int) -> StreamConfig:
    # A 64^3 asset's surface holds up to ~25k occupied voxels (a cube's shell: 23,816): the budget
    # holds the largest whatever the global batch asks.
    return StreamConfig(modality="3d", task=task, micro_batches=micro_batches, token_budget=32768,
                        global_batch=global_batch)


IMAGE_UND = 8192  # the paper's image-understanding global batch, every stage


def stage1() -> RunConfig:
    """Stage 1: image reconstruction and image understanding at 64-512 px, latent C = 32, so400m."""
    return RunConfig(
        name="stage1", run_dir="runs/stage1", stage=1, model=dataclasses.replace(preset("so400m"), understanding=True),
        data=DataConfig(streams={"image_rec": _image("rec", 512, 4096), "image_und": _image("und", 512, IMAGE_UND)}),
        steps=200_000, mix_rounds=0, reference_gpus=REFERENCE_GPUS,
    )


def stage2() -> RunConfig:
    """Stage 2: + video; images 64-1024, video 64-512 px; mix 22.2 / 11.1 / 66.6 % (image rec /
    video und / video rec) = 2 / 1 / 6 micro-batches, plus image understanding; the latent widens to
    C = 48 (from stage 1)."""
    cfg = stage1()
    cfg.name, cfg.run_dir, cfg.stage, cfg.steps = "stage2", "runs/stage2", 2, 200_000
    cfg.model = dataclasses.replace(cfg.model, latent_channels=48)
    cfg.data = dataclasses.replace(cfg.data, streams={
        "image_rec": _image("rec", 1024, 2048, 2), "image_und": _image("und", 512, IMAGE_UND),
        "video_und": _video("und", 512, 1, 1024), "video_rec": _video("rec", 512, 6, 1024)})
    return cfg


def stage3() -> RunConfig:
    """Stage 3: + 3D (64^3 voxels, Gaussian-splat decoder); images 64-2048, video 64-1024 px; mix
    22.2 / 11.1 / 44.4 / 11.1 / 11.1 % = 2 / 1 / 4 / 1 / 1 micro-batches, plus image understanding."""
    cfg = stage2()
    cfg.name, cfg.run_dir, cfg.stage, cfg.steps = "stage3", "runs/stage3", 3, 50_000
    cfg.model = dataclasses.replace(cfg.model, gaussian=gaussian_decoder_preset("base"))
    cfg.data = dataclasses.replace(cfg.data, streams={
        "image_rec": _image("rec", 2048, 1024, 2), "image_und": _image("und", 512, IMAGE_UND),
        "video_und": _video("und", 1024, 1, 512), "video_rec": _video("rec", 1024, 4, 512),
        "asset_und": _asset("und", 1, 256), "asset_rec": _asset("rec", 1, 256)})
    return cfg


def stage4() -> RunConfig:
    """Stage 4: stage 3 with discrete tokens: FSQ on the posterior mean (8 groups x 6 dims x 4 levels)."""
    cfg = stage3()
    cfg.name, cfg.run_dir, cfg.stage, cfg.steps = "stage4", "runs/stage4", 4, 100_000
    cfg.model = dataclasses.replace(cfg.model, quantizer="fsq")
    return cfg


def demo() -> RunConfig:
    """Stage 1 shrunk to minutes on 2 CPU cores: ``tiny`` on the photos bundled with scikit-image
    and scikit-learn (``tools/demo.py`` writes their shards and sets
    ``data.streams.image_rec.remote``)."""
    return RunConfig(
        name="demo", run_dir="runs/demo", stage=1, model=preset("tiny"),
        data=DataConfig(streams={"image_rec": StreamConfig(modality="image", task="rec", remote="runs/demo/shards",
                                                            min_res=64, max_res=128, token_budget=512)}),
        # The perceptual net is most of a CPU step: LPIPS/Gram at 64 px instead of 224. The paper's
        # weights (LPIPS 10, Gram 1000) stall the pixel fidelity of a randomly initialised tiny
        # model for hundreds of steps (measured: held-out PSNR flat after 150 steps, vs +3 dB in
        # 100 steps with LPIPS 1, Gram 10), so the demo uses the lighter ones.
        # No SigLIP2 weights ship in any package: the demo has no teacher, so no CLIP/feature term.
        loss=LossConfig(lpips_weight=1.0, gram_weight=10.0, perceptual_size=64, clip_weight=0.0),
        # The encoder's 0.1x LR is for SigLIP2-initialised weights; the demo's encoder is random.
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, encoder_lr_mult=1.0, ema_decay=0.999),
        checkpoint=CheckpointConfig(every=100, keep=2),
        log=LogConfig(every=10, eval_every=100),
        steps=300, precision="fp32",
    )


CONFIGS = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "stage4": stage4, "demo": demo}
