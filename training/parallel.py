"""Tensor, sequence and data parallelism, applied in one place.

    info = distributed.init()                                   # torch.distributed, gloo or NCCL
    dims = init_parallel(tp=2, sequence_parallel=True, seed=cfg.seed)
    torch.manual_seed(cfg.seed)                                 # the same weights on every rank
    model = build_model(cfg.model, dims).to(info.device)
    engine = build_engine(model, cfg, mpu=mpu_for(dims))        # DeepSpeed ZeRO over dims.dp

Layout: ``world = tp * dp``; the ``tp`` ranks of a tensor-parallel group are consecutive global
ranks (megatron's order). Every rank of a TP group sees the same packed micro-batch; each DP rank
its own.

Parameters keep the plain model's names at every layout. TP rank ``r`` holds the ``r``-th of ``tp``
equal chunks of:

- dim 0 (column-parallel): ``*.attn.qkv.weight`` / ``.bias`` (whole heads: the fused rows are laid
  out ``[heads, (q, k, v), head_dim]``) and ``*.mlp.fc1.weight`` / ``.bias``;
- dim 0 (by head): the per-head QK-norm gains ``*.attn.q_norm.weight`` / ``k_norm.weight``
  [heads, head_dim];
- dim 1 (row-parallel): ``*.attn.proj.weight`` and ``*.mlp.fc2.weight``;

and a full copy of everything else (norms, row-parallel biases, patch embedding, position tables,
latent, up-projection, pixel head): identical on the TP ranks.

Each parameter carries megatron's attributes ``tensor_model_parallel`` (True: split),
``partition_dim`` (0 or 1; -1 when replicated) and ``partition_stride`` (1). ``full_state_dict``
and ``load_full_state_dict`` convert between a rank's shards and the full tensors.

Gradients that are a partial sum on each TP rank are all-reduced over the TP group by a tensor
hook, before DeepSpeed sees them (so ZeRO 1, 2 and 3 all get whole gradients). They are marked
``tp_partial_grad = True``:

- with sequence parallelism, every parameter used on the token shard: the blocks' ``norm1`` and
  ``norm2`` and the row-parallel biases (``proj.bias``, ``fc2.bias``); these also carry megatron's
  ``sequence_parallel = True``.

DeepSpeed's gradient-norm clipping counts a parameter on every TP rank when
``tensor_model_parallel`` is set and only on TP rank 0 otherwise, then sums over the model-parallel
group (``mpu_for``): the true global norm.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from atoken.model import AToken, ModelConfig
from atoken.model.transformer import Angles, Block, LinearSpec

from . import megatron_cpu

log = logging.getLogger(__name__)

TP_PARTIAL_GRAD = "tp_partial_grad"  # parameter attribute: grad is all-reduced over the TP group


@dataclass(frozen=True)
class ParallelDims:
    """This rank's place in the layout. ``ParallelDims()`` is one process, no parallelism."""
    tp: int = 1
    dp: int = 1
    # Split the packed token dim across the TP ranks inside each transformer stack (needs tp > 1).
    sequence_parallel: bool = False
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = field(default=None, repr=False, compare=False)
    dp_group: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"tp and dp must be >= 1, got tp={self.tp} dp={self.dp}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tensor parallelism (tp > 1)")

    @property
    def tensor_parallel(self) -> bool:
        return self.tp > 1


