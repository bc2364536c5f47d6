"""The Gaussian renderer: the torch rasterizer against hand-derived EWA images, compositing rules,
gradients, and (on a GPU with gsplat) against gsplat itself."""
import math

import pytest
import torch

from atoken.model.gaussians import Gaussians
from atoken.model.splatting import covariances, gaussian_view_loss, get_render_backend, project, render, render_torch

W, H, F, CX, CY = 64, 48, 200.0, 32.0, 24.0  # image and pinhole intrinsics used by most tests
BG = torch.tensor([0.2, 0.3, 0.4])
# The release's rasterizer's conventions (gsplat's "antialiased" mode), written out here so the tests
# do not take them from the code under test: a 0.1 px^2 2D filter with opacity compensation.
FILTER_2D, ALPHA_MIN = 0.1, 1.0 / 255.0


def camera(v: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity world-to-camera (world = camera frame) and K, V times."""
    k = torch.tensor([[F, 0.0, CX], [0.0, F, CY], [0.0, 0.0, 1.0]])
    return torch.eye(4).expand(v, 4, 4).clone(), k.expand(v, 3, 3).clone()


def gaussians(means, scales, opacities, colors, quats=None) -> Gaussians:
    means = torch.as_tensor(means, dtype=torch.float32).reshape(-1, 3)
    n = means.shape[0]
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(n, 4) if quats is None else torch.as_tensor(quats).reshape(n, 4)
    return Gaussians(means, torch.as_tensor(scales, dtype=torch.float32).reshape(n, 3), quats.float(),
                     torch.as_tensor(opacities, dtype=torch.float32).reshape(n),
                     torch.as_tensor(colors, dtype=torch.float32).reshape(n, 3))


def filtered(cov2d, opacity) -> tuple[torch.Tensor, float]:
    """The 2D filter: (cov2d + 0.1 I, opacity * sqrt(det cov2d / det(cov2d + 0.1 I)))."""
    cov = torch.as_tensor(cov2d, dtype=torch.float64)
    blurred = cov + FILTER_2D * torch.eye(2, dtype=torch.float64)
    return blurred, opacity * math.sqrt(float(torch.linalg.det(cov) / torch.linalg.det(blurred)))


def analytic_alpha(centre, cov2d, opacity) -> torch.Tensor:
    """[H, W] alpha of one splat (cov2d before the 2D filter) by the rule: o' exp(-d^T cov'^-1 d / 2)
    at pixel centres with the filtered (cov', o'), 0 below 1/255."""
    cov2d, opacity = filtered(cov2d, opacity)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                            indexing="ij")
    d = torch.stack([xs - centre[0], ys - centre[1]], -1)  # [H, W, 2]
    q = torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(torch.as_tensor(cov2d, dtype=torch.float64)), d)
    a = (opacity * torch.exp(-0.5 * q)).clamp(max=0.999)
    return torch.where(a >= ALPHA_MIN, a, torch.zeros_like(a)).float()


@pytest.mark.parametrize("pos", [(0.0, 0.0, 2.0), (0.1, -0.05, 2.0)], ids=["on_axis", "off_axis"])
def test_isotropic_gaussian_is_the_hand_derived_ewa_splat(pos):
    # A colour below 0 (an SH DC term C0 * dc + 0.5 < 0) renders as 0, as the 3DGS rasterizer clamps it.
    sigma, opacity, color = 0.02, 0.8, torch.tensor([1.0, 0.5, -0.3])
    X, Y, d = pos
    # By hand: the mean projects to f X / d + c; J = [[f/d, 0, -f X/d^2], [0, f/d, -f Y/d^2]] and
    # J (sigma^2 I) J^T = (sigma f / d)^2 [[1 + X^2/d^2, XY/d^2], [XY/d^2, 1 + Y^2/d^2]], then the filter.
    centre = (F * X / d + CX, F * Y / d + CY)
    k = (sigma * F / d) ** 2
    cov2d = [[k * (1 + X * X / d / d), k * X * Y / d / d], [k * X * Y / d / d, k * (1 + Y * Y / d / d)]]
    g = gaussians(pos, [sigma] * 3, opacity, color)
    img, alpha = render(g, *camera(), W, H, background=BG, backend="torch")
    want = analytic_alpha(centre, cov2d, opacity)
    torch.testing.assert_close(alpha[0, 0], want, atol=2e-6, rtol=0)
    shown = color.clamp(min=0)
    torch.testing.assert_close(img[0], want * shown[:, None, None] + (1 - want) * BG[:, None, None], atol=2e-6, rtol=0)
    opacity = filtered(cov2d, opacity)[1]  # what the splat peaks at

    # Moments of the alpha image: centre, and the covariance of a Gaussian truncated where alpha < 1/255.
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    a = alpha[0, 0].double()
    mx, my = (a * xs).sum() / a.sum(), (a * ys).sum() / a.sum()
    assert abs(mx - centre[0]) < 0.02 and abs(my - centre[1]) < 0.02, (mx, my, centre)
    if X == 0 and Y == 0:  # isotropic on screen: r^2 / s^2 ~ Exp(1/2) truncated at c = 2 ln(255 o)
        s2, c = k + FILTER_2D, 2 * math.log(255 * opacity)
        var = s2 * (1 - (c / 2 + 1) * math.exp(-c / 2)) / (1 - math.exp(-c / 2))
        vx, vy = (a * (xs - mx) ** 2).sum() / a.sum(), (a * (ys - my) ** 2).sum() / a.sum()
        cxy = (a * (xs - mx) * (ys - my)).sum() / a.sum()
        assert vx == pytest.approx(var, rel=0.02) and vy == pytest.approx(var, rel=0.02), (vx, vy, var)
        assert abs(cxy) < 1e-3 * var
        # The mean sits on a pixel corner: the 4 nearest centres are (0.5, 0.5) px away.
        assert float(a.max()) == pytest.approx(opacity * math.exp(-0.5 * 0.5 / s2), abs=1e-6)


def test_rotated_anisotropic_gaussian_follows_the_wxyz_quaternion():
    # Long axis 0.04 along local x, rotated 30 degrees about the camera's z (w, x, y, z = cos, 0, 0, sin
    # of 15 degrees): on screen the long axis points along (cos 30, sin 30) in (x right, y down).
    theta, a, b, d = math.radians(30), 0.04, 0.01, 2.0
    q = [math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)]
    g = gaussians([0.0, 0.0, d], [a, b, b], 0.9, [1.0, 1.0, 1.0], quats=q)
    _, alpha = render(g, *camera(), W, H, backend="torch")
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    axes = torch.diag(torch.tensor([a * a, b * b], dtype=torch.float64))
    cov2d = (F / d) ** 2 * rot @ axes @ rot.T
    torch.testing.assert_close(alpha[0, 0], analytic_alpha((CX, CY), cov2d, 0.9), atol=2e-6, rtol=0)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0)) -> torch.Tensor:
    """OpenCV world-to-camera: rows of R are the camera's right, down, forward axes in world coordinates."""
    eye, target, up = (torch.tensor(v, dtype=torch.float32) for v in (eye, target, up))
    fwd = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(fwd, up)
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    m = torch.eye(4)
    m[:3, :3] = torch.stack([right, down, fwd])
    m[:3, 3] = -m[:3, :3] @ eye
    return m


