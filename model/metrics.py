"""Reconstruction quality metrics: training's held-out PSNR and the evaluation tools' (tools/eval/) scores.

Images are [3, H, W] (or batches [B, 3, H, W]) and video clips [3, T, H, W], floats in [0, 1]
(data range 1). The definitions follow the usual reference implementations, so numbers compare
with other papers' tables:

- ``psnr``: 10 log10(1 / MSE), the MSE over all pixels and channels (skimage
  ``peak_signal_noise_ratio(..., data_range=1)``).
- ``ssim``: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  population covariances, averaged over the positions where the window fits inside the image and
  over channels (skimage ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)``).
- video: the per-frame image metric averaged over frames (``reconstruction.video_record``).
- FID: the Frechet distance between Gaussians fitted to two sets of features (pytorch-fid's
  ``calculate_frechet_distance``); the features come from ``inception.InceptionFeatures``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5  # skimage/scipy defaults: radius int(3.5 * 1.5 + 0.5) = 5, window 11
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two images [3, H, W] in [0, 1] (data range 1)."""
    mse = torch.mean((x.double() - y.double()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)  # fp64 (torch.tensor(mse) would be fp32)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # scipy.ndimage's kernel: exp(-x^2 / 2 sigma^2) on x = -r..r, normalised to sum 1.
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return k / k.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float | torch.Tensor:
    """Mean SSIM of two images [C, H, W] -> float, or of two batches [B, C, H, W] -> [B] (float64).

    Computed in float64 on the inputs' device. Both sides must be at least 11 px (the window).
    """
    if x.shape != y.shape or x.ndim not in (3, 4):
        raise ValueError(f"ssim needs two [C, H, W] or [B, C, H, W] tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    single = x.ndim == 3
    x, y = (x[None] if single else x).double(), (y[None] if single else y).double()
    k = _gaussian_window(torch.float64, x.device)
    if min(x.shape[-2:]) < k.numel():
        raise ValueError(f"ssim needs images of at least {k.numel()}x{k.numel()} px, got {tuple(x.shape[-2:])}")
    # The five local moments in one grouped, separable 'valid' convolution: [B, 5C, H - 10, W - 10].
    # NOTE: 'valid' gives exactly the positions skimage keeps after cropping the window radius from
    # every side, so no border mode needs matching.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    c = maps.shape[1]
    maps = F.conv2d(F.conv2d(maps, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c),
                    k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    ux, uy, uxx, uyy, uxy = maps.chunk(5, dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_image = s.mean(dim=(1, 2, 3))  # every channel has as many positions: = mean of channel means
    return per_image[0].item() if single else per_image


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] rounded to 8 bits, as a saved PNG or video frame would hold them."""
    return (x.clamp(0, 1) * 255).round() / 255


def ssim_pairs(x: torch.Tensor, y: torch.Tensor, device: torch.device, chunk: int = 8) -> list[float]:
    """SSIM of each pair of images of two batches [N, 3, H, W] in [0, 1], ``chunk`` pairs at a time
    (its float64 moment maps take 40 bytes per input value)."""
    return [v for i in range(0, x.shape[0], chunk)
            for v in ssim(x[i:i + chunk].to(device), y[i:i + chunk].to(device)).tolist()]


def lpips_pairs(lpips: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8) -> list[float]:
    """LPIPS (``model.perceptual.LPIPS``) of each pair of images of two batches [N, 3, H, W] in [0, 1],
    ``chunk`` pairs per pass."""
    dev, out = next(lpips.parameters()).device, []
    for i in range(0, x.shape[0], chunk):
        with torch.no_grad():
            out += lpips(x[i:i + chunk].to(dev) * 2 - 1, y[i:i + chunk].to(dev) * 2 - 1).tolist()
    return out


# ---------------------------------------------------------------------------------------- FID

def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] -> (mean [D], covariance [D, D]) in float64 (unbiased, as pytorch-fid)."""
    f = _as_features(features)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians.

    As pytorch-fid: ``scipy.linalg.sqrtm`` of the product; if it is not finite (a near-singular
    product), ``eps`` is added to both diagonals and it is retried; an imaginary part left by
    numerical error is dropped when the diagonal's is below 1e-3, else ValueError. Costs one
    D x D Schur decomposition (D = 2048: seconds on a GPU host's CPUs, minutes on 2 cores); for
    raw features prefer ``fid_from_features``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different shapes: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm left an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor) -> float:
    """FID between two feature sets [N1, D] and [N2, D] (each N >= 2).

    When a set has no more samples than dimensions (N <= D, e.g. under 2048 images), both
    covariances are low rank: then Tr sqrt(S1 S2) is computed exactly as the sum of the singular
    values of A B^T / sqrt((N1 - 1)(N2 - 1)), A and B the centred features (the nonzero eigenvalues
    of S1 S2 are those of (A B^T)(A B^T)^T / ((N1 - 1)(N2 - 1))). This is the value
    ``frechet_distance`` approximates there, without its numerical trouble and at the cost of an
    N1 x N2 SVD. Otherwise the statistics go to ``frechet_distance``.
    """
    f1, f2 = _as_features(features1), _as_features(features2)
    (n1, d), (n2, d2) = f1.shape, f2.shape
    if d != d2:
        raise ValueError(f"feature sets of different widths: {d} and {d2}")
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {n1} and {n2}")
    if min(n1, n2) > d:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a, b = f1 - mu1, f2 - mu2
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * tr_covmean)


def _as_features(f: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(f, torch.Tensor):
        f = f.detach().cpu().numpy()
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    return f
