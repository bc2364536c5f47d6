"""The AToken model: config, packed batch, patches, 4D RoPE, varlen attention, the autoencoder."""
import importlib

# Exports resolved on first use (PEP 562): importing a light submodule (``.config``, ``.errors``)
# does not import torch and every other submodule, so that CLIs answer --help at once.
_EXPORTS = {
    **dict.fromkeys(["BACKENDS", "get_attention_backend", "varlen_attention"], "attention"),
    **dict.fromkeys(["AToken", "Decoder", "Encoder", "Posterior"], "autoencoder"),
    **dict.fromkeys(["PATCH_DIM", "PATCH_HW", "PATCH_T", "PRESETS", "ModelConfig", "TransformerConfig", "from_dict",
                      "preset"], "config"),
    **dict.fromkeys(["ASSET3D", "IMAGE", "VIDEO", "PackedBatch"], "packed"),
    **dict.fromkeys(["grid_coords", "pad_to_patches", "patchify", "unpatchify"], "patches"),
    **dict.fromkeys(["apply_rope", "rope_angles"], "rope"),
    **dict.fromkeys(["ImageLatent", "Tokenizer"], "tokenizer"),
    **dict.fromkeys(["SequenceSharding", "Transformer", "fuse_qkv", "split_qkv"], "transformer"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
