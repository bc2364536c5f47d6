"""AToken: a transformer autoencoder over the packed sparse 4D token stream.

    features [N, 3072] -> encoder (patch embed + resized position table, transformer, LayerNorm)
      -> latent Linear (no bias) -> Gaussian posterior (mean, logvar) [N, C] -> z (a sample, the
         mean, or with ``quantizer="fsq"`` the FSQ-quantized mean; FSQ ids [N, C / 6] are the tokens)
      -> decoder (up-projection + its own resized position table, transformer with per-head
         QK-norm, RMSNorm, pixel head) -> recon [N, 3072]
      -> at a 3D sample's voxels: the Gaussian decoder (model/gaussians.py) -> Gaussians
    encoder tokens [N, width] -> understanding (MAP head, per sample) -> embedding [B, width]

This is the released AToken's structure (``tools/official.py`` maps its weights one to one).
Attention runs over chunks of 4 latent frames (``packed.AttentionLayout``): a video longer than 16
frames is encoded and decoded as independent chunks, t restarting at 0 in each, while the MAP head
pools over all of a sample's tokens. Both transformers apply 4D RoPE from the chunk-relative
coordinates in every layer; position tables are resized to each chunk's (max x + 1, max y + 1).
Parameter prefixes
``encoder.``, ``latent.``, ``decoder.`` (and ``understanding.`` when configured). Each parameter's
optimizer group (weight decay, encoder LR) is declared by the modules (``optim_groups``,
model/params.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PATCH_DIM, ModelConfig
from .fsq import FSQ
from .gaussians import GaussianDecoder, Gaussians
from .kv_cache import KVCache
from .packed import ASSET3D, AttentionLayout, PackedBatch
from .params import ParamGroup, optim_groups
from .resample import resize_aa
from .rope import rope_angles
from .transformer import Angles, Transformer, init_weights, make_norm
from .understanding import Understanding

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
        """mean + std * noise. NOTE: the noise is drawn one channel at a time ([N] each, channel 0
        first), so channel c gets the same noise for the same generator state whatever C is: after
        ``AToken.widen_latent`` the old channels see the noise they saw before. (One [N, C] draw
        interleaves channels; one [C, N] draw keeps the prefix only as long as the RNG kernel's
        work split does not depend on the total size, which PyTorch does not promise on CUDA.)"""
        n, c = self.mean.shape
        noise = torch.stack([torch.randn(n, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
                             for _ in range(c)], dim=1)  # [N, C]
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """[N] KL(q(z|x) || N(0, I)) per token, summed over channels, in fp32."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1)


@dataclass
class Outputs:
    """What ``AToken.forward`` computed; a head that did not run is None."""
    posterior: Posterior | None = None  # mean, logvar [N, C] of every token
    recon: torch.Tensor | None = None  # [N, 3072] the pixel decoder's output for every token
    gaussians: Gaussians | None = None  # of the 3D samples, in batch order (one segment each)
    embedding: torch.Tensor | None = None  # [B, width] L2-normalised pooled embedding per sample
    # The sigmoid loss' log-scale and bias [1] each, as the understanding module's forward returned
    # them (the loss reads them here, never from the module: ZeRO-3 frees parameters after forward).
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None


