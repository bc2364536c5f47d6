"""Data pipeline: MDS streams (local or S3) -> decoded, patchified samples -> packed micro-batches ->
the stage's round-robin task mix."""
from .config import DataConfig, RetryConfig, StreamConfig
from .dataset import EpochSamples, StreamDataset, epoch_order, is_bad
from .images import (IMAGE_COLUMNS, IMAGE_EXTENSIONS, IMAGE_WRITER_COLUMNS, OPTIONAL_COLUMNS, decode_image,
                     open_rgb, resize_for_training, sample_resolution, training_size)
from .loader import StreamLoader
from .mixing import MixedLoader, mix_order
from .packing import GreedyPacker, MicroBatch, check_budget
from .samples import SAMPLE_DECODERS, decoder_for, image_sample
from .storage import check_streams, resolve_location

__all__ = [
    "DataConfig", "RetryConfig", "StreamConfig", "EpochSamples", "StreamDataset", "epoch_order", "is_bad",
    "IMAGE_COLUMNS", "IMAGE_EXTENSIONS", "IMAGE_WRITER_COLUMNS", "OPTIONAL_COLUMNS", "decode_image", "open_rgb",
    "resize_for_training", "sample_resolution", "training_size", "StreamLoader", "MixedLoader", "mix_order", "GreedyPacker",
    "MicroBatch", "check_budget", "SAMPLE_DECODERS", "decoder_for", "image_sample", "check_streams",
    "resolve_location",
]
