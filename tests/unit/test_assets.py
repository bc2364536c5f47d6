"""3D data pipeline: loading, Mitsuba renders and their cameras, voxels, voxel tokens, 3D shards.

Real meshes from the pymeshlab wheel (textured bunny, vertex-coloured airplane); synthetic ones
(boxes, a textured quad) where the expected pixels and voxels can be computed by hand.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pymeshlab
import pytest
import torch
import trimesh
from scipy.ndimage import binary_dilation
from scipy.spatial import cKDTree
from streaming import StreamingDataset

from atoken.data_pipeline.assets import (
    ASSET_COLUMNS,
    VOXEL_GRID,
    asset_sample,
    decode_views,
    load_mesh,
    normalize,
    trimesh_part,
    voxel_tokens,
    voxelize,
)
from atoken.data_pipeline.config import StreamConfig
from atoken.data_pipeline.render import MeshPart, intrinsics, look_at, render_views, sphere_cameras
from atoken.tools.make_3d_shards import main as shards_main

MESHES = Path(pymeshlab.__file__).parent / "tests" / "sample_meshes"
BUNNY, AIRPLANE = MESHES / "bunny10k_textured.obj", MESHES / "colored_airplane.ply"


# tests/conftest.py: streaming's filelocks in this test's own TMPDIR, its shared memory unlinked after.
pytestmark = pytest.mark.usefixtures("stream_env")


@pytest.fixture(scope="module")
def bunny() -> list[MeshPart]:
    return normalize(load_mesh(BUNNY))


def project(points: np.ndarray, viewmat: np.ndarray, k: np.ndarray) -> np.ndarray:
    """World points [n, 3] -> pixel positions (u, v) [n, 2]."""
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    pix = cam @ k.T
    return pix[:, :2] / pix[:, 2:]


# ---------------------------------------------------------------- cameras and renders


def test_camera_convention_matches_renders(bunny):
    """Mesh vertices projected with the stored viewmats/Ks land on the rendered silhouette."""
    res = 128
    viewmats, Ks = sphere_cameras(6, res)
    rgba = render_views(bunny, viewmats, Ks, res, spp=4)
    assert rgba.shape == (6, res, res, 4) and rgba.dtype == np.uint8
    verts = bunny[0].vertices
    for v in range(6):
        uv = project(verts, viewmats[v], Ks[v])
        covered = rgba[v, ..., 3] > 0
        ys, xs = np.nonzero(covered)
        # The silhouette's extent is the projected vertices' extent, to a pixel, on every side
        # (a flipped or transposed axis, or a half-pixel-off principal point beyond that, fails).
        assert np.allclose([uv[:, 0].min(), uv[:, 0].max(), uv[:, 1].min(), uv[:, 1].max()],
                           [xs.min(), xs.max() + 1, ys.min(), ys.max() + 1], atol=1.0), v
        # Every vertex lands on a covered pixel or next to one (a vertex on the silhouette's edge may
        # fall in a pixel that none of its few samples covered).
        near = binary_dilation(covered)[uv[:, 1].astype(int).clip(0, res - 1), uv[:, 0].astype(int).clip(0, res - 1)]
        assert near.all(), (v, near.mean())
    # Cameras sit on the sphere of radius 2, looking at the origin, which projects to the centre.
    centres = -np.einsum("vji,vj->vi", viewmats[:, :3, :3], viewmats[:, :3, 3])
    assert np.allclose(np.linalg.norm(centres, axis=1), 2.0, atol=1e-5)
    for v in range(6):
        assert np.allclose(project(np.zeros((1, 3)), viewmats[v], Ks[v]), res / 2, atol=1e-4)


def test_texture_lands_upright_and_unflipped():
    """A quad with a texture of four coloured quadrants, seen from +z: each quadrant where it belongs."""
    tex = np.zeros((64, 64, 3), np.uint8)
    colours = {"top_left": (255, 0, 0), "top_right": (0, 255, 0), "bottom_left": (0, 0, 255),
               "bottom_right": (255, 255, 0)}
    tex[:32, :32], tex[:32, 32:], tex[32:, :32], tex[32:, 32:] = colours.values()
    quad = MeshPart(np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], np.float32),
                    np.array([[0, 1, 2], [0, 2, 3]]), uv=np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32),
                    texture=tex)
    res = 64
    viewmat, k = look_at([[0.0, 0.0, 2.0]]), intrinsics(res, 55.0)
    rgba = render_views([quad], viewmat, k, res, spp=64)[0]
    # Seen from +z with +y up, image right is world +x and image down is world -y.
    for name, (x, y) in {"top_left": (-0.25, 0.25), "top_right": (0.25, 0.25), "bottom_left": (-0.25, -0.25),
                         "bottom_right": (0.25, -0.25)}.items():
        u, v = project(np.array([[x, y, 0.0]]), viewmat[0], k[0])[0]
        assert tuple(rgba[int(v), int(u)]) == (*colours[name], 255), name
    assert rgba[0, 0, 3] == 0 and rgba[res // 2, res // 2, 3] == 255
    # Sub-pixel: the quad's edges, read off the coverage of the pixels they cross, sit where Ks puts
    # its corners (pixel j spans [j, j + 1], centre j + 0.5); a half-pixel offset fails.
    (left, top), (right, bottom) = project(np.array([[-0.5, 0.5, 0], [0.5, -0.5, 0]]), viewmat[0], k[0])
    row, col = rgba[res // 2, :, 3] / 255, rgba[:, res // 2, 3] / 255
    j, i = int(left), int(top)
    assert 0 < row[j] < 1 and 0 < col[i] < 1
    assert abs((j + 1 - row[j]) - left) < 0.15 and abs((i + 1 - col[i]) - top) < 0.15
    assert abs(row.sum() - (right - left)) < 0.15 and abs(col.sum() - (bottom - top)) < 0.15


def test_textured_bunny_shows_its_texture(bunny, tmp_path):
    """The bunny's texture colours (flat red/green/blue squares, greys) come through; its GLB export
    (a glTF PBR material) renders the same texture times glTF's baseColorFactor."""
    res = 96
    viewmats, Ks = sphere_cameras(4, res)
    rgba = render_views(bunny, viewmats, Ks, res, spp=4)
    fg = rgba[rgba[..., 3] == 255][:, :3].astype(int)
    assert len(fg) > 1000 and fg.std(0).min() > 20  # not one flat colour
    for pure in ((255, 0, 0), (0, 255, 0), (0, 0, 255)):
        assert (np.abs(fg - pure).max(1) <= 2).mean() > 0.01, pure

    trimesh.load(BUNNY).export(tmp_path / "bunny.glb")  # trimesh writes Kd (0.6) as baseColorFactor
    glb = normalize(load_mesh(tmp_path / "bunny.glb"))
    glb_rgba = render_views(glb, viewmats, Ks, res, spp=4)
    assert np.array_equal(glb_rgba[..., 3], rgba[..., 3])
    both = (rgba[..., 3] == 255)
    diff = np.abs(glb_rgba[both][:, :3] - 0.6 * rgba[both][:, :3].astype(float))
    assert np.median(diff) <= 1 and (diff <= 2).mean() > 0.97


