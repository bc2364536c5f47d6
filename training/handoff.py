"""Stage hand-off: stage N+1 starts from stage N's final checkpoint with a fresh optimizer.

What carries over is the model's weights (EMA or raw, ``checkpoint.init_weights``), converted to the
new stage's model config:
  * the latent widens 32 -> 48 channels at stage 2 (``AToken.widen_latent``: reconstructions unchanged);
  * FSQ (stage 4) and other parameter-free switches need nothing;
  * heads new in this stage (e.g. the Gaussian decoder at stage 3) keep their fresh initialisation,
    and are listed in the log.
Anything else that differs (another width or depth, a narrower latent, a checkpoint that is not
one) is refused before any weight is touched, with what differs: ``check``, run once, by preflight.

``init_from`` may also be an inference directory: the released AToken weights imported with
``atoken-import-official`` (fine-tuning the release), or ``atoken-convert``'s output. Either is read
through ``checkpoint.read_weights``, the one reader of weights.

Resuming a stage's own checkpoint always wins over ``init_from``: a requeued stage-2 job continues
stage 2, it does not start over from stage 1.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from atoken.model import AToken, ModelConfig

from .checkpoint import WeightsSource, find_weights, read_weights

log = logging.getLogger(__name__)
SETTING = "checkpoint.init_from"  # what the errors name


def check_compatible(old: ModelConfig, new: ModelConfig, source: Path) -> None:
    """Raise ValueError naming every difference that a hand-off cannot bridge."""
    problems = []
    for part in ("encoder", "decoder"):
        a, b = getattr(old, part), getattr(new, part)
        if a != b:
            diff = {k: (getattr(a, k), getattr(b, k)) for k in vars(a) if getattr(a, k) != getattr(b, k)}
            problems.append(f"{part} differs (checkpoint vs this stage: {diff})")
    if old.pos_table_size != new.pos_table_size:
        problems.append(f"pos_table_size {old.pos_table_size} vs {new.pos_table_size}")
    if new.latent_channels < old.latent_channels:
        problems.append(f"the latent cannot narrow from {old.latent_channels} to {new.latent_channels} channels")
    if old.understanding and not new.understanding:
        problems.append("it has the MAP head (understanding.*) and this stage has none: set model.understanding=true")
    if old.gaussian is not None and new.gaussian != old.gaussian:
        problems.append("its Gaussian decoder differs from this stage's (model.gaussian)")
    if problems:
        raise ValueError(f"cannot start this stage from {source}: " + "; ".join(problems))


def check(new: ModelConfig, source: str | Path) -> WeightsSource:
    """What ``checkpoint.init_from`` names and whether it fits this stage (``check_compatible``), from
    its config alone (no weights read): preflight's check, the one of a run."""
    found = find_weights(source, SETTING)
    check_compatible(found.cfg, new, found.path)
    return found


def initial_state(new: ModelConfig, source: str | Path, weights: str = "ema"
                  ) -> tuple[dict[str, torch.Tensor], WeightsSource]:
    """The plain (TP=1) state dict to start from and where it came from (``read_weights``; an
    inference directory's weights are taken as stored, ``weights`` does not apply). Parameters new in
    this stage are absent from the dict (they keep their initialisation). The source was checked to
    fit ``new`` by preflight (``check``)."""
    state, found = read_weights(source, weights, SETTING)
    old = found.cfg
    prev = AToken(old)
    prev.load_state_dict(state)
    if new.latent_channels > old.latent_channels:
        prev.widen_latent(new.latent_channels)
        log.info("widened the latent from %d to %d channels", old.latent_channels, new.latent_channels)
    return prev.state_dict(), found


def apply(model: torch.nn.Module, new: ModelConfig, source: str | Path, weights: str) -> dict:
    """Load the previous stage's weights into ``model``, the plain model before ``parallelize``
    shards it. Returns a record for the run's events."""
    state, found = initial_state(new, source, weights)
    ckpt, old = found.path, found.cfg
    names = {n for n, _ in model.named_parameters()}
    unexpected = sorted(set(state) - names)
    if unexpected:
        parts = sorted({n.split(".")[0] for n in unexpected})
        raise ValueError(f"cannot start this stage from {ckpt}: it holds {parts} ({len(unexpected)} tensors, e.g. "
                         f"{unexpected[0]}) that this stage's model has not; give the stage the same heads "
                         "(e.g. --set model.understanding=true)")
    fresh = sorted(names - set(state))
    model.load_state_dict(state, strict=False)  # the fresh parameters keep their values; shapes are checked
    if fresh:
        log.info("new in this stage, freshly initialised: %s", sorted({n.split(".")[0] for n in fresh}))
    log.info("initialised from %s (%s weights)", ckpt, weights)
    return {"init_from": str(ckpt), "init_weights": weights, "latent": [old.latent_channels, new.latent_channels],
            "fresh": sorted({n.split(".")[0] for n in fresh})}
