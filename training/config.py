"""The run's one typed config tree, YAML round-trip and ``--set a.b=value`` overrides.

Each component owns its dataclass (``ModelConfig`` in model/, ``DataConfig`` in data_pipeline/,
``LossConfig`` in model/losses.py); ``RunConfig`` only assembles them. The named runs (the stages,
the demo) live in ``training/stages.py``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import yaml

from atoken.data_pipeline.config import DataConfig, StreamConfig
from atoken.model.config import GaussianDecoderConfig, ModelConfig, as_type, from_dict, gaussian_decoder_preset, preset
from atoken.model.losses import LossConfig

from .batch import rounds_per_step

# The scale the streams' ``global_batch`` (the paper's samples per step) is stated at: the Slurm
# scripts' default of 32 nodes x 8 GPUs (RunConfig.reference_gpus, stages.py's token budgets).
REFERENCE_GPUS = 256
PRECISIONS = ("auto", "bf16", "fp32")  # RunConfig.precision (training/engine.py's ``precision``)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak, after warm-up
    min_lr: float = 3e-5  # end of the cosine
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1  # as the model declares (model/params.py): matrices yes; biases, norms, tables no
    encoder_lr_mult: float = 0.1  # the SigLIP2-initialised encoder learns 10x slower
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # ramped up as min(decay, (1 + step) / (10 + step))


@dataclass
class ParallelConfig:
    """How the model is parallelised, all applied by training/parallelize.py, in this order."""
    tp: int = 1  # tensor-parallel size (megatron-core); data-parallel size is world_size // tp
    sequence_parallel: bool = False  # split the packed token dim over the TP ranks (needs tp > 1)
    activation_checkpointing: bool = False  # recompute each transformer block in backward
    compile: bool = False  # torch.compile each transformer block; tested at tp=1 only
    zero_stage: int = 1  # DeepSpeed ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters


def check_layout(tp: int, sequence_parallel: bool, world: int, heads: typing.Iterable[int] = ()) -> None:
    """The one check of a parallel layout (preflight, before anything is built; ``init_parallel``,
    ``ParallelDims`` and ``shard_model``): ``tp`` divides the world size and every transformer's
    ``heads`` (TP splits whole heads), and sequence parallelism has TP ranks to split over. ValueError."""
    if tp < 1 or world < 1 or world % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the world size {world}")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor parallelism (tp > 1)")
    for h in sorted(set(heads)):
        if h % tp:
            raise ValueError(f"heads {h} not divisible by tensor-parallel size {tp} (parallel.tp)")


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints (the last step always saves)
    keep: int = 3  # complete checkpoints kept on disk, newest first
    # "auto": continue from the run directory's latest complete checkpoint if there is one;
    # "none": start fresh (refuses a run directory that already holds checkpoints);
    # a path: that checkpoint directory (``.../checkpoints/step_00000100``).
    resume: str = "auto"
    # Stage hand-off (training/handoff.py): a run directory or checkpoint of the stage before, whose
    # weights ("ema" or "raw") start this stage with a fresh optimizer. Ignored once this run has
    # a checkpoint of its own (a requeued job resumes that).
    init_from: str | None = None
    init_weights: str = "ema"


@dataclass
class LogConfig:
    every: int = 10  # optimizer steps between log lines / wandb points
    wandb_mode: str = "offline"  # "offline", "online" or "disabled"
    wandb_project: str = "atoken"
    eval_every: int = 500  # held-out PSNR and an image grid of originals next to reconstructions
    eval_images: str | None = None  # folder of held-out images; None: no evaluation


@dataclass
class GuardConfig:
    """What a step must pass before it is applied (training/guards.py, docs/fault_tolerance.md)."""
    # Non-finite loss or gradient norm: the step is not applied (weights, optimizer moments, EMA and
    # LR schedule stay), counted and logged; this many in a row stop the run (exit 2). 0: never stop.
    nonfinite_limit: int = 3
    # A loss spike: a stream's loss above spike_factor x the median of its last spike_window applied
    # steps, checked once spike_window steps are known. 0: off.
    spike_factor: float = 3.0
    spike_window: int = 50
    # "skip": the step is not applied; "rollback": reload the last checkpoint, keep the data position
    # (the spike's data is skipped) and go on from the checkpoint's step.
    spike_policy: str = "skip"


@dataclass
class WatchdogConfig:
    """Hung and slow ranks, progress inside long steps (training/watchdog.py, training/exchange.py)."""
    # A rank that completes no micro-batch for this long dumps its threads' stacks to
    # run_dir/hangs/ and exits 124 (the Slurm scripts requeue). 0: auto, max(min_timeout,
    # factor x the median micro-batch time); before the first measured micro-batch: first_timeout.
    timeout: float = 0.0
    factor: float = 50.0
    min_timeout: float = 300.0
    first_timeout: float = 3600.0
    # Every this many steps the log names the slowest rank (step time up to the step's exchange).
    straggler_every: int = 50
    progress_every: float = 30.0  # seconds between progress lines inside a step of many micro-batches


@dataclass
class RunConfig:
    name: str = "stage1"
    run_dir: str = "runs/stage1"
    stage: int = 1
    model: ModelConfig = field(default_factory=lambda: preset("so400m"))
    # One image-reconstruction stream (stage 1); named configs (stages.py) set the stage's streams.
    data: DataConfig = field(default_factory=lambda: DataConfig(streams={"image_rec": StreamConfig()}))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    steps: int = 200_000
    # How many times the round-robin task mix (data_pipeline/mixing.py) repeats per optimizer step: a
    # step accumulates mix_rounds * (sum of the streams' micro_batches) packed micro-batches
    # (``micro_batches_per_step``).
    # 0: "auto", round(reference_gpus / data-parallel size) (training/batch.py), resolved at start.
    mix_rounds: int = 1
    reference_gpus: int = REFERENCE_GPUS  # the scale the streams' global_batch is stated at (above)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"
    seed: int = 0
    # The same command reproduces its losses bit for bit (training/determinism.py); costs speed.
    deterministic: bool = False

    @property
    def micro_batches_per_step(self) -> int:
        """Packed micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps); needs
        ``mix_rounds`` resolved (``with_rounds``)."""
        if self.mix_rounds < 1:
            raise ValueError("mix_rounds=0 (auto) is resolved at start: use RunConfig.with_rounds(dp)")
        return len(self.data.step_order(self.mix_rounds))

    def with_rounds(self, dp: int) -> RunConfig:
        """This config with ``mix_rounds`` resolved for ``dp`` data-parallel ranks (training/batch.py)."""
        return dataclasses.replace(self, mix_rounds=rounds_per_step(self.mix_rounds, self.reference_gpus, dp))

    def check(self) -> None:
        """Raise ValueError for values and combinations that cannot run, before anything is built."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        und = [s for s in self.data.streams.values() if s.task == "und"]
        if und and not self.model.understanding:
            raise ValueError(f"streams {[s.name for s in und]} are understanding streams: set model.understanding=true")
        if und and not self.loss.text_tower:
            raise ValueError(f"streams {[s.name for s in und]} need the frozen SigLIP2 text tower: "
                             "set loss.text_tower to a local checkpoint directory")
        if any(s.modality == "image" for s in und) and not self.loss.teacher:
            raise ValueError("image understanding distils the SigLIP2 teacher: set loss.teacher to a local directory")
        image_rec = [s.name for s in self.data.streams.values() if s.modality == "image" and s.task == "rec"]
        if image_rec and self.loss.clip_weight and not self.loss.teacher:
            raise ValueError(f"streams {image_rec}: the CLIP/feature term of image reconstruction needs the SigLIP2 "
                             "teacher: set loss.teacher to a local directory (or loss.clip_weight=0)")
        if self.mix_rounds < 0 or self.reference_gpus < 1:
            raise ValueError(f"mix_rounds must be >= 0 (0: auto) and reference_gpus >= 1, got {self.mix_rounds}, "
                             f"{self.reference_gpus}")
        if self.guards.spike_policy not in ("skip", "rollback"):
            raise ValueError(f"guards.spike_policy must be 'skip' or 'rollback', got {self.guards.spike_policy!r}")
        if self.guards.nonfinite_limit < 0 or self.guards.spike_factor < 0 or self.guards.spike_window < 1:
            raise ValueError("guards.nonfinite_limit and guards.spike_factor must be >= 0, guards.spike_window >= 1")
        if any(s.modality == "3d" and s.task == "rec" for s in self.data.streams.values()) and not self.model.gaussian:
            raise ValueError("3D reconstruction streams need the Gaussian decoder: set model.gaussian (e.g. =base)")

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


