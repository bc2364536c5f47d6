"""The Gaussian decoder (the release's formulas, windows, samples, fitting) and the 3DGS .ply files."""
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from plyfile import PlyData, PlyElement

from atoken.data_pipeline.render import look_at
from atoken.model.config import from_dict
from atoken.model.gaussians import (
    SH_C0,
    GaussianDecoder,
    GaussianDecoderConfig,
    Gaussians,
    gaussian_decoder_preset,
    window_partition,
)
from atoken.model.ply import load_ply, save_ply
from atoken.model.splatting import gaussian_view_loss, render
from atoken.training.parallelize import apply_activation_checkpointing

P = 768  # pixel-decoder values the Gaussian decoder reads


def block_coords(lo, hi) -> torch.Tensor:
    """[n, 4] coords (0, x, y, z) of every voxel with lo <= x, y, z < hi (per axis)."""
    axes = [torch.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    xyz = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)


def packed(*coords) -> tuple[torch.Tensor, torch.Tensor]:
    cu = torch.zeros(len(coords) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(c) for c in coords]), 0)
    return torch.cat(coords), cu


def tiny(**kw) -> GaussianDecoderConfig:
    return dataclasses.replace(gaussian_decoder_preset("tiny"), **kw)


def randomise(dec: GaussianDecoder, seed: int) -> GaussianDecoder:
    """Random non-trivial weights: norm gains around 1, the head (zero at init) random too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * r if "norm" in name else 0.05 * r if name.endswith("bias")
                    else r / math.sqrt(p.shape[-1]))
    return dec


def test_presets_are_the_released_config():
    base = gaussian_decoder_preset("base")  # configs/3d_decode_gs.yaml
    t = base.transformer
    assert (t.depth, t.width, t.heads, t.mlp_width, t.norm, t.qk_norm, t.bias) == (12, 768, 12, 3072, "rmsnorm",
                                                                                 False, False)
    assert (base.in_channels, base.gaussians_per_voxel, base.resolution, base.window, base.attn_softcap) == (
        768, 32, 64, 8, 30.0)
    assert (base.voxel_size, base.scaling_bias, base.opacity_bias, base.filter_3d) == (1.5, 4e-3, 0.1, 9e-4)
    assert base.lr == {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1}
    dec = GaussianDecoder(base)
    assert dec.head.out_features == 448 and dec.head.bias is not None and dec.up.bias is None
    assert from_dict(GaussianDecoderConfig, base.to_dict()) == base
    with pytest.raises(ValueError, match="unknown"):
        gaussian_decoder_preset("huge")
    with pytest.raises(ValueError, match="lr must give"):
        tiny(lr={"_xyz": 1.0})
    with pytest.raises(ValueError, match=r"does not know: \['max_offset'\]"):  # atoken's decoder before this one
        from_dict(GaussianDecoderConfig, {**base.to_dict(), "max_offset": 0.75})


def reference(dec: GaussianDecoder, pixels: torch.Tensor, coords: torch.Tensor) -> dict[str, torch.Tensor]:
    """One sample's Gaussians re-computed from the formulas (the release's decoder, written out), fp64."""
    cfg, w = dec.cfg, {k: v.double() for k, v in dec.state_dict().items()}
    tc, k = cfg.transformer, cfg.gaussians_per_voxel
    m, d = len(coords), tc.head_dim
    xyz = coords[:, 1:].double()
    f = tc.width // 6
    freqs = 10000.0 ** (-torch.arange(f, dtype=torch.float64) / f)
    pe = torch.cat([torch.cat([torch.sin(xyz[:, a, None] * freqs), torch.cos(xyz[:, a, None] * freqs)], 1)
                    for a in range(3)], 1)
    x = pixels[:, :P].double() @ w["up.weight"].T + F.pad(pe, (0, tc.width - 6 * f))

    def rms(v, g):
        return v / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-6) * g

    for i in range(tc.depth):
        b = f"blocks.{i}."
        cell = torch.div(coords[:, 1:] + (cfg.window // 2 if i % 2 else 0), cfg.window, rounding_mode="floor")
        same = (cell[:, None] == cell[None]).all(-1)  # [M, M] same window
        qkv = (rms(x, w[b + "norm1.weight"]) @ w[b + "attn.qkv.weight"].T).view(m, tc.heads, 3, d)  # ours: [H, 3, D]
        q, kk, v = qkv.unbind(2)
        s = torch.einsum("nhd,mhd->hnm", q, kk) / math.sqrt(d)
        s = 30.0 * torch.tanh(s / 30.0)
        a = s.masked_fill(~same, float("-inf")).softmax(-1)
        x = x + torch.einsum("hnm,mhd->nhd", a, v).reshape(m, -1) @ w[b + "attn.proj.weight"].T
        h = rms(x, w[b + "norm2.weight"]) @ w[b + "mlp.fc1.weight"].T
        x = x + F.gelu(h, approximate="tanh") @ w[b + "mlp.fc2.weight"].T
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    raw = x @ w["head.weight"].T + w["head.bias"]  # [M, 14 K]: xyz 3K | dc 3K | scaling 3K | rotation 4K | opacity K
    xyz_r, dc, sc, rot, op = raw.split([3 * k, 3 * k, 3 * k, 4 * k, k], 1)
    # The Hammersley set of K = 4 points: (n / 4, base-2 and base-3 radical inverses of n).
    ham = torch.tensor([[0, 0, 0], [0.25, 0.5, 1 / 3], [0.5, 0.25, 2 / 3], [0.75, 0.75, 1 / 9]], dtype=torch.float64)
    pert = torch.atanh((2 * ham - 1) / 1.5)
    means = ((xyz + 0.5) / 64)[:, None] + torch.tanh(xyz_r.view(m, k, 3) + pert) / 64 * 0.5 * 1.5 - 0.5
    sbias = math.log(math.expm1(4e-3))  # softplus^-1(4e-3)
    scales = torch.sqrt(F.softplus(sc.view(m, k, 3) + sbias).square() + 9e-4 ** 2)
    quats = rot.view(m, k, 4) * 0.1 + torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    opacities = torch.sigmoid(op.view(m, k) + math.log(0.1 / 0.9))
    return {"means": means.reshape(-1, 3), "scales": scales.reshape(-1, 3), "quats": quats.reshape(-1, 4),
            "opacities": opacities.reshape(-1), "colors": (SH_C0 * dc.view(m, k, 3) + 0.5).reshape(-1, 3)}


def test_gaussians_follow_the_release_formulas():
    # Random non-trivial weights, two samples, a scattered set of voxels across several windows: every
    # Gaussian parameter agrees with the formulas (module docstring) written out above, per sample.
    torch.manual_seed(0)
    dec = randomise(GaussianDecoder(tiny(gaussians_per_voxel=4)), seed=1).eval()
    a = block_coords((0, 0, 0), (64, 64, 64))[torch.randperm(64 ** 3)[:150]]
    b = block_coords((10, 20, 30), (14, 25, 33))
    coords, cu = packed(a, b)
    pixels = torch.rand(len(coords), 3072) * 2 - 1
    with torch.no_grad():
        g = dec(pixels, coords, cu)
    assert g.cu_seqlens.tolist() == [0, 4 * len(a), 4 * len(coords)]
    for i, (s, e) in enumerate(((0, len(a)), (len(a), len(coords)))):
        want = reference(dec, pixels[s:e], coords[s:e])
        got = g.sample(i)
        for name, t in want.items():
            torch.testing.assert_close(getattr(got, name).double(), t, atol=2e-5, rtol=1e-5, msg=name)
    assert float(g.opacities.std()) > 0.05 and float(g.scales.std()) > 1e-3  # the weights are non-trivial


def test_initial_gaussians_are_the_configured_ones():
    # The head starts at zero (as released): every Gaussian is the yaml's initial one.
    cfg = tiny()
    dec = GaussianDecoder(cfg)
    coords, cu = packed(block_coords((3, 4, 5), (5, 6, 7)))
    with torch.no_grad():
        g = dec(torch.randn(len(coords), 3072), coords, cu)
    k = cfg.gaussians_per_voxel
    torch.testing.assert_close(g.opacities, torch.full_like(g.opacities, 0.1))
    torch.testing.assert_close(g.scales, torch.full_like(g.scales, math.hypot(4e-3, 9e-4)))
    torch.testing.assert_close(g.colors, torch.full_like(g.colors, 0.5))
    torch.testing.assert_close(g.quats, torch.tensor([[1.0, 0, 0, 0]]).expand_as(g.quats))
    centres = ((coords[:, 1:] + 0.5) / 64 - 0.5).repeat_interleave(k, 0)
    off = (g.means - centres) * 64  # voxels
    assert off.abs().max() < 0.75 and off[:k].std(0).min() > 0.25  # inside 0.5 * voxel_size, spread out


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
        for s, e in itertools.pairwise(bounds):
            assert e > s and (sample[s:e] == sample[s]).all() and (cell[s:e] == cell[s]).all()
            keys.add((int(sample[s]), *tuple(cell[s].tolist())))
        assert len(keys) == len(bounds) - 1  # each window is one contiguous run
        assert p.max_seqlen == max(e - s for s, e in itertools.pairwise(bounds))


def influence(dec: GaussianDecoder, coords, cu, source: int, depth: int) -> set[int]:
    """The tokens whose output may depend on token ``source`` after ``depth`` blocks."""
    reach = {source}
    for part in dec.partitions(coords, cu)[:depth]:
        window_of = torch.empty(len(coords), dtype=torch.long)
        for w, (s, e) in enumerate(zip(part.cu_seqlens[:-1].tolist(), part.cu_seqlens[1:].tolist(), strict=True)):
            window_of[part.order[s:e]] = w
        hit = {int(window_of[i]) for i in reach}
        reach = {i for i in range(len(coords)) if int(window_of[i]) in hit}
    return reach


@pytest.mark.parametrize("depth", [1, 2], ids=["plain", "plain+shifted"])
def test_windows_bound_what_a_token_can_affect(depth):
    torch.manual_seed(1)
    dec = randomise(GaussianDecoder(tiny(window=4, transformer=dataclasses.replace(tiny().transformer, depth=depth))),
                    seed=2).eval()
    coords, cu = packed(block_coords((0, 0, 0), (12, 6, 2)))
    x = torch.randn(len(coords), P)
    source = int(((coords[:, 1:] == torch.tensor([5, 1, 0])).all(1)).nonzero())
    reach = influence(dec, coords, cu, source, depth)
    assert 0 < len(reach) < len(coords)
    x2 = x.clone()
    x2[source] += 3.0
    k = dec.cfg.gaussians_per_voxel
    with torch.no_grad():
        a, b = dec(x, coords, cu).colors.view(-1, k, 3), dec(x2, coords, cu).colors.view(-1, k, 3)
    change = (a - b).abs().amax((1, 2))  # [M]
    outside = torch.tensor([i not in reach for i in range(len(coords))])
    assert change[outside].max() < 1e-7, "a token changed outside the windows that reach it"
    assert change[~outside].min() > 1e-5, "a token inside the reach did not change"
    # The odd (shifted) block lets information cross the window border at x = 4; the first does not.
    assert any(int(coords[i, 1]) < 4 for i in reach) == (depth == 2)


def test_samples_do_not_affect_each_other():
    torch.manual_seed(2)
    dec = randomise(GaussianDecoder(tiny(window=4)), seed=3).eval()
    shared = block_coords((0, 0, 0), (4, 4, 2))  # both samples occupy the same voxels
    coords, cu = packed(shared, shared, block_coords((1, 1, 1), (3, 3, 3)))
    x = torch.randn(len(coords), P)
    x2 = x.clone()
    x2[: len(shared)] = torch.randn(len(shared), P)  # change all of sample 0
    with torch.no_grad():
        a, b = dec(x, coords, cu), dec(x2, coords, cu)
    rest = slice(len(shared) * dec.cfg.gaussians_per_voxel, None)
    torch.testing.assert_close(a.means[rest], b.means[rest], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.colors[rest], b.colors[rest], atol=1e-6, rtol=0)
    assert not torch.allclose(a.colors[:100], b.colors[:100])


def test_activation_checkpointing_changes_nothing():
    torch.manual_seed(3)
    coords, cu = packed(block_coords((0, 0, 0), (5, 3, 3)))
    x = torch.randn(len(coords), P)
    outs = []
    for ckpt in (False, True):
        dec = randomise(GaussianDecoder(tiny()), seed=4)
        if ckpt:
            apply_activation_checkpointing(dec)  # as training/parallelize.py applies it
        g = dec(x, coords, cu)
        (g.means.sum() + g.colors.square().sum()).backward()
        outs.append((g.means.detach(), dec.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1])


def test_bad_input_is_named():
    dec = GaussianDecoder(tiny())
    coords, cu = packed(block_coords((0, 0, 0), (2, 2, 2)))
    x = torch.randn(len(coords), P)
    with pytest.raises(ValueError, match="0 <= x, y, z < 64"):
        dec(x, coords + torch.tensor([0, 63, 0, 0]), cu)
    bad_t = coords.clone()
    bad_t[0, 0] = 1
    with pytest.raises(ValueError, match=r"\(0, x, y, z\)"):
        dec(x, bad_t, cu)
    with pytest.raises(ValueError, match="pixels must be"):
        dec(torch.randn(len(coords), P - 1), coords, cu)


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
    with torch.no_grad():
        views, _ = render(target_g, cams["viewmats"], cams["Ks"], 32, 32, backend="torch")
    dec = GaussianDecoder(tiny(gaussians_per_voxel=4))
    z = torch.randn(len(coords), P, requires_grad=True)  # stands where the pixel decoder's output goes
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
    dec = randomise(GaussianDecoder(tiny()), seed=6)
    coords, cu = packed(block_coords((10, 20, 30), (12, 22, 31)))
    with torch.no_grad():
        g = dec(torch.randn(len(coords), P), coords, cu)
    path = tmp_path / "asset.ply"
    save_ply(g, path)

    ply = PlyData.read(str(path))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(v[n].dtype == np.float32 for n in names) and len(v[names[0]]) == g.num_gaussians
    # The stored encodings, checked from the file with plyfile alone.
    col = lambda *ns: torch.from_numpy(np.stack([np.asarray(v[n]) for n in ns], -1))  # noqa: E731 - a one-line local helper
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
    data = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    path = tmp_path / "points.ply"
    PlyData([PlyElement.describe(data, "vertex")]).write(str(path))
    with pytest.raises(ValueError, match=r"points\.ply.*missing vertex properties"):
        load_ply(path)
