"""3D assets: loading and normalising meshes, 64^3 surface voxels, the MDS schema of 3D shards, and
the 3D input transform (voxels -> tokens) of a training sample.

Geometry (shared with the Gaussian renderer): an asset is normalised into the cube [-0.5, 0.5]^3,
centred, its longest side 1. Voxel (i, j, k) of the 64^3 grid has world centre
((i, j, k) + 0.5) / 64 - 0.5 and token coordinates (t, x, y, z) = (0, i, j, k).

Input transform (docs/design.md, "3D in"): each occupied voxel takes the 16x16 RGB patch of the nearest
view it projects into (nearest camera centre to the voxel centre; the patch centred on the projected
voxel centre, moved inside the image where it would cross the border). Its 768 values, in (h, w, c)
order and in [-1, 1], are zero-padded to 3072: the t = 0 slice of a 4x16x16 token, exactly like an
image token (frames = 1). Views are composited over black (``BACKGROUND``), as the targets are; a
training sample rounds the composite to 8 bits, as its 768 values travel as uint8 (``voxel_patches``).
NOTE: "nearest" does not test occlusion (as in the paper): a voxel hidden from its nearest camera
by other geometry takes the patch of what hides it.
"""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from PIL import Image
from trimesh.visual.material import PBRMaterial

from atoken.model.config import PATCH_DIM, PATCH_HW
from atoken.model.packed import ASSET3D

from .config import StreamConfig
from .render import MeshPart, render_views, sphere_cameras
from .samples import caption_of

VOXEL_GRID = 64
"""Voxels per side of the occupancy grid of an asset."""
BACKGROUND = 0.0
"""Colour of empty pixels in the views (inputs and targets): black, as gsplat renders with no
``backgrounds`` argument, so a splat render compares with a target without a background term."""
ASSET_EXTENSIONS = (".obj", ".ply", ".glb", ".gltf")

# The MDS schema of 3D shards, the one place it is defined (writer and reader share it).
# views: one PNG holding the V renders side by side (RGBA, straight alpha; [H, V*W, 4]);
# viewmats [V, 4, 4] and Ks [V, 3, 3]: the cameras (render.py); resolution: H = W of one view;
# voxels [M, 3]: occupied voxel indices (i, j, k); caption: "" when there is none.
ASSET_COLUMNS = {"views": "bytes", "viewmats": "ndarray:float32", "Ks": "ndarray:float32",
                 "resolution": "int32", "voxels": "ndarray:int16", "caption": "str", "name": "str"}


# ---------------------------------------------------------------- loading


def load_mesh(path: str | Path) -> list[MeshPart]:
    """Read a mesh file (OBJ with MTL/texture, PLY, GLB/glTF) -> its triangle meshes, in world space.

    Colour per part: a texture (times glTF's baseColorFactor; an OBJ's map_Kd replaces its Kd, as
    Blender's importer does), else vertex or face colours, else the material's colour (also for a
    material whose texture has no uv coordinates), else ``MeshPart``'s default grey. Points and
    lines in the file are dropped.
    Raises ValueError for an unreadable file or one without faces.
    """
    try:
        scene = trimesh.load(str(path), force="scene", process=False)
        meshes = [g for g in scene.dump(concatenate=False) if isinstance(g, trimesh.Trimesh)]
    except Exception as e:  # trimesh raises many types for a bad file
        raise ValueError(f"unreadable mesh file {str(path)!r}: {type(e).__name__}: {e}") from e
    parts = [trimesh_part(g) for g in meshes if len(g.faces)]
    if not parts:
        raise ValueError(f"mesh {str(path)!r} has no faces")
    return parts