def test_vertex_colours_come_through():
    parts = normalize(load_mesh(AIRPLANE))
    assert parts[0].vertex_colors is not None
    res = 128
    viewmats, Ks = sphere_cameras(2, res)
    rgba = render_views(parts, viewmats, Ks, res, spp=4)
    fg = rgba[rgba[..., 3] == 255][:, :3].astype(float)
    assert len(fg) > 300 and fg.std(0).min() > 30
    # Each covered pixel shows a colour interpolated between nearby vertices: close to some vertex colour.
    dist, _ = cKDTree(parts[0].vertex_colors.astype(float)).query(fg)
    assert np.median(dist) < 5 and (dist < 25).mean() > 0.95


# ---------------------------------------------------------------- voxels


def box_part(extents) -> MeshPart:
    return trimesh_part(trimesh.creation.box(extents=extents))


def shell(lo: tuple[int, int, int], hi: tuple[int, int, int]) -> set[tuple[int, int, int]]:
    """Voxels of the box of voxel indices lo..hi (inclusive) with at least one index on its border."""
    idx = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)], indexing="ij"),
                   -1).reshape(-1, 3)
    border = ((idx == lo) | (idx == hi)).any(1)
    return set(map(tuple, idx[border].tolist()))


def test_voxels_of_a_cube_and_a_box():
    cube = voxelize(normalize([box_part((3.0, 3.0, 3.0))]))
    assert cube.dtype == np.int16 and cube.shape == (VOXEL_GRID ** 3 - (VOXEL_GRID - 2) ** 3, 3)  # 23816
    assert set(map(tuple, cube.tolist())) == shell((0, 0, 0), (63, 63, 63))
    # A 1 x 0.6 x 0.3 box: its y faces at +-0.3 lie inside voxels 12 and 51 ((0.5 -+ 0.3) * 64 = 12.8,
    # 51.2), its z faces inside 22 and 41 (22.4, 41.6): the shell of those voxels, 64*40*20 - 62*38*18.
    box = voxelize(normalize([box_part((2.0, 1.2, 0.6))]))
    assert len(box) == 8792
    assert set(map(tuple, box.tolist())) == shell((0, 12, 22), (63, 51, 41))
    assert np.array_equal(box, np.unique(box, axis=0))  # sorted, unique


