"""Exponential moving average of the model's weights (docs/design.md: 0.9999)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .checkpoint.deepspeed_internals import is_partitioned, local_tensor, release_gathered


class EMA:
    """fp32 shadow copies of the trainable parameters, updated after each optimizer step.

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so short runs (and the first
    thousands of steps of long ones) are not dominated by the random initialisation.

    Each rank keeps the EMA of what it holds (``local_tensor``): a tensor-parallel shard, and under
    ZeRO-3 only its data-parallel partition of that, so the EMA is sharded like the weights. Build
    it after the DeepSpeed engine (which partitions the parameters under ZeRO-3).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: local_tensor(p).detach().float().clone()
                       for n, p in model.named_parameters() if p.requires_grad}
        self.partitioned = is_partitioned(model)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(local_tensor(p).detach().float(), 1 - d)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (for evaluation). Under ZeRO-3 this
        writes each rank's partitions, and the forward passes inside are collectives as in
        training: every rank must enter it."""
        params = dict(model.named_parameters())
        backup = {n: local_tensor(params[n]).detach().clone() for n in self.shadow}
        self._write(params, self.shadow)
        try:
            yield model
        finally:
            self._write(params, backup)

    @torch.no_grad()
    def _write(self, params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
        for n, v in values.items():
            local_tensor(params[n]).copy_(v)
        if self.partitioned:  # the next forward gathers from the partitions just written
            release_gathered(list(params.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]} ({len(missing)} in all)")
        for n in self.shadow:
            if state[n].shape != self.shadow[n].shape:
                raise ValueError(f"EMA state {n}: {tuple(state[n].shape)} does not fit this rank's "
                                 f"{tuple(self.shadow[n].shape)} (saved at another layout?)")
            self.shadow[n].copy_(state[n])
