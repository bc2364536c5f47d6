"""SigLIP2 import: with RoPE off our encoder and MAP head reproduce HF's Siglip2VisionModel (naflex)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from atoken.model import AToken, PackedBatch, Tokenizer, patchify, preset
from atoken.model.inference_dir import read_inference_config
from atoken.model.siglip2 import Siglip2ImageTower, encoder_config, load_siglip2, model_config
from atoken.tools.import_siglip2 import main as import_main

pytest.importorskip("transformers")
from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel
from transformers.utils import CONFIG_NAME

SIZES = [(48, 80), (64, 64), (16, 32)]  # (H, W) in pixels: patch grids 3x5, 4x4, 1x2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 2-layer Siglip2VisionModel (width 64, 2 heads of 32, 16x16 position table), with
    every parameter perturbed so that biases and norm weights are not their trivial init."""
    torch.manual_seed(0)
    cfg = Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              num_patches=256, patch_size=16)
    model = Siglip2VisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("siglip2") / "vision"
    model.save_pretrained(path)
    return path


def images():
    """Real photos (skimage) at several sizes, in [-1, 1]."""
    data = pytest.importorskip("skimage.data")
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    out = []
    for photo, (h, w) in zip(photos, SIZES, strict=True):
        x = torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 127.5 - 1
        out.append(F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0])
    return out


def hf_outputs(path, imgs):
    """HF naflex inputs built from the same images: patches flattened in (h, w, c) order, padded
    to the longest, with pixel_attention_mask and spatial_shapes. -> (per-image tokens, pooled)."""
    model = Siglip2VisionModel.from_pretrained(path).eval()
    grids = [(h // 16, w // 16) for _, h, w in (i.shape for i in imgs)]
    longest = max(h * w for h, w in grids)
    pixels, mask = torch.zeros(len(imgs), longest, 768), torch.zeros(len(imgs), longest, dtype=torch.long)
    for b, (img, (h, w)) in enumerate(zip(imgs, grids, strict=True)):
        patches = img.permute(1, 2, 0).reshape(h, 16, w, 16, 3).permute(0, 2, 1, 3, 4).reshape(h * w, 768)
        pixels[b, :h * w], mask[b, :h * w] = patches, 1
    with torch.no_grad():
        out = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=torch.tensor(grids))
    tokens = [out.last_hidden_state[b, :h * w] for b, (h, w) in enumerate(grids)]
    return tokens, out.pooler_output


def pack(imgs) -> PackedBatch:
    return PackedBatch.cat([(*patchify(i), "image", 1) for i in imgs])


def assert_reproduces_hf(model: AToken, hf_dir, imgs):
    batch = pack(imgs)
    with torch.no_grad():
        feats = model.features(batch)
        emb, pooled = model.understand(batch, feats)
    tokens, ref_pooled = hf_outputs(hf_dir, imgs)
    for (a, b), ref in zip(batch.spans(), tokens, strict=True):
        torch.testing.assert_close(feats[a:b], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb, F.normalize(ref_pooled, dim=-1), atol=1e-5, rtol=1e-5)


def test_import_reproduces_hf_with_rope_off(hf_dir):
    cfg = model_config(hf_dir, latent_channels=8)
    assert cfg.encoder_rope and cfg.understanding and cfg.pos_table_size == 16
    torch.manual_seed(0)
    model = AToken(cfg).eval()
    written = load_siglip2(model, hf_dir)
    # Every encoder and MAP head parameter comes from the checkpoint; nothing else does.
    assert written == sorted(n for n, _ in model.named_parameters()
                             if n.startswith(("encoder.", "understanding.head.")))
    imgs = images()
    model.encoder.transformer.rope = False
    assert_reproduces_hf(model, hf_dir, imgs)
    # The other 3 frames' patch-embedding columns are zero; the training model keeps RoPE on.
    assert torch.equal(model.encoder.patch_embed.weight[:, 768:], torch.zeros(64, 3 * 768))
    model.encoder.transformer.rope = True
    with torch.no_grad():
        assert not torch.allclose(model.understand(pack(imgs))[1], hf_outputs(hf_dir, imgs)[1], atol=1e-3)


def test_image_tower_is_siglip2(hf_dir):
    tower = Siglip2ImageTower.from_pretrained(hf_dir)
    assert not any(p.requires_grad for p in tower.parameters())
    imgs = images()
    _, pooled = tower(pack(imgs))
    _, ref = hf_outputs(hf_dir, imgs)
    torch.testing.assert_close(pooled, ref, atol=1e-4, rtol=1e-4)


def test_cli_writes_a_loadable_initialisation(hf_dir, tmp_path, capsys):
    out = tmp_path / "init"
    import_main([str(hf_dir), "--out", str(out), "--latent-channels", "8", "--seed", "3"])
    assert "RoPE on" in capsys.readouterr().out
    meta = read_inference_config(out)[1]
    assert meta["weights"] == "siglip2-import" and meta["model"]["encoder_rope"] is True
    tok = Tokenizer.from_pretrained(out, device="cpu")
    assert tok.model.cfg.latent_channels == 8
    recon = tok.reconstruct([torch.rand(3, 40, 24)])[0]  # the whole model runs (decoder random)
    assert recon.shape == (3, 40, 24)
    tok.model.encoder.transformer.rope = False
    assert_reproduces_hf(tok.model, hf_dir, images())


def test_full_siglip2_checkpoint_and_refusals(hf_dir, tmp_path):
    torch.manual_seed(1)
    full = Siglip2Model(Siglip2Config(
        text_config=dict(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_patches=256)))
    full.save_pretrained(tmp_path / "full")
    model = AToken(model_config(tmp_path / "full", latent_channels=8, rope=False)).eval()
    load_siglip2(model, tmp_path / "full")
    torch.testing.assert_close(model.encoder.pos_embed, full.vision_model.embeddings.position_embedding.weight)

    narrow = model_config(hf_dir, latent_channels=8)
    narrow.encoder = dataclasses.replace(narrow.encoder, mlp_width=96)
    with pytest.raises(ValueError, match="does not fit"):
        load_siglip2(AToken(narrow), hf_dir)
    with pytest.raises(ValueError, match="understanding=True"):
        load_siglip2(AToken(dataclasses.replace(model_config(hf_dir), understanding=False)), hf_dir)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_siglip2(model, tmp_path / "nowhere")


def test_so400m_naflex_shape_is_the_so400m_preset():
    """SigLIP2-So400m-patch16-naflex's published vision shape maps onto our so400m encoder."""
    hf = Siglip2VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                             num_patches=256, patch_size=16)
    assert encoder_config(hf) == (preset("so400m").encoder, 16)
    with pytest.raises(ValueError, match="patch 14 px"):
        encoder_config(Siglip2VisionConfig(patch_size=14))
