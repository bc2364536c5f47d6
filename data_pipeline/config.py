"""Configuration of the image-reconstruction data stream."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    remote: str
    """MDS shards: a local directory or ``s3://bucket/prefix`` (boto3 honours S3_ENDPOINT_URL etc.)."""
    local: str | None = None
    """Cache directory for the shards. None: a local ``remote`` is read in place, an s3:// one is
    cached in a fresh temporary directory. Two live datasets in one process need different ones."""
    min_res: int = 64
    """Smallest sampled longer side, in pixels (the stage's resolution range, DESIGN.md)."""
    max_res: int = 512
    """Largest sampled longer side, in pixels."""
    token_budget: int = 4096
    """Tokens per packed micro-batch (no padding); one max_res x max_res image must fit."""
    shuffle: bool = True
    seed: int = 0
    """Seeds streaming's shuffle and each sample's resolution draw."""
    num_workers: int = 0
    """DataLoader worker processes decoding images."""
    max_bad_fraction: float = 0.01
    """Fail once more than this fraction of the samples seen was undecodable."""
    bad_check_min_samples: int = 100
    """Samples to see before ``max_bad_fraction`` is enforced (a lone early bad file is no trend)."""

    def __post_init__(self):
        if not 16 <= self.min_res <= self.max_res:
            raise ValueError(f"need 16 <= min_res <= max_res, got min_res={self.min_res}, max_res={self.max_res}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.token_budget <= 0 or self.num_workers < 0 or self.bad_check_min_samples < 1 or self.seed < 0:
            raise ValueError(f"invalid token_budget / num_workers / bad_check_min_samples / seed in {self}")