def trimesh_part(mesh) -> MeshPart:
    """One trimesh.Trimesh -> a MeshPart with its colour source (see ``load_mesh``)."""
    vertices = np.asarray(mesh.vertices, np.float32)
    faces = np.asarray(mesh.faces, np.int64)
    visual = mesh.visual
    if visual.kind == "texture":
        material = visual.material
        pbr = isinstance(material, PBRMaterial)
        image = material.baseColorTexture if pbr else getattr(material, "image", None)
        if image is not None and visual.uv is not None and len(visual.uv) == len(vertices):
            texture = np.asarray(image.convert("RGB"), np.float32)
            if pbr and material.baseColorFactor is not None:  # glTF: texture times the factor
                texture = texture * (np.asarray(material.baseColorFactor[:3], np.float32) / 255.0)
            return MeshPart(vertices, faces, uv=np.asarray(visual.uv, np.float32),
                            texture=np.round(texture).astype(np.uint8))
        return MeshPart(vertices, faces, color=tuple(np.asarray(material.main_color[:3], float) / 255.0))
    if visual.kind == "vertex":
        return MeshPart(vertices, faces, vertex_colors=np.asarray(visual.vertex_colors[:, :3], np.uint8))
    if visual.kind == "face":
        # Renderers interpolate per vertex: give each face its own three vertices.
        colors = np.asarray(visual.face_colors[:, :3], np.uint8)
        return MeshPart(vertices[faces].reshape(-1, 3), np.arange(3 * len(faces)).reshape(-1, 3),
                        vertex_colors=np.repeat(colors, 3, axis=0))
    return MeshPart(vertices, faces)


def normalize(parts: list[MeshPart]) -> list[MeshPart]:
    """Move and scale all parts together into [-0.5, 0.5]^3: the bounding box of the vertices that
    faces use centred, its longest side 1."""
    points = np.concatenate([p.vertices[np.unique(p.faces)] for p in parts])
    lo, hi = points.min(0), points.max(0)
    size = float((hi - lo).max())
    if not np.isfinite(size) or size <= 0:
        raise ValueError(f"mesh has zero or non-finite size (bounds {lo.tolist()} .. {hi.tolist()})")
    centre = (lo + hi) / 2
    return [replace(p, vertices=((p.vertices - centre) / size).astype(np.float32)) for p in parts]


# ---------------------------------------------------------------- voxels


def voxelize(parts: list[MeshPart], grid: int = VOXEL_GRID, max_points: int = 1 << 22) -> np.ndarray:
    """Surface voxels of normalised parts -> int16 [M, 3] indices (i, j, k), sorted, unique.

    Every triangle is sampled on a barycentric lattice whose step is at most half a voxel along each
    edge (vertices and edges included), and a voxel is occupied when a sample falls in it; points on
    the cube's outer faces go to the border voxels. A voxel the surface only grazes (a sliver under
    half a voxel wide between lattice points) can be missed. ``max_points`` bounds memory per chunk.
    """
    occupied = np.zeros((grid,) * 3, bool)
    for part in parts:
        tri = part.vertices[part.faces].astype(np.float64)  # [m, 3 corners, 3]
        edges = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(1)  # [m]
        steps = np.maximum(1, np.ceil(edges * grid * 2)).astype(np.int64)  # lattice divisions per edge
        for n in np.unique(steps):
            a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
            keep = a + b <= n
            bary = np.stack([a[keep], b[keep], n - a[keep] - b[keep]], 1) / n  # [p, 3]
            group = tri[steps == n]
            per_chunk = max(1, max_points // len(bary))
            for start in range(0, len(group), per_chunk):
                points = np.einsum("pc,mcd->mpd", bary, group[start:start + per_chunk]).reshape(-1, 3)
                idx = np.clip(np.floor((points + 0.5) * grid), 0, grid - 1).astype(np.int64)
                occupied[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    return np.argwhere(occupied).astype(np.int16)


def voxel_centres(voxels: np.ndarray | torch.Tensor, grid: int = VOXEL_GRID) -> torch.Tensor:
    """Voxel indices [M, 3] -> world centres [M, 3] float32."""
    return (torch.as_tensor(voxels).float() + 0.5) / grid - 0.5


# ---------------------------------------------------------------- the shard columns


def encode_views(rgba: np.ndarray) -> bytes:
    """uint8 [V, H, W, 4] -> one PNG of the views side by side ([H, V*W, 4])."""
    v, h, w, _ = rgba.shape
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba.transpose(1, 0, 2, 3).reshape(h, v * w, 4))).save(buf, "PNG")
    return buf.getvalue()