def load_yaml(path: str) -> RunConfig:
    with open(path) as f:
        return from_dict(RunConfig, yaml.safe_load(f) or {})


def apply_override(cfg: RunConfig, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place. Values parse as YAML (``1e-4``, ``[64, 128]``,
    ``null``); ``model=base`` selects a model preset.

    Data streams are entries of ``data.streams``: ``data.streams.image_rec.remote=s3://b/p`` sets a
    field, ``data.streams.video_rec={modality: video, remote: ...}`` adds (or replaces) a stream,
    ``data.streams.video_rec=null`` removes one. With a single stream, ``data.<stream field>=value``
    (e.g. ``data.remote=...``) is short for that stream's field.
    """
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    path, raw = item.split("=", 1)
    *parents, leaf = path.split(".")
    if parents == ["data"] and leaf not in {f.name for f in dataclasses.fields(DataConfig)}:
        if leaf not in {f.name for f in dataclasses.fields(StreamConfig)}:
            raise ValueError(f"override {item!r}: DataConfig and StreamConfig have no field {leaf!r}")
        if len(cfg.data.streams) != 1:
            raise ValueError(f"override {item!r}: data.{leaf} is ambiguous with streams {sorted(cfg.data.streams)}; "
                             f"use data.streams.<name>.{leaf}")
        parents = ["data", "streams", next(iter(cfg.data.streams))]
    obj, owner = cfg, None
    for p in parents:
        if isinstance(obj, dict) and p in obj:
            obj = obj[p]
        elif dataclasses.is_dataclass(obj) and hasattr(obj, p):
            obj, owner = getattr(obj, p), (obj, p)
        else:
            raise ValueError(f"override {item!r}: no config section {p!r}")
    value = yaml.safe_load(raw)
    if isinstance(obj, dict):  # an entry of a dict[str, Dataclass] field (data.streams)
        entry_type = typing.get_args(typing.get_type_hints(type(owner[0]))[owner[1]])[1]
        if value is None:
            if leaf not in obj:
                raise ValueError(f"override {item!r}: no entry {leaf!r} to remove (have {sorted(obj)})")
            del obj[leaf]
        elif isinstance(value, dict):
            obj[leaf] = from_dict(entry_type, {"name": leaf, **value})
        else:
            raise ValueError(f"override {item!r}: give {leaf!r} a mapping of {entry_type.__name__} fields or null")
        return
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        known = f"; known: {sorted(f.name for f in dataclasses.fields(obj))}" if dataclasses.is_dataclass(obj) else ""
        raise ValueError(f"override {item!r}: {type(obj).__name__} has no field {leaf!r}{known}")
    t = typing.get_type_hints(type(obj))[leaf]
    if t is ModelConfig and isinstance(value, str):
        value = preset(value)
    elif leaf == "gaussian" and isinstance(obj, ModelConfig):  # a preset name or null
        value = gaussian_decoder_preset(value) if isinstance(value, str) else value
        if value is not None and not isinstance(value, GaussianDecoderConfig):
            raise ValueError(f"override {item!r}: model.gaussian takes a preset name or null")
    elif dataclasses.is_dataclass(t) or typing.get_origin(t) is dict:
        raise ValueError(f"override {item!r}: set the fields or entries of {leaf!r} one by one")
    elif t in (int, float) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            value = t(value)
        except (TypeError, ValueError):
            raise ValueError(f"override {item!r}: {leaf} needs a {t.__name__}") from None
    elif typing.get_origin(t) is tuple:
        value = as_type(t, value)
    setattr(obj, leaf, value)
