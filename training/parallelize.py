"""Parallelism, applied in one place, in torchtitan's order, to a model built once.

    info = distributed.init()                                   # torch.distributed, gloo or NCCL
    dims = init_parallel(tp=2, sequence_parallel=True, seed=cfg.seed)
    torch.manual_seed(cfg.seed)                                 # the same weights on every rank
    model = AToken(cfg.model)                                   # plain, once, on the CPU
    engine = parallelize(model, dims, cfg, info.device)

``parallelize`` applies, in this order (``cfg.parallel``):

1. tensor parallelism, and sequence parallelism with it (``shard_model``): each block's linears are
   swapped in place for megatron's Column/RowParallelLinear holding this rank's slices of the
   plain weights, so the model is never built twice and a TP rank holds exactly the corresponding
   slices of the TP=1 model of the same seed;
2. activation checkpointing of each transformer block (``apply_activation_checkpointing``);
3. ``torch.compile`` of each transformer block (``compile_blocks``);
4. the DeepSpeed engine: AdamW, the LR schedule and ZeRO over the data-parallel group
   (engine.py), with ``mpu_for(dims)``.

``prepare_loss(objective, cfg, device)`` does the same for the loss's frozen perceptual net (no
parallelism: it is replicated and has no trainable parameters): channels_last and compile, on CUDA.

The model itself (model/) knows nothing of this: its blocks are plain ``nn.Linear`` modules.

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
``partition_dim`` (0 or 1; -1 when replicated) and ``partition_stride`` (1); ``shards.py`` splits
and merges by them. ``full_state_dict`` gathers a rank's shards back into the full tensors.

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

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from atoken.model.transformer import Angles, Block, SequenceSharding, Transformer

from . import megatron_cpu
from .checkpoint.deepspeed_internals import clear_load_state_dict_pre_hooks, partitioned_params
from .config import check_layout
from .engine import build_engine
from .shards import merge, partition_dim, split

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
        if self.dp < 1:
            raise ValueError(f"dp must be >= 1, got {self.dp}")
        check_layout(self.tp, self.sequence_parallel, self.tp * self.dp)

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
    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed: call training.distributed.init() first")
    world = dist.get_world_size()
    check_layout(tp, sequence_parallel, world)
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
    """perform_initialization is off: shard_model copies the plain model's weights in."""


def _plain_linear_state(module: nn.Module) -> None:
    """Keep a megatron linear's state dict that of nn.Linear (``weight``, ``bias``). megatron adds an
    ``_extra_state`` entry (Transformer Engine compatibility; the classes below reset
    ``get/set_extra_state`` to nn.Module's) and a load hook that inserts one (removed here)."""
    clear_load_state_dict_pre_hooks(module)


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


class MegatronSequenceSharding(SequenceSharding):
    """With sequence parallelism: the packed token dim of a stack split across the TP ranks
    (megatron's scatter / gather over ``dims.tp_group``), set on each ``Transformer`` by ``shard_model``."""

    def __init__(self, dims: ParallelDims):
        self.tp_size = dims.tp
        self.tp_group = dims.tp_group

    def shard(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, angles: Angles | None
              ) -> tuple[torch.Tensor, torch.Tensor, int, Angles | None]:
        """x [N, width] (identical on the TP ranks) -> this rank's [N_pad / tp, width].

        N is padded to N_pad, a multiple of tp, with zero tokens that form their own last segment
        of cu_seqlens: no real sample attends to them, and ``unshard`` drops them again (so no
        loss, and exactly zero gradient, comes from them).
        """
        n = x.shape[0]
        pad = -n % self.tp_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([n + pad])])
            max_seqlen = max(max_seqlen, pad)
            if angles is not None:  # the identity rotation
                angles = (F.pad(angles[0], (0, 0, 0, pad), value=1.0), F.pad(angles[1], (0, 0, 0, pad)))
        return scatter_to_sequence_parallel_region(x, group=self.tp_group), cu_seqlens, max_seqlen, angles

    def unshard(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """This rank's [N_pad / tp, width] -> the full [N, width] on every TP rank."""
        # What follows the stack (final norm, heads, loss) runs replicated on every TP rank, so the
        # gradient arriving here is already whole: backward keeps this rank's rows, no reduction.
        full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.tp_group)
        return full[:num_tokens]