FACE_COLOURS = {(1, 0, 0): (230, 25, 25), (-1, 0, 0): (25, 200, 25), (0, 1, 0): (25, 25, 230),
                (0, -1, 0): (240, 240, 20), (0, 0, 1): (200, 20, 200), (0, 0, -1): (20, 220, 220)}


def test_voxel_tokens_of_a_coloured_box():
    """A cube with one colour per side, seen by 6 cameras on the axes: every voxel inside a side
    (away from its edges) takes the camera facing that side and a patch of that side's colour,
    centred where a hand-written pinhole projection puts the voxel centre."""
    mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    normals = np.round(mesh.face_normals).astype(int)
    mesh.visual.face_colors = np.array([(*FACE_COLOURS[tuple(n)], 255) for n in normals], np.uint8)
    parts = normalize([trimesh_part(mesh)])
    axes = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    res = 128
    viewmats, Ks = look_at(2.0 * np.array(axes, np.float32)), intrinsics(res, 55.0, 6)
    rgba = render_views(parts, viewmats, Ks, res, spp=4)
    views = torch.from_numpy(rgba[..., :3]).float() / 127.5 - 1  # fully covered where it matters
    voxels = torch.from_numpy(voxelize(parts).astype(np.int64))
    features, coords = voxel_tokens(voxels, views, torch.from_numpy(viewmats), torch.from_numpy(Ks))

    assert features.shape == (len(voxels), 3072) and features.dtype == torch.float32
    assert torch.equal(coords, torch.cat([torch.zeros(len(voxels), 1, dtype=torch.long), voxels], 1))
    assert torch.all(features[:, 768:] == 0) and features.abs().max() <= 1
    patches = features[:, :768].reshape(-1, 16, 16, 3)
    checked = 0
    for _axis, (normal, colour) in enumerate(FACE_COLOURS.items()):
        a = int(np.flatnonzero(normal)[0])
        side = voxels[:, a] == (VOXEL_GRID - 1 if normal[a] > 0 else 0)
        inner = side & ((voxels[:, [b for b in range(3) if b != a]] - 31.5).abs() < 26).all(1)
        centre = patches[inner][:, 7:9, 7:9].reshape(-1, 3)
        assert torch.allclose(centre, torch.tensor(colour) / 127.5 - 1, atol=1e-6), normal
        checked += int(inner.sum())
    assert checked == 6 * 52 * 52

    # The +x side from the camera at (2, 0, 0): image right is world -z, image down world -y.
    f = Ks[0, 0, 0]
    plus_x = torch.nonzero((voxels[:, 0] == 63) & ((voxels[:, 1:] - 31.5).abs() < 26).all(1)).flatten()
    for i in plus_x[::97].tolist():
        x, y, z = ((voxels[i].double() + 0.5) / VOXEL_GRID - 0.5).tolist()
        u, v = res / 2 + f * -z / (2 - x), res / 2 + f * -y / (2 - x)
        top, left = round(v - 8), round(u - 8)
        assert torch.equal(patches[i], views[0, top:top + 16, left:left + 16]), i


