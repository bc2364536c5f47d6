"""The pixel terms of the reconstruction loss (docs/design.md, Objective). ``model.objective.Objective``
weights them and adds the 3D, KL and semantic terms: the total is computed there and only there.

    L_rec  = 1.0 * L1 + 10 * LPIPS + 1000 * Gram + 1.0 * CLIP       images
    L_rec  = 1.0 * L1                                               video, 3D

L1 is taken at native resolution on the packed tokens, "normalised per patch": each token's mean
absolute error over its real values, then the mean over the micro-batch's tokens. LPIPS, Gram and
the CLIP term are taken at ``perceptual_size`` (224) on the unpatchified images.

The CLIP/feature term (``feature_loss``): the paper names it (weight 1, at 224) but not its
features or distance. Ours: the frozen SigLIP2 teacher's encoder tokens (after its final LayerNorm,
the features its MAP head pools; 14 x 14 of them at 224) of the reconstruction against those of the
original, 1 - cosine similarity per token, averaged. Per token rather than the pooled embedding, so
the term says where an image lost its semantics (one pooled vector per image is a weak signal for a
decoder); cosine, so the term is blind to the features' scale (VA-VAE's vision-foundation loss uses
the same distance). Gradients flow through the frozen teacher into the decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PATCH_T
from .packed import IMAGE, PackedBatch
from .patches import patchify, unpatchify
from .perceptual import LPIPS, load_perceptual


@dataclass
class LossConfig:
    rec_weight: float = 0.2
    kl_weight: float = 1e-8
    l1_weight: float = 1.0
    lpips_weight: float = 10.0
    gram_weight: float = 1000.0
    perceptual_net: str = "alex"  # "alex" or "vgg"
    trunk_weights: str | None = None  # None: torch hub cache, then stlpips-pytorch (perceptual.py)
    lin_weights: str | None = None  # None: bundled with the trunk file, then lpips' v0.1 file
    perceptual_size: int = 224
    clip_weight: float = 1.0  # the CLIP/feature term of image reconstruction; needs ``teacher``
    sem_weight: float = 1.0
    distill_temperature: float = 2.0
    # Local SigLIP2 checkpoint directories (HF save_pretrained; never downloaded): the frozen text
    # tower for understanding streams, and the frozen image teacher for image distillation.
    text_tower: str | None = None
    teacher: str | None = None


def token_l1(batch: PackedBatch, recon: torch.Tensor) -> torch.Tensor:
    """[N] mean |recon - target| of each token over its real frames only.

    Tokens are (t, h, w, c) ordered, so frame t is values [t*768, (t+1)*768); an image token's
    frames 1..3 are time padding and are left out (``batch.frames``).
    """
    n = recon.shape[0]
    # [N, 4]: mean |error| per frame of each token.
    per_frame = (recon.float() - batch.features.float()).abs().view(n, PATCH_T, -1).mean(-1)
    frames = torch.repeat_interleave(torch.tensor(batch.frames), torch.tensor(batch.seqlens))  # [N], on the host
    frames = frames.to(recon.device, non_blocking=True)
    real = torch.arange(PATCH_T, device=recon.device)[None] < frames[:, None]  # [N, 4]
    return (per_frame * real).sum(-1) / frames


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, C] channel Gram matrix G = F F^T / (C * H * W), F the [C, H*W] map.

    NOTE: normalised by C*H*W (as in Gatys et al. / the usual style loss), so layers of different
    sizes contribute on a comparable scale; the 1000 weight of the objective is set against this.
    Computed in float32: under bf16 autocast the products lose too much precision.
    """
    b, c, h, w = f.shape
    f = f.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def gram_loss(feats_x: list[torch.Tensor], feats_y: list[torch.Tensor]) -> torch.Tensor:
    """sum over layers of ||G(x) - G(y)||_F^2 -> [B]."""
    return sum((gram_matrix(a) - gram_matrix(b)).pow(2).sum((1, 2)) for a, b in zip(feats_x, feats_y, strict=True))


