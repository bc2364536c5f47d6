"""The released AToken's structure and checkpoint format: each piece of math against a direct
computation, the converters both ways, and fine-tuning from imported release weights.

The release's checkpoint is written here from its layout (``official_state``: names and shapes of
``apple/ml-atoken``'s ``AutoencoderKL``), with random non-trivial weights: per-head QK gains that
differ, a nonzero decoder table, nonzero norm biases.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import skimage.data as sk
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from atoken.model import AToken, PackedBatch, Tokenizer, patchify, preset
from atoken.model.autoencoder import position_embedding
from atoken.model.inference_dir import read_inference_config, save_inference_dir
from atoken.model.kv_cache import KVCache
from atoken.model.metrics import psnr
from atoken.model.patches import unpatchify
from atoken.model.rope import apply_rope, rope_angles
from atoken.model.tokenizer import VideoLatent
from atoken.model.transformer import MultiHeadRMSNorm
from atoken.tools.official import (
    FormatError,
    export_official,
    from_official,
    import_main,
    import_official,
    model_config,
)
from atoken.training import handoff
from tests.integration.test_training import shards, train  # noqa: F401 - the real photos' shards and the trainer in a subprocess

W, HEADS, MLP, DEPTH, C = 64, 2, 128, 2, 12


def arch(latent: int = C, fsq: bool = False) -> dict:
    a = {"patch_size": [4, 16, 16], "in_channels": 3072, "out_channels": 3072, "latent_channels": latent}
    for side, rms in (("encoder", False), ("decoder", True)):
        a.update({f"{side}_model_channels": W, f"{side}_num_blocks": DEPTH, f"{side}_num_heads": HEADS,
                  f"{side}_mlp_channels": MLP, f"{side}_attn_mode": "full", f"{side}_pe_mode": "joint",
                  f"{side}_qk_rms_norm": rms, f"{side}_use_bias": not rms, f"{side}_use_rms_norm": rms})
    a["use_decoder"] = True
    if fsq:
        a.update(use_quantizer=True, quantizer_type="fsq", quantizer_codebook_size=4096,
                 quantizer_feature_dim=latent, quantizer_num_codebooks=latent // 6, quantizer_chunk_size=1)
    return a


def official_state(a: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A release-format state dict (``AutoencoderKL.state_dict()`` names and shapes) of random weights."""
    g = torch.Generator().manual_seed(seed)
    W, HEADS, MLP = (a[f"encoder_{k}"] for k in ("model_channels", "num_heads", "mlp_channels"))
    shapes = {"encoder.input_layer.weight": (W, 3072), "encoder.input_layer.bias": (W,),
              "encoder.pos_embedder.position_embedding.weight": (256, W),
              "encoder.post_layernorm.weight": (W,), "encoder.post_layernorm.bias": (W,),
              "encoder.head.probe": (W,), "encoder.head.attention.to_q.weight": (W, W),
              "encoder.head.attention.to_q.bias": (W,), "encoder.head.attention.to_kv.weight": (2 * W, W),
              "encoder.head.attention.to_kv.bias": (2 * W,), "encoder.head.attention.to_out.weight": (W, W),
              "encoder.head.attention.to_out.bias": (W,), "encoder.head.layernorm.weight": (W,),
              "encoder.head.layernorm.bias": (W,), "encoder.head.mlp.mlp.0.weight": (MLP, W),
              "encoder.head.mlp.mlp.0.bias": (MLP,), "encoder.head.mlp.mlp.2.weight": (W, MLP),
              "encoder.head.mlp.mlp.2.bias": (W,), "proj.weight": (2 * a["latent_channels"], W),
              "decoder.input_layer.weight": (W, a["latent_channels"]),
              "decoder.pos_embedder.position_embedding.weight": (256, W),
              "decoder.out_norm.weight": (W,), "decoder.out_layer.weight": (3072, W)}
    for side in ("encoder", "decoder"):
        bias = side == "encoder"
        for i in range(a[f"{side}_num_blocks"]):
            b = f"{side}.blocks.{i}."
            layers = {"attn.to_qkv": (3 * W, W), "attn.to_out": (W, W), "mlp.mlp.0": (MLP, W), "mlp.mlp.2": (W, MLP)}
            for name, shape in layers.items():
                shapes[b + name + ".weight"] = shape
                if bias:
                    shapes[b + name + ".bias"] = shape[:1]
            for n in ("norm1", "norm2"):
                shapes[f"{b}{n}.weight"] = (W,)
                if bias:
                    shapes[f"{b}{n}.bias"] = (W,)
            if not bias:
                shapes[b + "attn.q_rms_norm.gamma"] = (HEADS, W // HEADS)
                shapes[b + "attn.k_rms_norm.gamma"] = (HEADS, W // HEADS)
    state = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if k.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "out_norm.weight", "post_layernorm.weight",
                       "gamma")):
            t = 1 + 0.3 * t  # gains near 1, all different
        elif k.endswith(("bias", "position_embedding.weight", "probe")):
            t = 0.2 * t
        else:
            t = t / math.sqrt(shape[-1])
        state[k] = t
    return state


