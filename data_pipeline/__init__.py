"""Data pipeline: MDS streams (local or S3) -> decoded, patchified samples -> packed micro-batches ->
the stage's round-robin task mix."""
import importlib

# Exports resolved on first use (PEP 562): importing a light submodule (``.config``, ``.errors``)
# does not import torch and every other submodule, so that CLIs answer --help at once.
_EXPORTS = {
    **dict.fromkeys(["DataConfig", "RetryConfig", "StreamConfig", "mix_order"], "config"),
    **dict.fromkeys(["PositionedSamples", "StreamDataset", "epoch_order", "is_bad"], "dataset"),
    **dict.fromkeys(["IMAGE_COLUMNS", "IMAGE_EXTENSIONS", "IMAGE_WRITER_COLUMNS", "OPTIONAL_COLUMNS", "decode_image",
                     "open_rgb", "resize_for_training", "sample_resolution", "training_size"], "images"),
    **dict.fromkeys(["StreamLoader"], "loader"),
    **dict.fromkeys(["MixedLoader"], "mixing"),
    **dict.fromkeys(["GreedyPacker", "MicroBatch", "check_budget"], "packing"),
    **dict.fromkeys(["SAMPLE_DECODERS", "decoder_for", "image_sample"], "samples"),
    **dict.fromkeys(["check_streams", "resolve_location"], "storage"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
