"""The stated global batch (training/batch.py, training/stages.py): the stage configs hold the paper's
samples per step at 256 GPUs, and the accumulation follows from the data-parallel size."""
from __future__ import annotations

import numpy as np
import pytest

from atoken.data_pipeline.config import StreamConfig
from atoken.data_pipeline.images import sample_resolution, training_size
from atoken.training.batch import mean_tokens, step_batches
from atoken.training.stages import CONFIGS


def test_mean_tokens_is_the_resolution_policys_mean():
    """Against the data pipeline's own draws (square images: the estimate's stated case)."""
    rng = np.random.default_rng(0)
    for lo, hi in ((64, 512), (64, 1024), (48, 48)):
        draws = [training_size(4096, 4096, sample_resolution(rng, lo, hi)) for _ in range(20000)]
        measured = np.mean([(h // 16) * (w // 16) for h, w in draws])
        assert mean_tokens(StreamConfig(min_res=lo, max_res=hi)) == pytest.approx(measured, rel=0.02)
    video = StreamConfig(modality="video", task="rec", min_res=64, max_res=512, clip_frames=(16, 32))
    assert mean_tokens(video) == pytest.approx(6 * mean_tokens(StreamConfig(min_res=64, max_res=512)))


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3", "stage4"])
def test_stages_state_the_papers_global_batch_with_image_understanding(stage):
    cfg = CONFIGS[stage]()
    streams = cfg.data.streams
    assert streams["image_und"].task == "und" and streams["image_und"].global_batch == 8192
    assert all(s.global_batch > 0 for s in streams.values()), "every stream states the paper's batch"
    assert cfg.mix_rounds == 0 and cfg.reference_gpus == 256 and cfg.model.understanding
    at_scale = {b.name: b for b in step_batches(streams, cfg.with_rounds(256).mix_rounds, 256)}
    # Image streams are sized to the paper's batch (within the budget's rounding), unless their
    # largest sample needs more tokens than the batch does.
    for name in ("image_rec", "image_und"):
        ratio = at_scale[name].ratio
        assert 1.0 <= ratio < 1.05 or streams[name].token_budget == (streams[name].max_res // 16) ** 2, (name, ratio)


def test_accumulation_follows_the_world_size():
    cfg = CONFIGS["stage1"]()
    assert [cfg.with_rounds(dp).mix_rounds for dp in (1, 8, 256, 512)] == [256, 32, 1, 1]
    # The step's samples stay the paper's on 8 ranks as on 256.
    small = {b.name: b.samples for b in step_batches(cfg.data.streams, 32, 8)}
    full = {b.name: b.samples for b in step_batches(cfg.data.streams, 1, 256)}
    assert small == pytest.approx(full)
    cfg.mix_rounds = 3
    assert cfg.with_rounds(8).mix_rounds == 3  # an explicit value is kept
    cfg.mix_rounds = 0
    with pytest.raises(ValueError, match="resolved at start"):
        cfg.micro_batches_per_step  # noqa: B018 - the property raises when read