def write_release(tmp_path, a: dict, state: dict, suffix: str = ".pt"):
    model, config = tmp_path / f"model{suffix}", tmp_path / "model.yaml"
    if suffix == ".pt":
        torch.save(state, model)
    else:
        save_file(state, str(model))
    config.write_text(yaml.safe_dump({"model": {"model_cfg": {"arch_cfg": a}}}))
    return model, config


def image_batch(sizes=((48, 80), (32, 32))) -> PackedBatch:
    g = torch.Generator().manual_seed(1)
    return PackedBatch.cat([(*patchify(torch.rand(3, h, w, generator=g) * 2 - 1), "image", 1) for h, w in sizes])


def imported_model(a: dict, seed: int = 0) -> AToken:
    cfg = model_config(a)
    model = AToken(cfg).eval()
    model.load_state_dict(from_official(official_state(a, seed), cfg))
    return model


# ------------------------------------------------------------------ the math, piece by piece


def test_per_head_qk_norm_is_the_release_formula():
    norm = MultiHeadRMSNorm(3, 8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(3, 8))
    x = torch.randn(5, 3, 8)
    direct = torch.empty_like(x)
    for n in range(5):
        for h in range(3):
            v = x[n, h]
            direct[n, h] = v / v.norm() * math.sqrt(8) * norm.weight[h]
    torch.testing.assert_close(norm(x), direct, atol=1e-6, rtol=1e-6)
    # A gain per head: the same vector under two heads comes out differently.
    assert not torch.allclose(norm(x[:, :1].expand(5, 3, 8))[:, 0], norm(x[:, :1].expand(5, 3, 8))[:, 1])


def test_decoder_adds_its_own_resized_table_and_the_latent_has_no_bias():
    model = imported_model(arch())
    batch = image_batch()
    seen = {}
    model.decoder.transformer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        feats = model.features(batch)
        post = model.posterior(feats)
        model.decode(post.mean, batch)
    # The latent: mean and logvar are the encoder features times proj's rows, no bias.
    w = model.latent.weight
    torch.testing.assert_close(post.mean, feats @ w[:C].t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post.logvar, (feats @ w[C:].t()).clamp(-30, 20), atol=1e-5, rtol=1e-5)
    # The decoder's input: up(z) + its table resized to each image's grid, read at (row, column).
    table = model.decoder.pos_embed.reshape(16, 16, W).permute(2, 0, 1)[None]
    rows = []
    for (h, w_), (_t, x, y, _) in [((3, 5), c) for c in batch.coords[:15].tolist()] + \
                                 [((2, 2), c) for c in batch.coords[15:].tolist()]:
        grid = F.interpolate(table, size=(h, w_), mode="bilinear", align_corners=False, antialias=True)[0]
        rows.append(grid[:, x, y])
    direct = post.mean @ model.decoder.up.weight.t() + torch.stack(rows)
    torch.testing.assert_close(seen["x"], direct, atol=1e-5, rtol=1e-5)
    assert model.decoder.pos_embed.abs().sum() > 0


