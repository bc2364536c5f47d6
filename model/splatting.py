"""Differentiable rendering of 3D Gaussians (3DGS, EWA splatting) and the 3D reconstruction loss.

Two backends, one convention:
  ``gsplat``  ``gsplat.rasterization`` (CUDA kernels), when gsplat is importable and the tensors are on CUDA
  ``torch``   a pure-PyTorch rasterizer (any device): the named CPU fallback, written to gsplat's rules

The conventions, as in gsplat 1.5.3's "antialiased" pinhole path (checked against its CUDA sources),
which is the release's rasterizer's (mip-splatting's ``diff-gaussian-rasterization`` with
``kernel_size`` 0.1, as TRELLIS' and AToken's ``GaussianRenderer`` set it):
- ``viewmats`` [V, 4, 4] are world-to-camera (OpenCV: the camera looks down +z, image x right, y
  down); ``Ks`` [V, 3, 3] are pixel intrinsics; pixel (row i, column j) has its centre at
  (j + 0.5, i + 0.5).
- Sigma = R S S^T R^T, R from the normalised (w, x, y, z) quaternion, S = diag(scales).
- EWA: Sigma2D = J W Sigma W^T J^T + 0.1 I (the 2D filter, ``FILTER_2D``), and each Gaussian's
  opacity is scaled by sqrt(det(Sigma2D without the filter) / det(Sigma2D)), so the filter blurs a
  Gaussian without brightening it (mip-splatting's compensation).
- Colours are RGB, clamped at 0 (a degree-0 SH colour C0 * dc + 0.5 is clamped so in 3DGS).
  J is the perspective Jacobian at the camera-space mean, with x/z and y/z clamped to 1.3x the
  field of view as gsplat does (so Gaussians far off-screen do not blow up).
- A Gaussian is dropped in a view if its depth z is not in (0.01, 1e10), its opacity is < 1/255,
  Sigma2D is singular, or its box (gsplat's opacity-aware 3-sigma extent) misses the image.
- Per pixel, Gaussians are composited front to back by camera-space z:
  alpha = min(0.999, o * exp(-d^T Sigma2D^-1 d / 2)), skipped when < 1/255; compositing stops
  before the Gaussian that would bring the transmittance T to <= 1e-4;
  colour = sum_i alpha_i T_i c_i + T_final * background, and the returned alpha is 1 - T_final.
  NOTE: gsplat 1.5.3's kernel clamps alpha at 0.999, not the 0.99 of the original 3DGS code.

The torch rasterizer bins Gaussians into square pixel tiles (exact: outside its box a Gaussian's
alpha is below 1/255), then composites chunks of tiles against chunks of their depth-sorted
Gaussians, carrying T between chunks. Each chunk of tiles runs under activation checkpointing, so
memory is bounded by ``budget`` elements per intermediate whatever the scene size; backward
recomputes the chunk (autograd, no hand-written backward).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .gaussians import Gaussians

logger = logging.getLogger(__name__)

NEAR_PLANE, FAR_PLANE = 0.01, 1e10
FILTER_2D = 0.1  # px^2 added to Sigma2D's diagonal: the release's 2d_filter_kernel_size
ALPHA_MIN, ALPHA_MAX = 1.0 / 255.0, 0.999
T_MIN = 1e-4  # compositing stops before T would reach this
MAX_EXTENT = 3.33  # box half-size in std-devs (gsplat)
SIGMA_MAX = 20.0  # exp(-20) < 1/255: no alpha this far out is ever used
# Pixel tile side of the torch rasterizer (gsplat's kernels use 16). Any size gives the same image;
# on CPU, 8 wastes fewer pixel-Gaussian pairs (benchmarks/splatting.py measures both).
TILE = 8
BACKENDS = ("gsplat", "torch")
HAVE_GSPLAT = importlib.util.find_spec("gsplat") is not None
_logged: set[tuple[str, str]] = set()


@dataclass
class Projection:
    """The Gaussians as seen by each view (the torch backend's intermediate)."""
    means2d: torch.Tensor  # [V, G, 2] pixel coordinates (x right, y down)
    conics: torch.Tensor  # [V, G, 3] (a, b, c) with Sigma2D^-1 = [[a, b], [b, c]]
    depths: torch.Tensor  # [V, G] camera-space z
    radii: torch.Tensor  # [V, G, 2] box half-sizes in px (x, y); no gradient
    opacities: torch.Tensor  # [V, G] opacity times the 2D filter's compensation
    visible: torch.Tensor  # [V, G] bool: survives the culling rules above


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """[..., 4] (w, x, y, z), normalised here -> [..., 3, 3] rotation matrices."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    r = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], dim=-1)
    return r.unflatten(-1, (3, 3))


def covariances(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[G, 4], [G, 3] -> world covariances [G, 3, 3] = R diag(s^2) R^T."""
    m = quat_to_rotmat(quats) * scales[:, None, :]  # R S
    return m @ m.transpose(-1, -2)


def project(g: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int) -> Projection:
    """EWA projection of every Gaussian into every view, with gsplat's culling."""
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]  # [V, 3, 3], [V, 3]
    mc = torch.einsum("vij,gj->vgi", rot, g.means) + trans[:, None]  # [V, G, 3] camera space
    cov = rot[:, None] @ covariances(g.quats, g.scales)[None] @ rot[:, None].transpose(-1, -2)  # [V, G, 3, 3]
    x, y, z = mc.unbind(-1)  # [V, G] each
    in_depth = (z > NEAR_PLANE) & (z < FAR_PLANE)
    # Dropped Gaussians still flow through the arithmetic: keep it finite so their zero gradients stay zero.
    z = torch.where(in_depth, z, torch.ones_like(z))
    fx, fy, cx, cy = (Ks[:, r, c, None] for r, c in ((0, 0), (1, 1), (0, 2), (1, 2)))  # [V, 1] each
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = z * torch.clamp(x / z, -(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
    ty = z * torch.clamp(y / z, -(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * tx / z ** 2, zero, fy / z, -fy * ty / z ** 2], -1).unflatten(-1, (2, 3))
    cov2d = jac @ cov @ jac.transpose(-1, -2)  # [V, G, 2, 2]
    a0, b, c0 = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    a, c = a0 + FILTER_2D, c0 + FILTER_2D
    det = a * c - b * b
    det_ok = det > 0
    det = torch.where(det_ok, det, torch.ones_like(det))
    compensation = torch.sqrt(((a0 * c0 - b * b) / det).clamp(min=0))  # [V, G]
    opacities = g.opacities[None] * compensation
    conics = torch.stack([c / det, -b / det, a / det], -1)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    with torch.no_grad():
        o = opacities
        extent = torch.sqrt(2 * torch.log(o.clamp(min=ALPHA_MIN) / ALPHA_MIN)).clamp(max=MAX_EXTENT)
        radii = torch.ceil(extent[..., None] * torch.stack([a, c], -1).clamp(min=0).sqrt())  # [V, G, 2]
        mx, my = means2d[..., 0], means2d[..., 1]
        on_image = ((mx + radii[..., 0] > 0) & (mx - radii[..., 0] < width)
                    & (my + radii[..., 1] > 0) & (my - radii[..., 1] < height))
        visible = in_depth & det_ok & (o >= ALPHA_MIN) & on_image
    return Projection(means2d, conics, mc[..., 2], radii, opacities, visible)


def _composite(pix: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, means2d: torch.Tensor,
               conics: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor, background: torch.Tensor,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of tiles against their depth-sorted Gaussians.

    pix [n, P, 2] pixel centres of n tiles; idx [n, L] Gaussian indices per tile, front to back
    (valid [n, L] marks real entries; the rest is padding); means2d [G, 2], conics [G, 3],
    opacities [G], colors [G, 3] of this view. -> (rgb [n, P, 3], T [n, P] final transmittance).
    """
    n, p = pix.shape[:2]
    px, py = pix.unsqueeze(-1).unbind(-2)  # [n, P, 1] each
    trans = pix.new_ones(n, p)  # T after the Gaussians composited so far
    done = torch.zeros(n, p, dtype=torch.bool, device=pix.device)  # compositing stopped
    rgb = pix.new_zeros(n, p, colors.shape[-1])
    for s in range(0, idx.shape[1], chunk):
        i, ok = idx[:, s:s + chunk], valid[:, s:s + chunk]  # [n, L']
        mx, my = means2d[i].unsqueeze(1).unbind(-1)  # [n, 1, L'] each
        ca, cb, cc = conics[i].unsqueeze(1).unbind(-1)
        dx, dy = px - mx, py - my  # [n, P, L'] each
        sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
        # NOTE: exp of large arguments is slow on CPU; beyond SIGMA_MAX alpha < 1/255 is skipped anyway.
        alpha = (opacities[i][:, None] * torch.exp(-sigma.clamp(max=SIGMA_MAX))).clamp(max=ALPHA_MAX)  # [n, P, L']
        use = ok[:, None] & (sigma >= 0) & (alpha >= ALPHA_MIN) & ~done[..., None]
        alpha = torch.where(use, alpha, torch.zeros_like(alpha))
        survive = torch.cumprod(1 - alpha, dim=-1)  # prod_{j <= k} (1 - alpha_j)
        # T only falls along the list, so the Gaussians kept (T after them > T_MIN) are a prefix.
        keep = trans[..., None] * survive > T_MIN
        t_before = trans[..., None] * torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], -1)
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        rgb = rgb + torch.einsum("npl,nlc->npc", alpha * t_before, colors[i])
        trans = trans * torch.prod(1 - alpha, dim=-1)
        done = done | (use & ~keep).any(-1)
    return rgb + trans[..., None] * background, trans


def _rasterize_view(means2d: torch.Tensor, conics: torch.Tensor, depths: torch.Tensor, radii: torch.Tensor,
                    visible: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor, background: torch.Tensor,
                    width: int, height: int, tile: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One view -> (rgb [H, W, 3], T [H, W])."""
    dev = means2d.device
    tw, th = math.ceil(width / tile), math.ceil(height / tile)
    ids = visible.nonzero().squeeze(1)
    ids = ids[torch.argsort(depths[ids].detach(), stable=True)]  # front to back
    with torch.no_grad():  # which tiles each Gaussian's box touches (gsplat's isect_tiles)
        m, r = means2d[ids], radii[ids]
        x0 = torch.floor((m[:, 0] - r[:, 0]) / tile).clamp(0, tw).long()
        x1 = torch.ceil((m[:, 0] + r[:, 0]) / tile).clamp(0, tw).long()
        y0 = torch.floor((m[:, 1] - r[:, 1]) / tile).clamp(0, th).long()
        y1 = torch.ceil((m[:, 1] + r[:, 1]) / tile).clamp(0, th).long()
        nx, count = x1 - x0, (x1 - x0) * (y1 - y0)  # [g]
        rank = torch.repeat_interleave(torch.arange(ids.shape[0], device=dev), count)  # [I] depth rank
        local = torch.arange(rank.shape[0], device=dev) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        tile_id = (y0[rank] + local // nx[rank]) * tw + x0[rank] + local % nx[rank]  # [I]
        order = torch.argsort(tile_id * max(ids.shape[0], 1) + rank)  # by tile, then front to back
        gauss = ids[rank[order]]  # [I] Gaussian per (tile, depth) intersection
        per_tile = torch.bincount(tile_id, minlength=tw * th)  # [tw * th]
        start = torch.cumsum(per_tile, 0) - per_tile
        ly, lx = torch.meshgrid(torch.arange(tile, device=dev), torch.arange(tile, device=dev), indexing="ij")
        local_pix = torch.stack([lx, ly], -1).reshape(1, tile * tile, 2).to(means2d.dtype) + 0.5
    # Group tiles of similar load (busiest first) so that padding each group to its busiest tile
    # wastes little; empty tiles are just the background.
    by_load = torch.argsort(per_tile, descending=True, stable=True).tolist()
    loads = per_tile[by_load].tolist()
    outs, transes, s = [], [], 0
    while s < len(by_load) and loads[s] > 0:
        n = max(1, min(budget // (tile * tile * loads[s]), len(by_load) - s))
        n = sum(1 for load in loads[s:s + n] if load > 0)
        t = torch.tensor(by_load[s:s + n], device=dev)  # [n] tile ids
        j = torch.arange(loads[s], device=dev)
        valid = j[None] < per_tile[t][:, None]  # [n, L]
        idx = torch.where(valid, gauss[(start[t][:, None] + j[None]).clamp(max=gauss.shape[0] - 1)], 0)
        origin = torch.stack([t % tw, t // tw], -1).to(means2d.dtype) * tile  # [n, 2] top-left corner
        pix = origin[:, None, :] + local_pix  # [n, tile^2, 2]
        chunk = max(1, budget // (n * tile * tile))
        args = (pix, idx, valid, means2d, conics, opacities, colors, background, chunk)
        if torch.is_grad_enabled() and any(a.requires_grad for a in (means2d, conics, opacities, colors, background)):
            rgb, trans = checkpoint(_composite, *args, use_reentrant=False)
        else:
            rgb, trans = _composite(*args)
        outs.append(rgb)
        transes.append(trans)
        s += n
    empty = len(by_load) - s
    outs.append(background.expand(empty, tile * tile, -1))
    transes.append(means2d.new_ones(empty, tile * tile))
    unsort = torch.empty(len(by_load), dtype=torch.long, device=dev)
    unsort[torch.tensor(by_load, device=dev)] = torch.arange(len(by_load), device=dev)
    # tiles [th * tw, tile^2, C] -> [th * tile, tw * tile, C], cropped to the image
    rgb = torch.cat(outs)[unsort].view(th, tw, tile, tile, -1).permute(0, 2, 1, 3, 4).reshape(th * tile, tw * tile, -1)
    trans = torch.cat(transes)[unsort].view(th, tw, tile, tile).permute(0, 2, 1, 3).reshape(th * tile, tw * tile)
    return rgb[:height, :width], trans[:height, :width]


def render_torch(g: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
                 background: torch.Tensor, tile: int = TILE,
                 budget: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch rasterizer -> (images [V, 3, H, W], alphas [V, 1, H, W]).

    Computes in fp32 (fp64 if the Gaussians are fp64, e.g. for gradcheck). ``budget`` bounds the
    elements of each [tiles, pixels, Gaussians] intermediate of a chunk.
    """
    dtype = torch.promote_types(g.means.dtype, torch.float32)
    g = g.to(dtype=dtype)
    viewmats, Ks, background = viewmats.to(dtype), Ks.to(dtype), background.to(dtype)
    proj = project(g, viewmats, Ks, width, height)
    images, alphas = [], []
    for v in range(viewmats.shape[0]):
        rgb, trans = _rasterize_view(proj.means2d[v], proj.conics[v], proj.depths[v], proj.radii[v],
                                     proj.visible[v], proj.opacities[v], g.colors, background, width, height, tile,
                                     budget)
        images.append(rgb.permute(2, 0, 1))
        alphas.append((1 - trans)[None])
    return torch.stack(images), torch.stack(alphas)


def render_gsplat(g: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
                  background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gsplat.rasterization`` with the conventions above -> (images [V, 3, H, W], alphas [V, 1, H, W])."""
    import gsplat  # noqa: PLC0415 - gsplat, an optional GPU rasterizer

    f = lambda t: t.float().contiguous()  # noqa: E731  (gsplat's kernels are fp32)
    colors, alphas, _ = gsplat.rasterization(
        f(g.means), f(g.quats), f(g.scales), f(g.opacities), f(g.colors), f(viewmats), f(Ks), width, height,
        near_plane=NEAR_PLANE, far_plane=FAR_PLANE, eps2d=FILTER_2D, sh_degree=None,
        backgrounds=f(background).expand(viewmats.shape[0], -1).contiguous(), rasterize_mode="antialiased")
    return colors.permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2)  # from [V, H, W, C]


def _backend_unavailable(name: str, x: torch.Tensor) -> str | None:
    if name == "gsplat" and not HAVE_GSPLAT:
        return "gsplat is not installed"
    if name == "gsplat" and not x.is_cuda:
        return f"gsplat needs CUDA tensors, got {x.device.type}"
    return None


def get_render_backend(x: torch.Tensor, backend: str | None = None) -> tuple[str, str]:
    """(backend, reason) that ``render`` uses for Gaussians like ``x``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown render backend {backend!r}; choose one of {BACKENDS} or None")
        reason = _backend_unavailable(backend, x)
        if reason:
            raise ValueError(f"render backend {backend!r} cannot run: {reason}")
        return backend, "requested"
    reason = _backend_unavailable("gsplat", x)
    return ("torch", f"fallback: {reason}") if reason else ("gsplat", f"auto: {x.device.type}")


def render(gaussians: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
           background: torch.Tensor | Sequence[float] | None = None,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render all ``gaussians`` from V cameras, differentiably.

    viewmats [V, 4, 4] world-to-camera, Ks [V, 3, 3] (conventions in the module docstring);
    background: RGB [3] (default black). -> (images [V, 3, H, W], alphas [V, 1, H, W]).
    ``backend``: "gsplat", "torch" or None (gsplat on CUDA when importable, else torch; logged once);
    the model's is ``GaussianDecoderConfig.render_backend``.
    """
    v = viewmats.shape[0]
    if viewmats.shape != (v, 4, 4) or Ks.shape != (v, 3, 3):
        raise ValueError(f"need viewmats [V, 4, 4] and Ks [V, 3, 3], got {list(viewmats.shape)} and {list(Ks.shape)}")
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"bad image size {width}x{height}")
    means = gaussians.means
    bg = torch.zeros(3) if background is None else torch.as_tensor(background)
    bg = bg.to(device=means.device, dtype=torch.promote_types(means.dtype, torch.float32))
    if bg.shape != (3,):
        raise ValueError(f"background must be RGB [3], got {list(bg.shape)}")
    name, reason = get_render_backend(means, backend)
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        logger.info("render backend: %s (%s)", name, reason)
    viewmats, Ks = viewmats.to(means.device), Ks.to(means.device)
    gaussians = dataclasses.replace(gaussians, colors=gaussians.colors.clamp(min=0))
    # NOTE: under the trainer's bf16 autocast the projection would lose the precision it needs.
    with torch.autocast(means.device.type, enabled=False):
        if name == "gsplat":
            return render_gsplat(gaussians, viewmats, Ks, int(width), int(height), bg)
        return render_torch(gaussians, viewmats, Ks, int(width), int(height), bg)


def gaussian_view_loss(gaussians: Gaussians, views: torch.Tensor, cameras: dict,
                       background: torch.Tensor | Sequence[float] | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """The 3D reconstruction loss (docs/design.md: L1 only): mean |render - view| over the V target views.

    gaussians: one sample's Gaussians; views [V, 3, H, W] in [0, 1]; cameras {"viewmats" [V, 4, 4],
    "Ks" [V, 3, 3]}; background: the colour the views were rendered over (default black).
    -> scalar, fp32.
    """
    if gaussians.num_samples != 1:
        raise ValueError(f"gaussian_view_loss takes one sample's Gaussians, got {gaussians.num_samples} samples "
                         "(use Gaussians.sample(i))")
    if views.ndim != 4 or views.shape[1] != 3:
        raise ValueError(f"views must be [V, 3, H, W], got {list(views.shape)}")
    if cameras["viewmats"].shape[0] != views.shape[0]:
        raise ValueError(f"{views.shape[0]} views but {cameras['viewmats'].shape[0]} cameras")
    images, _ = render(gaussians, cameras["viewmats"], cameras["Ks"], views.shape[3], views.shape[2],
                       background, backend)
    return (images.float() - views.to(images.device, torch.float32)).abs().mean()