def init_parallel(tp: int = 1, sequence_parallel: bool = False, seed: int = 0) -> ParallelDims:
    """megatron-core's parallel state on top of an initialised torch.distributed: TP groups of
    ``tp`` consecutive ranks, DP = world // tp. Calling it again re-initialises.

    Seeds megatron's RNG tracker (``model_parallel_cuda_manual_seed``): the default device RNG gets
    ``seed`` on every rank; the tracker's ``model-parallel-rng`` gets ``seed + 2718 + tp_rank``
    (differs across TP ranks, for randomness inside TP regions). Randomness that must differ across
    data-parallel replicas but match within a TP group (the posterior's noise: the decoder input is
    replicated on the TP ranks) must be seeded from ``dims.dp_rank``, never the global rank.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed: call training.distributed.init() first")
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the world size {world}")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor parallelism (tp > 1)")
    megatron_cpu.apply_if_no_cuda()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    dims = ParallelDims(tp=tp, dp=world // tp, sequence_parallel=sequence_parallel,
                        tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                        tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group())
    log.info("parallel layout: %s", dims)
    return dims


# ------------------------------------------------------------------ megatron's linear layers

def _no_init(weight: torch.Tensor) -> None:
    """perform_initialization is off: build_model copies the plain model's weights in."""


def _plain_linear_state(module: nn.Module) -> None:
    """Keep a megatron linear's state dict that of nn.Linear (``weight``, ``bias``). megatron adds an
    ``_extra_state`` entry (Transformer Engine compatibility; the classes below reset
    ``get/set_extra_state`` to nn.Module's) and a load hook that inserts one (removed here)."""
    module._load_state_dict_pre_hooks.clear()


def _mark_split(p: torch.Tensor, dim: int) -> None:
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1


def _megatron_forward(layer, forward, x: torch.Tensor) -> torch.Tensor:
    """Run a megatron linear, returning its output only (skip_bias_add is off: bias included).

    NOTE: megatron's autograd functions restore autocast in backward for CUDA only; under CPU
    autocast their backward would mix bf16 grads with fp32 weights. On CPU they run in fp32.
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return forward(x.to(layer.weight.dtype))[0]
    return forward(x)[0]


@functools.cache
def _column_row_classes():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """``[..., in] -> [..., out / tp]`` (gather_output=False), bias added; returns a tensor.
        With sequence parallelism its input is this rank's token shard, all-gathered inside."""
        DECAY, NO_DECAY = ("weight",), ("bias",)  # optimizer groups, as nn.Linear (model/params.py)
        get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

        def __init__(self, in_features: int, out_features: int, bias: bool, config, tp_group):
            super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                             gather_output=False, skip_bias_add=False, tp_group=tp_group)
            _plain_linear_state(self)
            _mark_split(self.weight, dim=0)  # megatron 0.16 marks the weight only if it initialises it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _megatron_forward(self, super().forward, x)

    class RowLinear(RowParallelLinear):
        """``[..., in / tp] -> [..., out]``, all-reduced (or, with sequence parallelism,
        reduce-scattered to this rank's token shard), bias added; returns a tensor."""
        DECAY, NO_DECAY = ("weight",), ("bias",)  # optimizer groups, as nn.Linear (model/params.py)
        get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

        def __init__(self, in_features: int, out_features: int, bias: bool, config, tp_group):
            super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                             input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
            _plain_linear_state(self)
            _mark_split(self.weight, dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _megatron_forward(self, super().forward, x)

    return ColumnLinear, RowLinear


class MegatronLinearSpec(LinearSpec):
    """The transformer's linears as megatron's Column/RowParallelLinear over ``dims.tp_group``, and,
    with ``dims.sequence_parallel``, the packed token dim split across the TP ranks in each stack."""

    def __init__(self, dims: ParallelDims):
        from megatron.core import ModelParallelConfig

        self.tp_size = dims.tp
        self.sequence_parallel = dims.sequence_parallel
        self.tp_group = dims.tp_group
        # NOTE: parameters are allocated on the CPU, like the plain model's (the caller moves the
        # model); weights are copied in by build_model, not drawn by megatron.
        self.config = ModelParallelConfig(tensor_model_parallel_size=dims.tp,
                                          sequence_parallel=dims.sequence_parallel, params_dtype=torch.float32,
                                          use_cpu_initialization=True, perform_initialization=False)
        self._column, self._row = _column_row_classes()

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return self._column(in_features, out_features, bias, self.config, self.tp_group)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return self._row(in_features, out_features, bias, self.config, self.tp_group)

    def shard_sequence(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, angles: Angles | None
                       ) -> tuple[torch.Tensor, torch.Tensor, int, Angles | None]:
        """x [N, width] (identical on the TP ranks) -> this rank's [N_pad / tp, width].

        N is padded to N_pad, a multiple of tp, with zero tokens that form their own last segment
        of cu_seqlens: no real sample attends to them, and ``unshard_sequence`` drops them again
        (so no loss, and exactly zero gradient, comes from them).
        """
        if not self.sequence_parallel:
            return x, cu_seqlens, max_seqlen, angles
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        n = x.shape[0]
        pad = -n % self.tp_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([n + pad])])
            max_seqlen = max(max_seqlen, pad)
            if angles is not None:  # the identity rotation
                angles = (F.pad(angles[0], (0, 0, 0, pad), value=1.0), F.pad(angles[1], (0, 0, 0, pad)))
        return scatter_to_sequence_parallel_region(x, group=self.tp_group), cu_seqlens, max_seqlen, angles

    def unshard_sequence(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """This rank's [N_pad / tp, width] -> the full [N, width] on every TP rank."""
        if not self.sequence_parallel:
            return x
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # What follows the stack (final norm, heads, loss) runs replicated on every TP rank, so the
        # gradient arriving here is already whole: backward keeps this rank's rows, no reduction.
        full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.tp_group)
        return full[:num_tokens]


