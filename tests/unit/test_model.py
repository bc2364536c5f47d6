"""CPU unit tests of the model: patches, 4D RoPE, varlen attention backends, packing isolation."""
import dataclasses
import logging
import math
import typing

import pytest
import torch

from atoken.model import (
    AToken,
    ModelConfig,
    PackedBatch,
    Posterior,
    TransformerConfig,
    apply_rope,
    from_dict,
    fuse_qkv,
    pad_to_patches,
    patchify,
    preset,
    rope_angles,
    split_qkv,
    unpatchify,
    varlen_attention,
)
from atoken.model import attention as attn_mod
from atoken.model.attention import check_backend, dense_reference_attention, sdpa_loop_attention
from atoken.model.autoencoder import position_embedding
from atoken.model.transformer import Attention
from atoken.training.parallelize import apply_activation_checkpointing


def micro_config() -> ModelConfig:
    """The tiny preset shrunk further so a forward takes milliseconds."""
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 2, 64, 2, 128  # head_dim 32
    cfg.latent_channels = 8
    return cfg


def image_batch(images: list[torch.Tensor]) -> PackedBatch:
    parts = []
    for img in images:
        f, c, g = patchify(img)
        parts.append((f, c, g, "image", 1))
    return PackedBatch.cat(parts)


# ---------------------------------------------------------------- patches

def test_patchify_roundtrip_image_and_video():
    img = torch.randn(3, 48, 80)  # 3x5 patch grid
    f, c, g = patchify(img)
    assert f.shape == (15, 3072) and g == (1, 3, 5, 1)
    assert torch.equal(f.reshape(15, 4, 16, 16, 3)[:, 1:], torch.zeros(15, 3, 16, 16, 3))  # time padding
    assert torch.equal(unpatchify(f, g, frames=1), img[:, None])
    assert c[:, 0].eq(0).all() and c[:, 3].eq(0).all() and c[-1].tolist() == [0, 2, 4, 0]

    vid = torch.randn(3, 8, 32, 48)
    f, c, g = patchify(vid)
    assert g == (2, 2, 3, 1) and f.shape == (12, 3072)
    assert torch.equal(unpatchify(f, g), vid)


def test_patchify_rejects_non_multiple_and_pad_crop_identity():
    with pytest.raises(ValueError, match="multiples of 16"):
        patchify(torch.randn(3, 50, 64))
    img = torch.randn(3, 50, 70)
    padded = pad_to_patches(img)
    assert padded.shape == (3, 64, 80)
    assert torch.equal(padded[:, :50, :70], img)
    f, _, g = patchify(padded)
    assert torch.equal(unpatchify(f, g, frames=1)[:, 0, :50, :70], img)


# ---------------------------------------------------------------- RoPE

def _rope_scores(q, k, coords, theta=10000.0):
    cos, sin = rope_angles(coords, q.shape[-1], theta)
    return torch.einsum("nhd,mhd->hnm", apply_rope(q, cos, sin), apply_rope(k, cos, sin))


def test_rope_scores_depend_only_on_coordinate_differences():
    torch.manual_seed(0)
    n, h, d = 10, 2, 32
    q, k = torch.randn(n, h, d), torch.randn(n, h, d)
    coords = torch.randint(0, 20, (n, 4))
    ref = _rope_scores(q, k, coords)
    shifted = _rope_scores(q, k, coords + torch.tensor([3, -5, 7, 11]))
    torch.testing.assert_close(shifted, ref, atol=1e-4, rtol=1e-4)
    for axis in range(4):  # moving one token along any one axis must change its scores
        moved = coords.clone()
        moved[4, axis] += 3
        changed = _rope_scores(q, k, moved)
        assert (changed[:, 4] - ref[:, 4]).abs().max() > 1e-2
        torch.testing.assert_close(changed[:, :4, :4], ref[:, :4, :4])  # other pairs untouched


