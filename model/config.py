"""Model configuration: one dataclass per part, and the named presets.

The widths follow docs/design.md: ``so400m`` is SigLIP2-So400m's shape (the paper's model), ``base`` the
paper's ablation, ``tiny`` trains in minutes on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

# Every modality uses the same 4x16x16 (t, h, w) patch of RGB: 3 * 4 * 16 * 16 values a token.
PATCH_T, PATCH_HW, CHANNELS = 4, 16, 3
PATCH_DIM = CHANNELS * PATCH_T * PATCH_HW * PATCH_HW  # 3072
# model/attention.py's BACKENDS, named here without importing torch (the config stays light).
# "auto" tries them fastest first by the measured ranking in model/attention.py (MEASURED_MS), sdpa last.
ATTENTION_BACKENDS = ("fa4", "flash_attn", "torch_varlen", "cudnn", "sdpa")


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
    """The released ``SLatGaussianDecoder`` (``3d_decode_gs.yaml``) and TRELLIS' ``Gaussian`` activations.

    It reads the first ``in_channels`` values of the pixel decoder's output at each occupied voxel
    (one 16x16 RGB patch) and outputs ``gaussians_per_voxel`` Gaussians per voxel.
    """
    transformer: TransformerConfig  # RMSNorm, no biases, no QK-norm, no RoPE (sinusoidal positions)
    in_channels: int = 768
    gaussians_per_voxel: int = 32
    resolution: int = 64  # voxels per side of the [-0.5, 0.5]^3 cube
    window: int = 8  # Swin windows of window^3 voxels, shifted by window // 2 on odd blocks
    # The release's windowed attention calls flash-attn with softcap=30: logits -> 30 tanh(logits / 30).
    attn_softcap: float = 30.0
    # representation_config of 3d_decode_gs.yaml, same names:
    voxel_size: float = 1.5  # |offset| < 0.5 * voxel_size voxels
    lr: dict = dataclasses.field(default_factory=lambda: {
        "_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1})
    scaling_bias: float = 4e-3  # softplus(0 + inverse_softplus(scaling_bias)) == scaling_bias
    opacity_bias: float = 0.1  # sigmoid(0 + logit(opacity_bias)) == opacity_bias
    filter_3d: float = 9e-4  # 3d_filter_kernel_size: scales = sqrt(s^2 + filter_3d^2)
    filter_2d: float = 0.1  # 2d_filter_kernel_size: the renderer's screen-space dilation, px^2
    # "gsplat" (CUDA), "torch" (any device) or None: gsplat on CUDA when installed, else torch.
    render_backend: str | None = None

    def __post_init__(self):
        if set(self.lr) != set(GAUSSIAN_ATTRIBUTES):
            raise ValueError(f"lr must give {list(GAUSSIAN_ATTRIBUTES)}, got {sorted(self.lr)}")
        if not (self.scaling_bias > 0 and 0 < self.opacity_bias < 1 and self.voxel_size > 0):
            raise ValueError(f"need scaling_bias > 0, 0 < opacity_bias < 1, voxel_size > 0; got "
                             f"{self.scaling_bias}, {self.opacity_bias}, {self.voxel_size}")
        if self.window < 1 or self.gaussians_per_voxel < 1 or self.resolution < 1 or self.in_channels < 1:
            raise ValueError(f"bad window {self.window}, gaussians_per_voxel {self.gaussians_per_voxel}, "
                             f"resolution {self.resolution} or in_channels {self.in_channels}")
        if self.render_backend not in (None, "gsplat", "torch"):
            raise ValueError(f"render_backend must be 'gsplat', 'torch' or None, got {self.render_backend!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ``from_dict``'s error for unknown fields (e.g. max_offset, scale_range): a config written for
    # atoken's own decoder before it became the release's.
    UNKNOWN_KEYS = ("the Gaussian decoder config has fields this version does not know: {unknown} (written for "
                    "atoken's earlier Gaussian decoder, which no longer exists); known: {known}")


# The release's per-voxel output layout, attribute-major: name -> values per Gaussian.
GAUSSIAN_ATTRIBUTES = {"_xyz": 3, "_features_dc": 3, "_scaling": 3, "_rotation": 4, "_opacity": 1}


def _gaussian_transformer(depth: int, width: int, heads: int, mlp_width: int) -> TransformerConfig:
    # The release's SparseTransformerBase defaults: RMSNorm (eps 1e-6), no biases, no QK-norm.
    return TransformerConfig(depth, width, heads, mlp_width, norm="rmsnorm", qk_norm=False, bias=False)


GAUSSIAN_DECODER_PRESETS = {
    # 3d_decode_gs.yaml: 12 blocks, width 768, 12 heads, MLP 3072, swin windows of 8.
    "base": lambda: GaussianDecoderConfig(_gaussian_transformer(12, 768, 12, 3072)),
    "tiny": lambda: GaussianDecoderConfig(_gaussian_transformer(2, 64, 2, 256), window=4),
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


# ------------------------------------------------------------------ the one loader of config dataclasses

UNKNOWN_KEYS = "unknown {cls} keys {unknown}; known: {known}"  # a class may word it its own way (UNKNOWN_KEYS)


def from_dict(cls, d: dict):
    """Build dataclass ``cls`` from a nested dict (a run's YAML, an inference directory's config, a
    checkpoint's client state), checking every key: the one loader of every config dataclass
    (``ModelConfig``, ``RunConfig``, ``DataConfig``, ...). An unknown key is a ValueError listing the
    known ones."""
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(getattr(cls, "UNKNOWN_KEYS", UNKNOWN_KEYS).format(cls=cls.__name__, unknown=unknown,
                                                                           known=names))
    return cls(**{k: as_type(hints[k], v) for k, v in d.items()})


def as_type(t, v):
    """A plain value as type ``t``: dataclasses (also ``X | None``) built field by field,
    ``dict[str, Dataclass]`` entry by entry, lists into (nested) tuples; anything else as it is."""
    if dataclasses.is_dataclass(t):
        return from_dict(t, v)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return as_type(inner[0], v) if v is not None and len(inner) == 1 else v
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {key: as_type(args[1], item) for key, item in (v or {}).items()}
    if origin is tuple and v is not None:
        inner = args[0] if args and ((len(args) == 2 and args[1] is Ellipsis) or len(set(args)) == 1) else None
        return tuple(as_type(inner, x) for x in v) if inner is not None else tuple(v)
    return v