# ------------------------------------------------------------------ the model

def build_model(cfg: ModelConfig, dims: ParallelDims, checkpoint: bool = False) -> AToken:
    """The model for this rank: plain at tp == 1, megatron's TP (and SP) layers otherwise.

    Draws the weights from the current CPU RNG exactly as ``AToken(cfg)`` does, so with the same
    seed a TP rank holds the corresponding slices of the TP=1 model (and every TP rank the same
    replicated weights: checked here).
    """
    if not dims.tensor_parallel:
        model = AToken(cfg, checkpoint=checkpoint)
        _set_replicated_defaults(model)
        return model
    full = AToken(cfg)  # NOTE: the whole model on each rank for a moment (as megatron's CPU init)
    with torch.random.fork_rng(devices=[]):  # the RNG continues as after the plain model's init
        model = AToken(cfg, linear=MegatronLinearSpec(dims), checkpoint=checkpoint)
    for attn in (m.attn for m in model.modules() if isinstance(m, Block)):
        if attn.q_norm is not None:  # per-head gains: each rank holds its own heads' rows
            _mark_split(attn.q_norm.weight, dim=0)
            _mark_split(attn.k_norm.weight, dim=0)
    _set_replicated_defaults(model)
    load_full_state_dict(model, full.state_dict(), dims)
    del full
    _mark_partial_grads(model, dims)
    _reduce_partial_grads_over_tp(model, dims)
    _check_replicated(model, dims)
    return model


def _set_replicated_defaults(model: nn.Module) -> None:
    """megatron's attribute defaults on every parameter the TP layers did not mark as split."""
    for p in model.parameters():
        if not hasattr(p, "tensor_model_parallel"):
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = False, -1, 1


def _mark_partial_grads(model: nn.Module, dims: ParallelDims) -> None:
    """With sequence parallelism, the parameters applied to this rank's token shard only."""
    if not dims.sequence_parallel:
        return
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for p in [*block.norm1.parameters(), *block.norm2.parameters(),
                  *(m.bias for m in (block.attn.proj, block.mlp.fc2) if m.bias is not None)]:
            p.sequence_parallel = True  # megatron's name for it
            setattr(p, TP_PARTIAL_GRAD, True)