def test_table_is_resized_to_each_samples_own_coordinates():
    """A sparse sample (a 3D asset's voxels) reads the table at (max x + 1, max y + 1), not its grid."""
    model = imported_model(arch())
    coords = torch.tensor([[0, 0, 0, 3], [0, 2, 6, 1], [0, 4, 1, 0], [0, 4, 6, 9]])
    batch = PackedBatch.cat([(torch.zeros(4, 3072), coords, (1, 64, 64, 64), "3d", 1)])
    pos = position_embedding(model.encoder.pos_embed, batch.attention_layout())
    table = model.encoder.pos_embed.reshape(16, 16, W).permute(2, 0, 1)[None]
    grid = F.interpolate(table, size=(5, 7), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(pos, torch.stack([grid[:, x, y] for _, x, y, _ in coords.tolist()]), atol=1e-6, rtol=0)


def test_video_is_encoded_in_independent_16_frame_chunks_and_pooled_over_all():
    model = imported_model(arch())
    clip = torch.rand(3, 32, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = PackedBatch.cat([(*patchify(clip), "video", 4)])
    halves = [PackedBatch.cat([(*patchify(clip[:, a:a + 16]), "video", 4)]) for a in (0, 16)]
    layout = whole.attention_layout()
    assert layout.cu_seqlens.tolist() == [0, 24, 48] and layout.coords[:, 0].tolist() == [0] * 6 + [1] * 6 + \
        [2] * 6 + [3] * 6 + [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6
    with torch.no_grad():
        feats = model.features(whole)
        alone = torch.cat([model.features(h) for h in halves])
        torch.testing.assert_close(feats, alone, atol=1e-5, rtol=1e-5)
        # The MAP head pools one embedding over both chunks' tokens.
        emb = model.understand(whole)[0]
        torch.testing.assert_close(emb, model.understanding.head(alone, whole.cu_seqlens)[0], atol=1e-5, rtol=1e-5)
        assert emb.shape == (1, W)
        # The decoder, too, sees independent chunks.
        z = model.posterior(feats).mean
        torch.testing.assert_close(model.decode(z, whole),
                                   torch.cat([model.decode(z[:24], halves[0]), model.decode(z[24:], halves[1])]),
                                   atol=1e-5, rtol=1e-5)
    # The Tokenizer's tiles are memory bounds only: 16 and 32 frames give one latent.
    tok = Tokenizer(model)
    video = (clip + 1) / 2
    torch.testing.assert_close(tok.encode_video(video, 16).z, tok.encode_video(video, 32).z, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        tok.encode_video(video, 8)


def test_kv_cache_positions():
    """Which frames are cached and where: stride 3 latent frames, 1 cached."""
    cache = KVCache(frames=1)
    chunk = PackedBatch.cat([(*patchify(torch.zeros(3, 12, 16, 32)), "video", 4)]).attention_layout()
    assert chunk.coords[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    first = cache.begin(chunk)
    assert first.coords[:, 0].tolist() == [0, 0, 1, 1, 2, 2]  # nothing cached yet
    assert cache._keep.tolist() == [False, False, False, False, True, True]  # the last frame is kept...
    cache.end()
    assert cache.past_coords[:, 0].tolist() == [0, 0]  # ... at t = 0
    second = cache.begin(chunk)
    assert second.coords[:, 0].tolist() == [1, 1, 2, 2, 3, 3]  # the new frames follow the cached one
    assert cache.key_layout.coords[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cache.key_layout.coords[:, 1:].tolist() == chunk.coords[:2, 1:].tolist() + second.coords[:, 1:].tolist()


def test_kv_cache_decoding_equals_a_direct_computation():
    """One decoder block: the second chunk attends to its own keys and the first chunk's last
    frame's (QK-normed, un-rotated, then rotated at t = 0); the first chunk decodes as alone."""
    model = imported_model({**arch(), "decoder_num_blocks": 1})
    tok = Tokenizer(model)
    g = torch.Generator().manual_seed(3)
    latent = VideoLatent(torch.randn(6, 2, 3, C, generator=g), (24, 32, 48), 16)  # 6 latent frames
    with torch.no_grad():
        cached = tok.decode_video(latent, stride_frames=12, cache_frames=4)
        plain = tok.decode_video(latent, stride_frames=12)
        torch.testing.assert_close(cached[:, :12], plain[:, :12])  # chunk 0: nothing cached yet
        assert not torch.allclose(cached[:, 12:], plain[:, 12:], atol=1e-4)

        # Direct: chunk 1 (latent frames 3-5 at t = 1..3) with frame 2 of chunk 0 cached at t = 0.
        dec, blk = model.decoder, model.decoder.transformer.blocks[0]
        hd = W // HEADS

        def block_inputs(z, t0):
            b = PackedBatch.cat([(*patchify(torch.zeros(3, 4 * z.shape[0], 32, 48)), "video", 4)])
            x = dec.up(z.reshape(-1, C)) + position_embedding(dec.pos_embed, b.attention_layout())
            coords = b.coords.clone()
            coords[:, 0] += t0
            h = blk.norm1(x)
            q, k, v = blk.attn.qkv(h).view(-1, HEADS, 3, hd).unbind(2)
            return x, blk.attn.q_norm(q), blk.attn.k_norm(k), v, coords

        _, _, k0, v0, c0 = block_inputs(latent.z[:3], 0)
        x1, q1, k1, v1, c1 = block_inputs(latent.z[3:], 1)
        last = c0[:, 0] == 2
        keys_c = torch.cat([c0[last] - torch.tensor([2, 0, 0, 0]), c1])
        k_all, v_all = torch.cat([k0[last], k1]), torch.cat([v0[last], v1])
        qr = apply_rope(q1, *rope_angles(c1, hd))
        kr = apply_rope(k_all, *rope_angles(keys_c, hd))
        att = torch.softmax(torch.einsum("nhd,mhd->hnm", qr, kr) / math.sqrt(hd), -1)
        o = torch.einsum("hnm,mhd->nhd", att, v_all).reshape(-1, W)
        x = x1 + blk.attn.proj(o)
        x = x + blk.mlp(blk.norm2(x))
        recon = dec.head(dec.norm(x))
        frames = ((unpatchify(recon, (3, 2, 3, 1)) + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(cached[:, 12:], frames[:, :12], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="<= 16"):
        tok.decode_video(latent, stride_frames=16, cache_frames=4)


# ------------------------------------------------------------------ the converters


@pytest.mark.parametrize("suffix,fsq", [(".pt", False), (".safetensors", True)])
def test_import_export_round_trip_is_bit_identical(tmp_path, suffix, fsq):
    a = arch(48 if fsq else C, fsq=fsq)
    state = official_state(a, seed=4)
    model, config = write_release(tmp_path, a, state, suffix)
    out = import_official(model, config, tmp_path / "imported")
    tok = Tokenizer.from_pretrained(out)
    assert tok.model.cfg.understanding and (tok.model.fsq is not None) == fsq
    exported = export_official(out, tmp_path / "exported")
    back = torch.load(exported / "model.pt", weights_only=True)
    assert sorted(back) == sorted(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    assert yaml.safe_load((exported / "config.yaml").read_text())["model"]["model_cfg"]["arch_cfg"] == a
    if fsq:
        ids = tok.encode_ids([torch.rand(3, 32, 48)])[0]
        assert ids.shape == (2, 3, 8)


GS_W, GS_HEADS, GS_K = 64, 2, 32


def gs_yaml() -> dict:
    """A small ``3d_decode_gs.yaml`` (the release's keys; widths shrunk)."""
    rep = {"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
           "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": GS_K, "2d_filter_kernel_size": 0.1,
           "3d_filter_kernel_size": 9.0e-4, "scaling_bias": 4.0e-3, "opacity_bias": 0.1,
           "scaling_activation": "softplus"}
    return {"model": {"class_name": "models.pretrained.decoder_gs.SLatGaussianDecoderTrain", "resolution": 64,
                      "model_channels": GS_W, "latent_channels": 768, "num_blocks": 2, "num_heads": GS_HEADS,
                      "mlp_channels": 4 * GS_W, "attn_mode": "swin", "window_size": 4, "representation_config": rep}}


def official_gs_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A release-format ``SLatGaussianDecoderTrain`` state dict: the decoder's names and shapes, its
    Hammersley buffer, and tensors of the LPIPS network its class carries (two sharing storage, as
    torchmetrics' ``lin0`` and ``lins.0`` do)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"input_layer.weight": (GS_W, 768), "out_layer.weight": (14 * GS_K, GS_W), "out_layer.bias": (14 * GS_K,)}
    for i in range(2):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (GS_W,), b + "norm2.weight": (GS_W,),
                       b + "attn.to_qkv.weight": (3 * GS_W, GS_W), b + "attn.to_out.weight": (GS_W, GS_W),
                       b + "mlp.mlp.0.weight": (4 * GS_W, GS_W), b + "mlp.mlp.2.weight": (GS_W, 4 * GS_W)})
    state = {k: (1 + 0.3 * torch.randn(s, generator=g)) if "norm" in k
             else torch.randn(s, generator=g) / math.sqrt(s[-1]) for k, s in shapes.items()}
    ham = [[n / GS_K, sum(((n >> b) & 1) / 2 ** (b + 1) for b in range(6)), 0.0] for n in range(GS_K)]
    for n in range(GS_K):  # base-3 radical inverse
        m, f = n, 1 / 3
        while m:
            m, d = divmod(m, 3)
            ham[n][2] += d * f
            f /= 3
    state["offset_perturbation"] = torch.atanh((torch.tensor(ham) * 2 - 1) / 1.5)
    lin = torch.rand(1, 64, 1, 1, generator=g)
    state.update({"lpips_loss.net.scaling_layer.shift": torch.tensor([-0.03, -0.088, -0.188]).view(1, 3, 1, 1),
                  "lpips_loss.net.net.slice1.0.weight": torch.randn(64, 3, 3, 3, generator=g),
                  "lpips_loss.net.lin0.model.1.weight": lin, "lpips_loss.net.lins.0.model.1.weight": lin})
    return state


def write_gs_release(tmp_path, state: dict, cfg: dict | None = None):
    model, config = tmp_path / "3d_decode_gs.pt", tmp_path / "3d_decode_gs.yaml"
    torch.save(state, model)
    config.write_text(yaml.safe_dump(cfg or gs_yaml()))
    return model, config


def test_gaussian_decoder_import_export_round_trip_is_bit_identical(tmp_path):
    a = arch()
    model, config = write_release(tmp_path, a, official_state(a, seed=5))
    gs_state = official_gs_state(seed=6)
    gs_model, gs_config = write_gs_release(tmp_path, gs_state)
    out = import_official(model, config, tmp_path / "imported", gs_model, gs_config)
    tok = Tokenizer.from_pretrained(out)
    dec = tok.model.gaussian_decoder
    assert dec.cfg.window == 4 and dec.cfg.gaussians_per_voxel == GS_K and dec.cfg.lr["_rotation"] == 0.1
    # The release's fused QKV rows are [3, heads, head_dim]: head 1's key is rows W + D : W + 2D.
    d = GS_W // GS_HEADS
    _q, k, _v = dec.blocks[0].attn.qkv.weight.view(GS_HEADS, 3, d, GS_W).unbind(1)
    assert torch.equal(k[1], gs_state["blocks.0.attn.to_qkv.weight"][GS_W + d:GS_W + 2 * d])
    assert torch.equal(dec.offset_perturbation, gs_state["offset_perturbation"])  # our formula, the release's values
    # A real decode through the imported weights (pixel decoder, then the Gaussian decoder).
    coords = torch.tensor([[0, 3, 4, 5], [0, 3, 4, 6], [0, 9, 9, 9]])
    gaussians = tok.decode_asset(tok.encode_asset(torch.rand(3, 3072) * 2 - 1, coords), coords)
    assert gaussians.num_gaussians == 3 * GS_K and torch.isfinite(gaussians.means).all()
    exported = export_official(out, tmp_path / "exported")
    back = torch.load(exported / "3d_decode_gs.pt", weights_only=True)
    assert sorted(back) == sorted(gs_state)
    for key in gs_state:
        assert back[key].dtype == gs_state[key].dtype and torch.equal(back[key], gs_state[key]), key
    assert yaml.safe_load((exported / "3d_decode_gs.yaml").read_text()) == gs_yaml()
    main = torch.load(exported / "model.pt", weights_only=True)
    assert not any(k.startswith("gaussian") for k in main) and len(main) == len(official_state(a))


def test_gaussian_decoder_import_refuses_by_name(tmp_path):
    a = arch()
    model, config = write_release(tmp_path, a, official_state(a))
    good = official_gs_state()
    cases = {"missing": ({k: v for k, v in good.items() if k != "blocks.1.norm2.weight"}, None,
                         "missing: blocks.1.norm2.weight"),
             "shape": ({**good, "out_layer.bias": torch.zeros(5)}, None, "out_layer.bias (5,) (expected (448,))"),
             "unexpected": ({**good, "pos_embedder.freqs": torch.zeros(3)}, None, "unexpected: pos_embedder.freqs"),
             "attn": (good, {"model": {**gs_yaml()["model"], "attn_mode": "full"}}, "attn_mode = 'full'"),
             "rep": (good, {"model": {**gs_yaml()["model"], "representation_config": {
                 **gs_yaml()["model"]["representation_config"], "scaling_activation": "exp"}}}, "scaling_activation")}
    for name, (state, cfg, message) in cases.items():
        (tmp_path / name).mkdir()
        gs_model, gs_config = write_gs_release(tmp_path / name, state, cfg)
        with pytest.raises(FormatError) as e:
            import_official(model, config, tmp_path / "out", gs_model, gs_config)
        assert message in str(e.value), (name, str(e.value))
    with pytest.raises(FormatError, match="together"):
        import_official(model, config, tmp_path / "out", gs_model)
    # Without the LPIPS tensors the release's class cannot load strictly: export says so.
    gs_model, gs_config = write_gs_release(tmp_path, good)
    out = import_official(model, config, tmp_path / "imported", gs_model, gs_config)
    (out / "gs_lpips.pt").unlink()
    with pytest.raises(FormatError, match=r"gs_lpips.pt not found"):
        export_official(out, tmp_path / "x")


def test_import_refuses_by_name(tmp_path, capsys):
    a = arch()
    good = official_state(a)
    cases = {"missing": ({k: v for k, v in good.items() if k != "decoder.blocks.1.attn.k_rms_norm.gamma"},
                         "missing: decoder.blocks.1.attn.k_rms_norm.gamma"),
             "unexpected": ({**good, "encoder.extra.weight": torch.zeros(1)}, "unexpected: encoder.extra.weight"),
             "shape": ({**good, "proj.weight": torch.zeros(2 * C + 2, W)}, "proj.weight (26, 64) (expected (24, 64))")}
    for name, (state, message) in cases.items():
        (tmp_path / name).mkdir()
        model, config = write_release(tmp_path / name, a, state)
        with pytest.raises(FormatError) as e:
            import_official(model, config, tmp_path / "out")
        assert message in str(e.value), (name, str(e.value))
    with pytest.raises(SystemExit) as e:
        import_main([str(model), "--config", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    bad = {**a, "decoder_attn_mode": "swin"}
    with pytest.raises(FormatError, match="decoder_attn_mode = 'swin'"):
        model_config(bad)


def test_export_refuses_what_the_release_cannot_hold(tmp_path):
    a = arch()
    model, config = write_release(tmp_path, a, official_state(a))
    out = import_official(model, config, tmp_path / "imported")
    state = load_file(str(out / "model.safetensors"))
    state["understanding.logit_scale"] = torch.tensor([5.0])
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(FormatError, match=r"logit_scale is \[5.0\], but the release fixes it at 4.8438"):
        export_official(out, tmp_path / "x")
    # A model without the MAP head: the release always holds one.
    cfg, meta = read_inference_config(out)
    save_inference_dir(out, {k: v for k, v in state.items() if not k.startswith("understanding.")},
                       {**cfg.to_dict(), "understanding": False}, meta["weights"], meta["source"],
                       dtype=getattr(torch, meta["dtype"]))
    with pytest.raises(FormatError, match="always holds the MAP head"):
        export_official(out, tmp_path / "x")


# ------------------------------------------------------------------ fine-tuning the release


@pytest.mark.slow
def test_fine_tuning_from_imported_release_weights(tmp_path, shards):  # noqa: F811 - the fixture, imported above
    """The trainer starts from an imported release (a tiny one, random): its step-0 reconstruction
    of a held-out photo is the imported model's, it trains, and a rerun resumes its own checkpoint."""

    a = {**arch(latent=32), **{f"{s}_{k}": v for s in ("encoder", "decoder")
                               for k, v in (("model_channels", 192), ("num_heads", 4), ("mlp_channels", 768),
                                            ("num_blocks", 1))}}
    model, config = write_release(tmp_path, a, official_state(a, seed=5))
    imported = import_official(model, config, tmp_path / "imported")
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    photo = np.asarray(Image.fromarray(sk.chelsea()).resize((96, 64)))
    Image.fromarray(photo).save(holdout / "chelsea.png")
    run = tmp_path / "run"
    extra = ("model.understanding=true", f"checkpoint.init_from={imported}", f"log.eval_images={holdout}", "steps=2")
    records = train(run, shards, *extra)
    x = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    expected = psnr(x, Tokenizer.from_pretrained(imported, device="cpu").reconstruct([x])[0])
    step0 = next(r for r in records if r["step"] == 0 and "eval_psnr_per_image" in r)
    assert step0["eval_psnr_per_image"]["chelsea.png"] == pytest.approx(expected, abs=1e-4)
    assert sorted(r["step"] for r in records if "loss" in r) == [1, 2]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][:2] == ["start", "init_from"] and events[1]["init_from"] == str(imported)
    # Run again, longer: it resumes its own checkpoint (not the release) and continues.
    records = train(run, shards, *extra[:-1], "steps=3")
    assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3]
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events.count("init_from") == 1 and "resume" in events


def test_fine_tuning_refuses_a_stage_without_the_release_heads(tmp_path):
    model, config = write_release(tmp_path, arch(), official_state(arch()))
    imported = import_official(model, config, tmp_path / "imported")
    narrow = model_config(arch())
    with pytest.raises(ValueError, match="cannot narrow"):
        handoff.check(dataclasses.replace(narrow, latent_channels=6), imported)
    with pytest.raises(ValueError, match="encoder differs"):
        handoff.check(preset("tiny"), imported)
    with pytest.raises(ValueError, match=r"has the MAP head .* set model.understanding=true"):
        handoff.check(dataclasses.replace(narrow, understanding=False), imported)