# ------------------------------------------------------------------ the one entry point

def parallelize(model: nn.Module, dims: ParallelDims, cfg, device: torch.device):
    """``model`` (a plain ``AToken``, built once on the CPU, the same weights on every rank) ->
    this rank's DeepSpeed engine. ``cfg``: the ``RunConfig`` (``cfg.parallel`` and, for the
    engine, ``cfg.optim`` and ``cfg.steps``). Every rank calls it."""
    p = cfg.parallel
    shard_model(model, dims)  # 1. TP / SP (before the move: the slices are cut on the CPU)
    model.to(device)
    if p.activation_checkpointing:
        apply_activation_checkpointing(model)  # 2.
    if p.compile:
        compile_blocks(model)  # 3. (compiles the checkpointed forward: recomputation is traced too)
    return build_engine(model, cfg, mpu=mpu_for(dims))  # 4.


def blocks(model: nn.Module) -> list[Block]:
    """Every transformer ``Block`` of ``model`` (encoder, decoder, Gaussian decoder), in order."""
    return [m for m in model.modules() if isinstance(m, Block)]


# ------------------------------------------------------------------ 1. tensor / sequence parallelism

def shard_model(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """In place: this rank's part of ``model`` (a no-op apart from megatron's attributes at tp == 1).

    Each block's ``qkv``/``fc1`` become column-parallel and ``proj``/``fc2`` row-parallel layers
    holding this rank's slices (``shards.split``), its attention keeps its own ``heads // tp``
    heads (and their QK-norm rows); with ``dims.sequence_parallel`` every ``Transformer`` splits
    the token dim (``MegatronSequenceSharding``). Then: partial-gradient hooks, and a check that
    the replicated parameters agree over the TP group.
    """
    if not dims.tensor_parallel:
        _set_replicated_defaults(model)
        return model

    # NOTE: parameters are allocated on the CPU, like the plain model's (parallelize moves the
    # model); weights are copied in from the plain layers, not drawn by megatron.
    config = ModelParallelConfig(tensor_model_parallel_size=dims.tp, sequence_parallel=dims.sequence_parallel,
                                 params_dtype=torch.float32, use_cpu_initialization=True,
                                 perform_initialization=False)
    column, row = _column_row_classes()
    check_layout(dims.tp, dims.sequence_parallel, dims.tp * dims.dp, [b.attn.heads for b in blocks(model)])
    for block in blocks(model):
        attn, mlp = block.attn, block.mlp
        attn.qkv, attn.proj = _sharded(column, attn.qkv, config, dims), _sharded(row, attn.proj, config, dims)
        mlp.fc1, mlp.fc2 = _sharded(column, mlp.fc1, config, dims), _sharded(row, mlp.fc2, config, dims)
        attn.heads //= dims.tp  # this rank's heads
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:  # per-head gains [heads, head_dim]: each rank holds its own heads' rows
                norm.weight = nn.Parameter(split(norm.weight.detach(), 0, dims.tp, dims.tp_rank).clone())
                _mark_split(norm.weight, dim=0)
    if dims.sequence_parallel:
        sharding = MegatronSequenceSharding(dims)
        for stack in (m for m in model.modules() if isinstance(m, Transformer)):
            stack.sequence = sharding
    _set_replicated_defaults(model)
    _mark_partial_grads(model, dims)
    _reduce_partial_grads_over_tp(model, dims)
    _check_replicated(model, dims)
    return model


@torch.no_grad()
def _sharded(cls, plain: nn.Linear, config, dims: ParallelDims) -> nn.Module:
    """A megatron linear holding this rank's slices of ``plain``'s weight and bias."""
    layer = cls(plain.in_features, plain.out_features, plain.bias is not None, config, dims.tp_group)
    for name, p in layer.named_parameters():
        t = split(getattr(plain, name), partition_dim(p), dims.tp, dims.tp_rank)
        if t.shape != p.shape:
            raise ValueError(f"{name}: shard {tuple(t.shape)} does not fit parameter {tuple(p.shape)}")
        p.copy_(t)
    return layer


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
    bad = [n for n, h, lo in zip(names, high.tolist(), low.tolist(), strict=True) if h != lo]
    if bad:
        raise RuntimeError(f"replicated parameters differ across tensor-parallel ranks (seeded differently?): "
                           f"{bad[:5]} ({len(bad)} in all)")


# ------------------------------------------------------------------ 2. activation checkpointing

def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer ``Block`` in backward (torch's non-reentrant checkpoint), as
    torchtitan wraps its blocks. The block's ``forward`` is wrapped in place, so parameter names are
    unchanged (a wrapper module would prefix them). Without grad (evaluation, inference) it is the
    plain forward. Returns how many blocks."""
    found = blocks(model)
    for block in found:
        block.forward = functools.partial(_checkpointed, block.forward)
    log.info("activation checkpointing: %d transformer blocks", len(found))
    return len(found)


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


# ------------------------------------------------------------------ 3. compile

def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every transformer ``Block`` in place (``nn.Module.compile``: parameter names
    and checkpoints unchanged), the unit that repeats, as torchtitan compiles its blocks. Inductor
    fuses what eager mode runs as separate memory-bound kernels: the norms with their casts, the
    fp32 RoPE rotation, GELU, the residual adds. Attention stays the varlen kernel
    (``model.attention``), called from the compiled graph. Packed batches change length every step,
    so shapes are compiled dynamic. Returns how many blocks."""
    found = blocks(model)
    for block in found:
        block.compile(dynamic=True)
    log.info("torch.compile: %d transformer blocks (dynamic shapes)", len(found))
    return len(found)


def prepare_loss(objective: nn.Module, cfg, device: torch.device) -> None:
    """The frozen perceptual trunk of ``objective`` (``Objective`` or ``ReconstructionLoss``) on CUDA:
    channels_last weights, so cuDNN runs its convolutions NHWC (the [B_img, 3, S, S] input is
    transposed once, at the first convolution), and with ``parallel.compile`` the trunk compiled
    (as Cosmos compiles only its VGG). Shapes: static at first; a micro-batch with another image
    count recompiles once with the batch dimension dynamic (torch.compile's automatic dynamic), so
    a packed stream's varying image counts cost two compiles, not one per count. On CPU nothing
    changes (the golden file's numerics, and Inductor's CPU compile costs more than it saves here)."""
    rec = getattr(objective, "rec", objective)
    net = rec.perceptual
    if device.type != "cuda":
        log.info("perceptual net: eager, NCHW (on %s)", device.type)
        return
    net.to(memory_format=torch.channels_last)
    if cfg.parallel.compile:
        net.net.compile()
    log.info("perceptual net: channels_last%s", ", trunk compiled" if cfg.parallel.compile else "")


# ------------------------------------------------------------------ reading the weights back

def _zero3_gathered(model: nn.Module):
    """DeepSpeed ZeRO-3 keeps only a DP partition of each parameter: gather them for reading."""
    params = partitioned_params(model)
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # noqa: PLC0415 - DeepSpeed picks its accelerator on import: after distributed.init()

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def full_state_dict(model: nn.Module, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """The plain (TP=1) model's parameters, gathered from the TP shards, on every rank (CPU copies).
    A collective over the TP group (and, under ZeRO-3, the DP group): every rank must call it."""
    module = getattr(model, "module", model)  # a DeepSpeed engine or the model
    out = {}
    with _zero3_gathered(module):
        for name, p in module.named_parameters():
            t, dim = p.detach(), partition_dim(p)
            if dims.tensor_parallel and dim is not None:
                parts = [torch.empty_like(t) for _ in range(dims.tp)]
                dist.all_gather(parts, t.contiguous(), group=dims.tp_group)
                t = merge(parts, dim)
            out[name] = t.cpu().clone()
    return out


# ------------------------------------------------------------------ 4. DeepSpeed's view of the layout

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
