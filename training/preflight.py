"""Everything about a run that can be checked before anything is built: the trainer's first call.

Building so400m, DeepSpeed and the perceptual net takes a minute; a mistake found after that costs
the minute and ends in a long traceback. ``check_run`` finds the mistakes that can be found from the
config and the file system (and the S3 endpoint) first, each as one ``UserError`` that names the
setting, file or stream and says what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

from atoken.data_pipeline.images import IMAGE_EXTENSIONS, open_rgb
from atoken.data_pipeline.packing import check_budget
from atoken.data_pipeline.storage import check_streams
from atoken.model.attention import check_backend
from atoken.model.errors import UserError

from . import checkpoint
from .config import RunConfig, check_layout


def check_run(cfg: RunConfig) -> Path | None:
    """Raise ``UserError`` for the first mistake found; returns the checkpoint to resume from (None:
    a fresh start). Cheap: reads configs, index files and the held-out images, asks S3 for the
    buckets; builds nothing."""
    try:  # the config's own consistency checks (they raise ValueError)
        cfg.data.check()  # first: every stream's fields, after --set overrides (no data at all, say)
        cfg.check()
        for stream in cfg.data.streams.values():
            check_budget(stream)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.model.attention != "auto":  # a forced kernel whose package is missing: say so now
        try:
            check_backend(cfg.model.attention)
        except ValueError as e:
            raise UserError(f"model.attention: {e}") from None
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    m = cfg.model
    heads = [m.encoder.heads, m.decoder.heads] + ([m.gaussian.transformer.heads] if m.gaussian else [])
    try:
        check_layout(cfg.parallel.tp, cfg.parallel.sequence_parallel, world, heads)
    except ValueError as e:
        raise UserError(str(e)) from None
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir={cfg.run_dir!r} is a file, not a directory: choose another run_dir")
    for key, path in (("loss.text_tower", cfg.loss.text_tower), ("loss.teacher", cfg.loss.teacher)):
        if path and not Path(path).is_dir():
            raise UserError(f"{key}={path!r}: no such directory (a local SigLIP2 checkpoint directory)")
    resume = checkpoint.resolve(cfg.checkpoint.resume, run_dir / "checkpoints")
    if resume is None and cfg.checkpoint.init_from:
        _check_init_from(cfg)
    if cfg.log.eval_images:
        _check_images(Path(cfg.log.eval_images))
    check_streams(cfg.data)  # last: it may ask an S3 endpoint
    return resume


def _check_init_from(cfg: RunConfig) -> None:
    from . import handoff  # noqa: PLC0415 - it imports the model: only for init_from, so a refused run builds none

    if cfg.checkpoint.init_weights not in ("ema", "raw"):
        raise UserError(f"checkpoint.init_weights must be 'ema' or 'raw', got {cfg.checkpoint.init_weights!r}")
    try:  # a path that holds no weights is a UserError already
        handoff.check(cfg.model, cfg.checkpoint.init_from)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_images(folder: Path) -> None:
    """log.eval_images: a folder of images that all decode (the held-out set)."""
    if not folder.is_dir():
        raise UserError(f"log.eval_images={str(folder)!r}: no such folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise UserError(f"log.eval_images={str(folder)!r}: no images there ({', '.join(IMAGE_EXTENSIONS)})")
    for p in paths:
        try:
            open_rgb(p.read_bytes())
        except Exception as e:  # any decode failure: name the file
            raise UserError(f"log.eval_images: cannot read {p} ({type(e).__name__}: {e}); remove or replace it") from e
