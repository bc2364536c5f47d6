"""The global batch: what one optimizer step holds per stream, against the paper's numbers.

A stream states the paper's global batch (``StreamConfig.global_batch``: samples per optimizer step
over all ranks at ``RunConfig.reference_gpus``, the Slurm scripts' 256 GPUs). A step holds, per
data-parallel rank, ``mix_rounds`` rounds of the mix, each with the stream's ``micro_batches``
packed micro-batches of ``token_budget`` tokens. With ``mix_rounds = 0`` ("auto") the rounds follow
from the data-parallel size: ``max(1, round(reference_gpus / dp))``, so a smaller job accumulates
to the paper's step instead of shrinking it.

Packing is by tokens, so samples per micro-batch vary; the estimate here is ``token_budget /
mean_tokens`` (full packing; the trainer logs the real ``pack_fill``), with the mean tokens of a
sample from the stream's resolution range (``mean_tokens``).
"""
from __future__ import annotations

from dataclasses import dataclass

from atoken.data_pipeline.config import StreamConfig
from atoken.data_pipeline.packing import worst_case_tokens
from atoken.model.config import PATCH_HW, PATCH_T

# A 3D sample's tokens are its occupied voxels, which the config does not bound: an estimate of a
# typical 64^3 surface (a cube's whole shell is 23,816).
ASSET_TOKENS = 12_000


def mean_tokens(stream: StreamConfig) -> float:
    """Expected tokens of one sample. Images: the mean of (s / 16)^2 over the longer sides s the
    stream draws (uniform over multiples of 16, ``images.sample_resolution``), i.e. square images
    (an upper bound: a 4:3 photo has 3/4 of it). Video: that times the tile's 4-frame groups (mean
    clip length for reconstruction, ``und_max_frames`` for understanding: an upper bound)."""
    if stream.modality == "3d":
        return float(ASSET_TOKENS)
    sides = range(max(1, stream.min_res // PATCH_HW), stream.max_res // PATCH_HW + 1)
    area = sum(k * k for k in sides) / len(sides)
    if stream.modality == "image":
        return area
    frames = sum(stream.clip_frames) / 2 if stream.task == "rec" else stream.und_max_frames
    return area * -(-frames // PATCH_T)


def budget_for(stream: StreamConfig, global_batch: int, gpus: int) -> int:
    """The token budget (a multiple of 256, at least the largest sample) that gives ``global_batch``
    samples per step at ``gpus`` data-parallel ranks with one round of the mix per step."""
    per_micro = global_batch / (gpus * stream.micro_batches)
    need = -(-int(per_micro * mean_tokens(stream)) // 256) * 256
    return max(need, worst_case_tokens(stream) or 0)


def rounds_per_step(mix_rounds: int, reference_gpus: int, dp: int) -> int:
    """Rounds of the mix per optimizer step: ``mix_rounds``, or with 0 (auto) what keeps the
    reference scale's step (module docstring)."""
    return mix_rounds if mix_rounds > 0 else max(1, round(reference_gpus / dp))


@dataclass
class StreamBatch:
    name: str
    micro_batches: int  # per rank per optimizer step
    samples: float  # per optimizer step over all ranks (estimate)
    tokens: int  # token budget per optimizer step over all ranks (at full packing)
    paper: int  # the paper's samples per step (0: not stated)
    budget: int = 0  # tokens per packed micro-batch (the stream's token_budget)
    dp: int = 1  # data-parallel ranks the step is spread over

    @property
    def ratio(self) -> float | None:
        return self.samples / self.paper if self.paper else None


def step_batches(streams: dict[str, StreamConfig], rounds: int, dp: int) -> list[StreamBatch]:
    """Per stream: what one optimizer step holds at ``dp`` data-parallel ranks."""
    out = []
    for name, s in streams.items():
        micro = s.micro_batches * rounds
        out.append(StreamBatch(name, micro, dp * micro * s.token_budget / mean_tokens(s), dp * micro * s.token_budget,
                               s.global_batch, s.token_budget, dp))
    return out


def describe(batches: list[StreamBatch], dp: int, rounds: int, reference_gpus: int, loading: str = "") -> str:
    """The start-up table: per stream and in all, the micro-batch's token budget, and per optimizer
    step the samples and tokens per rank and over all ranks, with the ratio to the paper's batch;
    ``loading``: a line on how the data reaches the device."""
    def ratio(x: float | None) -> str:
        return f"{x:.3g}" if x is not None else "-"

    row = "  {:<12} {:>10} {:>12} {:>12} {:>12} {:>13} {:>13} {:>7} {:>7}".format
    lines = [f"global batch at {dp} data-parallel ranks, {rounds} round(s) of the mix per step (the paper's "
             f"numbers: at {reference_gpus} GPUs):",
             row("stream", "micro/rank", "tokens/micro", "samples/rank", "tokens/rank", "samples/step", "tokens/step",
                 "paper", "ratio")]
    for b in batches:
        lines.append(row(b.name, b.micro_batches, b.budget, f"{b.samples / dp:.1f}", b.tokens // dp, f"{b.samples:.0f}",
                         b.tokens, b.paper or "-", ratio(b.ratio)))
    stated = [b for b in batches if b.paper]
    total = sum(b.samples for b in stated) / sum(b.paper for b in stated) if stated else None
    samples, tokens = sum(b.samples for b in batches), sum(b.tokens for b in batches)
    lines.append(row("all", sum(b.micro_batches for b in batches), "-", f"{samples / dp:.1f}", tokens // dp,
                     f"{samples:.0f}", tokens, sum(b.paper for b in batches) or "-", ratio(total)))
    lines.append("  (per optimizer step; samples: token budget / mean sample tokens, i.e. full packing; pack_fill "
                 "in the logs is the measured fill; tokens/micro: data.streams.<name>.token_budget)")
    if loading:
        lines.append(f"  {loading}")
    return "\n".join(lines)
