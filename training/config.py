"""The run's one typed config tree, YAML round-trip and ``--set a.b=value`` overrides.

Each component owns its dataclass (``ModelConfig`` in model/, ``DataConfig`` in data_pipeline/,
``LossConfig`` in model/losses.py); ``RunConfig`` only assembles them. Named runs live in
``training/configs.py``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import yaml

from atoken.data_pipeline.config import DataConfig
from atoken.model.config import ModelConfig, preset
from atoken.model.losses import LossConfig


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak, after warm-up
    min_lr: float = 3e-5  # end of the cosine
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1  # on matrices only; biases, norms and tables are not decayed
    encoder_lr_mult: float = 0.1  # the SigLIP2-initialised encoder learns 10x slower
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # ramped up as min(decay, (1 + step) / (10 + step))


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size (megatron-core); data-parallel size is world_size // tp
    sequence_parallel: bool = False  # split the packed token dim over the TP ranks (needs tp > 1)
    activation_checkpointing: bool = False  # recompute each transformer block in backward


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints (the last step always saves)
    keep: int = 3  # complete checkpoints kept on disk, newest first
    # "auto": continue from the run directory's latest complete checkpoint if there is one;
    # "none": start fresh (refuses a run directory that already holds checkpoints);
    # a path: that checkpoint directory (``.../checkpoints/step_00000100``).
    resume: str = "auto"


@dataclass
class LogConfig:
    every: int = 10  # optimizer steps between log lines / wandb points
    wandb_mode: str = "offline"  # "offline", "online" or "disabled"
    wandb_project: str = "atoken"
    eval_every: int = 500  # held-out PSNR and an image grid of originals next to reconstructions
    eval_images: str | None = None  # folder of held-out images; None: no evaluation


@dataclass
class RunConfig:
    name: str = "stage1"
    run_dir: str = "runs/stage1"
    stage: int = 1
    model: ModelConfig = field(default_factory=lambda: preset("so400m"))
    data: DataConfig = field(default_factory=lambda: DataConfig(remote=""))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    steps: int = 200_000
    grad_accum: int = 1  # packed micro-batches per optimizer step
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"
    zero_stage: int = 1  # DeepSpeed ZeRO stage for optimizer state
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(x):
    """Tuples -> lists so yaml.safe_dump writes plain YAML."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def from_dict(cls, d: dict):
    """Build dataclass ``cls`` from a nested dict, checking every key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = t.from_dict(v) if hasattr(t, "from_dict") else from_dict(t, v)
        elif typing.get_origin(t) is tuple:
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def load_yaml(path: str) -> RunConfig:
    with open(path) as f:
        return from_dict(RunConfig, yaml.safe_load(f) or {})


def apply_override(cfg: RunConfig, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place. Values parse as YAML (``1e-4``, ``[64, 128]``,
    ``null``); ``model=base`` selects a model preset."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    path, raw = item.split("=", 1)
    *parents, leaf = path.split(".")
    obj = cfg
    for p in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ValueError(f"override {item!r}: no config section {p!r}")
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"override {item!r}: {type(obj).__name__} has no field {leaf!r}")
    value = yaml.safe_load(raw)
    t = typing.get_type_hints(type(obj))[leaf]
    if t is ModelConfig and isinstance(value, str):
        value = preset(value)
    elif dataclasses.is_dataclass(t):
        raise ValueError(f"override {item!r}: set the fields of {leaf!r} one by one")
    elif t in (int, float) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            value = t(value)
        except (TypeError, ValueError):
            raise ValueError(f"override {item!r}: {leaf} needs a {t.__name__}") from None
    elif typing.get_origin(t) is tuple:
        value = tuple(value)
    setattr(obj, leaf, value)
