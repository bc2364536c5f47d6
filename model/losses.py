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

from .config import CHANNELS, PATCH_DIM, PATCH_HW, PATCH_T
from .packed import IMAGE, PackedBatch
from .patches import grid_coords
from .perceptual import LPIPS, load_perceptual
from .resample import resize_aa

FRAME_VALUES = PATCH_DIM // PATCH_T  # 768: the first frame of a token, all of an image token's pixels


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
    Computed in float32, autocast or not (autocast would run the matmul in bf16, whose products
    lose too much precision).
    """
    b, c, h, w = f.shape
    f = f.float().reshape(b, c, h * w)
    with torch.autocast(f.device.type, enabled=False):
        return f @ f.transpose(1, 2) / (c * h * w)


def gram_loss(feats_x: list[torch.Tensor], feats_y: list[torch.Tensor]) -> torch.Tensor:
    """sum over layers of ||G(x) - G(y)||_F^2 -> [B]."""
    return sum((gram_matrix(a) - gram_matrix(b)).pow(2).sum((1, 2)) for a, b in zip(feats_x, feats_y, strict=True))


def image_pairs(batch: PackedBatch, recon: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The image samples as pixels resized to size x size: (originals, reconstructions), each
    [B_img, 3, size, size] in batch order; None if the batch holds no image.

    Batched: the images of one size are gathered, unpatchified and resized together (one op each
    per distinct size, not per image); per image the same values as resizing it alone.
    """
    idx = [i for i, m in enumerate(batch.modalities) if m == IMAGE]
    if not idx:
        return None
    starts = [s for s, _ in batch.spans()]
    by_size: dict[tuple[int, int], list[int]] = {}  # (h, w) patch grid -> its images, in batch order
    for i in idx:
        by_size.setdefault(batch.grids[i][1:3], []).append(i)

    def resized(tokens: torch.Tensor) -> torch.Tensor:
        out = []
        for (h, w), members in by_size.items():
            # Rows of the members' tokens [G * h * w], built on the host, copied without a sync.
            rows = (torch.tensor([starts[i] for i in members])[:, None] + torch.arange(h * w)).flatten()
            frame0 = tokens[:, :FRAME_VALUES].index_select(0, rows.to(tokens.device, non_blocking=True))
            # [G*h*w, 768] (ph, pw, c) per token -> [G, 3, h*16, w*16] (an image's frame 0, as unpatchify)
            img = (frame0.view(len(members), h, w, PATCH_HW, PATCH_HW, CHANNELS).permute(0, 5, 1, 3, 2, 4)
                   .reshape(len(members), CHANNELS, h * PATCH_HW, w * PATCH_HW))
            # fp32: CPU has no bf16 antialiased resize (bf16 autocast on CPU failed here)
            out.append(resize_aa(img.float(), (size, size)))
        out = torch.cat(out)  # [B_img, 3, size, size] grouped by size
        order = [i for members in by_size.values() for i in members]
        if order == idx:
            return out
        where = {i: k for k, i in enumerate(order)}
        back = torch.tensor([where[i] for i in idx]).to(out.device, non_blocking=True)
        return out.index_select(0, back)  # batch order

    with torch.no_grad():
        orig = resized(batch.features)
    return orig, resized(recon)


def packed_images(x: torch.Tensor) -> PackedBatch:
    """x [B, 3, H, W] (H, W multiples of 16) -> the PackedBatch of its B images: ``patchify`` of each,
    batched (the same tokens, coords and grids as ``PackedBatch.cat`` of the per-image patchify)."""
    b, c, hh, ww = x.shape
    h, w = hh // PATCH_HW, ww // PATCH_HW
    # [B, 3, h, 16, w, 16] -> [B, h, w, 16, 16, 3]: each token's frame 0 in (ph, pw, c) order
    frame0 = x.reshape(b, c, h, PATCH_HW, w, PATCH_HW).permute(0, 2, 4, 3, 5, 1).reshape(b * h * w, FRAME_VALUES)
    features = F.pad(frame0, (0, PATCH_DIM - FRAME_VALUES))  # frames 1..3: time padding, zeros
    coords = grid_coords(1, h, w, device=x.device).repeat(b, 1)
    cu = torch.arange(b + 1, dtype=torch.int32) * (h * w)
    return PackedBatch(features, coords, cu, [(1, h, w, 1)] * b, [IMAGE] * b, [1] * b)


def feature_loss(teacher: nn.Module, orig: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """The CLIP/feature term (module docstring): orig (no grad), rec [B, 3, S, S] in [-1, 1], S a
    multiple of 16 -> [B] mean over each image's tokens of 1 - cos(teacher(rec), teacher(orig)).
    ``teacher.features(batch)`` gives the frozen image tower's tokens [N, width]."""
    with torch.no_grad():
        target = teacher.features(packed_images(orig))
    batch = packed_images(rec)
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
        cfg = self.cfg
        l1 = token_l1(batch, recon).mean()
        lpips = gram = clip = recon.new_zeros((), dtype=torch.float32)
        # A term weighted 0 is not computed (it reads 0): with LPIPS and Gram both 0 the net does not run.
        perceptual = bool(cfg.lpips_weight or cfg.gram_weight)
        pairs = image_pairs(batch, recon, cfg.perceptual_size) if perceptual or cfg.clip_weight else None
        if pairs is not None and perceptual:
            dtype = next(self.perceptual.parameters()).dtype
            orig, rec = (p.to(dtype) for p in pairs)
            # One trunk pass per side serves both terms (LPIPS and Gram read the same 5 feature maps).
            with torch.no_grad():
                fx = self.perceptual.features(orig)
            fy = self.perceptual.features(rec)
            if cfg.lpips_weight:
                lpips = self.perceptual.distance(fx, fy).float().mean()
            if cfg.gram_weight:
                gram = gram_loss(fx, fy).mean()
        if pairs is not None and cfg.clip_weight:
            if teacher is None:
                raise ValueError("the CLIP/feature term of image reconstruction needs the frozen SigLIP2 "
                                 "teacher: set loss.teacher to a local checkpoint directory, or loss.clip_weight=0")
            clip = feature_loss(teacher, *pairs).mean()
        return {"l1": l1, "lpips": lpips, "gram": gram, "clip": clip}