def decode_views(data: bytes, n_views: int) -> np.ndarray:
    """Inverse of ``encode_views``: PNG bytes -> uint8 [V, H, W, 4]."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGBA":
            raise ValueError(f"views PNG has mode {img.mode}, expected RGBA")
        strip = np.asarray(img)  # [H, V*W, 4]
    h, vw, _ = strip.shape
    if vw % n_views:
        raise ValueError(f"views PNG of width {vw} does not split into {n_views} views")
    return np.ascontiguousarray(strip.reshape(h, n_views, vw // n_views, 4).transpose(1, 0, 2, 3))


def prepare_asset(path: str | Path, views: int = 8, resolution: int = 256, spp: int = 16) -> dict[str, Any]:
    """The shard columns of one mesh file (all of ``ASSET_COLUMNS`` but name; caption ""):
    normalised, rendered from ``sphere_cameras(views, resolution)``, voxelised.

    Raises ValueError for an unreadable file, a mesh without faces, or a render with nothing in it.
    """
    parts = normalize(load_mesh(path))
    viewmats, Ks = sphere_cameras(views, resolution)
    rgba = render_views(parts, viewmats, Ks, resolution, spp=spp)
    if not rgba[..., 3].any():
        raise ValueError(f"the render of {str(path)!r} is empty (no pixel covered in {views} views)")
    voxels = voxelize(parts)
    return {"views": encode_views(rgba), "viewmats": viewmats, "Ks": Ks, "resolution": resolution,
            "voxels": voxels, "caption": ""}


# ---------------------------------------------------------------- training samples


def voxel_patches(voxels: torch.Tensor, views: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                  grid: int = VOXEL_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3D input transform (module docstring), vectorised over voxels.

    voxels [M, 3] int (i, j, k); views [V, H, W, 3] of any dtype; viewmats [V, 4, 4]; Ks [V, 3, 3].
    Returns each voxel's patch [M, 768] ((h, w, c) order, the views' dtype) and coords [M, 4] int64
    (0, i, j, k). Raises ValueError when a voxel projects into no view.
    """
    n_views, hgt, wid, _ = views.shape
    if hgt < PATCH_HW or wid < PATCH_HW:
        raise ValueError(f"views of {hgt}x{wid} px are smaller than one {PATCH_HW}x{PATCH_HW} patch")
    voxels = torch.as_tensor(voxels).long()
    viewmats, Ks = viewmats.double(), Ks.double()
    centres = voxel_centres(voxels, grid).double()  # [M, 3]
    # Every voxel in every camera: pixel position (u, v) and depth.
    cam = torch.einsum("vij,mj->mvi", viewmats[:, :3, :3], centres) + viewmats[:, :3, 3]  # [M, V, 3]
    pix = torch.einsum("vij,mvj->mvi", Ks, cam)
    depth = pix[..., 2]
    u, v = pix[..., 0] / depth, pix[..., 1] / depth  # [M, V]
    inside = (depth > 0) & (u >= 0) & (u < wid) & (v >= 0) & (v < hgt)
    if not bool(inside.any(1).all()):
        raise ValueError(f"{int((~inside.any(1)).sum())} of {len(voxels)} voxels project into none of the "
                         f"{n_views} views")
    eyes = -torch.einsum("vji,vj->vi", viewmats[:, :3, :3], viewmats[:, :3, 3])  # camera centres [V, 3]
    best = torch.cdist(centres, eyes).masked_fill(~inside, float("inf")).argmin(1)  # [M]
    rows = torch.arange(len(voxels))
    half = PATCH_HW // 2
    top = torch.round(v[rows, best] - half).long().clamp(0, hgt - PATCH_HW)
    left = torch.round(u[rows, best] - half).long().clamp(0, wid - PATCH_HW)
    offsets = torch.arange(PATCH_HW)
    patches = views[best[:, None, None], (top[:, None] + offsets)[:, :, None],
                    (left[:, None] + offsets)[:, None, :]]  # [M, 16, 16, 3]
    coords = torch.cat([torch.zeros(len(voxels), 1, dtype=torch.long), voxels], 1)
    return patches.reshape(len(voxels), -1), coords


