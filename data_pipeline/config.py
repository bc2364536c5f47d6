"""Configuration of the data streams: one ``StreamConfig`` per modality/task, held by ``DataConfig``.

A stage's task mix is its streams' ``micro_batches``: e.g. stage 2's 22.2 / 11.1 / 66.6 % (image rec /
video und / video rec, docs/design.md) is 2 / 1 / 6 packed micro-batches per round of the mix
(``mixing.py``). Streams are keyed by name; ``StreamConfig.name`` repeats the key (filled in from it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction

from atoken.model.config import PATCH_HW, PATCH_T

MODALITIES = ("image", "video", "3d")  # model.packed's IMAGE, VIDEO, ASSET3D
TASKS = ("rec", "und")


@dataclass
class StreamConfig:
    """One MDS dataset read for one task. Decode functions (``samples.py``) read these attributes."""
    name: str = ""
    """The stream's key in ``DataConfig.streams`` (filled in from it when empty)."""
    modality: str = "image"
    """"image", "video" or "3d": picks the decode function (``samples.SAMPLE_DECODERS``)."""
    task: str = "rec"
    """"rec" (reconstruction) or "und" (understanding)."""
    remote: str = ""
    """MDS shards: a local directory or ``s3://bucket/prefix`` (boto3 honours S3_ENDPOINT_URL, AWS_*)."""
    local: str | None = None
    """Cache directory for the shards. None: a local ``remote`` is read in place, an s3:// one is
    cached under $TMPDIR/atoken-mds/<hash of the URL>. Two live datasets need different ones."""
    micro_batches: int = 1
    """Packed micro-batches of this stream in each round of the mix (``mixing.py``)."""
    token_budget: int = 4096
    """Tokens per packed micro-batch (no padding); the largest sample must fit."""
    min_res: int = 64
    """Smallest sampled longer side, in pixels (multiple of 16)."""
    max_res: int = 512
    """Largest sampled longer side, in pixels (multiple of 16)."""
    clip_frames: tuple[int, int] = (16, 32)
    """Video reconstruction: range of the tile length in frames (multiples of 4)."""
    frame_strides: tuple[tuple[int, int], ...] = ((1, 3), (4, 12))
    """Video reconstruction: pick one range uniformly, then a frame stride uniformly in it."""
    und_fps: float = 1.0
    """Video understanding: frames per second sampled from the clip."""
    und_max_frames: int = 64
    """Video understanding: at most this many frames."""
    views: int = 0
    """3D: stored views used as reconstruction targets (0: all)."""
    global_batch: int = 0
    """The paper's samples per optimizer step of this stream over all ranks at the reference scale
    (``RunConfig.reference_gpus``); 0: not stated. The trainer prints it against what the config
    gives (training/batch.py)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        where = f"stream {self.name!r}"
        if self.modality not in MODALITIES:
            raise ValueError(f"{where}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.task not in TASKS:
            raise ValueError(f"{where}: task must be one of {TASKS}, got {self.task!r}")
        if not (PATCH_HW <= self.min_res <= self.max_res and self.min_res % PATCH_HW == 0 == self.max_res % PATCH_HW):
            raise ValueError(f"{where}: need {PATCH_HW} <= min_res <= max_res, both multiples of {PATCH_HW}; "
                             f"got min_res={self.min_res}, max_res={self.max_res}")
        if self.micro_batches < 1 or self.token_budget < 1 or self.views < 0 or self.global_batch < 0:
            raise ValueError(f"{where}: micro_batches and token_budget must be >= 1, views and global_batch >= 0, "
                             f"got {self.micro_batches}, {self.token_budget}, {self.views}, {self.global_batch}")
        lo, hi = self.clip_frames
        if not (PATCH_T <= lo <= hi and lo % PATCH_T == 0 == hi % PATCH_T):
            raise ValueError(f"{where}: clip_frames must be a range of multiples of {PATCH_T}, got {self.clip_frames}")
        if not self.frame_strides or any(not 1 <= a <= b for a, b in self.frame_strides):
            raise ValueError(f"{where}: frame_strides must be ranges (lo, hi) with 1 <= lo <= hi, got "
                             f"{self.frame_strides}")
        if self.und_fps <= 0 or self.und_max_frames < 1:
            raise ValueError(f"{where}: und_fps must be > 0 and und_max_frames >= 1")


@dataclass
class RetryConfig:
    """Shard downloads (S3): a failed download is retried after ``backoff * 2**k`` seconds (k = 0, 1,
    ...; at most ``backoff_max``), ``attempts`` times in all, before the run fails."""
    attempts: int = 12
    backoff: float = 1.0
    backoff_max: float = 30.0
    timeout: float = 120.0
    """Seconds one shard download may take (streaming's download_timeout; boto3's read timeout)."""

    def __post_init__(self):
        if self.attempts < 1 or self.backoff < 0 or self.backoff_max < self.backoff or self.timeout <= 0:
            raise ValueError(f"invalid retry settings {self}: need attempts >= 1, 0 <= backoff <= backoff_max, "
                             "timeout > 0")


def cpus_per_task() -> int:
    """CPUs this training process may use: Slurm's ``SLURM_CPUS_PER_TASK`` (the stage scripts' 12),
    else the CPUs it is bound to, shared by the processes torchrun started on this node."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def mix_order(streams: dict[str, StreamConfig]) -> list[str]:
    """Stream names of one round of the mix, in order (mixing.py's docstring)."""
    slots = sorted((Fraction(2 * k + 1, 2 * s.micro_batches), i, name)
                   for i, (name, s) in enumerate(streams.items()) for k in range(s.micro_batches))
    return [name for _, _, name in slots]


