"""The whole objective over one packed micro-batch of any mix of modalities and tasks
(docs/design.md, Objective): the one place where the loss terms are weighted and summed.

    L      = rec_weight (0.2) * L_rec + sem_weight (1.0) * L_sem + kl_weight (1e-8) * L_KL
    L_rec  = L1 + 10 LPIPS + 1000 Gram        image tokens   (losses.ReconstructionLoss)
             + 1 CLIP                                        (the teacher's features, losses.feature_loss)
           + L1                               video tokens   (native resolution, real frames)
           + L1 of rendered views             3D samples     (splatting.gaussian_view_loss, per asset)
    L_sem  = distill_loss (KL, T = 2)         images: the frozen SigLIP2 teacher's image-text
                                              similarities over all the data-parallel micro-batch's captions
           + sigmoid_loss                     video and 3D: against the data-parallel micro-batch's captions
The terms a micro-batch has no samples for are 0; "rec" and "und" pick which half runs (a
micro-batch of one stream has one task; the mixed-batch test runs both).

``group`` (the data-parallel process group, None in one process) makes the semantic losses global:
collective, so every data-parallel rank must call the objective on a micro-batch of the same
stream (the task mix's order is the same on every rank, data_pipeline/mixing.py).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from .autoencoder import Outputs
from .losses import LossConfig, ReconstructionLoss
from .packed import ASSET3D, IMAGE, PackedBatch
from .siglip2 import Siglip2ImageTower
from .splatting import gaussian_view_loss
from .understanding import TextTower, distill_loss, sigmoid_loss


class Objective(nn.Module):
    """forward(batch, out, extras, tasks) -> scalar terms, "total" among them.
    It never reads the model: every input arrives in ``out`` (as ZeRO-3 needs), and the 3D term's
    ``render_backend`` is given when the objective is built.

    ``extras``: per sample what the losses need beyond its tokens ("caption"; for 3D "views"
    [V, 3, H, W] in [0, 1] and "cameras"). The frozen networks (perceptual net, text tower, teacher)
    are kept out of this module's parameters and state_dict, like the perceptual net before.
    """

    # Per task, the weighted term that is its own (the trainer logs it per stream as "<stream>/<term>").
    TASK_TERM: ClassVar[dict[str, str]] = {"rec": "rec", "und": "sem"}

    def __init__(self, cfg: LossConfig, text_tower: TextTower | None = None, teacher: nn.Module | None = None,
                 group=None, render_backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.rec = ReconstructionLoss(cfg)
        self._frozen = (text_tower, teacher)
        self.group = group  # data-parallel process group of the semantic losses (None: this process only)
        # The 3D term's renderer (``GaussianDecoderConfig.render_backend``; None: splatting's auto choice).
        self.render_backend = render_backend

    @classmethod
    def from_config(cls, cfg: LossConfig, group=None, render_backend: str | None = None) -> Objective:
        """Loads the text tower and the teacher from their local paths when the config names them."""
        tower = TextTower.from_pretrained(cfg.text_tower) if cfg.text_tower else None
        teacher = None
        if cfg.teacher:
            teacher = Siglip2ImageTower.from_pretrained(cfg.teacher)
        return cls(cfg, tower, teacher, group, render_backend)

    @property
    def text_tower(self) -> TextTower | None:
        return self._frozen[0]

    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen[1]

    def _apply(self, fn, *args, **kwargs):
        for m in self._frozen:
            if m is not None:
                m._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, batch: PackedBatch, out: Outputs, extras: list[dict[str, Any]],
                tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
        cfg, zero = self.cfg, batch.features.new_zeros((), dtype=torch.float32)
        terms = dict.fromkeys(("l1", "lpips", "gram", "clip", "l1_3d", "kl", "rec", "distill", "sigmoid", "sem"), zero)
        if "rec" in tasks:
            pixels = [i for i, m in enumerate(batch.modalities) if m != ASSET3D]
            if pixels:
                sub, rows = batch.select(pixels) if len(pixels) < batch.num_samples else (batch, None)
                recon = out.recon if rows is None else out.recon[rows]
                teacher = self.teacher
                if cfg.clip_weight and any(m == IMAGE for m in sub.modalities):
                    teacher = self._need(teacher, "loss.teacher", "the CLIP/feature term (loss.clip_weight)")
                r = self.rec(sub, recon, teacher)
                terms.update(l1=r["l1"], lpips=r["lpips"], gram=r["gram"], clip=r["clip"])
            assets = [i for i, m in enumerate(batch.modalities) if m == ASSET3D]
            if assets:
                losses = []
                for k, i in enumerate(assets):
                    views, cameras = _required(extras[i], ("views", "cameras"), batch.names, i)
                    losses.append(gaussian_view_loss(out.gaussians.sample(k), views, cameras,
                                                     backend=self.render_backend))
                terms["l1_3d"] = torch.stack(losses).mean()
            terms["kl"] = out.posterior.kl().float().mean()
        if "und" in tasks:
            emb = out.embedding  # [B, width], L2-normalised
            images = [i for i, m in enumerate(batch.modalities) if m == IMAGE]
            others = [i for i, m in enumerate(batch.modalities) if m != IMAGE]
            tower = self._need(self.text_tower, "loss.text_tower", "understanding")
            if images:
                teacher = self._need(self.teacher, "loss.teacher", "image understanding (distillation)")
                sub, _ = batch.select(images)
                # The texts to score against: every caption of the micro-batch (not only the images'),
                # of every data-parallel rank (distill_loss gathers them).
                captions = [e["caption"] for e in extras if e.get("caption")]
                for i in images:
                    _caption(extras, i, batch.names)  # each image needs its own caption
                txt = tower.embed(captions).to(emb.device)
                scale = torch.tensor(tower.logit_scale if tower.logit_scale is not None else 0.0).exp()
                terms["distill"] = distill_loss(emb[images], teacher(sub)[0], txt, scale, cfg.distill_temperature,
                                                group=self.group)
            if others:
                txt = tower.embed([_caption(extras, i, batch.names) for i in others])
                terms["sigmoid"] = sigmoid_loss(emb[others], txt.to(emb.device), out.logit_scale, out.logit_bias,
                                                group=self.group)
        return weigh(cfg, terms)

    @staticmethod
    def _need(module, key: str, what: str):
        if module is None:
            raise ValueError(f"{what} needs the frozen SigLIP2 network: set {key} to a local checkpoint directory")
        return module


def weigh(cfg: LossConfig, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one place the terms are weighted and summed (the formula above): ``terms`` (the scalar
    unweighted ones, "l1" ... "sigmoid", those of a task not run 0) with "rec", "sem" and "total" set."""
    t = terms
    rec = (cfg.l1_weight * (t["l1"] + t["l1_3d"]) + cfg.lpips_weight * t["lpips"] + cfg.gram_weight * t["gram"]
           + cfg.clip_weight * t["clip"])
    sem = t["distill"] + t["sigmoid"]
    total = cfg.rec_weight * rec + cfg.sem_weight * sem + cfg.kl_weight * t["kl"]
    return {**t, "rec": rec, "sem": sem, "total": total}


def _caption(extras: list[dict[str, Any]], i: int, names: list[str]) -> str:
    text = extras[i].get("caption") if i < len(extras) else None
    if not text:
        name = names[i] if i < len(names) else f"#{i}"
        raise ValueError(f"sample {name!r} has no caption: understanding streams need captioned samples")
    return text


def _required(extra: dict[str, Any], keys: tuple[str, ...], names: list[str], i: int) -> list[Any]:
    missing = [k for k in keys if k not in extra]
    if missing:
        name = names[i] if i < len(names) else f"#{i}"
        raise ValueError(f"3D sample {name!r} lacks its reconstruction targets {missing}")
    return [extra[k] for k in keys]