def test_viewmat_is_world_to_camera():
    vm = look_at((1.0, 0.5, 2.0))
    right = vm[0, :3]
    dist = math.sqrt(1 + 0.25 + 4)
    # A Gaussian at the target lands on the principal point, one 0.1 along the camera's right axis
    # F * 0.1 / dist pixels to the right of it.
    for pos, want in [((0.0, 0.0, 0.0), (CX, CY)), (tuple((0.1 * right).tolist()), (CX + F * 0.1 / dist, CY))]:
        _, alpha = render(gaussians(pos, [0.01] * 3, 0.9, [1, 1, 1]), vm[None], camera()[1], W, H, backend="torch")
        ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        a = alpha[0, 0]
        got = float((a * xs).sum() / a.sum()), float((a * ys).sum() / a.sum())
        assert got == pytest.approx(want, abs=0.02), (pos, got, want)


@pytest.mark.parametrize("red_depth,blue_depth", [(2.0, 3.0), (3.0, 2.0)])
def test_front_gaussian_occludes_the_back_one(red_depth, blue_depth):
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    # Both centred on pixel (24, 32)'s centre, where each one's alpha is exactly its opacity 0.8 times
    # its filter compensation (which depends on its size on screen, so on its depth).
    ray = torch.tensor([(32.5 - CX) / F, (24.5 - CY) / F, 1.0])
    X, Y = float(ray[0]), float(ray[1])

    def shown(d):  # the splat's opacity after the filter; cov2d as in the isotropic test
        k = (0.02 * F / d) ** 2
        return filtered([[k * (1 + X * X), k * X * Y], [k * X * Y, k * (1 + Y * Y)]], 0.8)[1]
    g = gaussians(torch.stack([ray * red_depth, ray * blue_depth]), [[0.02] * 3] * 2, [0.8, 0.8],
                  torch.stack([red, blue]))
    img, alpha = render(g, *camera(), W, H, background=BG, backend="torch")
    front, back = (red, blue) if red_depth < blue_depth else (blue, red)
    of, ob = shown(min(red_depth, blue_depth)), shown(max(red_depth, blue_depth))
    assert 0.7 < ob < of < 0.8
    want = of * front + (1 - of) * ob * back + (1 - of) * (1 - ob) * BG
    torch.testing.assert_close(img[0, :, 24, 32], want, atol=1e-6, rtol=0)
    assert float(alpha[0, 0, 24, 32]) == pytest.approx(1 - (1 - of) * (1 - ob), abs=1e-6)
    # The order of the Gaussians in the list does not matter, only their depth.
    flipped = Gaussians(g.means.flip(0), g.scales, g.quats, g.opacities, g.colors.flip(0))
    torch.testing.assert_close(render(flipped, *camera(), W, H, background=BG, backend="torch")[0], img)