@dataclass
class DataConfig:
    streams: dict[str, StreamConfig] = field(default_factory=dict)
    """name -> stream. The mix interleaves them in this order (``mixing.py``)."""
    seed: int = 0
    """Seeds every stream's sample order and each sample's random choices (resolution, clip, ...)."""
    shuffle: bool = True
    shuffle_block: int = 1 << 16
    """Samples are shuffled within windows of this many samples of the shard-shuffled order
    (``dataset.epoch_order``): larger mixes better, but a rank caches a window's shards at once."""
    num_workers: int = -1
    """DataLoader worker processes decoding samples, per stream; -1 (auto): this task's CPUs but one
    (kept for the training process), shared out over the streams (``workers_per_stream``)."""
    prefetch: int = 2
    """Packed micro-batches each stream keeps ready ahead of the trainer (``loader.StreamLoader``)."""
    max_bad_fraction: float = 0.01
    """Fail once more than this fraction of a stream's samples seen was undecodable."""
    bad_check_min_samples: int = 100
    """Samples of a stream to see before ``max_bad_fraction`` is enforced (one bad file is no trend)."""
    retry: RetryConfig = field(default_factory=RetryConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for key, s in self.streams.items():
            if not s.name:
                s.name = key
            elif s.name != key:
                raise ValueError(f"stream {key!r} carries the name {s.name!r}; they must agree")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if (self.shuffle_block < 1 or self.num_workers < -1 or self.prefetch < 1 or self.bad_check_min_samples < 1
                or self.seed < 0):
            raise ValueError(f"invalid shuffle_block / num_workers / prefetch / bad_check_min_samples / seed in {self}")

    @property
    def workers_per_stream(self) -> int:
        """``num_workers``, or with -1 (auto) ``(cpus_per_task() - 1) // streams``."""
        if self.num_workers >= 0:
            return self.num_workers
        return max(0, cpus_per_task() - 1) // max(1, len(self.streams))

    def step_order(self, mix_rounds: int) -> list[str]:
        """Stream names of an optimizer step's micro-batches, in order: ``mix_rounds`` rounds of the mix
        (``mix_order``). The one source of the micro-batches per step: ``MixedLoader`` hands them out in
        this order (the trainer's loop), and DeepSpeed accumulates its length
        (``RunConfig.micro_batches_per_step``)."""
        return mix_order(self.streams) * mix_rounds

    def check(self) -> None:
        """Raise unless the config can run (after any overrides): valid fields, at least one stream,
        each with a ``remote``."""
        self.validate()
        for s in self.streams.values():
            s.validate()
        if not self.streams:
            raise ValueError("data.streams is empty: configure at least one stream")
        missing = [n for n, s in self.streams.items() if not s.remote]
        if missing:
            raise ValueError(f"no data given: streams {missing} have no remote; set data.streams.<name>.remote "
                             "(or data.remote with one stream) to MDS shards, a folder or s3://bucket/prefix")