def voxel_tokens(voxels: torch.Tensor, views: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                 grid: int = VOXEL_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """``voxel_patches`` of float views [V, H, W, 3] in [-1, 1] as tokens: features [M, 3072] float32
    (values 768: zero) and coords [M, 4] int64 (0, i, j, k)."""
    patches, coords = voxel_patches(voxels, views, viewmats, Ks, grid)
    features = torch.zeros(len(patches), PATCH_DIM, dtype=torch.float32)
    features[:, : patches.shape[1]] = patches
    return features, coords


def asset_sample(raw: dict[str, Any], rng: np.random.Generator, stream: StreamConfig) -> dict[str, Any]:
    """One MDS sample (``ASSET_COLUMNS``) -> a training sample (the shared sample contract).

    Tokens come from all stored views; the reconstruction targets are ``stream.views`` of them
    (0: all), chosen with ``rng`` and kept in stored order. Returns
      {"values": [M, 768] uint8 (each voxel's patch of the views composited and rounded to 8 bits),
       "coords": [M, 4] int64 (0, i, j, k),
       "grid": (1, 64, 64, 64), "frames": 1, "modality": "3d", "name": str, ["caption": str,]
       "views": [k, 3, H, W] float32 in [0, 1] (over black), "cameras": {"viewmats": [k, 4, 4], "Ks": [k, 3, 3]}}.
    """
    name = str(raw["name"])
    viewmats, Ks = np.array(raw["viewmats"], np.float32), np.array(raw["Ks"], np.float32)  # writable copies
    n_views, res = len(viewmats), int(raw["resolution"])
    if viewmats.shape != (n_views, 4, 4) or Ks.shape != (n_views, 3, 3) or n_views == 0:
        raise ValueError(f"{name}: cameras of shapes {viewmats.shape}, {Ks.shape} do not match")
    rgba = decode_views(raw["views"], n_views)
    if rgba.shape[1:3] != (res, res):
        raise ValueError(f"{name}: views are {rgba.shape[1]}x{rgba.shape[2]} px, the sample says {res}")
    voxels = np.asarray(raw["voxels"]).astype(np.int64).reshape(-1, 3)
    if len(voxels) == 0 or voxels.min() < 0 or voxels.max() >= VOXEL_GRID:
        raise ValueError(f"{name}: {len(voxels)} voxels, indices outside [0, {VOXEL_GRID}) or none")
    want = stream.views or n_views
    if want > n_views:
        raise ValueError(f"{name}: the stream asks for {want} target views, the sample has {n_views}")

    rgba = torch.from_numpy(rgba).float().div_(255.0)  # [V, H, W, 4]
    rgb = rgba[..., :3] * rgba[..., 3:] + BACKGROUND * (1 - rgba[..., 3:])  # over the background
    pixels = rgb.mul(255.0).round_().to(torch.uint8)  # [V, H, W, 3]
    values, coords = voxel_patches(torch.from_numpy(voxels), pixels, torch.from_numpy(viewmats), torch.from_numpy(Ks))
    pick = torch.from_numpy(np.sort(rng.choice(n_views, size=want, replace=False)))
    sample = {"values": values, "coords": coords, "grid": (1, VOXEL_GRID, VOXEL_GRID, VOXEL_GRID),
              "frames": 1, "modality": ASSET3D, "name": name,
              "views": rgb[pick].permute(0, 3, 1, 2).contiguous(),
              "cameras": {"viewmats": torch.from_numpy(viewmats)[pick], "Ks": torch.from_numpy(Ks)[pick]},
              **caption_of(raw)}
    return sample
