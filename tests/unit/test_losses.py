"""CPU tests of the perceptual net (parity with lpips / ST-LPIPS) and the reconstruction loss."""
import logging
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atoken.model.autoencoder import Outputs, Posterior
from atoken.model.losses import LossConfig, ReconstructionLoss, gram_loss, gram_matrix, token_l1
from atoken.model.objective import Objective
from atoken.model.packed import PackedBatch
from atoken.model.patches import patchify
from atoken.model.perceptual import HUB_FILES, LPIPS, load_perceptual, stlpips_file

skdata = pytest.importorskip("skimage.data")


def photos(size: int = 64) -> torch.Tensor:
    """[3, 3, size, size] real photos in [-1, 1]."""
    imgs = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    x = [torch.from_numpy(i).permute(2, 0, 1)[None].float() / 127.5 - 1 for i in imgs]
    return torch.cat([F.interpolate(i, size=(size, size), mode="bilinear", antialias=True) for i in x])


def noised(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def alex() -> LPIPS:
    return load_perceptual("alex")


# ---------------------------------------------------------------- perceptual net

def _lpips_reference(net: str):
    lpips = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # pnet_rand: torchvision builds the trunk without downloading; its weights come from us.
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_lpips_package(net, tmp_path):
    """Vanilla trunk from a torchvision-layout file (the hub cache format) + lpips' lin layers."""
    torch.manual_seed(0)  # the reference's random trunk init
    ref = _lpips_reference(net)
    # Re-key lpips' trunk ('slice<k>.<i>.*') into torchvision's 'features.<i>.*', plus a classifier
    # key that must be ignored, as in the real hub file.
    sd = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
    sd["classifier.1.weight"] = torch.zeros(2, 2)
    torch.save(sd, tmp_path / "trunk.pth")
    ours = load_perceptual(net, trunk_weights=str(tmp_path / "trunk.pth"))
    assert not ours.shift_tolerant
    x = photos()
    y = noised(x, 0.2)
    with torch.no_grad():
        want = ref(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The hub-cache file is picked up with no explicit path, before the ST-LPIPS file.
    os.makedirs(tmp_path / "hub" / "checkpoints")
    os.replace(tmp_path / "trunk.pth", tmp_path / "hub" / "checkpoints" / HUB_FILES[net])
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        assert not load_perceptual(net).shift_tolerant
    finally:
        torch.hub.set_dir(old)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_default_is_stlpips_and_matches_it(net, caplog):
    """Default (offline) weights: the ST-LPIPS file, in its own shift-tolerant trunk."""
    stlpips = pytest.importorskip("stlpips_pytorch.stlpips")
    with caplog.at_level(logging.INFO, logger="atoken.model.perceptual"):
        ours = load_perceptual(net)
    assert ours.shift_tolerant and stlpips_file(net) in caplog.text
    ref = stlpips.LPIPS(net=net, variant="shift_tolerant", pretrained=True, verbose=False).eval()
    x = photos()
    y = noised(x, 0.2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), atol=1e-5, rtol=0)


def test_missing_weights_name_the_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.pth"):
        load_perceptual("alex", trunk_weights=str(tmp_path / "nope.pth"))


def test_lpips_sanity_frozen_eval_and_input_grads(alex):
    x = photos()
    d = [alex(x, noised(x, s)) for s in (0.05, 0.1, 0.3)]
    assert torch.allclose(alex(x, x), torch.zeros(3), atol=1e-7)
    assert (d[0] < d[1]).all() and (d[1] < d[2]).all()
    parent = torch.nn.Sequential(alex)
    parent.train()
    assert not alex.training and not any(p.requires_grad for p in alex.parameters())
    y = noised(x, 0.1).requires_grad_(True)
    alex(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert [f.shape[1] for f in alex.features(x)] == [64, 192, 384, 256, 256]


# ---------------------------------------------------------------- Gram

def test_gram_matrix_and_loss_match_direct_computation():
    torch.manual_seed(0)
    fx = [torch.randn(2, 3, 4, 5), torch.randn(2, 6, 2, 3)]
    fy = [torch.randn(2, 3, 4, 5), torch.randn(2, 6, 2, 3)]
    want = np.zeros(2)
    for a, b in zip(fx, fy, strict=True):
        for i in range(2):
            c, h, w = a.shape[1:]
            ga = np.zeros((c, c))
            gb = np.zeros((c, c))
            for p in range(c):
                for q in range(c):
                    ga[p, q] = sum(a[i, p, y, x].item() * a[i, q, y, x].item() for y in range(h) for x in range(w))
                    gb[p, q] = sum(b[i, p, y, x].item() * b[i, q, y, x].item() for y in range(h) for x in range(w))
            ga, gb = ga / (c * h * w), gb / (c * h * w)
            if a is fx[0]:
                np.testing.assert_allclose(gram_matrix(a)[i].numpy(), ga, rtol=1e-5, atol=1e-6)
            want[i] += ((ga - gb) ** 2).sum()
    np.testing.assert_allclose(gram_loss(fx, fy).numpy(), want, rtol=1e-5)


# ---------------------------------------------------------------- L1, KL

def _batch(sizes=((32, 48), (48, 32)), seed=0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for h, w in sizes:
        f, c, grid = patchify(torch.rand(3, h, w, generator=g) * 2 - 1)
        parts.append((f, c, grid, "image", 1))
    return PackedBatch.cat(parts)


def test_l1_counts_only_real_frames():
    batch = _batch()
    recon = batch.features + 0.1
    base = token_l1(batch, recon)
    torch.testing.assert_close(base, torch.full_like(base, 0.1))  # 0.1 over real values; padding ignored
    pad = recon.clone()
    pad[:, 768:] += 5.0  # frames 1..3 of an image token are time padding
    torch.testing.assert_close(token_l1(batch, pad), base)
    real = recon.clone()
    real[0, 5] += 7.68
    changed = token_l1(batch, real)
    assert changed[0] == pytest.approx(0.1 + 7.68 / 768, abs=1e-5) and torch.equal(changed[1:], base[1:])
    # A video sample (frames=4) counts all 3072 values.
    f, c, grid = patchify(torch.zeros(3, 4, 16, 16))
    video = PackedBatch.cat([(f, c, grid, "video", 4)])
    vrec = f.clone()
    vrec[:, 768:] = 1.0
    assert token_l1(video, vrec).item() == pytest.approx(0.75)


def test_posterior_kl_per_token():
    mean, logvar = torch.randn(5, 8), torch.randn(5, 8)
    want = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(-1)
    torch.testing.assert_close(Posterior(mean, logvar).kl(), want)
    assert Posterior(torch.zeros(3, 4), torch.zeros(3, 4)).kl().abs().max() == 0


# ---------------------------------------------------------------- ReconstructionLoss

def _posterior(n: int, seed: int = 2) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    return Posterior(torch.randn(n, 8, generator=g) * 3, torch.randn(n, 8, generator=g))


def test_reconstruction_loss_forward_backward():
    cfg = LossConfig(clip_weight=0.0)  # the CLIP/feature term needs a teacher: tests/unit/test_clip_term.py
    objective = Objective(cfg)
    loss = objective.rec
    assert not list(objective.parameters()) and not objective.state_dict()  # the frozen net stays out
    batch = _batch()
    torch.manual_seed(1)
    recon = (batch.features + 0.1 * torch.randn_like(batch.features)).requires_grad_(True)
    post = _posterior(batch.num_tokens)
    terms = loss(batch, recon)
    assert set(terms) == {"l1", "lpips", "gram", "clip"} and terms["clip"] == 0
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    with pytest.raises(ValueError, match="needs the frozen SigLIP2 teacher"):
        ReconstructionLoss(LossConfig())(batch, recon)  # clip_weight 1 without a teacher
    assert terms["lpips"] > 0 and terms["gram"] > 0 and terms["l1"] > 0
    # The one total (Objective): the weights of docs/design.md, Objective.
    out = objective(batch, Outputs(posterior=post, recon=recon), [{}] * batch.num_samples, ("rec",))
    for k in terms:
        torch.testing.assert_close(out[k], terms[k])
    torch.testing.assert_close(out["kl"], post.kl().mean())
    want = 0.2 * (terms["l1"] + 10 * terms["lpips"] + 1000 * terms["gram"]) + 1e-8 * out["kl"]
    torch.testing.assert_close(out["total"], want)
    out["total"].backward()
    assert recon.grad is not None and torch.isfinite(recon.grad).all()
    # Gradient reaches the real frame values only (the padding frames do not enter any term).
    assert recon.grad[:, :768].abs().sum() > 0 and recon.grad[:, 768:].abs().sum() == 0
    # A perfect reconstruction costs nothing but the KL.
    zero = objective(batch, Outputs(posterior=Posterior(*(torch.zeros(batch.num_tokens, 8),) * 2),
                                          recon=batch.features), [{}] * batch.num_samples, ("rec",))
    assert zero["total"].abs() < 1e-6


def test_reconstruction_loss_under_cpu_bf16_autocast():
    """precision=bf16 on CPU: the reconstruction arrives in bf16, which CPU's antialiased resize
    does not take; the terms still come out, with a gradient, close to fp32's."""
    loss = ReconstructionLoss(LossConfig(clip_weight=0.0))
    batch = _batch()
    torch.manual_seed(1)
    recon = (batch.features + 0.1 * torch.randn_like(batch.features)).requires_grad_(True)
    fp32 = loss(batch, recon)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(batch, recon.bfloat16())
    for k in ("l1", "lpips", "gram"):
        torch.testing.assert_close(bf16[k].float(), fp32[k].float(), rtol=5e-2, atol=1e-3)
    bf16["lpips"].backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_reconstruction_loss_l1_only_without_images():
    objective = Objective(LossConfig())  # no images: the CLIP term (weight 1) needs no teacher
    f, c, grid = patchify(torch.rand(3, 4, 32, 32) * 2 - 1)
    batch = PackedBatch.cat([(f, c, grid, "video", 4)])
    zeros = torch.zeros(f.shape[0], 8)
    out = objective(batch, Outputs(posterior=Posterior(zeros, zeros), recon=f + 0.5), [{}], ("rec",))
    assert out["lpips"] == 0 and out["gram"] == 0
    torch.testing.assert_close(out["total"], torch.tensor(0.2 * 0.5))
