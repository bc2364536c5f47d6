"""The batched perceptual loss against the per-image implementation it replaced (kept here as the
reference), the Gram matrix's precision under autocast, and no perceptual work at zero weights."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from atoken.model.losses import LossConfig, ReconstructionLoss, gram_loss, gram_matrix, image_pairs, packed_images
from atoken.model.packed import IMAGE, PackedBatch
from atoken.model.patches import patchify, unpatchify
from atoken.model.perceptual import load_perceptual
from atoken.training.parallelize import prepare_loss

# Images of three sizes, out of size order, and a video between them (the loss skips it).
SIZES = ((32, 48), (48, 32), (32, 48), "video", (64, 64), (48, 32))


def _batch(seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for s in SIZES:
        if s == "video":
            f, c, grid = patchify(torch.rand(3, 4, 32, 32, generator=g) * 2 - 1)
            parts.append((f, c, grid, "video", 4))
        else:
            f, c, grid = patchify(torch.rand(3, *s, generator=g) * 2 - 1)
            parts.append((f, c, grid, IMAGE, 1))
    return PackedBatch.cat(parts)


def _recon(batch: PackedBatch) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (batch.features + 0.1 * torch.randn(batch.features.shape, generator=g)).requires_grad_(True)


# ---------------------------------------------------------------- the replaced per-image implementation

def reference_image_pairs(batch: PackedBatch, recon: torch.Tensor, size: int):
    """``losses.image_pairs`` before batching: one unpatchify and one resize per image."""
    idx = [i for i, m in enumerate(batch.modalities) if m == IMAGE]
    spans = batch.spans()

    def resized(tokens, i):
        img = unpatchify(tokens[slice(*spans[i])], batch.grids[i], batch.frames[i])[:, 0]  # [3, H, W]
        return F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)

    with torch.no_grad():
        orig = torch.cat([resized(batch.features, i) for i in idx])
    return orig, torch.cat([resized(recon, i) for i in idx])


def reference_terms(net, batch, recon, size):
    orig, rec = reference_image_pairs(batch, recon, size)
    with torch.no_grad():
        fx = net.features(orig)
    fy = net.features(rec)
    return net.distance(fx, fy).float().mean(), gram_loss(fx, fy).mean()


@pytest.fixture(scope="module")
def alex():
    return load_perceptual("alex")


def test_image_pairs_equal_the_per_image_resize():
    batch = _batch()
    recon = _recon(batch)
    got, want = image_pairs(batch, recon, 40), reference_image_pairs(batch, recon, 40)
    assert got[0].shape == (5, 3, 40, 40)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)  # bit for bit, in batch order


def test_batched_loss_equals_the_per_image_loss_values_and_gradients(alex):
    """fp32, CPU: the terms and the gradient reaching the reconstruction equal the per-image
    implementation's bit for bit (the golden file's demo runs this path)."""
    batch = _batch()
    loss = ReconstructionLoss(LossConfig(perceptual_size=40, clip_weight=0.0))
    loss._perceptual = (alex,)
    recon = _recon(batch)
    terms = loss(batch, recon)
    (grad,) = torch.autograd.grad(terms["lpips"] + 100 * terms["gram"], recon)
    recon_ref = recon.detach().clone().requires_grad_(True)
    lpips, gram = reference_terms(alex, batch, recon_ref, 40)
    (grad_ref,) = torch.autograd.grad(lpips + 100 * gram, recon_ref)
    assert torch.equal(terms["lpips"], lpips) and torch.equal(terms["gram"], gram)
    assert lpips > 0 and gram > 0 and grad_ref.abs().sum() > 0
    assert torch.equal(grad, grad_ref)


def test_packed_images_equal_per_image_patchify():
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    got = packed_images(x)
    want = PackedBatch.cat([(*patchify(img), IMAGE, 1) for img in x])
    assert torch.equal(got.features, want.features) and torch.equal(got.coords, want.coords)
    assert torch.equal(got.cu_seqlens, want.cu_seqlens)
    assert (got.grids, got.modalities, got.frames) == (want.grids, want.modalities, want.frames)


# ---------------------------------------------------------------- Gram in fp32

def test_gram_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    f = torch.randn(2, 16, 8, 8).bfloat16()
    want = gram_matrix(f.float())  # no autocast: fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gram_matrix(f)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # bf16 products would be off by ~1e-3


# ---------------------------------------------------------------- zero weights: no work

def test_zero_weights_do_not_run_the_perceptual_net(alex):
    batch = _batch()
    calls = []
    hook = alex.net.register_forward_hook(lambda *_: calls.append(1))
    for lpips_w, gram_w, runs in ((0.0, 0.0, 0), (1.0, 0.0, 2), (0.0, 1.0, 2)):
        loss = ReconstructionLoss(LossConfig(perceptual_size=32, clip_weight=0.0, lpips_weight=lpips_w,
                                             gram_weight=gram_w))
        loss._perceptual = (alex,)
        calls.clear()
        terms = loss(batch, _recon(batch))
        assert len(calls) == runs  # one trunk pass per side (original, reconstruction) when it runs
        assert (terms["lpips"] > 0) == bool(lpips_w) and (terms["gram"] > 0) == bool(gram_w)
        assert terms["l1"] > 0
    hook.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepared_perceptual_net_on_cuda_matches_eager():
    """``prepare_loss`` (channels_last, compiled trunk) changes the terms and gradients by rounding only,
    over two image counts (the second compile: batch dimension dynamic)."""
    cfg = LossConfig(perceptual_size=64, clip_weight=0.0)
    eager, fast = ReconstructionLoss(cfg).cuda(), ReconstructionLoss(cfg).cuda()
    prepare_loss(fast, SimpleNamespace(parallel=SimpleNamespace(compile=True)), torch.device("cuda"))
    assert fast.perceptual.lins[0].weight.is_contiguous(memory_format=torch.channels_last)
    for seed in (0, 1):
        host = _batch(seed)
        if seed:
            host, _ = host.select([0, 1, 4])
        batch, noisy = host.to("cuda"), _recon(host).detach()
        results = []
        for loss in (eager, fast):
            recon = noisy.cuda().requires_grad_(True)
            t = loss(batch, recon)
            (t["lpips"] + 100 * t["gram"]).backward()
            results.append((t["lpips"], t["gram"], recon.grad))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
