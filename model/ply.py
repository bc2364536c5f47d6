"""Read and write Gaussians as a standard 3DGS .ply (the layout of the original 3DGS code, read by
common viewers and loaders): one binary little-endian ``vertex`` element of float32 properties

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  [f_rest_0 ...]  opacity  scale_0 scale_1 scale_2  rot_0 .. rot_3

with f_dc the SH degree-0 coefficient, (rgb - 0.5) / C0; opacity as a logit; scales as logs;
rot as a (w, x, y, z) quaternion; normals zero. Our colours are plain RGB, so any f_rest_* written
(``sh_degree`` > 0, e.g. 3 for loaders that insist on 45 of them) are zeros.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from .gaussians import Gaussians

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
_OPACITY_EPS = 1e-7  # keeps the logit finite for opacities of exactly 0 or 1


def _rest_names(sh_degree: int) -> list[str]:
    return [f"f_rest_{i}" for i in range(3 * ((sh_degree + 1) ** 2 - 1))]


def save_ply(gaussians: Gaussians, path: str | os.PathLike, sh_degree: int = 0) -> None:
    """Write all Gaussians (of every sample) to ``path`` atomically (temporary file, then rename)."""
    if sh_degree < 0:
        raise ValueError(f"sh_degree must be >= 0, got {sh_degree}")
    g = gaussians.detach().to("cpu", torch.float64)
    opacity = g.opacities.clamp(_OPACITY_EPS, 1 - _OPACITY_EPS)
    cols = {
        "x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
        "nx": torch.zeros_like(opacity), "ny": torch.zeros_like(opacity), "nz": torch.zeros_like(opacity),
        **{f"f_dc_{i}": (g.colors[:, i] - 0.5) / SH_C0 for i in range(3)},
        **{name: torch.zeros_like(opacity) for name in _rest_names(sh_degree)},
        "opacity": torch.log(opacity / (1 - opacity)),
        **{f"scale_{i}": torch.log(g.scales[:, i]) for i in range(3)},
        **{f"rot_{i}": torch.nn.functional.normalize(g.quats, dim=-1)[:, i] for i in range(4)},
    }
    data = np.empty(g.num_gaussians, dtype=[(name, "<f4") for name in cols])
    for name, col in cols.items():
        data[name] = col.numpy()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    PlyData([PlyElement.describe(data, "vertex")], byte_order="<").write(str(tmp))
    os.replace(tmp, path)


def load_ply(path: str | os.PathLike) -> Gaussians:
    """A 3DGS .ply -> Gaussians (one sample, fp32). f_rest_* are ignored (view-dependent colour is not
    modelled); colours are f_dc * C0 + 0.5, not clamped (another tool's file may exceed [0, 1])."""
    ply = PlyData.read(str(path))
    if "vertex" not in ply:
        raise ValueError(f"{path}: no 'vertex' element (not a 3DGS .ply)")
    v = ply["vertex"]
    names = {p.name for p in v.properties}
    need = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [n for n in need if n not in names]
    if missing:
        raise ValueError(f"{path}: not a 3DGS .ply, missing vertex properties {missing}")
    col = lambda *ns: torch.from_numpy(np.stack([np.asarray(v[n], dtype=np.float32) for n in ns], -1))  # noqa: E731 - a one-line local helper
    return Gaussians(
        means=col("x", "y", "z"),
        scales=torch.exp(col("scale_0", "scale_1", "scale_2")),
        quats=torch.nn.functional.normalize(col("rot_0", "rot_1", "rot_2", "rot_3"), dim=-1),
        opacities=torch.sigmoid(col("opacity")[:, 0]),
        colors=col("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5,
    )
