"""model/resample.py: the forms of the antialiased resize and of reflection padding that
``deterministic=true`` uses on CUDA equal the original ops (values and gradients), on CPU."""
import os

import pytest
import torch
import torch.nn.functional as F

from atoken.model.autoencoder import position_embedding
from atoken.model.losses import LossConfig, ReconstructionLoss
from atoken.model.packed import PackedBatch
from atoken.model.patches import patchify
from atoken.model.resample import aa_matrix, reflect_pad, reflect_pad_cat, resize_aa, resize_aa_matmul

# (H, W) -> (S_h, S_w): down and up, by whole and fractional factors, square and not, identity.
RESIZES = [((48, 80), (64, 64)), ((64, 64), (64, 64)), ((300, 17), (224, 224)), ((512, 384), (224, 224)),
           ((16, 16), (27, 5))]


@pytest.mark.parametrize("shape,size", RESIZES)
def test_matmul_resize_equals_antialiased_interpolate(shape, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=g, requires_grad=True)
    want = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    got = resize_aa_matmul(x, size)
    cot = torch.randn(want.shape, generator=g)
    (g_want,), (g_got,) = torch.autograd.grad(want, x, cot), torch.autograd.grad(got, x, cot)
    # Rounding only: a different summation order of the same float32 taps.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-5 * g_want.abs().max().item())


def test_aa_matrix_rows_are_normalised_filters():
    m = aa_matrix(300, 224)
    assert m.shape == (224, 300) and m.dtype == torch.float32
    torch.testing.assert_close(m.sum(1), torch.ones(224))
    assert (m >= 0).all() and (m > 0).sum(1).max() <= 4  # a downscale by 1.34: at most 4 taps
    assert torch.equal(aa_matrix(64, 64), torch.eye(64))


def test_matmul_resize_ignores_autocast():
    x = torch.randn(1, 3, 48, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_aa_matmul(x, (64, 64))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, resize_aa_matmul(x, (64, 64)))


@pytest.mark.parametrize("p", [1, 2])
def test_cat_reflect_pad_equals_f_pad(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 11, generator=g, requires_grad=True)
    want, got = F.pad(x, (p,) * 4, mode="reflect"), reflect_pad_cat(x, p)
    assert torch.equal(got, want)
    cot = torch.randn(want.shape, generator=g)
    (g_want,), (g_got,) = torch.autograd.grad(want, x, cot), torch.autograd.grad(got, x, cot)
    # Equal up to the order in which a corner's (up to 4) reflected gradients are summed.
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6)


def test_cpu_keeps_the_original_ops_in_deterministic_mode():
    """The dispatch changes nothing on CPU (so the golden file's bits): F.interpolate / F.pad."""
    x = torch.randn(1, 3, 48, 80)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(resize_aa(x, (64, 64)),
                           F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False))
        assert torch.equal(reflect_pad(x, 2), F.pad(x, (2,) * 4, mode="reflect"))
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_deterministic_backward_of_the_loss_and_position_table():
    """On CUDA in deterministic mode the perceptual loss (resize, ST-LPIPS blur-pool) and the
    encoder's position table run their backward (the original ops raise) and repeat bit for bit."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        g = torch.Generator().manual_seed(0)
        parts = [(*patchify(torch.rand(3, h, w, generator=g) * 2 - 1), "image", 1) for h, w in ((32, 48), (64, 64))]
        batch = PackedBatch.cat(parts).to("cuda")
        loss = ReconstructionLoss(LossConfig(perceptual_size=64, clip_weight=0.0)).cuda()
        table = torch.randn(16 * 16, 8, device="cuda", requires_grad=True)
        grads = []
        for _ in range(2):
            recon = (batch.features + 0.1).requires_grad_(True)
            t = loss(batch, recon)
            pos = position_embedding(table, batch.attention_layout())
            (t["lpips"] + t["gram"] + pos.square().sum()).backward()
            grads.append((recon.grad.clone(), table.grad.clone()))
            table.grad = None
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    finally:
        torch.use_deterministic_algorithms(before)
