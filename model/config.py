"""Model configuration: one dataclass per part, and the named presets.

The widths follow DESIGN.md: ``so400m`` is SigLIP2-So400m's shape (the paper's model), ``base`` the
paper's ablation, ``tiny`` trains in minutes on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Every modality uses the same 4x16x16 (t, h, w) patch of RGB: 3 * 4 * 16 * 16 values a token.
PATCH_T, PATCH_HW, CHANNELS = 4, 16, 3
PATCH_DIM = CHANNELS * PATCH_T * PATCH_HW * PATCH_HW  # 3072


@dataclass
class TransformerConfig:
    depth: int
    width: int
    heads: int
    mlp_width: int
    # "layernorm" (with bias, SigLIP2 encoder) or "rmsnorm" (decoder).
    norm: str = "layernorm"
    qk_norm: bool = False
    bias: bool = True
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        # 4D RoPE splits the head dim equally over (t, h, w, z) in (even, odd) pairs.
        if self.head_dim % 8:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 8 for 4D RoPE")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")


@dataclass
class ModelConfig:
    encoder: TransformerConfig
    decoder: TransformerConfig
    latent_channels: int = 32
    # Side of SigLIP2's learned square position table (16x16 for patch16 at 256 px); it is resized
    # to each sample's patch grid.
    pos_table_size: int = 16
    rope_theta: float = 10000.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        return cls(encoder=TransformerConfig(**d.pop("encoder")),
                   decoder=TransformerConfig(**d.pop("decoder")), **d)


def _symmetric(depth: int, width: int, heads: int, mlp_width: int, **kw) -> ModelConfig:
    enc = TransformerConfig(depth, width, heads, mlp_width, norm="layernorm", qk_norm=False, bias=True)
    dec = TransformerConfig(depth, width, heads, mlp_width, norm="rmsnorm", qk_norm=True, bias=False)
    return ModelConfig(encoder=enc, decoder=dec, **kw)


PRESETS = {
    "tiny": lambda: _symmetric(depth=4, width=192, heads=4, mlp_width=768),
    "base": lambda: _symmetric(depth=12, width=768, heads=12, mlp_width=3072),
    "so400m": lambda: _symmetric(depth=27, width=1152, heads=16, mlp_width=4304),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
