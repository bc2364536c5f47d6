"""The Gaussian-splat decoder (shapes, bounds, windows, samples, fitting) and the 3DGS .ply files."""
import math

import numpy as np
import pytest
import torch
from plyfile import PlyData

from atoken.data_pipeline.render import look_at
from atoken.model.gaussians import (GaussianDecoder, GaussianDecoderConfig, Gaussians, gaussian_decoder_preset,
                                    window_partition)
from atoken.model.ply import SH_C0, load_ply, save_ply
from atoken.model.splatting import gaussian_view_loss

C = 8  # latent channels


def block_coords(lo, hi) -> torch.Tensor:
    """[n, 4] coords (0, i, j, k) of every voxel with lo <= i, j, k < hi (per axis)."""
    axes = [torch.arange(a, b) for a, b in zip(lo, hi)]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([torch.zeros(len(ijk), 1, dtype=torch.long), ijk], 1)


def packed(*coords) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.zeros(len(coords) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(c) for c in coords]), 0)
    return torch.cat(coords), cu


def tiny(**kw) -> GaussianDecoderConfig:
    cfg = gaussian_decoder_preset("tiny")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_presets():
    base = gaussian_decoder_preset("base")
    t = base.transformer
    assert (t.depth, t.width, t.heads, base.gaussians_per_voxel, base.window) == (12, 768, 12, 32, 8)
    assert GaussianDecoderConfig.from_dict(base.to_dict()) == base
    with pytest.raises(ValueError, match="unknown"):
        gaussian_decoder_preset("huge")


def test_shapes_bounds_and_initial_gaussians():
    torch.manual_seed(0)
    cfg = tiny()
    dec = GaussianDecoder(cfg, C)
    coords, cu = packed(block_coords((0, 0, 0), (3, 2, 2)), block_coords((60, 61, 62), (64, 64, 64)))
    m, k = len(coords), cfg.gaussians_per_voxel
    z = torch.randn(m, C) * 10  # large latents: the bounds must hold anyway
    g = dec(z, coords, cu)
    assert g.means.shape == (m * k, 3) and g.quats.shape == (m * k, 4) and g.opacities.shape == (m * k,)
    assert g.cu_seqlens.tolist() == [0, 12 * k, m * k]
    assert g.sample_ids().tolist() == [0] * (12 * k) + [1] * (m - 12) * k
    voxel = 1 / cfg.resolution
    centres = ((coords[:, 1:] + 0.5) * voxel - 0.5).repeat_interleave(k, 0)  # voxel-major rows
    assert (g.means - centres).abs().max() <= cfg.max_offset * voxel + 1e-7
    lo, hi = cfg.scale_range
    assert g.scales.min() >= lo * voxel * (1 - 1e-5) and g.scales.max() <= hi * voxel * (1 + 1e-5)
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(m * k))
    assert 0 < g.opacities.min() and g.opacities.max() < 1 and 0 <= g.colors.min() and g.colors.max() <= 1

    # At initialisation: the configured Gaussians, spread over their voxel.
    g0 = dec(torch.randn(m, C), coords, cu)
    assert g0.opacities.mean().item() == pytest.approx(cfg.init_opacity, rel=0.05)
    assert (g0.scales / voxel).log().mean().exp().item() == pytest.approx(cfg.init_scale, rel=0.05)
    assert g0.colors.mean().item() == pytest.approx(0.5, abs=0.02)
    assert ((g0.means - centres).abs() / voxel).max() < 0.55  # inside (or at) the voxel
    spread = (g0.means[:k] - g0.means[:k].mean(0)).norm(dim=-1).mean() / voxel
    assert spread > 0.3  # the 32 slots are spread out, not stacked


def test_window_partition():
    coords, cu = packed(block_coords((0, 0, 0), (6, 5, 3)), block_coords((2, 2, 2), (7, 4, 5)))
    for shift in (0, 2):
        p = window_partition(coords, cu, window=4, shift=shift)
        assert torch.equal(coords[p.order][p.inverse], coords)
        sample = torch.repeat_interleave(torch.arange(2), (cu[1:] - cu[:-1]).long())[p.order]
        cell = (coords[p.order, 1:] + shift) // 4
        bounds = p.cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == len(coords)
        keys = set()
        for s, e in zip(bounds[:-1], bounds[1:]):
            assert e > s and (sample[s:e] == sample[s]).all() and (cell[s:e] == cell[s]).all()
            keys.add((int(sample[s]),) + tuple(cell[s].tolist()))
        assert len(keys) == len(bounds) - 1  # each window is one contiguous run
        assert p.max_seqlen == max(e - s for s, e in zip(bounds[:-1], bounds[1:]))


