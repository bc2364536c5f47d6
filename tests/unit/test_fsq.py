"""FSQ: parity with vector_quantize_pytorch, straight-through gradients, ids, and the FSQ autoencoder."""
import dataclasses

import pytest
import torch

from atoken.model import AToken, ModelConfig, PackedBatch, from_dict, patchify, preset
from atoken.model.fsq import FSQ

vqp = pytest.importorskip("vector_quantize_pytorch")


def fsq_config(channels: int = 12) -> ModelConfig:
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 2, 64, 2, 128
    return dataclasses.replace(cfg, latent_channels=channels, quantizer="fsq")  # validated


def image_batch(sizes) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    parts = [(*patchify(torch.rand(3, h, w, generator=g) * 2 - 1), "image", 1) for h, w in sizes]
    return PackedBatch.cat(parts)


def test_matches_vector_quantize_pytorch_values_indices_and_gradient():
    torch.manual_seed(0)
    fsq, ref = FSQ(48, levels=4, group_dims=6), vqp.FSQ(levels=[4] * 6)
    x = (torch.randn(500, 48) * 2).requires_grad_(True)
    xq, ids = fsq.quantize(x)
    x_ref = x.detach().clone().requires_grad_(True)
    out_ref, ids_ref = ref(x_ref.view(500, 8, 6))  # (batch, sequence = 8 groups, 6 dims)
    assert ids.shape == (500, 8) and ids.dtype == torch.int64
    assert torch.equal(xq, out_ref.reshape(500, 48))
    assert torch.equal(ids, ids_ref.long())
    assert set(xq.unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}
    g = torch.randn(500, 48)
    xq.backward(g)
    out_ref.reshape(500, 48).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    # Straight-through: the gradient of the unrounded bound tanh(x + shift) * half_l / (L // 2).
    t = torch.tanh(x.detach() + fsq.shift)
    torch.testing.assert_close(x.grad, g * (1 - t ** 2) * fsq.half_l / 2)
    assert x.grad.abs().min() > 0


def test_ids_dequantize_and_codebook():
    torch.manual_seed(1)
    fsq, ref = FSQ(48), vqp.FSQ(levels=[4] * 6)
    xq, ids = fsq.quantize(torch.randn(64, 48) * 3)
    assert torch.equal(fsq.dequantize(ids), xq)
    assert fsq.codebook_size == 4096 and int(ids.min()) >= 0 and int(ids.max()) < 4096
    every = torch.arange(4096).repeat(8, 1).t()  # [4096, 8]: every code in every group
    codes = fsq.dequantize(every).view(4096, 8, 6)[:, 0]
    assert torch.equal(codes, ref.indices_to_codes(torch.arange(4096)))
    assert codes.unique(dim=0).shape[0] == 4096
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        fsq.dequantize(torch.full((2, 8), 4096))
    with pytest.raises(ValueError, match="groups of 6"):
        FSQ(40)


def test_quantize_bf16_inputs():
    torch.manual_seed(0)
    fsq = FSQ(12)
    x = torch.randn(32, 12)
    _, ids = fsq.quantize(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xq_bf, ids_bf = fsq.quantize(x.bfloat16())
    assert xq_bf.dtype == torch.bfloat16  # the levels (multiples of 1/2) are exact in bf16
    assert torch.equal(xq_bf.float(), fsq.dequantize(ids_bf))
    # bf16 rounding of the input may move values at a level boundary; nearly all ids agree.
    assert (ids_bf == ids).float().mean() > 0.95


def test_fsq_autoencoder_decodes_the_quantized_mean():
    torch.manual_seed(0)
    model = AToken(fsq_config()).eval()
    assert model.fsq is not None and not list(model.fsq.parameters()) and not list(model.fsq.buffers())
    batch = image_batch([(32, 48), (16, 32)])
    with torch.no_grad():
        out = model(batch, sample=True, generator=torch.Generator().manual_seed(1))
        sampled, post = out.recon, out.posterior
        mode = model(batch, sample=False).recon
        ids = model.encode_ids(batch)
        from_ids = model.decode_ids(ids, batch)
    assert ids.shape == (batch.num_tokens, 2)
    assert torch.equal(sampled, mode)  # never a sample under FSQ
    torch.testing.assert_close(from_ids, mode, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decode(model.fsq.quantize(post.mean)[0], batch), mode, atol=1e-6, rtol=0)
    # Gradients reach the encoder through the straight-through rounding.
    model.train()
    recon = model(batch).recon
    recon.square().mean().backward()
    assert model.latent.weight.grad.abs().sum() > 0 and model.encoder.patch_embed.weight.grad.abs().sum() > 0


def test_config_validation_and_continuous_model_refuses_ids():
    with pytest.raises(ValueError, match="not a multiple of fsq_group_dims"):
        fsq_config(channels=32)
    with pytest.raises(ValueError, match="quantizer must be"):
        ModelConfig(encoder=preset("tiny").encoder, decoder=preset("tiny").decoder, quantizer="vq")
    cfg = fsq_config()
    assert from_dict(ModelConfig, cfg.to_dict()) == cfg
    model = AToken(dataclasses.replace(fsq_config(), quantizer="none"))
    with pytest.raises(ValueError, match="continuous latent"):
        model.encode_ids(image_batch([(16, 16)]))
