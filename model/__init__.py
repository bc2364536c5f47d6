"""The AToken model: config, packed batch, patches, 4D RoPE, varlen attention, the autoencoder."""
from .attention import BACKENDS, get_attention_backend, set_attention_backend, varlen_attention
from .autoencoder import AToken, Decoder, Encoder, Posterior
from .config import PATCH_DIM, PATCH_HW, PATCH_T, PRESETS, ModelConfig, TransformerConfig, preset
from .packed import ASSET3D, IMAGE, VIDEO, PackedBatch
from .patches import grid_coords, pad_to_patches, patchify, unpatchify
from .rope import apply_rope, rope_angles
from .tokenizer import ImageLatent, Tokenizer
from .transformer import LinearSpec, Transformer, fuse_qkv, split_qkv

__all__ = [
    "AToken", "Encoder", "Decoder", "Posterior",
    "ModelConfig", "TransformerConfig", "preset", "PRESETS", "PATCH_DIM", "PATCH_HW", "PATCH_T",
    "PackedBatch", "IMAGE", "VIDEO", "ASSET3D",
    "patchify", "unpatchify", "pad_to_patches", "grid_coords",
    "rope_angles", "apply_rope",
    "varlen_attention", "set_attention_backend", "get_attention_backend", "BACKENDS",
    "Transformer", "LinearSpec", "fuse_qkv", "split_qkv",
    "Tokenizer", "ImageLatent",
]
