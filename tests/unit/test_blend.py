"""core.blend: feathering stays inside the selection; compositing and Poisson blending are exact outside it."""
from __future__ import annotations

import math

import pytest
import torch

from core.blend import color_match, composite, feather_mask, inside_distance, poisson_blend
from core.common import InvalidInput


def random_mask(seed: int, h: int = 40, w: int = 48, soft: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(1, 1, h, w)
    for _ in range(3):
        y0 = int(torch.randint(0, h - 8, (1,), generator=g))
        x0 = int(torch.randint(0, w - 8, (1,), generator=g))
        hh = int(torch.randint(4, h - y0 + 1, (1,), generator=g))
        ww = int(torch.randint(4, w - x0 + 1, (1,), generator=g))
        m[..., y0:y0 + hh, x0:x0 + ww] = 1
    if soft:
        m = m * torch.rand(m.shape, generator=g).clamp(min=0.05)
    return m


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("radius", [0.0, 1.5, 6.0])
def test_feather_never_leaves_selection(seed, radius):
    m = random_mask(seed, soft=seed % 2 == 1)
    a = feather_mask(m, radius)
    assert a.shape == m.shape
    assert torch.all(a[m == 0] == 0)
    assert torch.all(a <= m + 1e-7) and torch.all(a >= 0)
    assert a.max() > 0


def test_feather_ramps_inwards_and_reaches_one():
    m = torch.zeros(64, 64)
    m[16:48, 16:48] = 1
    a = feather_mask(m, 8.0)
    assert a.shape == (64, 64)
    assert a[32, 32] == 1.0  # deeper than the radius
    row = a[32, 16:32]
    assert torch.all(row[1:] >= row[:-1])  # monotone from the edge inwards
    assert 0 < row[0] < 0.1
    # the image border does not count as unselected
    full = feather_mask(torch.ones(20, 20), 5.0)
    assert torch.all(full == 1)


def test_thin_selection_still_reaches_full_strength():
    m = torch.zeros(32, 32)
    m[10:14, 4:28] = 1  # 4 px wide, far thinner than the radius
    a = feather_mask(m, 16.0)
    assert a.max() == 1.0


def test_inside_distance_matches_euclid_roughly():
    m = torch.ones(1, 1, 41, 41)
    m[..., 20, 20] = 0
    d = inside_distance(m, 15.0)
    assert d[0, 0, 20, 20] == 0
    assert d[0, 0, 20, 30] == pytest.approx(10.0)
    assert d[0, 0, 27, 27] == pytest.approx(7 * math.sqrt(2), rel=1e-5)
    assert d[0, 0, 20 + 8, 20 + 4] == pytest.approx(math.hypot(8, 4), rel=0.09)


@pytest.mark.parametrize("seed", range(4))
def test_composite_exact_outside_and_at_full_alpha(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(2, 3, 40, 48, generator=g) * 2 - 1
    over = torch.rand(2, 3, 40, 48, generator=g) * 2 - 1
    a = feather_mask(random_mask(seed), 4.0).expand(2, 1, 40, 48)
    out = composite(base, over, a)
    zero = (a == 0).expand_as(base)
    one = (a == 1).expand_as(base)
    assert torch.equal(out[zero], base[zero])
    assert torch.equal(out[one], over[one])
    mid = ((a > 0) & (a < 1)).expand_as(base)
    expect = (a * over + (1 - a) * base)[mid]
    assert torch.allclose(out[mid], expect)


def test_composite_rejects_mismatched_shapes():
    with pytest.raises(InvalidInput):
        composite(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9), torch.ones(8, 8))
    with pytest.raises(InvalidInput):
        composite(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.ones(7, 8))


def test_color_match_transfers_stats_and_applies_to_target():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 32, 32, generator=g)
    src = ref * 0.5 + 0.2  # a colour cast
    mask = torch.zeros(32, 32)
    mask[4:28, 4:28] = 1
    fixed = color_match(src, ref, mask)
    assert torch.allclose(fixed[..., 4:28, 4:28], ref[..., 4:28, 4:28], atol=1e-4)
    # the same correction applied to an edited render keeps the edit (a +0.3 shift in red)
    edited = src.clone()
    edited[:, 0] += 0.3
    out = color_match(src, ref, mask, target=edited)
    assert torch.allclose(out[:, 0] - fixed[:, 0], torch.full_like(out[:, 0], 0.6), atol=1e-4)  # gain 2
    with pytest.raises(InvalidInput):
        color_match(src, ref, torch.zeros(32, 32))


def _laplacian(x):
    return (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])


@pytest.mark.parametrize("seed", range(3))
def test_poisson_exact_outside_and_follows_overlay_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    H, W = 40, 48
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    base = torch.stack([0.3 * xx, 0.2 * yy, xx * yy]).unsqueeze(0) + 0.01 * torch.rand(1, 3, H, W, generator=g)
    detail = torch.sin(6 * xx) * torch.cos(5 * yy)
    overlay = 0.8 + 0.3 * detail.expand(1, 3, H, W)  # offset colour + texture
    m = random_mask(seed + 10, H, W)
    m[..., 0, :] = 0  # keep a Dirichlet boundary
    out = poisson_blend(base, overlay, m)
    outside = (m == 0).expand_as(base)
    assert torch.equal(out[outside], base[outside])
    inside = (m > 0).expand_as(base)
    # the colour offset is gone: the result sits near base levels, not overlay levels
    assert (out[inside] - base[inside]).abs().mean() < (overlay[inside] - base[inside]).abs().mean() * 0.5
    # the discrete Poisson equation holds at interior pixels whose neighbours are all inside Ω
    interior = (m[..., 1:-1, 1:-1] > 0) & (m[..., :-2, 1:-1] > 0) & (m[..., 2:, 1:-1] > 0) \
        & (m[..., 1:-1, :-2] > 0) & (m[..., 1:-1, 2:] > 0)
    interior = interior.expand(1, 3, H - 2, W - 2)
    assert torch.allclose(_laplacian(out)[interior], _laplacian(overlay)[interior], atol=1e-4)


def test_poisson_seamless_at_boundary():
    H = W = 48
    base = torch.zeros(1, 3, H, W)
    overlay = torch.ones(1, 3, H, W) * 0.7  # flat, shifted colour: Poisson result must equal base
    m = torch.zeros(H, W)
    m[10:30, 12:40] = 1
    out = poisson_blend(base, overlay, m)
    assert torch.allclose(out, base, atol=1e-5)
    # with everything selected there is no boundary: overlay comes back unchanged
    assert torch.equal(poisson_blend(base, overlay, torch.ones(H, W)), overlay)
    assert torch.equal(poisson_blend(base, overlay, torch.zeros(H, W)), base)


def test_poisson_solves_the_discrete_equation_everywhere_in_the_region():
    g = torch.Generator().manual_seed(7)
    H, W = 37, 45
    base = torch.rand(1, 3, H, W, generator=g)
    overlay = torch.rand(1, 3, H, W, generator=g) + 0.5
    m = torch.zeros(H, W)
    m[5:30, 8:40] = 1
    m[12:20, 0:10] = 1  # touches the image border: Neumann there
    m[20:25, 20:30] = 0  # a hole: Dirichlet inside too
    out = poisson_blend(base, overlay, m, tol=1e-10)
    inside = m > 0

    def nsum(x):
        p = torch.nn.functional.pad(x, (1, 1, 1, 1))
        return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]

    count = nsum(torch.ones(1, 1, H, W))
    lhs = count * out - nsum(out)
    rhs = count * overlay - nsum(overlay)
    assert torch.allclose(lhs[..., inside], rhs[..., inside], atol=1e-6)
