"""AToken: a transformer autoencoder over the packed sparse 4D token stream.

    features [N, 3072] -> encoder (patch embed + resized position table, transformer, LayerNorm)
      -> latent Linear -> Gaussian posterior (mean, logvar) [N, C] -> z
      -> decoder (up-projection, transformer, RMSNorm, pixel head) -> recon [N, 3072]

Both transformers apply 4D RoPE from ``batch.coords`` in every layer. Parameter prefixes
``encoder.``, ``latent.``, ``decoder.`` are relied on by the trainer (encoder LR x0.1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PATCH_DIM, ModelConfig
from .packed import PackedBatch
from .rope import rope_angles
from .transformer import Angles, LinearSpec, Transformer, make_norm

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in fp32


@dataclass
class Posterior:
    """Diagonal Gaussian over the latent, per token: mean, logvar [N, C]."""
    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """[N] KL(q(z|x) || N(0, I)) per token, summed over channels, in fp32."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearSpec | None = None, checkpoint: bool = False):
        super().__init__()
        tc, self.pos_table_size = cfg.encoder, cfg.pos_table_size
        self.patch_embed = nn.Linear(PATCH_DIM, tc.width)
        # SigLIP2's learned table, row-major over a (size, size) grid of (row, column).
        self.pos_embed = nn.Parameter(torch.empty(cfg.pos_table_size ** 2, tc.width))
        self.transformer = Transformer(tc, linear, checkpoint=checkpoint)
        self.norm = make_norm(tc.norm, tc.width, tc.norm_eps)  # SigLIP2's post_layernorm

    def position_embedding(self, batch: PackedBatch) -> torch.Tensor:
        """[N, width]: the table resized to each sample's (H, W) patch grid, read at its (x, y).

        Resized as HF Siglip2 (naflex) does: bilinear, antialias, in fp32 (CPU antialias needs it).
        The same table serves every t; z is ignored.
        """
        s = self.pos_table_size
        table = self.pos_embed.reshape(s, s, -1).permute(2, 0, 1)[None].float()  # [1, width, s, s]
        hw = [(g[1], g[2]) for g in batch.grids]
        resized, offset = [], {}
        for h, w in dict.fromkeys(hw):  # each distinct grid once
            offset[(h, w)] = sum(r.shape[0] for r in resized)
            r = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            resized.append(r[0].flatten(1).t())  # [h*w, width]
        device = batch.coords.device
        ids = batch.sample_ids().to(device)  # [N]
        base = torch.tensor([offset[k] for k in hw], device=device)[ids]
        row_len = torch.tensor([w for _, w in hw], device=device)[ids]
        index = base + batch.coords[:, 1] * row_len + batch.coords[:, 2]  # [N]
        return torch.cat(resized)[index]

    def forward(self, batch: PackedBatch, angles: Angles | None) -> torch.Tensor:
        x = self.patch_embed(batch.features)  # [N, width]
        x = x + self.position_embedding(batch).to(x.dtype)
        x = self.transformer(x, batch.cu_seqlens, batch.max_seqlen, angles)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearSpec | None = None, checkpoint: bool = False):
        super().__init__()
        tc = cfg.decoder
        self.up = nn.Linear(cfg.latent_channels, tc.width, bias=tc.bias)
        self.transformer = Transformer(tc, linear, checkpoint=checkpoint)
        self.norm = make_norm(tc.norm, tc.width, tc.norm_eps)
        self.head = nn.Linear(tc.width, PATCH_DIM, bias=tc.bias)

    def forward(self, z: torch.Tensor, batch: PackedBatch, angles: Angles | None) -> torch.Tensor:
        x = self.transformer(self.up(z), batch.cu_seqlens, batch.max_seqlen, angles)  # [N, width]
        return self.head(self.norm(x))  # [N, 3072]


class AToken(nn.Module):
    """The unified tokenizer. ``linear`` builds the transformer linears (tensor parallelism hook);
    ``checkpoint`` enables per-block activation checkpointing."""

    def __init__(self, cfg: ModelConfig, linear: LinearSpec | None = None, checkpoint: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, linear, checkpoint)
        self.latent = nn.Linear(cfg.encoder.width, 2 * cfg.latent_channels)  # -> (mean, logvar)
        self.decoder = Decoder(cfg, linear, checkpoint)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        nn.init.normal_(self.encoder.pos_embed, std=std)

    def rope(self, batch: PackedBatch, head_dim: int) -> Angles:
        return rope_angles(batch.coords, head_dim, self.cfg.rope_theta)

    def encode(self, batch: PackedBatch, angles: Angles | None = None) -> Posterior:
        if angles is None:
            angles = self.rope(batch, self.cfg.encoder.head_dim)
        mean, logvar = self.latent(self.encoder(batch, angles)).chunk(2, dim=-1)  # each [N, C]
        return Posterior(mean, logvar.clamp(*LOGVAR_RANGE))

    def decode(self, z: torch.Tensor, batch: PackedBatch, angles: Angles | None = None) -> torch.Tensor:
        """z [N, C] -> recon [N, 3072]; reads only batch.coords and batch.cu_seqlens."""
        if angles is None:
            angles = self.rope(batch, self.cfg.decoder.head_dim)
        return self.decoder(z, batch, angles)

    def forward(self, batch: PackedBatch, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, Posterior]:
        """-> (recon [N, 3072], posterior); z is a posterior sample, or its mean if not ``sample``."""
        enc_angles = self.rope(batch, self.cfg.encoder.head_dim)  # once per forward, for all layers
        dec_hd = self.cfg.decoder.head_dim
        dec_angles = enc_angles if dec_hd == self.cfg.encoder.head_dim else self.rope(batch, dec_hd)
        posterior = self.encode(batch, enc_angles)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z, batch, dec_angles), posterior
