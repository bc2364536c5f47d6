"""torch.compile on the transformer blocks, the unit that repeats (as torchtitan compiles its blocks).

Each ``Block`` of the encoder, the decoder and the Gaussian decoder is compiled in place
(``nn.Module.compile``), so parameter names and checkpoints are unchanged. Inductor fuses what
eager mode runs as separate memory-bound kernels: the norms with their casts, the fp32 RoPE
rotation, GELU, the residual adds. Attention stays the varlen kernel (``model.attention``), called
from the compiled graph. Packed batches change length every step, so shapes are compiled dynamic.
"""
from __future__ import annotations

import logging

from torch import nn

from atoken.model.transformer import Block

logger = logging.getLogger(__name__)


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer ``Block`` of ``model`` in place; returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(dynamic=True)
    logger.info("torch.compile: %d transformer blocks (dynamic shapes)", len(blocks))
    return len(blocks)
