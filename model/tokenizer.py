"""Inference API: ``Tokenizer.from_pretrained(dir)``, ``encode(images)`` and ``decode(latents)``.

An inference directory holds ``config.json`` (the model config and provenance) and
``model.safetensors`` (weights, EMA by default); ``atoken-convert`` writes it from a checkpoint.
Images are float tensors [3, H, W] in [0, 1] of any size: they are padded to whole patches by edge
replication and the decoded images are cropped back (see ``patches.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .autoencoder import AToken
from .config import ModelConfig
from .packed import IMAGE, PackedBatch
from .patches import pad_to_patches, patchify, unpatchify

FORMAT = "atoken-inference"


@dataclass
class ImageLatent:
    z: torch.Tensor  # [h, w, C]: the posterior mean on the image's patch grid
    size: tuple[int, int]  # (H, W) of the original image, for cropping after decoding


class Tokenizer:
    def __init__(self, model: AToken, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "Tokenizer":
        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.exists():
                raise FileNotFoundError(f"{f} not found: {path} is not an atoken inference directory "
                                        "(make one with atoken-convert)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_file} is not an {FORMAT} config (format={meta.get('format')!r})")
        model = AToken(ModelConfig.from_dict(meta["model"]))
        state = load_file(str(weights))
        model.load_state_dict({k: v.float() for k, v in state.items()})
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or getattr(torch, meta.get("dtype", "float32"))
        return cls(model, device, dtype)

    def _pack(self, images: list[torch.Tensor]) -> PackedBatch:
        parts = []
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected [3, H, W], got {tuple(img.shape)}")
            feats, coords, grid = patchify(pad_to_patches(img.float() * 2 - 1))
            parts.append((feats, coords, grid, IMAGE, 1))
        return PackedBatch.cat(parts).to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor]) -> list[ImageLatent]:
        """images: list of [3, H, W] in [0, 1] -> one latent per image (posterior means)."""
        batch = self._pack(images)
        mean = self.model.encode(batch).mean.float().cpu()  # [N, C]
        out = []
        for img, (a, b), (_, h, w, _) in zip(images, batch.spans(), batch.grids):
            out.append(ImageLatent(mean[a:b].reshape(h, w, -1), tuple(img.shape[-2:])))
        return out

    @torch.no_grad()
    def decode(self, latents: list[ImageLatent]) -> list[torch.Tensor]:
        """latents -> list of [3, H, W] images in [0, 1]."""
        parts, zs = [], []
        for lat in latents:
            h, w, _ = lat.z.shape
            # The decoder reads only the batch's coordinates and lengths; the features stay zero.
            parts.append((*patchify(torch.zeros(3, h * 16, w * 16)), IMAGE, 1))
            zs.append(lat.z.reshape(h * w, -1))
        batch = PackedBatch.cat(parts).to(self.device, self.dtype)
        recon = self.model.decode(torch.cat(zs).to(self.device, self.dtype), batch).float().cpu()
        out = []
        for lat, (a, b), grid in zip(latents, batch.spans(), batch.grids):
            img = unpatchify(recon[a:b], grid, frames=1)[:, 0]  # [3, H', W']
            out.append(((img[:, :lat.size[0], :lat.size[1]] + 1) / 2).clamp(0, 1))
        return out

    def reconstruct(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decode(self.encode(images))