def influence(dec: GaussianDecoder, coords, cu, source: int) -> set[int]:
    """The tokens whose output may depend on token ``source``: grown block by block over its windows."""
    reach = {source}
    for part in dec.partitions(coords, cu):
        window_of = torch.empty(len(coords), dtype=torch.long)
        for w, (s, e) in enumerate(zip(part.cu_seqlens[:-1].tolist(), part.cu_seqlens[1:].tolist())):
            window_of[part.order[s:e]] = w
        hit = {int(window_of[i]) for i in reach}
        reach = {i for i in range(len(coords)) if int(window_of[i]) in hit}
    return reach


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "shifted"])
def test_windows_bound_what_a_token_can_affect(shift):
    torch.manual_seed(1)
    dec = GaussianDecoder(tiny(window=4, shift_windows=shift, head_init_std=0.02), C).eval()
    coords, cu = packed(block_coords((0, 0, 0), (12, 6, 2)))
    z = torch.randn(len(coords), C)
    source = int(((coords[:, 1:] == torch.tensor([5, 1, 0])).all(1)).nonzero())
    reach = influence(dec, coords, cu, source)
    assert 0 < len(reach) < len(coords)
    z2 = z.clone()
    z2[source] += 3.0
    k = dec.cfg.gaussians_per_voxel
    with torch.no_grad():
        a, b = dec(z, coords, cu).colors.view(-1, k, 3), dec(z2, coords, cu).colors.view(-1, k, 3)
    change = (a - b).abs().amax((1, 2))  # [M]
    outside = torch.tensor([i not in reach for i in range(len(coords))])
    assert change[outside].max() < 1e-7, "a token changed outside the windows that reach it"
    assert change[~outside].min() > 1e-5, "a token inside the reach did not change"
    # A shifted block lets information cross the window border at i = 4; a plain one does not.
    assert any(int(coords[i, 1]) < 4 for i in reach) == shift


@pytest.mark.parametrize("window", [0, 4])
def test_samples_do_not_affect_each_other(window):
    torch.manual_seed(2)
    dec = GaussianDecoder(tiny(window=window, head_init_std=0.02), C).eval()
    shared = block_coords((0, 0, 0), (4, 4, 2))  # both samples occupy the same voxels
    coords, cu = packed(shared, shared, block_coords((1, 1, 1), (3, 3, 3)))
    z = torch.randn(len(coords), C)
    z2 = z.clone()
    z2[: len(shared)] = torch.randn(len(shared), C)  # change all of sample 0
    with torch.no_grad():
        a, b = dec(z, coords, cu), dec(z2, coords, cu)
    rest = slice(len(shared) * dec.cfg.gaussians_per_voxel, None)
    torch.testing.assert_close(a.means[rest], b.means[rest], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.colors[rest], b.colors[rest], atol=1e-6, rtol=0)
    assert not torch.allclose(a.colors[:100], b.colors[:100])


def test_activation_checkpointing_changes_nothing():
    torch.manual_seed(3)
    coords, cu = packed(block_coords((0, 0, 0), (5, 3, 3)))
    z = torch.randn(len(coords), C)
    outs = []
    for ckpt in (False, True):
        torch.manual_seed(4)
        dec = GaussianDecoder(tiny(), C, checkpoint=ckpt)
        g = dec(z, coords, cu)
        (g.means.sum() + g.colors.square().sum()).backward()
        outs.append((g.means.detach(), dec.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1])


def test_bad_input_is_named():
    dec = GaussianDecoder(tiny(), C)
    coords, cu = packed(block_coords((0, 0, 0), (2, 2, 2)))
    z = torch.randn(len(coords), C)
    with pytest.raises(ValueError, match="0 <= i, j, k < 64"):
        dec(z, coords + torch.tensor([0, 63, 0, 0]), cu)
    bad_t = coords.clone()
    bad_t[0, 0] = 1
    with pytest.raises(ValueError, match=r"\(0, i, j, k\)"):
        dec(z, bad_t, cu)
    with pytest.raises(ValueError, match="z must be"):
        dec(torch.randn(len(coords), C + 1), coords, cu)


