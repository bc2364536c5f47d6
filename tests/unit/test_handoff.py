"""Stage 1 -> 2 handoff: widening the latent from 32 to 48 channels changes no reconstruction."""
import dataclasses

import pytest
import torch

from atoken.model import AToken, PackedBatch, patchify, preset


def config(channels: int = 32, **kw):
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 2, 64, 2, 128
    return dataclasses.replace(cfg, latent_channels=channels, **kw)


def packed_batch() -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    parts = [(*patchify(torch.rand(3, h, w, generator=g) * 2 - 1), "image", 1) for h, w in ((32, 48), (64, 32))]
    parts.append((*patchify(torch.rand(3, 8, 32, 32, generator=g) * 2 - 1), "video", 4))  # 2 temporal tiles
    return PackedBatch.cat(parts)


def test_widening_keeps_mode_and_sampled_reconstructions():
    torch.manual_seed(0)
    cfg = config(32)
    model = AToken(cfg).eval()
    batch = packed_batch()
    with torch.no_grad():
        out = model(batch, sample=False)
        mode, post = out.recon, out.posterior
        sampled = model(batch, sample=True, generator=torch.Generator().manual_seed(7)).recon
        model.widen_latent(48)
        out = model(batch, sample=False)
        mode2, post2 = out.recon, out.posterior
        sampled2 = model(batch, sample=True, generator=torch.Generator().manual_seed(7)).recon
    assert cfg.latent_channels == 32 and model.cfg.latent_channels == 48  # the caller's config is untouched
    assert post2.mean.shape == (batch.num_tokens, 48)
    assert not torch.allclose(sampled, mode, atol=1e-3)  # the sample really differs from the mode
    torch.testing.assert_close(mode2, mode, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sampled2, sampled, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(post2.mean[:, :32], post.mean, atol=1e-6, rtol=1e-6)
    assert torch.equal(post2.mean[:, 32:], torch.zeros(batch.num_tokens, 16))
    assert torch.equal(post2.logvar[:, 32:], torch.zeros(batch.num_tokens, 16))
    torch.testing.assert_close(post2.kl(), post.kl(), atol=1e-5, rtol=1e-6)  # the new channels' KL is 0
    # The widened model is an ordinary C=48 model: its state loads into a fresh one.
    fresh = AToken(model.cfg)
    fresh.load_state_dict(model.state_dict())


def test_new_channels_start_learning():
    torch.manual_seed(0)
    model = AToken(config(32))
    model.widen_latent(48)
    batch = packed_batch()
    out = model(batch, sample=True, generator=torch.Generator().manual_seed(1))
    recon, post = out.recon, out.posterior
    ((recon - batch.features).abs().mean() + 1e-3 * post.kl().mean()).backward()
    # Sampled noise on the new channels reaches the zero columns of the up-projection.
    assert model.decoder.up.weight.grad[:, 32:].abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_widening_refusals():
    model = AToken(config(32))
    for channels in (32, 16):
        with pytest.raises(ValueError, match="can only add channels: the latent has 32"):
            model.widen_latent(channels)
    fsq = AToken(config(12, quantizer="fsq"))
    with pytest.raises(ValueError, match="FSQ groups of 6"):
        fsq.widen_latent(16)
    fsq.widen_latent(48)
    assert fsq.fsq.groups == 8 and fsq.encode_ids(packed_batch()).shape[1] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_widening_keeps_sampled_reconstructions_on_cuda():
    torch.manual_seed(0)
    model = AToken(config(32)).cuda().eval()
    batch = packed_batch().to("cuda")
    with torch.no_grad():
        sampled = model(batch, sample=True, generator=torch.Generator("cuda").manual_seed(7)).recon
        model.widen_latent(48)
        sampled2 = model(batch, sample=True, generator=torch.Generator("cuda").manual_seed(7)).recon
    torch.testing.assert_close(sampled2, sampled, atol=1e-5, rtol=1e-5)