def test_rope_matches_released_complex_formulation():
    """Per axis D/8 frequencies theta^(-i/D) (full head dim), axes (t, x, y, z) concatenated,
    adjacent (even, odd) pairs rotated as complex numbers."""
    torch.manual_seed(0)
    n, h, d = 6, 3, 72
    x, coords = torch.randn(n, h, d), torch.randint(0, 30, (n, 4))
    freqs = 1.0 / 10000.0 ** (torch.arange(d // 8).float() / d)
    angles = torch.cat([coords[:, a, None].float() * freqs for a in range(4)], -1)  # [n, d/2]
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(n, h, d // 2, 2))
                             * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    torch.testing.assert_close(apply_rope(x, *rope_angles(coords, d)), ref)
    # Only the t-axis block (first D/4 dims) rotates when only t is non-zero.
    only_t = torch.zeros(n, 4, dtype=torch.long)
    only_t[:, 0] = 5
    out = apply_rope(x, *rope_angles(only_t, d))
    assert torch.equal(out[..., d // 4:], x[..., d // 4:]) and not torch.allclose(out[..., :d // 4], x[..., :d // 4])


# ---------------------------------------------------------------- attention backends

def _packed_qkv(lens, h=2, d=16, dtype=torch.float32, device="cpu"):
    cu = torch.tensor([0, *list(torch.tensor(lens).cumsum(0))], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lens), h, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    return q, k, v, cu


def test_sdpa_loop_matches_dense_reference_with_grads():
    torch.manual_seed(0)
    q, k, v, cu = _packed_qkv([5, 1, 9, 3])
    out = varlen_attention(q, k, v, cu, 9, backend="sdpa")
    ref = dense_reference_attention(q, k, v, cu)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_or_unavailable_backend_raises():
    with pytest.raises(ValueError, match="unknown attention backend"):
        check_backend("xformers")
    with pytest.raises(ValueError, match=r"model.attention must be"):
        dataclasses.replace(preset("tiny"), attention="xformers")
    q, k, v, cu = _packed_qkv([3, 4])
    for name in ("cudnn", "fa4", "flash_attn", "torch_varlen"):  # never runnable on CPU fp32 tensors
        try:
            check_backend(name)
        except ValueError as e:
            assert "unavailable" in str(e)
            continue  # package missing: refused at once
        with pytest.raises(ValueError, match="cannot run"):
            varlen_attention(q, k, v, cu, 4, backend=name)


def test_backend_from_model_config_reaches_every_attention():
    cfg = dataclasses.replace(preset("tiny"), attention="sdpa")
    model = AToken(cfg)
    backends = {m.backend for m in model.modules() if isinstance(m, Attention)}
    assert backends == {"sdpa"}


def test_backend_choice_logged_once(caplog):
    attn_mod._logged.clear()
    q, k, v, cu = _packed_qkv([3, 4])
    with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
        for _ in range(3):
            varlen_attention(q, k, v, cu, 4)
    msgs = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("attention backend: sdpa (")


def test_backend_checks_trace_as_constants_under_compile():
    """The package checks import (cudnn, flash_attn.cute) eagerly: a compiled block that asks which
    backend runs keeps one graph instead of failing to trace the imports."""
    reasons = torch.compile(lambda: [attn_mod._unavailable_reason(n, None) for n in attn_mod.BACKENDS],
                            fullgraph=True, backend="eager")()
    assert reasons == [attn_mod._unavailable_reason(n, None) for n in attn_mod.BACKENDS] and reasons[-1] is None


def test_auto_order_is_the_measured_ranking():
    """auto tries the measured backends fastest first, then the unmeasured, never sdpa before them."""
    order = attn_mod.auto_order()
    measured = [b for b in order if b in attn_mod.MEASURED_MS]
    assert measured == sorted(attn_mod.MEASURED_MS, key=attn_mod.MEASURED_MS.get)
    assert order[:len(measured)] == tuple(measured) and "sdpa" not in order
    assert set(order) | {"sdpa"} == set(attn_mod.BACKENDS)


class _ReferenceFA4:
    """Stands in for ``flash_attn.cute.interface`` on CPU: the dense reference with FA4's call shapes
    (lse [heads, N] fp32, the backward's (dq, dk, dv)). It tests atoken's ops around the kernel (the
    autograd wiring, the fake kernels under torch.compile); the kernel itself is tested on a GPU below."""
    calls: typing.ClassVar[list[str]] = []

    @classmethod
    def _flash_attn_fwd(cls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse):
        cls.calls.append("fwd")
        lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        ids = torch.repeat_interleave(torch.arange(len(lens)), lens)
        scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(ids[:, None] != ids[None, :], float("-inf"))
        return dense_reference_attention(q, k, v, cu_seqlens_q), scores.logsumexp(-1).float(), None, None, None

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, dout, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        deterministic):
        cls.calls.append(f"bwd deterministic={deterministic}")
        # The attention backward by hand (custom ops run below autograd): P = exp(S - lse),
        # dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D).
        scale = q.shape[-1] ** -0.5
        lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        ids = torch.repeat_interleave(torch.arange(len(lens)), lens)
        s = torch.einsum("nhd,mhd->hnm", q, k) * scale
        p = (s - lse[..., None]).exp().masked_fill(ids[:, None] != ids[None, :], 0.0)  # [h, N, N]
        dv = torch.einsum("hnm,nhd->mhd", p, dout)
        dp = torch.einsum("nhd,mhd->hnm", dout, v)
        ds = p * (dp - (dout * out).sum(-1).T[..., None])
        return torch.einsum("hnm,mhd->nhd", ds, k) * scale, torch.einsum("hnm,nhd->mhd", ds, q) * scale, dv


def test_fa4_ops_autograd_and_compile_on_cpu(monkeypatch):
    """varlen_attention(backend="fa4") through atoken's custom ops, eager and compiled (one graph):
    values and gradients equal the sdpa loop's; the determinism flag reaches the backward."""
    monkeypatch.setattr(attn_mod, "_fa4", lambda: _ReferenceFA4)
    monkeypatch.setattr(attn_mod, "_unavailable_reason", lambda name, x: None)
    torch.manual_seed(0)
    q, k, v, cu = _packed_qkv([5, 1, 9, 3])
    g = torch.randn(18, 2, 16)
    ref = sdpa_loop_attention(q, k, v, cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    fn = torch.compile(lambda *a: attn_mod.varlen_attention(*a, backend="fa4"), fullgraph=True, backend="eager")
    for f in (lambda *a: attn_mod.varlen_attention(*a, backend="fa4"), fn):
        _ReferenceFA4.calls = []
        out = f(q, k, v, cu, 9)
        grads = torch.autograd.grad(out, (q, k, v), g)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert _ReferenceFA4.calls == ["fwd", "bwd deterministic=False"]
    torch.use_deterministic_algorithms(True)
    try:
        _ReferenceFA4.calls = []
        torch.autograd.grad(attn_mod.varlen_attention(q, k, v, cu, 9, backend="fa4"), (q, k, v), g)
    finally:
        torch.use_deterministic_algorithms(False)
    assert _ReferenceFA4.calls == ["fwd", "bwd deterministic=True"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["cudnn", "fa4", "flash_attn", "torch_varlen"])
def test_cuda_backends_match_sdpa_bf16(name):
    """Values and gradients on packed mixed lengths (so400m's head_dim 72), against the loop of SDPA."""
    if attn_mod._unavailable_reason(name, None):
        pytest.skip(attn_mod._unavailable_reason(name, None))
    torch.manual_seed(0)
    q, k, v, cu = _packed_qkv([130, 7, 300, 64], h=4, d=72, dtype=torch.bfloat16, device="cuda")
    out = varlen_attention(q, k, v, cu, 300, backend=name)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = sdpa_loop_attention(q, k, v, cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------- transformer pieces

def test_fused_qkv_layout():
    torch.manual_seed(0)
    heads, hd, width = 3, 8, 24
    wq, wk, wv = (torch.randn(heads * hd, width) for _ in range(3))
    fused = fuse_qkv(wq, wk, wv, heads)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads), (wq, wk, wv), strict=True))
    x = torch.randn(5, width)
    q, _k, v = (x @ fused.t()).view(5, heads, 3, hd).unbind(2)  # as Attention.forward reads it
    torch.testing.assert_close(q, (x @ wq.t()).view(5, heads, hd))
    torch.testing.assert_close(v, (x @ wv.t()).view(5, heads, hd))


# ---------------------------------------------------------------- the autoencoder

def test_packing_isolation():
    torch.manual_seed(0)
    model = AToken(micro_config()).eval()
    imgs = [torch.rand(3, 32, 48) * 2 - 1, torch.rand(3, 48, 32) * 2 - 1, torch.rand(3, 16, 64) * 2 - 1]
    with torch.no_grad():
        base = model(image_batch(imgs), sample=False).recon
        cu = [0, 6, 12, 16]
        for variant in (torch.rand(3, 48, 32) * 2 - 1, torch.rand(3, 64, 64) * 2 - 1):  # new pixels, new size
            new = [imgs[0], variant, imgs[2]]
            batch = image_batch(new)
            res = model(batch, sample=False)
            out, post = res.recon, res.posterior
            ncu = batch.cu_seqlens.tolist()
            torch.testing.assert_close(out[:ncu[1]], base[:cu[1]], atol=1e-6, rtol=0)
            torch.testing.assert_close(out[ncu[2]:], base[cu[2]:], atol=1e-6, rtol=0)
            if variant.shape == imgs[1].shape:
                assert (out[cu[1]:cu[2]] - base[cu[1]:cu[2]]).abs().max() > 1e-4
    assert out.shape == (batch.num_tokens, 3072) and post.mean.shape == (batch.num_tokens, 8)


def test_forward_backward_checkpoint_and_rope_toggle():
    cfg = micro_config()
    torch.manual_seed(0)
    plain = AToken(cfg)
    torch.manual_seed(0)
    ckpt = AToken(cfg)
    apply_activation_checkpointing(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ckpt.state_dict().values(), strict=True))
    batch = image_batch([torch.rand(3, 32, 32), torch.rand(3, 16, 48)])
    grads = []
    for m in (plain, ckpt):
        res = m(batch, sample=True, generator=torch.Generator().manual_seed(1))
        recon, post = res.recon, res.posterior
        ((recon - batch.features).abs().mean() + 1e-3 * post.kl().mean()).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(g is not None and g.isfinite().all() for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the encoder's RoPE can be switched off (SigLIP2 comparison)
        on = plain.encode(batch).mean
        plain.encoder.transformer.rope = False
        assert not torch.allclose(plain.encode(batch).mean, on)


def test_parameter_names_and_position_table():
    torch.manual_seed(0)
    model = AToken(micro_config())
    names = [n for n, _ in model.named_parameters()]
    assert all(n.split(".")[0] in ("encoder", "latent", "decoder") for n in names)
    for n in ("encoder.patch_embed.weight", "encoder.pos_embed", "encoder.transformer.blocks.1.attn.qkv.weight",
              "encoder.transformer.blocks.0.mlp.fc1.bias", "encoder.transformer.blocks.0.norm1.bias",
              "encoder.norm.weight", "latent.weight", "decoder.up.weight", "decoder.pos_embed", "decoder.head.weight",
              "decoder.transformer.blocks.0.attn.q_norm.weight", "decoder.transformer.blocks.1.norm2.weight"):
        assert n in names, n
    assert not any(n.startswith("decoder.") and n.endswith(".bias") for n in names)
    assert "latent.bias" not in names  # the release's ``proj`` has none
    # A 16x16 grid reads the table unresized, at row-major (x, y).
    batch = image_batch([torch.zeros(3, 256, 256), torch.zeros(3, 32, 16)])
    pos = position_embedding(model.encoder.pos_embed, batch.attention_layout())
    torch.testing.assert_close(pos[:256], model.encoder.pos_embed, atol=1e-6, rtol=0)
    assert pos.shape == (258, 64)


def test_posterior():
    post = Posterior(torch.zeros(4, 8), torch.zeros(4, 8))
    assert torch.equal(post.kl(), torch.zeros(4))
    post = Posterior(torch.ones(2, 3), torch.full((2, 3), math.log(2.0)))
    torch.testing.assert_close(post.kl(), torch.full((2,), 0.5 * 3 * (1 + 2 - 1 - math.log(2.0))))
    a, b = (post.sample(torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)


def test_presets_and_parameter_count():
    so = preset("so400m")
    for tc in (so.encoder, so.decoder):
        assert (tc.depth, tc.width, tc.heads, tc.head_dim, tc.mlp_width) == (27, 1152, 16, 72, 4304)
    assert (so.encoder.norm, so.encoder.qk_norm, so.encoder.bias) == ("layernorm", False, True)
    assert (so.decoder.norm, so.decoder.qk_norm, so.decoder.bias) == ("rmsnorm", True, False)
    base = preset("base")
    assert (base.encoder.depth, base.encoder.width, base.encoder.heads) == (12, 768, 12)
    assert from_dict(ModelConfig, so.to_dict()) == so
    with pytest.raises(ValueError):
        preset("huge")
    with pytest.raises(ValueError, match="multiple of 8"):
        TransformerConfig(2, 100, 5, 128)  # head_dim 20 cannot split over 4 RoPE axes in pairs
    with torch.device("meta"):
        model = AToken(so)
    count = sum(p.numel() for p in model.parameters())
    enc = sum(p.numel() for p in model.encoder.parameters())
    print(f"so400m AToken parameters: {count / 1e6:.1f}M (encoder {enc / 1e6:.1f}M)")
    assert 780e6 < count < 860e6 and 400e6 < enc < 430e6
