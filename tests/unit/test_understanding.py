"""Understanding: the MAP head on packed batches, the two semantic losses, the frozen text tower."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

from atoken.model import AToken, PackedBatch, patchify, preset
from atoken.model.understanding import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT, MAPHead, TextTower, distill_loss, sigmoid_loss

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402 - after importorskip, which skips this module without transformers
    PreTrainedTokenizerFast,
    Siglip2Config,
    Siglip2Model,
    Siglip2TextModel,
    Siglip2VisionConfig,
)
from transformers.models.siglip2.modeling_siglip2 import (  # noqa: E402 - after importorskip, as above
    Siglip2MultiheadAttentionPoolingHead,
)

WIDTH, HEADS, MLP = 64, 2, 128


def und_config():
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 2, WIDTH, HEADS, MLP
    return dataclasses.replace(cfg, latent_channels=8, understanding=True)


def tiny_siglip2(seed: int = 0) -> Siglip2Model:
    cfg = Siglip2Config(
        text_config=dict(vocab_size=40, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=2,
                         num_attention_heads=HEADS, max_position_embeddings=12, projection_size=WIDTH),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=2, num_attention_heads=HEADS,
                           num_patches=256))
    torch.manual_seed(seed)
    return Siglip2Model(cfg).eval()


def load_hf_head(ours: MAPHead, hf: Siglip2MultiheadAttentionPoolingHead) -> None:
    """HF's head -> ours (the mapping model/siglip2.py applies; written out here as an independent check)."""
    sd, w = hf.state_dict(), ours.probe.shape[0]
    ours.load_state_dict({
        "probe": sd["probe"].reshape(-1),
        "q.weight": sd["attention.in_proj_weight"][:w], "q.bias": sd["attention.in_proj_bias"][:w],
        "kv.weight": sd["attention.in_proj_weight"][w:], "kv.bias": sd["attention.in_proj_bias"][w:],
        "out.weight": sd["attention.out_proj.weight"], "out.bias": sd["attention.out_proj.bias"],
        "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
        **{f"mlp.{k}": sd[f"mlp.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}})


def test_map_head_matches_hf_per_packed_sample():
    torch.manual_seed(0)
    hf = Siglip2MultiheadAttentionPoolingHead(
        Siglip2VisionConfig(hidden_size=WIDTH, intermediate_size=MLP, num_attention_heads=HEADS)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and norm weights
    ours = MAPHead(und_config().encoder)
    load_hf_head(ours, hf)
    lens = [5, 1, 17, 9]
    x = torch.randn(sum(lens), WIDTH)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    emb, pooled = ours(x, cu)
    # HF: pad to a dense [B, max_len, W] batch with an attention mask.
    dense, mask = torch.zeros(len(lens), max(lens), WIDTH), torch.zeros(len(lens), max(lens), dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        dense[i, :b - a], mask[i, :b - a] = x[a:b], 1
    with torch.no_grad():
        ref = hf(dense, mask)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, F.normalize(ref, dim=-1), atol=1e-5, rtol=1e-5)
    # Each sample's embedding depends on its own tokens only.
    alone, _ = ours(x[cu[2]:cu[3]], torch.tensor([0, lens[2]], dtype=torch.int32))
    torch.testing.assert_close(alone[0], emb[2], atol=1e-6, rtol=1e-6)


def test_atoken_understand_and_parameters():
    torch.manual_seed(0)
    model = AToken(und_config())
    names = [n for n, _ in model.named_parameters()]
    assert "understanding.head.probe" in names and "understanding.logit_scale" in names
    assert all(n.split(".")[0] in ("encoder", "latent", "decoder", "understanding") for n in names)
    assert model.understanding.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    assert model.understanding.logit_bias.item() == LOGIT_BIAS_INIT
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in ((32, 48), (16, 16), (64, 32))]
    batch = PackedBatch.cat([(*patchify(i), "image", 1) for i in imgs])
    emb, pooled = model.understand(batch)
    assert emb.shape == (3, WIDTH) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    # The same pass can feed reconstruction and understanding.
    feats = model.features(batch)
    torch.testing.assert_close(model.understand(batch, feats)[1], pooled)
    # The scale and bias reach the loss as outputs of the module's forward (what ZeRO-3 needs).
    out = model(batch, tasks=("und",))
    torch.testing.assert_close(out.embedding, emb)
    assert out.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT) and out.logit_bias.item() == LOGIT_BIAS_INIT
    loss = sigmoid_loss(out.embedding, F.normalize(torch.randn(3, WIDTH), dim=-1), out.logit_scale, out.logit_bias)
    loss.backward()
    for p in (model.understanding.logit_scale, model.understanding.logit_bias, model.understanding.head.probe,
              model.encoder.patch_embed.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no understanding head"):
        AToken(dataclasses.replace(und_config(), understanding=False)).understand(batch)


def test_sigmoid_loss_matches_hf_siglip2():
    model = tiny_siglip2()
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE_INIT)
        model.logit_bias.fill_(LOGIT_BIAS_INIT)
    torch.manual_seed(1)
    b = 6
    ids = torch.randint(0, 40, (b, 12))
    imgs = torch.rand(b, 3, 32, 32) * 2 - 1
    pixels = imgs.permute(0, 2, 3, 1).reshape(b, 2, 16, 2, 16, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 768)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, pixel_attention_mask=torch.ones(b, 4, dtype=torch.long),
                    spatial_shapes=torch.tensor([[2, 2]] * b), return_loss=True)
    ours = sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias)
    torch.testing.assert_close(ours, out.loss)
    # The convention: the parameter is log t. A perfect positive pair scores t + b > 0.
    assert math.exp(LOGIT_SCALE_INIT) + LOGIT_BIAS_INIT > 100
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        sigmoid_loss(out.image_embeds, out.text_embeds[:3], model.logit_scale, model.logit_bias)


def test_distill_loss():
    torch.manual_seed(0)
    b, k, d, t, scale = 4, 7, 16, 2.0, math.exp(LOGIT_SCALE_INIT)
    teacher = F.normalize(torch.randn(b, d), dim=-1)
    student = F.normalize(torch.randn(b, d), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(k, d), dim=-1)
    assert distill_loss(teacher, teacher, txt, scale).item() == pytest.approx(0.0, abs=1e-6)
    loss = distill_loss(student, teacher, txt, scale, temperature=t)
    p_t = (scale * teacher @ txt.t() / t).softmax(-1)
    log_p_s = (scale * student @ txt.t() / t).log_softmax(-1)
    manual = t ** 2 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    torch.testing.assert_close(loss, manual)
    assert loss > 0
    teacher.requires_grad_(True)
    distill_loss(student, teacher, txt, scale).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # the teacher is a constant
    with pytest.raises(ValueError, match="texts"):
        distill_loss(student, teacher, txt[:, :8], scale)


def test_text_tower_from_local_directory(tmp_path):
    model = tiny_siglip2(seed=2)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE_INIT)
        model.logit_bias.fill_(LOGIT_BIAS_INIT)
    model.save_pretrained(tmp_path / "full")
    words = ["<pad>", "<unk>", "a", "photo", "of", "cat", "dog", "bird"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(tmp_path / "full")

    tower = TextTower.from_pretrained(tmp_path / "full", max_length=12)
    assert tower.logit_scale == pytest.approx(LOGIT_SCALE_INIT) and tower.logit_bias == LOGIT_BIAS_INIT
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.train().training
    texts = ["a photo of cat", "a photo of a dog", "bird"]
    emb = tower.embed(texts)
    ids = tower.tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = F.normalize(model.get_text_features(input_ids=ids), dim=-1)
    assert emb.shape == (3, WIDTH)
    torch.testing.assert_close(emb, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(emb[0], emb[1])

    # A text-only directory: no logit parameters, no tokenizer.
    text_only = Siglip2TextModel(model.config.text_config)
    text_only.text_model.load_state_dict(model.text_model.state_dict())
    text_only.save_pretrained(tmp_path / "text")
    tower2 = TextTower.from_pretrained(tmp_path / "text", max_length=12)
    assert tower2.tokenizer is None and tower2.logit_scale is None
    torch.testing.assert_close(tower2.embed_ids(ids), emb, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="without a tokenizer"):
        tower2.embed(texts)
    with pytest.raises(FileNotFoundError, match=r"config.json not found"):
        TextTower.from_pretrained(tmp_path / "missing")