def image_pairs(batch: PackedBatch, recon: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The image samples as pixels resized to size x size: (originals, reconstructions), each
    [B_img, 3, size, size]; None if the batch holds no image."""
    idx = [i for i, m in enumerate(batch.modalities) if m == IMAGE]
    if not idx:
        return None
    spans = batch.spans()

    def resized(tokens: torch.Tensor, i: int) -> torch.Tensor:
        img = unpatchify(tokens[slice(*spans[i])], batch.grids[i], batch.frames[i])[:, 0]  # [3, H, W]
        # fp32: CPU has no bf16 antialiased resize (bf16 autocast on CPU failed here)
        return F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)

    with torch.no_grad():
        orig = torch.cat([resized(batch.features, i) for i in idx])
    return orig, torch.cat([resized(recon, i) for i in idx])


def feature_loss(teacher: nn.Module, orig: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """The CLIP/feature term (module docstring): orig (no grad), rec [B, 3, S, S] in [-1, 1], S a
    multiple of 16 -> [B] mean over each image's tokens of 1 - cos(teacher(rec), teacher(orig)).
    ``teacher.features(batch)`` gives the frozen image tower's tokens [N, width]."""
    def packed(x: torch.Tensor) -> PackedBatch:
        return PackedBatch.cat([(*patchify(img), IMAGE, 1) for img in x])

    with torch.no_grad():
        target = teacher.features(packed(orig))
    batch = packed(rec)
    cos = F.cosine_similarity(teacher.features(batch).float(), target.float(), dim=-1)  # [N]
    ids = batch.sample_ids().to(cos.device)
    per_image = cos.new_zeros(rec.shape[0]).index_add(0, ids, 1 - cos)
    return per_image / torch.tensor(batch.seqlens, device=cos.device)


class ReconstructionLoss(nn.Module):
    """forward(batch, recon [N, 3072], teacher=None) -> the unweighted scalar terms 'l1', 'lpips',
    'gram', 'clip' of the micro-batch's image and video samples (``Objective`` weights and sums them).
    'clip' is computed when ``cfg.clip_weight`` > 0 and needs ``teacher`` (the frozen SigLIP2 image
    tower, ``model.siglip2.Siglip2ImageTower``) then.

    The perceptual net is frozen and kept out of this module's parameters and state_dict (so no
    optimizer or checkpoint ever sees it); ``.to()`` / ``.cuda()`` still move it (see ``_apply``).
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self._perceptual = (load_perceptual(cfg.perceptual_net, cfg.trunk_weights, cfg.lin_weights),)

    @property
    def perceptual(self) -> LPIPS:
        return self._perceptual[0]

    def _apply(self, fn, *args, **kwargs):
        self.perceptual._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, batch: PackedBatch, recon: torch.Tensor,
                teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        l1 = token_l1(batch, recon).mean()
        lpips = gram = clip = recon.new_zeros((), dtype=torch.float32)
        pairs = image_pairs(batch, recon, self.cfg.perceptual_size)
        if pairs is not None:
            dtype = next(self.perceptual.parameters()).dtype
            orig, rec = (p.to(dtype) for p in pairs)
            with torch.no_grad():
                fx = self.perceptual.features(orig)
            fy = self.perceptual.features(rec)
            lpips = self.perceptual.distance(fx, fy).float().mean()
            gram = gram_loss(fx, fy).mean()
            if self.cfg.clip_weight:
                if teacher is None:
                    raise ValueError("the CLIP/feature term of image reconstruction needs the frozen SigLIP2 "
                                     "teacher: set loss.teacher to a local checkpoint directory, or loss.clip_weight=0")
                clip = feature_loss(teacher, *pairs).mean()
        return {"l1": l1, "lpips": lpips, "gram": gram, "clip": clip}
