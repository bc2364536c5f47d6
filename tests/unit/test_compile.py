"""The speed paths of training: compiled transformer blocks, the optimizer choice, and packed
batches that carry their lengths on the host (so the forward pass never waits on the device)."""
from __future__ import annotations

import logging

import pytest
import torch

from atoken.model import AToken, PackedBatch, patchify
from atoken.model.losses import token_l1
from atoken.model.transformer import Block
from atoken.training.engine import make_optimizer
from atoken.training.parallelize import compile_blocks
from tests.unit.test_model import micro_config


def _batch(seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for h, w in ((32, 48), (64, 32), (16, 16)):
        f, c, grid = patchify(torch.rand(3, h, w, generator=g) * 2 - 1)
        parts.append((f, c, grid, "image", 1))
    return PackedBatch.cat(parts, names=["a", "b", "c"])


def _loss_and_grads(model: AToken, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(batch, sample=False)
    loss = token_l1(batch, out.recon).mean() + 1e-3 * out.posterior.kl().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_does():
    torch.manual_seed(0)
    eager = AToken(micro_config())
    compiled = AToken(micro_config())
    compiled.load_state_dict(eager.state_dict())
    n = compile_blocks(compiled)
    cfg = compiled.cfg
    assert n == cfg.encoder.depth + cfg.decoder.depth == sum(isinstance(m, Block) for m in compiled.modules())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled in place: names unchanged
    assert all(m._compiled_call_impl is not None for m in compiled.modules() if isinstance(m, Block))
    for seed in (0, 1):  # a second batch of other lengths runs the dynamic-shape graph
        batch = _batch(seed) if seed == 0 else _batch(seed).select([2, 0])[0]
        le, ge = _loss_and_grads(eager, batch)
        lc, gc = _loss_and_grads(compiled, batch)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        assert ge.keys() == gc.keys() and len(ge) == len(list(eager.parameters()))
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)


def test_optimizer_choice_is_logged_and_falls_back_to_torch(caplog):
    p = torch.nn.Parameter(torch.ones(3))
    with caplog.at_level(logging.INFO, logger="atoken.training.engine"):
        opt = make_optimizer([{"params": [p]}], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("optimizer:")]
    assert len(msgs) == 1
    if torch.cuda.is_available():
        pytest.skip("the CPU fallback is what this checks")
    assert type(opt) is torch.optim.AdamW and msgs[0] == "optimizer: torch.optim.AdamW(fused=False) (no CUDA)"
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p < 1)  # it steps


def test_packed_batch_lengths_live_on_the_host():
    batch = _batch()
    assert batch.seqlens == [6, 8, 1] and batch.max_seqlen == 8
    assert batch.spans() == [(0, 6), (6, 14), (14, 15)]
    moved = batch.to("cpu", dtype=torch.float64)
    assert moved.features.dtype == torch.float64 and moved.seqlens == batch.seqlens
    assert moved.spans() == batch.spans() and moved.names == batch.names
    torch.testing.assert_close(moved.sample_ids(), torch.tensor([0] * 6 + [1] * 8 + [2]))
    sub, rows = batch.select([2, 0])
    assert sub.seqlens == [1, 6] and rows.tolist() == [14, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="does not cover 15 tokens"):
        PackedBatch(batch.features, batch.coords, torch.tensor([0, 6, 14], dtype=torch.int32), batch.grids,
                    batch.modalities)