def _all_reduce_grad(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.contiguous().clone()  # the incoming grad may be shared; never reduce it in place
    dist.all_reduce(grad, group=group)
    return grad


def _reduce_partial_grads_over_tp(model: nn.Module, dims: ParallelDims) -> None:
    """A tensor hook per marked parameter: it runs when the parameter's gradient is computed,
    before it is accumulated into ``.grad`` and before DeepSpeed's own hooks (ZeRO 1, 2 and 3).
    NOTE: every TP rank runs the same graph, so the hooks fire (and all-reduce) in the same order."""
    for p in model.parameters():
        if getattr(p, TP_PARTIAL_GRAD, False):
            p.register_hook(functools.partial(_all_reduce_grad, group=dims.tp_group))


def _check_replicated(model: nn.Module, dims: ParallelDims) -> None:
    """Replicated parameters must be identical on the TP ranks (same seed): one small all-reduce."""
    names, sums = [], []
    for name, p in model.named_parameters():
        if not p.tensor_model_parallel:
            names.append(name)
            sums.append(p.detach().double().abs().sum() + p.detach().double().sum())
    local = torch.stack(sums)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=dims.tp_group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=dims.tp_group)
    bad = [n for n, h, lo in zip(names, high.tolist(), low.tolist()) if h != lo]
    if bad:
        raise RuntimeError(f"replicated parameters differ across tensor-parallel ranks (seeded differently?): "
                           f"{bad[:5]} ({len(bad)} in all)")


def _zero3_gathered(model: nn.Module):
    """DeepSpeed ZeRO-3 keeps only a DP partition of each parameter: gather them for reading."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def full_state_dict(model: nn.Module, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """The plain (TP=1) model's parameters, gathered from the TP shards, on every rank (CPU copies).
    A collective over the TP group (and, under ZeRO-3, the DP group): every rank must call it."""
    module = getattr(model, "module", model)  # a DeepSpeed engine or the model
    out = {}
    with _zero3_gathered(module):
        for name, p in module.named_parameters():
            t = p.detach()
            if dims.tensor_parallel and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(dims.tp)]
                dist.all_gather(parts, t.contiguous(), group=dims.tp_group)
                t = torch.cat(parts, dim=p.partition_dim)
            out[name] = t.cpu().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], dims: ParallelDims,
                         allow_missing: bool = False) -> None:
    """Copy the plain model's tensors into this rank's shards (before the DeepSpeed engine exists).
    ``allow_missing``: parameters absent from ``state`` keep their values (a stage hand-off's new heads)."""
    params = dict(model.named_parameters())
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if unexpected or (missing and not allow_missing):
        raise KeyError(f"state and model differ: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for name, p in params.items():
        if name not in state:
            continue
        t = state[name]
        if dims.tensor_parallel and getattr(p, "tensor_model_parallel", False):
            t = t.chunk(dims.tp, dim=p.partition_dim)[dims.tp_rank]
        if t.shape != p.shape:
            raise ValueError(f"{name}: shard {tuple(t.shape)} does not fit parameter {tuple(p.shape)}")
        p.copy_(t)


# ------------------------------------------------------------------ DeepSpeed

class MegatronMPU:
    """DeepSpeed's model-parallel unit (``deepspeed.initialize(mpu=...)``) over our layout.

    DeepSpeed asks for ``get_model_parallel_*`` (megatron calls it tensor-model-parallel) and
    ``get_data_parallel_*``; with it, ZeRO partitions over the DP group only and the clipping norm
    is summed over the TP group. NOTE: no ``initialize_sequence_parallel``: DeepSpeed would take
    that for its own (Ulysses) sequence parallelism and ignore the model-parallel group.
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_model_parallel_group(self):
        return self.dims.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.dims.tp_group, 0)

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dims.dp_group)

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def mpu_for(dims: ParallelDims) -> MegatronMPU | None:
    """The ``mpu`` to give DeepSpeed: None without a parallel state (one plain process)."""
    return MegatronMPU(dims) if dims.tp_group is not None else None