def orbit_cameras(n: int, radius: float = 1.2, size: int = 32) -> dict:
    """n cameras on a circle around the origin, looking at it (OpenCV world-to-camera)."""
    a = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
    eyes = torch.stack([radius * a.cos(), torch.full_like(a, 0.3), radius * a.sin()], -1)
    f = size * 2.0  # a ~28 degree field of view
    k = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    return {"viewmats": torch.from_numpy(look_at(eyes.numpy(), up=(0.0, -1.0, 0.0))), "Ks": k.expand(n, 3, 3).clone()}


def test_decoder_render_l1_fits_a_small_target():
    # Target: an 8x8x8-voxel block whose 4 quadrants have their own colour, rendered by the torch
    # rasterizer from 3 views; the decoder (and the latents) must fit it, the L1 falling.
    torch.manual_seed(5)
    coords, cu = packed(block_coords((28, 28, 28), (36, 36, 36)))
    quadrant = ((coords[:, 1] >= 32).long() * 2 + (coords[:, 3] >= 32).long())
    palette = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9], [0.9, 0.9, 0.1]])
    centres = (coords[:, 1:] + 0.5) / 64 - 0.5
    n = len(coords)
    target_g = Gaussians(centres.float(), torch.full((n, 3), 0.6 / 64), torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
                         torch.full((n,), 0.9), palette[quadrant])
    cams = orbit_cameras(3)
    from atoken.model.splatting import render
    with torch.no_grad():
        views, _ = render(target_g, cams["viewmats"], cams["Ks"], 32, 32, backend="torch")
    dec = GaussianDecoder(tiny(gaussians_per_voxel=4), C)
    z = torch.randn(len(coords), C, requires_grad=True)
    opt = torch.optim.Adam([*dec.parameters(), z], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = gaussian_view_loss(dec(z, coords, cu), views, cams, backend="torch")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print('L1 over the steps:', ' '.join(f'{x:.4f}' for x in losses))
    assert losses[-1] < 0.6 * losses[0], losses


def test_ply_round_trip_in_the_standard_layout(tmp_path):
    torch.manual_seed(6)
    dec = GaussianDecoder(tiny(), C)
    coords, cu = packed(block_coords((10, 20, 30), (12, 22, 31)))
    with torch.no_grad():
        g = dec(torch.randn(len(coords), C) * 3, coords, cu)
    path = tmp_path / "asset.ply"
    save_ply(g, path)

    ply = PlyData.read(str(path))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(v[n].dtype == np.float32 for n in names) and len(v[names[0]]) == g.num_gaussians
    # The stored encodings, checked from the file with plyfile alone.
    col = lambda *ns: torch.from_numpy(np.stack([np.asarray(v[n]) for n in ns], -1))  # noqa: E731
    torch.testing.assert_close(col("x", "y", "z"), g.means)
    torch.testing.assert_close(col("f_dc_0", "f_dc_1", "f_dc_2"), (g.colors - 0.5) / SH_C0)
    torch.testing.assert_close(torch.sigmoid(col("opacity")[:, 0]), g.opacities)
    torch.testing.assert_close(col("scale_0", "scale_1", "scale_2").exp(), g.scales)
    torch.testing.assert_close(col("rot_0", "rot_1", "rot_2", "rot_3"), g.quats)  # w first

    back = load_ply(path)
    for f in ("means", "scales", "quats", "opacities", "colors"):
        torch.testing.assert_close(getattr(back, f), getattr(g, f), atol=1e-6, rtol=1e-5, msg=f)

    save_ply(g, tmp_path / "sh3.ply", sh_degree=3)  # loaders that expect 45 f_rest_* values
    props = PlyData.read(str(tmp_path / "sh3.ply"))["vertex"].properties
    rest = [p.name for p in props if p.name.startswith("f_rest_")]
    assert len(rest) == 45
    torch.testing.assert_close(load_ply(tmp_path / "sh3.ply").colors, g.colors, atol=1e-6, rtol=1e-5)


def test_load_ply_names_a_foreign_file(tmp_path):
    from plyfile import PlyElement
    data = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    path = tmp_path / "points.ply"
    PlyData([PlyElement.describe(data, "vertex")]).write(str(path))
    with pytest.raises(ValueError, match=r"points\.ply.*missing vertex properties"):
        load_ply(path)