def position_embedding(table: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """[N, width]: the learned table [s * s, width] resized to each chunk's (max x + 1, max y + 1) and
    read at each token's (x, y); z and t are ignored.

    Resized as HF Siglip2 (naflex) and the release do: bilinear, antialias, in fp32 (CPU antialias
    needs it), row-major over (row x, column y).
    """
    s = math.isqrt(table.shape[0])
    grid = table.reshape(s, s, -1).permute(2, 0, 1)[None].float()  # [1, width, s, s]
    resized, offset = [], {}
    for h, w in dict.fromkeys(layout.table_hw):  # each distinct size once
        offset[(h, w)] = sum(r.shape[0] for r in resized)
        r = resize_aa(grid, (h, w))  # F.interpolate's; on CUDA in deterministic mode as matmuls
        resized.append(r[0].flatten(1).t())  # [h*w, width]
    device = layout.coords.device
    # Per-chunk [S] tables built on the host, copied without waiting on the device.
    base = torch.tensor([offset[k] for k in layout.table_hw]).to(device, non_blocking=True)[layout.chunk_ids]
    row_len = torch.tensor([w for _, w in layout.table_hw]).to(device, non_blocking=True)[layout.chunk_ids]
    index = base + layout.coords[:, 1] * row_len + layout.coords[:, 2]  # [N]
    # NOTE: an embedding lookup, not ``[index]``: indexing's backward on CPU accumulates with
    # parallel atomic adds (run-to-run different sums); embedding's backward does not.
    return F.embedding(index, torch.cat(resized))


class Encoder(nn.Module):
    NO_DECAY = ("pos_embed",)  # a learned position table (model/params.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tc = cfg.encoder
        self.patch_embed = nn.Linear(PATCH_DIM, tc.width)
        # SigLIP2's learned table, row-major over a (size, size) grid of (row, column).
        self.pos_embed = nn.Parameter(torch.empty(cfg.pos_table_size ** 2, tc.width))
        self.transformer = Transformer(tc, rope=cfg.encoder_rope, attention=cfg.attention)
        self.norm = make_norm(tc.norm, tc.width, tc.norm_eps)  # SigLIP2's post_layernorm

    def forward(self, features: torch.Tensor, layout: AttentionLayout, angles: Angles | None) -> torch.Tensor:
        x = self.patch_embed(features)  # [N, width]
        x = x + position_embedding(self.pos_embed, layout).to(x.dtype)
        x = self.transformer(x, layout.cu_seqlens, layout.max_seqlen, angles)
        return self.norm(x)


class Decoder(nn.Module):
    """z [N, C] -> up-projection + its own resized position table -> transformer -> RMSNorm -> pixels."""
    NO_DECAY = ("pos_embed",)  # a learned position table (model/params.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tc = cfg.decoder
        self.up = nn.Linear(cfg.latent_channels, tc.width, bias=tc.bias)
        self.pos_embed = nn.Parameter(torch.empty(cfg.pos_table_size ** 2, tc.width))
        self.transformer = Transformer(tc, attention=cfg.attention, fused=cfg.fused_qk_rope)
        self.norm = make_norm(tc.norm, tc.width, tc.norm_eps)
        self.head = nn.Linear(tc.width, PATCH_DIM, bias=tc.bias)

    def forward(self, z: torch.Tensor, layout: AttentionLayout, angles: Angles | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = self.up(z)
        x = x + position_embedding(self.pos_embed, layout).to(x.dtype)
        x = self.transformer(x, layout.cu_seqlens, layout.max_seqlen, angles, cache)  # [N, width]
        return self.head(self.norm(x))  # [N, 3072]


class AToken(nn.Module):
    """The unified tokenizer, a plain single-process module: tensor / sequence parallelism and
    activation checkpointing are applied to it from outside (training/parallelize.py)."""
    ENCODER_LR = ("encoder",)  # SigLIP2-initialised: these children learn at OptimConfig.encoder_lr_mult x LR

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        # The release's ``proj``: no bias.
        self.latent = nn.Linear(cfg.encoder.width, 2 * cfg.latent_channels, bias=False)  # -> (mean, logvar)
        self.decoder = Decoder(cfg)
        self.understanding = Understanding(cfg.encoder) if cfg.understanding else None
        self.fsq = FSQ(cfg.latent_channels, cfg.fsq_levels, cfg.fsq_group_dims) if cfg.quantizer == "fsq" else None
        # Reads the pixel decoder's output at 3D samples' voxels (the release's 3D path).
        self.gaussian_decoder = GaussianDecoder(cfg.gaussian) if cfg.gaussian is not None else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        init_weights(self, std)
        nn.init.normal_(self.encoder.pos_embed, std=std)
        nn.init.normal_(self.decoder.pos_embed, std=std)
        if self.understanding is not None:
            self.understanding.reset_parameters()
        if self.gaussian_decoder is not None:
            self.gaussian_decoder.reset_parameters(std)  # its head starts at zero, not at ``std``

    def optim_groups(self) -> dict[str, ParamGroup]:
        """{parameter name: (decay, encoder LR)} for every parameter, as the modules declare it."""
        return optim_groups(self)

    def rope(self, layout: AttentionLayout, head_dim: int) -> Angles:
        return rope_angles(layout.coords, head_dim, self.cfg.rope_theta)

    def features(self, batch: PackedBatch, layout: AttentionLayout | None = None,
                 angles: Angles | None = None) -> torch.Tensor:
        """The encoder's output tokens [N, width] (what both the latent and the MAP head read)."""
        layout = layout or batch.attention_layout()
        if angles is None:
            angles = self.rope(layout, self.cfg.encoder.head_dim)
        return self.encoder(batch.features, layout, angles)

    def posterior(self, features: torch.Tensor) -> Posterior:
        mean, logvar = self.latent(features).chunk(2, dim=-1)  # each [N, C]
        return Posterior(mean, logvar.clamp(*LOGVAR_RANGE))

    def encode(self, batch: PackedBatch) -> Posterior:
        return self.posterior(self.features(batch))

    def understand(self, batch: PackedBatch, features: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embedding [B, width] L2-normalised, unnormalised pooled [B, width]) per sample, pooled
        over all of a sample's tokens (every chunk of a video); ``features`` [N, width] reuses an
        encoder pass (e.g. the one of ``forward``)."""
        self._require_head()
        if features is None:
            features = self.features(batch)
        return self.understanding(features, batch.cu_seqlens)[:2]

    def _require_head(self) -> None:
        if self.understanding is None:
            raise ValueError("this model has no understanding head: build it with ModelConfig(understanding=True)")

    def _require_fsq(self) -> FSQ:
        if self.fsq is None:
            raise ValueError("this model has a continuous latent: build it with ModelConfig(quantizer='fsq') "
                             "for discrete tokens")
        return self.fsq

    def encode_ids(self, batch: PackedBatch) -> torch.Tensor:
        """The discrete tokens: FSQ ids [N, C / fsq_group_dims] int64 of the posterior mean."""
        return self._require_fsq().quantize(self.encode(batch).mean)[1]

    def decode_ids(self, ids: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """FSQ ids [N, G] -> recon [N, 3072]; reads only batch.coords and the batch's lengths."""
        z = self._require_fsq().dequantize(ids)
        return self.decode(z.to(self.decoder.up.weight.dtype), batch)

    def decode(self, z: torch.Tensor, batch: PackedBatch, layout: AttentionLayout | None = None,
               angles: Angles | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """z [N, C] -> recon [N, 3072]; reads only batch.coords and the batch's lengths. ``cache``
        (inference, one video): attend to the previous chunk's cached frames too (``KVCache``)."""
        layout = layout or batch.attention_layout()
        if cache is not None:
            layout = cache.begin(layout)  # this chunk's t shifted past the cached frames
            angles = None
        if angles is None:
            angles = self.rope(layout, self.cfg.decoder.head_dim)
        if cache is None:
            return self.decoder(z, layout, angles)
        cache.key_angles = self.rope(cache.key_layout, self.cfg.decoder.head_dim)
        recon = self.decoder(z, layout, angles, cache)
        cache.end()
        return recon

    def forward(self, batch: PackedBatch, sample: bool = True, generator: torch.Generator | None = None,
                tasks: tuple[str, ...] = ("rec",)) -> Outputs:
        """Run the heads ``tasks`` asks for over one packed batch of any mix of modalities.

        "rec": the posterior, z (a sample, its mean if not ``sample``; with FSQ the quantized mean,
        straight-through, never a sample), the pixel decoder's output for every sample, and from it
        the Gaussians of the 3D samples. "und": the pooled embedding of every sample. The encoder
        runs once for both.
        """
        unknown = set(tasks) - {"rec", "und"}
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of ('rec', 'und'), got {tasks}")
        layout = batch.attention_layout()  # once per forward: chunks, chunk-relative t
        enc_angles = self.rope(layout, self.cfg.encoder.head_dim)  # once per forward, for all layers
        feats = self.features(batch, layout, enc_angles)
        out = Outputs()
        if "und" in tasks:
            self._require_head()
            out.embedding, _, out.logit_scale, out.logit_bias = self.understanding(feats, batch.cu_seqlens)
        if "rec" not in tasks:
            return out
        out.posterior = posterior = self.posterior(feats)
        if self.fsq is not None:
            z = self.fsq.quantize(posterior.mean)[0]
        else:
            z = posterior.sample(generator) if sample else posterior.mode()
        dec_hd = self.cfg.decoder.head_dim
        dec_angles = enc_angles if dec_hd == self.cfg.encoder.head_dim else self.rope(layout, dec_hd)
        out.recon = self.decode(z, batch, layout, dec_angles)  # 3D samples too: the Gaussians read it
        assets = [i for i, m in enumerate(batch.modalities) if m == ASSET3D]
        if assets:
            out.gaussians = self.decode_gaussians(out.recon, batch, assets)
        return out

    def decode_gaussians(self, recon: torch.Tensor, batch: PackedBatch, assets: list[int] | None = None) -> Gaussians:
        """The pixel decoder's output recon [N, 3072] -> the Gaussians of the 3D samples ``assets``
        (default: all of the batch's), in batch order (the release's ``inference_3d``)."""
        if self.gaussian_decoder is None:
            raise ValueError("the batch holds 3D samples but the model has no Gaussian decoder "
                             "(ModelConfig.gaussian)")
        if assets is None:
            assets = list(range(batch.num_samples))
        sub, rows = batch.select(assets) if len(assets) < batch.num_samples else (batch, None)
        return self.gaussian_decoder(recon if rows is None else recon[rows], sub.coords, sub.cu_seqlens)

    @torch.no_grad()
    def widen_latent(self, channels: int) -> None:
        """Stage 2's latent widening, in place: C -> ``channels`` with every reconstruction unchanged.

        The new channels' mean rows output 0 and their log-variance rows output 0 (variance 1), so
        their KL is 0; the decoder's up-projection gets zero columns for them, so the decoder ignores
        them (sampled values included) until training moves those columns. With ``sample()``'s
        per-channel noise, the old channels also keep their noise: sampled reconstructions for a
        given generator state are identical too. Build the optimizer after widening.
        """
        old = self.cfg.latent_channels
        if channels <= old:
            raise ValueError(f"widen_latent can only add channels: the latent has {old}, asked for {channels}")
        if self.fsq is not None and channels % self.cfg.fsq_group_dims:
            raise ValueError(f"widen_latent: {channels} channels do not split into FSQ groups of "
                             f"{self.cfg.fsq_group_dims}")
        lat, up = self.latent, self.decoder.up
        new_lat = nn.Linear(lat.in_features, 2 * channels, bias=lat.bias is not None,
                            device=lat.weight.device, dtype=lat.weight.dtype)
        new_lat.weight.zero_()
        new_lat.weight[:old] = lat.weight[:old]  # mean rows
        new_lat.weight[channels:channels + old] = lat.weight[old:]  # log-variance rows
        if lat.bias is not None:
            new_lat.bias.zero_()  # new channels: mean 0, log-variance 0
            new_lat.bias[:old] = lat.bias[:old]
            new_lat.bias[channels:channels + old] = lat.bias[old:]
        new_lat.weight.requires_grad_(lat.weight.requires_grad)
        self.latent, self.decoder.up = new_lat, _widened_input(up, channels)
        self.cfg = dataclasses.replace(self.cfg, latent_channels=channels)  # the caller's config stays as it was
        if self.fsq is not None:
            self.fsq = FSQ(channels, self.cfg.fsq_levels, self.cfg.fsq_group_dims)


@torch.no_grad()
def _widened_input(linear: nn.Linear, channels: int) -> nn.Linear:
    """``linear`` taking ``channels`` inputs: the old weights, zero columns for the new inputs."""
    new = nn.Linear(channels, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.zero_()
    new.weight[:, :linear.in_features] = linear.weight
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new
