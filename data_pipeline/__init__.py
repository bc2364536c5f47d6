"""Data pipeline: MDS image shards -> decoded, resized, patchified samples -> packed micro-batches."""
from .config import DataConfig
from .dataset import ImageDataset, is_bad, resolve_location
from .images import (IMAGE_COLUMNS, IMAGE_EXTENSIONS, OPTIONAL_COLUMNS, decode_image, open_rgb,
                     resize_for_training, sample_resolution, training_size)
from .loader import PackedImageLoader, build_image_loader
from .packing import GreedyPacker, check_budget

__all__ = [
    "DataConfig", "ImageDataset", "is_bad", "resolve_location", "IMAGE_COLUMNS", "IMAGE_EXTENSIONS",
    "OPTIONAL_COLUMNS", "decode_image", "open_rgb", "resize_for_training", "sample_resolution",
    "training_size", "PackedImageLoader", "build_image_loader", "GreedyPacker", "check_budget",
]