def test_compositing_stops_before_transmittance_reaches_1e_4():
    # gsplat's rule: alpha clamps at 0.999, so after the first opaque Gaussian T = 1e-3; the second
    # would take T to 1e-6 <= 1e-4, so it and everything behind it are left out.
    ray = torch.tensor([(32.5 - CX) / F, (24.5 - CY) / F, 1.0])
    cols = torch.eye(3)
    # (Large on screen, so the filter's compensation leaves the opacity above 0.999.)
    g = gaussians(torch.stack([ray * 2, ray * 3, ray * 4]), [[0.5] * 3] * 3, [1.0] * 3, cols)
    img, alpha = render(g, *camera(), W, H, background=BG, backend="torch")
    torch.testing.assert_close(img[0, :, 24, 32], 0.999 * cols[0] + 0.001 * BG, atol=1e-6, rtol=0)
    assert float(alpha[0, 0, 24, 32]) == pytest.approx(0.999, abs=1e-6)


def test_culled_gaussians_contribute_nothing():
    keep = gaussians([0.0, 0.0, 2.0], [0.02] * 3, 0.8, [1, 0, 0])
    base = render(keep, *camera(), W, H, background=BG, backend="torch")[0]
    extra = gaussians([[0.0, 0.0, 0.005], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]], [[0.05] * 3] * 3,
                      [0.9, 0.9, 0.5 / 255], [[0, 1, 0]] * 3)  # inside the near plane, behind, too faint
    both = Gaussians(*(torch.cat([getattr(keep, f), getattr(extra, f)])
                       for f in ("means", "scales", "quats", "opacities", "colors")))
    torch.testing.assert_close(render(both, *camera(), W, H, background=BG, backend="torch")[0], base)


def random_scene(n: int, seed: int, dtype=torch.float32) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731 - a one-line local helper
    means = torch.cat([(r(n, 2) - 0.5) * 0.6, 1.5 + r(n, 1)], -1)
    return Gaussians(means, 0.01 + 0.05 * r(n, 3), torch.randn(n, 4, generator=g, dtype=dtype),
                     0.3 + 0.69 * r(n), r(n, 3))


def test_chunked_compositing_matches_one_pass():
    # A budget this small splits each tile's Gaussians into many passes (T and the stop carried
    # between them) and the tiles into many groups; neither that nor the tile size may change the image.
    g = random_scene(300, seed=0)
    vm, k = camera(2)
    vm[1, :3, 3] = torch.tensor([0.05, -0.02, 0.3])
    one = render_torch(g, vm, k, W, H, BG, tile=16, budget=1 << 26)
    many = render_torch(g, vm, k, W, H, BG, tile=8, budget=8 * 8 * 7)
    torch.testing.assert_close(many, one, atol=1e-6, rtol=0)
    assert float(one[1].min()) < 0.5  # the scene covers pixels, so the check is not vacuous



def test_gradients_reach_every_parameter():
    g = random_scene(40, seed=1)
    params = [g.means, g.scales, g.quats, g.opacities, g.colors]
    for p in params:
        p.requires_grad_(True)
    target = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    vm, k = camera(2)
    vm[1, :3, 3] = torch.tensor([0.05, 0.0, 0.2])
    loss = gaussian_view_loss(g, target, {"viewmats": vm, "Ks": k}, background=BG, backend="torch")
    loss.backward()
    for name, p in zip(("means", "scales", "quats", "opacities", "colors"), params, strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.abs().sum(-1) if p.ndim > 1 else p.grad.abs()).gt(0).float().mean() > 0.5, name