# ---------------------------------------------------------------- shards


def test_writer_round_trip_and_rejections(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "bunny").mkdir(parents=True)
    for name in ("bunny10k_textured.obj", "bunny10k_textured.mtl", "TextureDouble_A.png"):
        shutil.copy(MESHES / name, src / "bunny" / name)
    shutil.copy(AIRPLANE, src / "airplane.ply")
    (src / "airplane.txt").write_text("a toy airplane with rainbow colours\n")
    trimesh.PointCloud(np.random.default_rng(0).random((20, 3))).export(src / "points.ply")  # no faces
    (src / "garbage.glb").write_bytes(np.random.default_rng(1).bytes(300))
    sliver = trimesh.Trimesh([[0, 0, 0], [1, 1, 1], [2, 2, 2]], [[0, 1, 2]], process=False)  # zero area
    sliver.export(src / "sliver.ply")

    out = tmp_path / "out"
    assert shards_main([str(src), str(out), "--views", "4", "--resolution", "64", "--spp", "2",
                        "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1] == "wrote 2 samples, rejected 3"
    for name, why in [("garbage.glb", "unreadable mesh file"), ("points.ply", "has no faces"),
                      ("sliver.ply", "render of")]:
        assert f"rejected {name}: " in text and why in text.split(f"rejected {name}: ")[1].splitlines()[0], name

    ds = StreamingDataset(local=str(out), batch_size=1)
    rows = [ds[i] for i in range(ds.num_samples)]
    assert [r["name"] for r in rows] == ["airplane.ply", "bunny/bunny10k_textured.obj"]
    assert all(set(r) == set(ASSET_COLUMNS) for r in rows)
    assert [r["caption"] for r in rows] == ["a toy airplane with rainbow colours", ""]

    stream = StreamConfig(name="3d", modality="3d", views=2)
    bunny = rows[1]
    sample = asset_sample(bunny, np.random.default_rng(5), stream)
    stored = decode_views(bunny["views"], 4)
    assert stored.shape == (4, 64, 64, 4)
    n = len(bunny["voxels"])
    assert sample["values"].shape == (n, 768) and sample["values"].dtype == torch.uint8  # travel as uint8
    assert sample["coords"].shape == (n, 4)
    assert sample["coords"].dtype == torch.int64 and torch.all(sample["coords"][:, 0] == 0)
    assert torch.equal(sample["coords"][:, 1:], torch.from_numpy(bunny["voxels"].astype(np.int64)))
    assert sample["grid"] == (1, 64, 64, 64) and sample["frames"] == 1 and sample["modality"] == "3d"
    assert sample["name"] == "bunny/bunny10k_textured.obj" and "caption" not in sample
    # Targets: 2 of the 4 stored views (which: from the rng), over black, with their own cameras.
    pick = np.sort(np.random.default_rng(5).choice(4, size=2, replace=False))
    expected = (stored[pick, ..., :3] / 255 * (stored[pick, ..., 3:] / 255)).astype(np.float32)
    assert sample["views"].shape == (2, 3, 64, 64)
    assert torch.allclose(sample["views"], torch.from_numpy(expected).permute(0, 3, 1, 2), atol=1e-6)
    assert torch.equal(sample["cameras"]["viewmats"], torch.from_numpy(bunny["viewmats"][pick]))
    assert torch.equal(sample["cameras"]["Ks"], torch.from_numpy(bunny["Ks"][pick]))
    airplane = asset_sample(rows[0], np.random.default_rng(0), StreamConfig(modality="3d"))  # views=0: all
    assert airplane["caption"] == "a toy airplane with rainbow colours" and airplane["views"].shape == (4, 3, 64, 64)

    with pytest.raises(ValueError, match="asks for 8 target views"):
        asset_sample(bunny, np.random.default_rng(0), StreamConfig(modality="3d", views=8))
    with pytest.raises(ValueError, match=r"bunny/bunny10k_textured.obj"):
        asset_sample({**bunny, "voxels": np.array([[0, 0, 64]], np.int16)}, np.random.default_rng(0), stream)
