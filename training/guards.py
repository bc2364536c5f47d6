"""What a step must pass before it is applied: finite loss and gradients, no loss spike; and finite
state before anything is written (checkpoints, ``atoken-convert``). docs/fault_tolerance.md.

The decision is taken once per step, on every rank alike, from the step's exchange
(``exchange.py``: the loss of each stream summed over the ranks, the count of non-finite micro-batch
losses), after the last micro-batch's forward and before its backward. A step that must not be
applied is backpropagated through ``loss * nan``: the gradient norm is then not finite on every rank
and DeepSpeed's own check (ZeRO 1-3, fp32 and bf16 alike) drops the update without touching weights,
optimizer moments or the LR schedule; the trainer skips the EMA update. The data position has moved on.
A non-finite gradient norm from finite losses is caught by the same check: ``engine.was_step_applied()``
says so after the step.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque

import torch
import torch.distributed as dist

from atoken.model.errors import UserError

from .ema import local_tensor

log = logging.getLogger(__name__)

OK, NONFINITE, SPIKE = "ok", "nonfinite", "spike"


def describe(micros: list[dict], loader, rank: int) -> list[dict]:
    """Where micro-batches' samples come from (``train_step``'s records: stream, sample indices and
    names): per micro-batch its rank, stream, and per sample [shard, row in the shard, index, name]."""
    out = []
    for m in micros:
        dataset = loader.loaders[m["stream"]].dataset
        pairs = zip(m["indices"], m["names"], strict=False)  # indices: [] when a loader does not track them
        samples = [[*dataset.locate(i), i, name] for i, name in pairs]
        out.append({"rank": rank, "stream": m["stream"], "samples": samples})
    return out


def format_data(described: list[dict], limit: int = 4) -> str:
    """``describe`` records as one short phrase (the first ``limit`` samples)."""
    parts = [f"rank {d['rank']} {d['stream']} {shard} row {row} (sample {idx} {name!r})"
             for d in described for shard, row, idx, name in d["samples"]]
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more if parts else "no samples recorded"


class StepGuard:
    """Per step: ``verdict`` (before the update), then ``applied`` or ``nonfinite`` / ``spiked``.
    Its state (each stream's recent losses, the non-finite streak) is checkpointed, so a resumed run
    decides as the uninterrupted one would."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.recent: dict[str, deque] = {}
        self.streak: list[tuple[int, str]] = []  # (step, data) of the non-finite steps in a row
        self.counts = {"nonfinite": 0, "spikes": 0, "rollbacks": 0}

    def verdict(self, nonfinite: bool, stream_losses: dict[str, float]) -> tuple[str, list[dict]]:
        """OK, NONFINITE or SPIKE for the step's agreed losses; for a spike, the streams that spiked."""
        if nonfinite or not all(math.isfinite(v) for v in stream_losses.values()):
            return NONFINITE, []
        spikes = []
        if self.cfg.spike_factor > 0:
            for name, loss in stream_losses.items():
                seen = self.recent.get(name, ())
                if len(seen) >= self.cfg.spike_window:
                    median = statistics.median(seen)
                    if loss > self.cfg.spike_factor * median:
                        spikes.append({"stream": name, "loss": loss, "median": median,
                                       "ratio": loss / median if median > 0 else math.inf})
        return (SPIKE, spikes) if spikes else (OK, [])

    def applied(self, stream_losses: dict[str, float]) -> None:
        for name, loss in stream_losses.items():
            self.recent.setdefault(name, deque(maxlen=self.cfg.spike_window)).append(loss)
        self.streak = []

    def spiked(self) -> None:
        self.counts["spikes"] += 1

    def nonfinite(self, step: int, data: str) -> None:
        """Count a non-finite step; raise the run's one error once ``nonfinite_limit`` are in a row."""
        self.counts["nonfinite"] += 1
        self.streak.append((step, data))
        limit = self.cfg.nonfinite_limit
        if limit and len(self.streak) >= limit:
            steps = [s for s, _ in self.streak]
            raise UserError(
                f"{len(steps)} non-finite steps in a row (steps {', '.join(map(str, steps))}; none applied, "
                f"the last checkpoint holds the last finite state): the loss or gradient norm is NaN/inf; "
                f"data of step {steps[0]}: {self.streak[0][1]}; "
                "lower optim.lr / raise optim.warmup_steps, or check those samples "
                f"(guards.nonfinite_limit={limit})")

    def state_dict(self) -> dict:
        return {"recent": {k: list(v) for k, v in self.recent.items()}, "streak": list(self.streak),
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint written before the guards existed
            return
        self.recent = {k: deque(v, maxlen=self.cfg.spike_window) for k, v in state["recent"].items()}
        self.streak = [tuple(x) for x in state["streak"]]
        self.counts.update(state["counts"])


class StepChecks:
    """The step's checks in order: ``begin``; ``before_update`` (the exchange, then the verdict;
    True: do not apply); after ``engine.step()``, ``after_update`` (what the step was, its events, the
    error after ``nonfinite_limit`` in a row)."""

    def __init__(self, cfg, exchange, signals, loader, event, rank: int):
        self.guard = StepGuard(cfg)
        self.policy = cfg.spike_policy
        self.exchange, self.signals, self.loader, self.event, self.rank = exchange, signals, loader, event, rank
        self.step, self.t0, self.verdict, self.spikes, self.agreed = 0, 0.0, OK, [], None

    def begin(self, step: int) -> None:
        self.step, self.t0, self.verdict, self.spikes = step, time.perf_counter(), OK, []

    def before_update(self, stream_losses: dict[str, torch.Tensor], nonfinite: torch.Tensor, waited: float) -> bool:
        """After the last micro-batch's forward. ``stream_losses``: this rank's loss per stream (its task's
        term, mean of its micro-batches); ``nonfinite``: count of its micro-batches with a non-finite loss."""
        local = {k: float(v) for k, v in stream_losses.items()}  # one device sync per step
        self.agreed = self.exchange.agree(self.step, self.signals.flag, int(nonfinite), local,
                                          time.perf_counter() - self.t0, waited)
        self.verdict, self.spikes = self.guard.verdict(self.agreed.nonfinite > 0, self.agreed.stream_losses)
        return self.verdict != OK

    @property
    def stop(self) -> int:
        return self.agreed.stop if self.agreed else 0

    def after_update(self, applied: bool, micros: list[dict]) -> str:
        """OK, NONFINITE or SPIKE, the same on every rank (collective on a step not applied)."""
        if self.agreed.stragglers:
            self.event("stragglers", **self.agreed.stragglers)
        if self.verdict != OK and applied:
            raise RuntimeError(f"step {self.step}: the guards dropped it ({self.verdict}) but DeepSpeed applied it")
        if self.verdict == OK and not applied:
            self.verdict = NONFINITE  # finite losses, non-finite gradient norm (DeepSpeed's check)
        if self.verdict == OK:
            self.guard.applied(self.agreed.stream_losses)
            return OK
        # Which data: the micro-batches whose loss was not finite, else (a spike, or a non-finite gradient
        # from finite losses) all of the step's; gathered from every rank.
        bad = [m for m in micros if not bool(m["finite"])] if self.verdict == NONFINITE else []
        mine = describe(bad or micros, self.loader, self.rank)
        data = mine
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine, group=self.exchange.group)
            data = [d for r in every for d in r]
        text = format_data(data)
        if self.verdict == NONFINITE:
            log.warning("step %d not applied: non-finite loss or gradient norm (%d micro-batch loss(es) NaN/inf); "
                        "data: %s", self.step, self.agreed.nonfinite, text)
            self.event("nonfinite", step=self.step, micro_batches_nonfinite=self.agreed.nonfinite,
                       count=self.guard.counts["nonfinite"] + 1, data=data)
            self.guard.nonfinite(self.step, text)  # raises after nonfinite_limit in a row
        else:
            self.guard.spiked()
            log.warning("step %d not applied: loss spike %s (policy %s); data: %s", self.step, ", ".join(
                f"{s['stream']} {s['loss']:.4g} = {s['ratio']:.1f}x its recent median" for s in self.spikes),
                self.policy, text)
            self.event("spike", step=self.step, streams=self.spikes, policy=self.policy,
                       count=self.guard.counts["spikes"], data=data)
        return self.verdict


def first_nonfinite(tensors) -> str | None:
    """The name of the first tensor in ``(name, tensor)`` pairs holding a NaN or inf, else None.
    One device sync for all of them; the names are looked up only when something is wrong."""
    tensors = [(n, t) for n, t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not tensors:
        return None
    device = tensors[0][1].device  # one flag per tensor, gathered on one device (optimizer state may be elsewhere)
    bad = torch.stack([(~torch.isfinite(t)).any().to(device) for _, t in tensors])
    if not bool(bad.any()):
        return None
    return tensors[int(bad.nonzero()[0])][0]


def _optimizer_tensors(engine):
    """This rank's optimizer state: torch's AdamW moments behind DeepSpeed's ZeRO wrapper, and ZeRO's
    fp32 master partitions where it keeps them."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for g, group in enumerate(inner.param_groups):
        for i, p in enumerate(group["params"]):
            for key, t in inner.state.get(p, {}).items():
                yield f"optimizer {group.get('name', g)} param {i} {key}", t
            yield f"optimizer {group.get('name', g)} master param {i}", p


def nonfinite_state(engine, ema) -> str | None:
    """Collective (every rank calls it): the first non-finite tensor of the weights, optimizer state or
    EMA on any rank ("rank R: NAME"), or None when all are finite."""
    named = [(f"weight {n}", local_tensor(p)) for n, p in engine.module.named_parameters()]
    named += list(_optimizer_tensors(engine))
    named += [(f"EMA {n}", t) for n, t in ema.state_dict().items()]
    bad = first_nonfinite(named)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bad
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, bad)
    return next((f"rank {r}: {b}" for r, b in enumerate(found) if b), None)


def check_finite_weights(state: dict[str, torch.Tensor], where) -> None:
    """``atoken-convert``'s refusal: a UserError naming the first tensor of ``state`` that is not finite."""
    bad = first_nonfinite(state.items())
    if bad is not None:
        t = state[bad]
        n = int((~torch.isfinite(t)).sum())
        raise UserError(f"{where}: weight {bad!r} is not finite ({n} of {t.numel()} values NaN/inf): the run "
                        "diverged before this checkpoint; convert an earlier one (checkpoints/step_*)")