def test_finite_differences_match_autograd():
    g0 = random_scene(3, seed=3, dtype=torch.float64)
    vm, k = camera(1)
    vm, k = vm.double(), k.double()
    k[0, :2] *= 0.25  # 16 x 12 pixels of the same field of view
    weights = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def f(means, scales, quats, opacities, colors):
        img, alpha = render_torch(Gaussians(means, scales, quats, opacities, colors), vm, k, 16, 12,
                                  BG.double())
        return (img * weights).sum() + alpha.sum()

    inputs = [t.clone().requires_grad_(True) for t in (g0.means, g0.scales, g0.quats, g0.opacities, g0.colors)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_view_loss_is_the_mean_absolute_error():
    g = random_scene(30, seed=5)
    vm, k = camera(1)
    img, _ = render(g, vm, k, W, H, background=BG, backend="torch")
    cams = {"viewmats": vm, "Ks": k}
    assert float(gaussian_view_loss(g, img, cams, background=BG, backend="torch")) == pytest.approx(0.0, abs=1e-7)
    shifted = gaussian_view_loss(g, img + 0.25, cams, background=BG, backend="torch")
    assert float(shifted) == pytest.approx(0.25, abs=1e-5)
    two = Gaussians(g.means, g.scales, g.quats, g.opacities, g.colors, torch.tensor([0, 10, 30], dtype=torch.int32))
    with pytest.raises(ValueError, match="one sample"):
        gaussian_view_loss(two, img, cams)


def test_backend_choice_on_cpu_is_the_torch_fallback():
    name, reason = get_render_backend(torch.zeros(1))
    assert name == "torch" and "fallback" in reason
    with pytest.raises(ValueError, match="gsplat"):
        get_render_backend(torch.zeros(1), "gsplat")


def test_projection_matches_gsplats_reference_implementation():
    # gsplat ships a pure-PyTorch reference of its projection (a private module, CPU-runnable). In
    # fp64 ours must be the same math; its culling is looser (a fixed 3.33-sigma box, where its CUDA
    # kernel and we use the opacity-aware one), so compare where we keep a Gaussian.
    pytest.importorskip("gsplat")
    from gsplat.cuda._torch_impl import _fully_fused_projection  # noqa: PLC0415 - gsplat, an optional GPU rasterizer

    g = random_scene(500, seed=7, dtype=torch.float64)
    g.means[:50, 2] -= 1.6  # some behind the near plane and far outside the field of view
    vm, k = camera(2)
    vm[1, :3, 3] = torch.tensor([0.2, -0.1, 0.4])
    vm, k = vm.double(), k.double()
    ours = project(g, vm, k, W, H)
    radii, means2d, depths, conics, comp = _fully_fused_projection(g.means, covariances(g.quats, g.scales), vm, k, W, H,
                                                                   eps2d=0.1, calc_compensations=True)
    assert bool((ours.visible <= (radii > 0).all(-1)).all())
    keep = ours.visible
    torch.testing.assert_close(ours.means2d[keep], means2d[keep], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ours.conics[keep], conics[keep], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ours.depths[keep], depths[keep], atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.opacities[keep], (g.opacities[None] * comp)[keep], atol=1e-9, rtol=1e-9)


@pytest.mark.gpu
def test_gsplat_and_torch_backends_agree():
    pytest.importorskip("gsplat")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = random_scene(2000, seed=6).to("cuda")
    vm, k = camera(3)
    vm[1, :3, 3] = torch.tensor([0.1, 0.0, 0.3])
    vm[2, :3, :3] = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    vm[2, :3, 3] = torch.tensor([0.0, 0.0, 2.0])
    vm, k = vm.cuda(), k.cuda()
    bg = BG.cuda()
    ref_img, ref_alpha = render(g, vm, k, W, H, background=bg, backend="gsplat")
    img, alpha = render(g, vm, k, W, H, background=bg, backend="torch")
    diff = (img - ref_img).abs()
    print(f"gsplat vs torch: image max {diff.max():.2e} mean {diff.mean():.2e}; "
          f"alpha max {(alpha - ref_alpha).abs().max():.2e}")
    # gsplat's kernels use fast-math exp, so a pixel can sit on the other side of the 1/255 cut.
    assert float(diff.mean()) < 1e-4 and float(diff.max()) < 2e-2
