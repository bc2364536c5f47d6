"""Model configuration: one dataclass per part, and the named presets.

The widths follow DESIGN.md: ``so400m`` is SigLIP2-So400m's shape (the paper's model), ``base`` the
paper's ablation, ``tiny`` trains in minutes on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Every modality uses the same 4x16x16 (t, h, w) patch of RGB: 3 * 4 * 16 * 16 values a token.
PATCH_T, PATCH_HW, CHANNELS = 4, 16, 3
PATCH_DIM = CHANNELS * PATCH_T * PATCH_HW * PATCH_HW  # 3072
# model/attention.py's BACKENDS, named here without importing torch (the config stays light).
ATTENTION_BACKENDS = ("cudnn", "flash_attn", "torch_varlen", "sdpa")


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
class GaussianDecoderConfig:
    transformer: TransformerConfig
    gaussians_per_voxel: int = 32
    resolution: int = 64  # voxels per side of the [-0.5, 0.5]^3 cube
    window: int = 8  # attention windows of window^3 voxels; 0: each sample is one window
    shift_windows: bool = True  # odd blocks use windows shifted by window // 2
    max_offset: float = 0.75  # |position offset| per axis, voxels (TRELLIS: 0.5 * voxel_size 1.5)
    scale_range: tuple[float, float] = (0.005, 4.0)  # bounds of each std-dev, voxels
    init_scale: float = 0.25  # voxels (TRELLIS' scaling_bias 4e-3 is 0.26 voxel at 64^3)
    init_opacity: float = 0.1  # TRELLIS' opacity_bias
    head_init_std: float = 1e-3  # small: the first render is the configured initial Gaussians
    rope_theta: float = 10000.0

    def __post_init__(self):
        lo, hi = self.scale_range
        if not 0 < lo < self.init_scale < hi:
            raise ValueError(f"need 0 < scale_range[0] < init_scale < scale_range[1], got "
                             f"{self.scale_range} and init_scale {self.init_scale}")
        if not 0 < self.init_opacity < 1:
            raise ValueError(f"init_opacity must be in (0, 1), got {self.init_opacity}")
        if self.max_offset <= 0.5:
            raise ValueError(f"max_offset {self.max_offset} must exceed 0.5 voxel (the slots fill the voxel)")
        if self.window < 0 or self.gaussians_per_voxel < 1 or self.resolution < 1:
            raise ValueError(f"bad window {self.window}, gaussians_per_voxel {self.gaussians_per_voxel} "
                             f"or resolution {self.resolution}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GaussianDecoderConfig":
        d = dict(d)
        d["scale_range"] = tuple(d["scale_range"])
        return cls(transformer=TransformerConfig(**d.pop("transformer")), **d)


def _decoder_transformer(depth: int, width: int, heads: int, mlp_width: int) -> TransformerConfig:
    # Like the image decoder (DESIGN.md): RMSNorm, QK-RMSNorm, no biases.
    return TransformerConfig(depth, width, heads, mlp_width, norm="rmsnorm", qk_norm=True, bias=False)


GAUSSIAN_DECODER_PRESETS = {
    # The released AToken Gaussian decoder (DESIGN.md): 12 blocks, width 768, 12 heads, windowed
    # attention, 32 Gaussians per voxel. Window 8 with shifting is TRELLIS' choice at 64^3 (an
    # assumption: the released config names "windowed attention" only).
    "base": lambda: GaussianDecoderConfig(_decoder_transformer(12, 768, 12, 3072)),
    "tiny": lambda: GaussianDecoderConfig(_decoder_transformer(2, 64, 2, 256), window=4),
}


def gaussian_decoder_preset(name: str) -> GaussianDecoderConfig:
    if name not in GAUSSIAN_DECODER_PRESETS:
        raise ValueError(f"unknown Gaussian decoder preset {name!r}; choose one of {sorted(GAUSSIAN_DECODER_PRESETS)}")
    return GAUSSIAN_DECODER_PRESETS[name]()


@dataclass
class ModelConfig:
    encoder: TransformerConfig
    decoder: TransformerConfig
    latent_channels: int = 32
    # Side of SigLIP2's learned square position table (16x16 for patch16 at 256 px); it is resized
    # to each sample's patch grid.
    pos_table_size: int = 16
    rope_theta: float = 10000.0
    # False only to reproduce SigLIP2, which has no RoPE (a parity check or a frozen teacher built
    # from its weights); the decoder always applies RoPE.
    encoder_rope: bool = True
    # The understanding branch (model/understanding.py): the MAP pooling head over the encoder's
    # tokens and the sigmoid loss' learnable logit scale and bias, parameters under ``understanding.``.
    understanding: bool = False
    # "none": a continuous KL latent. "fsq" (stage 4): the decoder reads the FSQ-quantized posterior
    # mean (model/fsq.py): groups of ``fsq_group_dims`` channels with ``fsq_levels`` levels each, so
    # ``fsq_levels ** fsq_group_dims`` codes (4096) and latent_channels / fsq_group_dims ids per token.
    quantizer: str = "none"
    fsq_levels: int = 4
    fsq_group_dims: int = 6
    # The Gaussian-splat decoder of 3D samples (model/gaussians.py); None: no 3D output (stages 1-2).
    gaussian: GaussianDecoderConfig | None = None
    # The varlen attention kernel of the encoder and decoder (model/attention.py): "auto" picks the
    # fastest that runs on the tensors; a name forces one, and an error says why it cannot run.
    attention: str = "auto"
    # The decoder's QK-norm and RoPE in one Triton pass on CUDA (model/fused_qk_rope.py); off until
    # its speed is measured on a GPU (benchmarks/NOTES.md). The encoder has no QK-norm.
    fused_qk_rope: bool = False

    def __post_init__(self):
        if self.attention not in ("auto", *ATTENTION_BACKENDS):
            raise ValueError(f"model.attention must be 'auto' or one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be positive, got {self.latent_channels}")
        if self.quantizer not in ("none", "fsq"):
            raise ValueError(f"quantizer must be 'none' or 'fsq', got {self.quantizer!r}")
        if self.quantizer == "fsq":
            if self.fsq_levels < 3:
                raise ValueError(f"fsq_levels must be >= 3 (2 levels cannot code 0), got {self.fsq_levels}")
            if self.latent_channels % self.fsq_group_dims:
                raise ValueError(f"latent_channels {self.latent_channels} is not a multiple of "
                                 f"fsq_group_dims {self.fsq_group_dims}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        gaussian = d.pop("gaussian", None)
        return cls(encoder=TransformerConfig(**d.pop("encoder")), decoder=TransformerConfig(**d.pop("decoder")),
                   gaussian=GaussianDecoderConfig.from_dict(gaussian) if gaussian else None, **d)


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
