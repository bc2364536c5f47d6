"""Inference API: ``Tokenizer.from_pretrained(dir)``, then per modality encode / decode.

An inference directory (``inference_dir.py``) holds the model config and provenance and the weights
(EMA by default); ``atoken-convert`` writes it from a checkpoint.

  images  [3, H, W] in [0, 1], any size   encode -> ImageLatent -> decode (padded to whole patches
                                          by edge replication, cropped back; ``patches.py``)
  videos  [3, T, H, W] in [0, 1]          encode_video -> VideoLatent -> decode_video, by temporal
                                          tiles: memory is bounded by the tile, not the video;
                                          decode_video(cache_frames=...) is the release's KV cache
  3D      voxel tokens of an asset        encode_asset -> latent [M, C] -> decode_asset -> Gaussians
  ids     FSQ models (stage 4)            encode_ids / decode_ids: [h, w, 8] int64 codes per image
  embed   models with the MAP head        embed(images) -> [B, width] L2-normalised;
                                          embed_video(clips) -> [B, width], one sample per clip
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .autoencoder import AToken
from .config import PATCH_DIM, PATCH_T
from .errors import UserError
from .gaussians import Gaussians
from .inference_dir import CONFIG_FILE, WEIGHTS_FILE, load_inference_dir
from .kv_cache import KVCache
from .packed import ASSET3D, CHUNK_FRAMES, IMAGE, VIDEO, PackedBatch
from .patches import pad_to_patches, patchify, unpatchify

CHUNK_VIDEO_FRAMES = CHUNK_FRAMES * PATCH_T  # 16 video frames: the encoder's and decoder's chunk


@dataclass
class ImageLatent:
    z: torch.Tensor  # [h, w, C]: the posterior mean on the image's patch grid
    size: tuple[int, int]  # (H, W) of the original image, for cropping after decoding


@dataclass
class VideoLatent:
    z: torch.Tensor  # [t, h, w, C]: the posterior mean, t = ceil(T / 4) over all tiles
    size: tuple[int, int, int]  # (T, H, W) of the original video
    tile_frames: int  # frames per temporal tile it was encoded with (a multiple of 16)


class Tokenizer:
    def __init__(self, model: AToken, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Tokenizer:
        state, cfg, meta = load_inference_dir(path)
        model = AToken(cfg)
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:  # weights of another config
            raise UserError(f"{Path(path) / WEIGHTS_FILE}: its weights do not fit its {CONFIG_FILE} "
                            f"({str(e).splitlines()[0]}); make it again with atoken-convert") from None
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

    def _latent(self, batch: PackedBatch) -> torch.Tensor:
        """[N, C] fp32 on CPU: the posterior mean, FSQ-quantized when the model has FSQ."""
        mean = self.model.encode(batch).mean
        if self.model.fsq is not None:
            mean = self.model.fsq.quantize(mean)[0]
        return mean.float().cpu()

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor]) -> list[ImageLatent]:
        """images: list of [3, H, W] in [0, 1] -> one latent per image (posterior means; FSQ models:
        the quantized means, what their decoder was trained on)."""
        batch = self._pack(images)
        mean = self._latent(batch)  # [N, C]
        out = []
        for img, (a, b), (_, h, w, _) in zip(images, batch.spans(), batch.grids, strict=True):
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
        for lat, (a, b), grid in zip(latents, batch.spans(), batch.grids, strict=True):
            img = unpatchify(recon[a:b], grid, frames=1)[:, 0]  # [3, H', W']
            out.append(((img[:, :lat.size[0], :lat.size[1]] + 1) / 2).clamp(0, 1))
        return out

    def reconstruct(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decode(self.encode(images))

    # ---------------------------------------------------------------- video

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor, tile_frames: int = 16) -> VideoLatent:
        """video [3, T, H, W] in [0, 1] -> its latent, one temporal tile of ``tile_frames`` at a time.

        The encoder sees independent chunks of 16 frames (the release's, and training's), so tiles
        of any multiple of 16 give the same latent; the tile only bounds memory. The last tile is
        zero-padded in time to whole 4-frame patches; decoding crops it back.
        """
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"expected a video [3, T, H, W], got {tuple(video.shape)}")
        if tile_frames < CHUNK_VIDEO_FRAMES or tile_frames % CHUNK_VIDEO_FRAMES:
            raise ValueError(f"tile_frames must be a positive multiple of {CHUNK_VIDEO_FRAMES} (the encoder's "
                             f"chunk), got {tile_frames}")
        t_len, hgt, wid = video.shape[1:]
        zs = []
        for t0 in range(0, t_len, tile_frames):
            tile = pad_to_patches(video[:, t0:t0 + tile_frames].float() * 2 - 1)  # [3, t, H', W']
            feats, coords, grid = patchify(tile)
            batch = PackedBatch.cat([(feats, coords, grid, VIDEO, PATCH_T)]).to(self.device, self.dtype)
            zs.append(self._latent(batch).reshape(*grid[:3], -1))  # [t, h, w, C]
        return VideoLatent(torch.cat(zs), (t_len, hgt, wid), tile_frames)

    @torch.no_grad()
    def decode_video(self, latent: VideoLatent, stride_frames: int = CHUNK_VIDEO_FRAMES,
                     cache_frames: int = 0) -> torch.Tensor:
        """VideoLatent -> [3, T, H, W] in [0, 1], one chunk of ``stride_frames`` at a time into one
        CPU tensor. ``cache_frames`` > 0: each chunk also attends to the keys and values of the
        previous chunk's last ``cache_frames`` frames (the release's ``kv_cache_size``; ``kv_cache.py``).
        As in the release, stride_frames + cache_frames <= 16, both multiples of 4; the defaults
        (16, 0) decode as training does."""
        for name, v in (("stride_frames", stride_frames), ("cache_frames", cache_frames)):
            if v < 0 or v % PATCH_T:
                raise ValueError(f"{name} must be a multiple of {PATCH_T}, got {v}")
        if stride_frames == 0 or stride_frames + cache_frames > CHUNK_VIDEO_FRAMES:
            raise ValueError(f"need 0 < stride_frames and stride_frames + cache_frames <= {CHUNK_VIDEO_FRAMES}, "
                             f"got {stride_frames} + {cache_frames}")
        t_len, hgt, wid = latent.size
        _, h, w, _ = latent.z.shape
        out = torch.empty(3, t_len, hgt, wid)
        step = stride_frames // PATCH_T  # latent frames per chunk
        cache = KVCache(cache_frames // PATCH_T) if cache_frames else None
        for t0 in range(0, latent.z.shape[0], step):
            z = latent.z[t0:t0 + step]  # [t, h, w, C]
            grid = (z.shape[0], h, w, 1)
            batch = _coords_only(grid, VIDEO, self.device, self.dtype)
            recon = self.model.decode(z.reshape(-1, z.shape[-1]).to(self.device, self.dtype), batch,
                                      cache=cache).float().cpu()
            frames = unpatchify(recon, grid)  # [3, t*4, H', W']
            f0 = t0 * PATCH_T
            n = min(frames.shape[1], t_len - f0)
            out[:, f0:f0 + n] = ((frames[:, :n, :hgt, :wid] + 1) / 2).clamp(0, 1)
        return out

    def reconstruct_video(self, video: torch.Tensor, tile_frames: int = 16, stride_frames: int = CHUNK_VIDEO_FRAMES,
                          cache_frames: int = 0) -> torch.Tensor:
        return self.decode_video(self.encode_video(video, tile_frames), stride_frames, cache_frames)

    # ---------------------------------------------------------------- 3D

    @torch.no_grad()
    def encode_asset(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """An asset's voxel tokens (``data_pipeline.assets.voxel_tokens``: features [M, 3072] in
        [-1, 1], coords [M, 4] = (0, x, y, z)) -> its latent [M, C] (posterior mean)."""
        return self._latent(self._asset_batch(features, coords))

    @torch.no_grad()
    def decode_asset(self, z: torch.Tensor, coords: torch.Tensor) -> Gaussians:
        """latent [M, C] at voxel coords [M, 4] -> the asset's Gaussians (fp32, CPU): the pixel
        decoder, then the Gaussian decoder on its output (the release's ``inference_3d``)."""
        if self.model.gaussian_decoder is None:
            raise ValueError("this tokenizer has no Gaussian decoder (a stage 1-2 model): it cannot decode 3D")
        batch = self._asset_batch(torch.zeros(z.shape[0], PATCH_DIM), coords)  # the decoder reads coords only
        recon = self.model.decode(z.to(self.device, self.dtype), batch)
        return self.model.decode_gaussians(recon, batch).to("cpu", torch.float32)

    def _asset_batch(self, features: torch.Tensor, coords: torch.Tensor) -> PackedBatch:
        res = self.model.cfg.gaussian.resolution if self.model.cfg.gaussian else 64
        batch = PackedBatch.cat([(features.float(), coords.long(), (1, res, res, res), ASSET3D, 1)])
        return batch.to(self.device, self.dtype)

    # ---------------------------------------------------------------- discrete tokens, embeddings

    @torch.no_grad()
    def encode_ids(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """images -> per image its FSQ ids [h, w, G] int64 (G = 8 for C = 48); FSQ models only."""
        batch = self._pack(images)
        ids = self.model.encode_ids(batch).cpu()
        return [ids[a:b].reshape(h, w, -1) for (a, b), (_, h, w, _) in zip(batch.spans(), batch.grids, strict=True)]

    @torch.no_grad()
    def decode_ids(self, ids: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """FSQ ids [h, w, G] per image (and each image's (H, W) to crop to) -> images [3, H, W]."""
        fsq = self.model._require_fsq()
        return self.decode([ImageLatent(fsq.dequantize(i.reshape(-1, i.shape[-1])).reshape(*i.shape[:2], -1), s)
                            for i, s in zip(ids, sizes, strict=True)])

    @torch.no_grad()
    def embed(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images -> [B, width] L2-normalised pooled embeddings (the understanding head)."""
        return self.model.understand(self._pack(images))[0].float().cpu()

    @torch.no_grad()
    def embed_video(self, videos: list[torch.Tensor]) -> torch.Tensor:
        """videos: list of [3, T, H, W] in [0, 1], T a multiple of 4 -> [B, width] L2-normalised pooled
        embeddings. Each clip is one sample (training's understanding clips: 1 fps, up to 64 frames,
        ``data_pipeline.clips``): encoded in chunks of 16 frames, pooled over all of them."""
        parts = []
        for i, v in enumerate(videos):
            if v.ndim != 4 or v.shape[0] != 3 or v.shape[1] % PATCH_T:
                raise ValueError(f"video {i}: expected [3, T, H, W], T a multiple of {PATCH_T}, got {tuple(v.shape)}")
            parts.append((*patchify(pad_to_patches(v.float() * 2 - 1)), VIDEO, PATCH_T))
        return self.model.understand(PackedBatch.cat(parts).to(self.device, self.dtype))[0].float().cpu()


def _coords_only(grid: tuple[int, int, int, int], modality: str, device, dtype) -> PackedBatch:
    """A one-sample batch whose features are zero: the decoder reads only coords and lengths."""
    t, h, w, _ = grid
    feats, coords, g = patchify(torch.zeros(3, t * PATCH_T, h * 16, w * 16))
    return PackedBatch.cat([(feats, coords, g, modality, PATCH_T if modality == VIDEO else 1)]).to(device, dtype)
