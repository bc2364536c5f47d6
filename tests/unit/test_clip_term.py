"""The CLIP/feature term of image reconstruction (model/losses.py ``feature_loss``): against the HF
SigLIP2 vision model computed directly, and its gradient into the decoder, on real photos with a
tiny random SigLIP2 saved locally (tests/helpers/siglip2_local.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Siglip2VisionModel

from atoken.model import AToken, PackedBatch, patchify, preset
from atoken.model.losses import LossConfig, ReconstructionLoss
from atoken.model.objective import Objective
from atoken.model.siglip2 import Siglip2ImageTower
from tests.helpers.siglip2_local import write_tiny_siglip2

pytest.importorskip("transformers")
WIDTH, HEADS, MLP, SIZE = 64, 2, 128, 64  # SIZE: the term's resolution (224 in training)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    return write_tiny_siglip2(tmp_path_factory.mktemp("siglip2"), WIDTH, HEADS, MLP)


def photos() -> list[torch.Tensor]:
    """Two real photos [3, H, W] in [-1, 1] at sizes that are not the term's."""
    out = []
    for which, (w, h) in (("chelsea", (80, 48)), ("astronaut", (48, 64))):
        arr = np.array(Image.fromarray(getattr(skimage.data, which)()).resize((w, h)))
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)
    return out


def hf_tokens(model, img: torch.Tensor) -> torch.Tensor:
    """HF Siglip2VisionModel's last hidden state (after post_layernorm) [n, W] of one image, resized
    to SIZE x SIZE as the loss does (bilinear, antialias), its patches in HF's (h, w, c) order."""
    x = F.interpolate(img[None], size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    g = SIZE // 16
    pixels = x.permute(0, 2, 3, 1).reshape(1, g, 16, g, 16, 3).permute(0, 1, 3, 2, 4, 5).reshape(1, g * g, 768)
    out = model(pixel_values=pixels, pixel_attention_mask=torch.ones(1, g * g, dtype=torch.long),
                spatial_shapes=torch.tensor([[g, g]]))
    return out.last_hidden_state[0]


def test_clip_term_equals_the_teacher_computed_directly(siglip):
    teacher = Siglip2ImageTower.from_pretrained(siglip)
    originals = photos()
    g = torch.Generator().manual_seed(0)
    recons = [(x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1) for x in originals]
    batch = PackedBatch.cat([(*patchify(x), "image", 1) for x in originals])
    recon = torch.cat([patchify(x)[0] for x in recons]).requires_grad_(True)
    cfg = LossConfig(perceptual_size=SIZE, l1_weight=0.0, lpips_weight=0.0, gram_weight=0.0)
    out = ReconstructionLoss(cfg)(batch, recon, teacher)

    hf = Siglip2VisionModel.from_pretrained(siglip, local_files_only=True).eval()
    with torch.no_grad():
        per_image = [(1 - F.cosine_similarity(hf_tokens(hf, r), hf_tokens(hf, x), dim=-1)).mean()
                     for x, r in zip(originals, recons, strict=True)]
    want = torch.stack(per_image).mean()
    assert want > 1e-3  # the noisy reconstruction's features do differ
    torch.testing.assert_close(out["clip"], want, atol=1e-5, rtol=1e-4)
    out["clip"].backward()
    assert recon.grad[:, :768].abs().sum() > 0  # through the frozen teacher to the pixels
    assert not any(p.grad is not None for p in teacher.parameters())


def test_clip_term_gradient_reaches_the_decoder(siglip):
    torch.manual_seed(0)
    cfg = preset("tiny")
    for tc in (cfg.encoder, cfg.decoder):
        tc.depth, tc.width, tc.heads, tc.mlp_width = 1, WIDTH, HEADS, MLP
    model = AToken(dataclasses.replace(cfg, latent_channels=8))
    loss_cfg = LossConfig(perceptual_size=SIZE, l1_weight=0.0, lpips_weight=0.0, gram_weight=0.0, kl_weight=0.0,
                          teacher=str(siglip))
    objective = Objective.from_config(loss_cfg)
    batch = PackedBatch.cat([(*patchify(x), "image", 1) for x in photos()])
    out = model(batch, generator=torch.Generator().manual_seed(0))
    terms = objective(batch, out, [{}, {}], ("rec",))
    assert terms["clip"] > 0 and terms["total"].item() == pytest.approx(0.2 * terms["clip"].item())
    terms["total"].backward()
    for name in ("decoder.head.weight", "decoder.transformer.blocks.0.mlp.fc2.weight", "decoder.up.weight",
                 "latent.weight", "encoder.patch_embed.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not any(p.grad is not None for p in objective.teacher.parameters())
    with pytest.raises(ValueError, match=r"set loss.teacher"):
        Objective(dataclasses.replace(loss_cfg, teacher=None))(batch, out, [{}, {}], ("rec",))
