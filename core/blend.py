"""Compositing inside a selection: inward feathering, exact alpha compositing, colour matching and
gradient-domain (Poisson) blending.

Every function here leaves the pixels where the mask / alpha is 0 *bit-identical* to ``base``:
alpha never grows outside the selection and the final pick is ``torch.where``, not arithmetic.

Shapes: images ``(N,C,H,W)`` (any range, usually ``[-1,1]``); masks and alphas ``(N,1,H,W)`` or ``(H,W)``
in ``[0,1]`` (1 = selected).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.common import InvalidInput

_SQRT2 = math.sqrt(2.0)


def _as_mask4(mask: torch.Tensor) -> torch.Tensor:
    """``(H,W)``, ``(1,H,W)``/``(N,H,W)`` or ``(N,1,H,W)`` -> ``(N,1,H,W)`` float."""
    if not torch.is_tensor(mask):
        raise InvalidInput(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise InvalidInput(f"mask must be (H,W), (N,H,W) or (N,1,H,W); got shape {tuple(mask.shape)}")
    return mask.float()


def inside_distance(mask: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Chamfer (3-4 style, weights 1 and √2) distance in pixels from each pixel to the nearest
    pixel where ``mask == 0``, clamped to ``max_distance``.

    The image border does not count as unselected: a selection touching the border is not faded there.
    mask ``(N,1,H,W)`` -> ``(N,1,H,W)`` float32; 0 exactly where ``mask == 0``.
    """
    mask = _as_mask4(mask)
    big = float(max_distance) + 2.0
    d = torch.where(mask > 0, torch.full_like(mask, big), torch.zeros_like(mask))
    H, W = d.shape[-2:]
    iterations = int(math.ceil(max_distance)) + 1
    for _ in range(iterations):
        p = F.pad(d, (1, 1, 1, 1), mode="replicate")
        best = d
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                step = _SQRT2 if dy and dx else 1.0
                shifted = p[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W] + step
                best = torch.minimum(best, shifted)
        if torch.equal(best, d):
            break
        d = best
    d = torch.where(mask > 0, d, torch.zeros_like(d))
    return d.clamp(max=float(max_distance))


def feather_mask(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Feather a selection *inwards*: ``alpha = mask · smoothstep(d / r)`` with ``d`` the distance to the
    nearest unselected pixel.

    ``alpha`` is exactly 0 wherever ``mask`` is 0 (so those pixels stay bit-identical after
    :func:`composite`) and equals ``mask`` deeper than ``radius`` pixels inside. ``r`` is
    ``min(radius, deepest point of the selection)`` so that a selection thinner than the feather still
    reaches full strength at its centre. ``radius <= 0`` returns the mask unchanged.
    mask ``(H,W)`` / ``(N,1,H,W)`` in [0,1] -> alpha of the same shape, float32 in [0,1].
    """
    shape = mask.shape
    m = _as_mask4(mask).clamp(0.0, 1.0)
    if radius is None or radius <= 0 or not bool((m > 0).any()):
        return m.reshape(shape)
    d = inside_distance(m, radius)
    deepest = d.flatten(1).amax(dim=1).clamp(min=1.0).view(-1, 1, 1, 1)
    r = torch.clamp(deepest, max=float(radius))
    t = (d / r).clamp(0.0, 1.0)
    ramp = t * t * (3.0 - 2.0 * t)
    alpha = torch.where(m > 0, m * ramp, torch.zeros_like(m))
    return alpha.reshape(shape)


def composite(base: torch.Tensor, overlay: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha·overlay + (1−alpha)·base``, returning ``base`` bit-for-bit where ``alpha == 0`` and
    ``overlay`` bit-for-bit where ``alpha == 1``.

    base, overlay ``(N,C,H,W)``; alpha ``(N,1,H,W)``, ``(1,1,H,W)`` or ``(H,W)`` in [0,1].
    """
    if base.shape != overlay.shape:
        raise InvalidInput(f"composite: base {tuple(base.shape)} and overlay {tuple(overlay.shape)} differ in shape")
    a = _as_mask4(alpha).to(base.dtype)
    if a.shape[-2:] != base.shape[-2:]:
        raise InvalidInput(f"composite: alpha {tuple(a.shape[-2:])} does not match image {tuple(base.shape[-2:])}")
    mixed = a * overlay + (1.0 - a) * base
    mixed = torch.where(a >= 1, overlay, mixed)
    return torch.where(a > 0, mixed, base)


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel weighted mean and std. x ``(N,C,H,W)``, w ``(N,1,H,W)``."""
    total = w.sum(dim=(2, 3), keepdim=True).clamp(min=1e-8)
    mean = (x * w).sum(dim=(2, 3), keepdim=True) / total
    var = ((x - mean) ** 2 * w).sum(dim=(2, 3), keepdim=True) / total
    return mean, var.clamp(min=0).sqrt()


def color_match(src: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | None = None,
                max_gain: float = 4.0) -> torch.Tensor:
    """Per-channel mean/std transfer so that ``src`` has ``ref``'s colour statistics inside ``mask``.

    The affine map is estimated from ``src`` vs ``ref`` (weighted by ``mask``) and applied to ``target``
    (default ``src``). Passing the *unedited* reconstruction as ``src`` and the *edited* render as
    ``target`` corrects the inversion's colour cast without undoing a colour edit.
    src, ref, target ``(N,C,H,W)``; mask ``(N,1,H,W)`` or ``(H,W)`` in [0,1]. The gain is clamped to
    ``[1/max_gain, max_gain]``.
    """
    if src.shape != ref.shape:
        raise InvalidInput(f"color_match: src {tuple(src.shape)} and ref {tuple(ref.shape)} differ in shape")
    w = _as_mask4(mask).to(src.dtype).expand(src.shape[0], 1, *src.shape[-2:])
    if not bool((w > 0).any()):
        raise InvalidInput("color_match: the mask is empty")
    mu_s, sd_s = _weighted_stats(src, w)
    mu_r, sd_r = _weighted_stats(ref, w)
    gain = (sd_r / sd_s.clamp(min=1e-6)).clamp(1.0 / max_gain, max_gain)
    target = src if target is None else target
    return (target - mu_s) * gain + mu_r


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the 4 neighbours with zero padding. x ``(B,1,H,W)``."""
    p = F.pad(x, (1, 1, 1, 1))
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]


def poisson_blend(base: torch.Tensor, overlay: torch.Tensor, mask: torch.Tensor, tol: float = 1e-6,
                  max_iter: int = 5000) -> torch.Tensor:
    """Gradient-domain blending: inside ``Ω = {mask > 0}`` solve ``Δf = Δ overlay`` with ``f = base`` on
    the pixels just outside Ω (Pérez et al. 2003, guidance field = overlay gradients); ``base`` elsewhere.

    Solved per channel (float64) for the membrane ``h = f − overlay`` (harmonic in Ω, ``base − overlay`` outside)
    by conjugate gradients on the 4-neighbour Laplacian of Ω's bounding box, preconditioned with the box's exact
    inverse Laplacian (fast sine transform); relative residual ``tol``. Pixels outside Ω are returned
    bit-identical to ``base``. When Ω has no outside
    neighbour (everything selected) there is no boundary condition and ``overlay`` is returned.
    base, overlay ``(N,C,H,W)``; mask ``(N,1,H,W)`` / ``(1,1,H,W)`` / ``(H,W)``.
    """
    if base.shape != overlay.shape:
        raise InvalidInput(f"poisson_blend: base {tuple(base.shape)} and overlay {tuple(overlay.shape)} differ")
    N, C, H, W = base.shape
    m = _as_mask4(mask)
    if m.shape[-2:] != (H, W):
        raise InvalidInput(f"poisson_blend: mask {tuple(m.shape[-2:])} does not match image {(H, W)}")
    m = m.expand(N, 1, H, W)
    out = []
    for n in range(N):
        out.append(_poisson_one(base[n:n + 1], overlay[n:n + 1], m[n:n + 1] > 0, tol, max_iter))
    return torch.cat(out, 0)


def _poisson_one(base, overlay, region, tol, max_iter):
    H, W = base.shape[-2:]
    if not bool(region.any()):
        return base.clone()
    ys, xs = torch.nonzero(region[0, 0], as_tuple=True)
    y0, y1 = max(int(ys.min()) - 1, 0), min(int(ys.max()) + 2, H)
    x0, x1 = max(int(xs.min()) - 1, 0), min(int(xs.max()) + 2, W)
    b = base[..., y0:y1, x0:x1].double().permute(1, 0, 2, 3)  # (C,1,h,w): one system per channel
    g = overlay[..., y0:y1, x0:x1].double().permute(1, 0, 2, 3)
    inside = region[..., y0:y1, x0:x1].double()  # (1,1,h,w)
    if not bool((_neighbour_sum(1 - inside) * inside).gt(0).any()):
        return overlay.clone()  # pure Neumann problem: no boundary to match
    # f = g + h with Δh = 0 in Ω and h = base − overlay outside: the same solution as Δf = Δg, f = base on ∂Ω,
    # but h is smooth, so a coarse solve is a good start for the fine one
    h = _membrane(b - g, inside, tol, max_iter)
    solved = (g + h).permute(1, 0, 2, 3).to(base.dtype)
    out = base.clone()
    crop = out[..., y0:y1, x0:x1]
    out[..., y0:y1, x0:x1] = torch.where(region[..., y0:y1, x0:x1], solved, crop)
    return out


def _dst1(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unnormalised DST-I along ``dim`` via the FFT of the odd extension (its own inverse up to 2/(n+1))."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    zero = torch.zeros_like(x[..., :1])
    ext = torch.cat([zero, x, zero, -x.flip(-1)], dim=-1)
    out = -torch.fft.rfft(ext, dim=-1).imag[..., 1:n + 1] / 2
    return out.movedim(-1, dim)


def _fft_friendly(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _rect_inverse_laplacian(h: int, w: int, like: torch.Tensor):
    """``z = L⁻¹ r`` for the 5-point Laplacian with zero Dirichlet values around a box holding the h×w array
    (DST diagonalises it). The box is grown to FFT-friendly sizes; float32 is plenty for a preconditioner."""
    H, W = _fft_friendly(h + 1) - 1, _fft_friendly(w + 1) - 1
    ky = torch.arange(1, H + 1, dtype=torch.float32, device=like.device)
    kx = torch.arange(1, W + 1, dtype=torch.float32, device=like.device)
    eig = (4 - 2 * torch.cos(math.pi * ky / (H + 1)))[:, None] - 2 * torch.cos(math.pi * kx / (W + 1))[None, :]
    scale = 4.0 / ((H + 1) * (W + 1))

    def solve(r: torch.Tensor) -> torch.Tensor:
        big = F.pad(r.float(), (0, W - w, 0, H - h))
        z = _dst1(_dst1(_dst1(_dst1(big, -2), -1) / eig, -2), -1) * scale
        return z[..., :h, :w].to(r.dtype)

    return solve


def _membrane(d: torch.Tensor, inside: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Discrete harmonic interpolation: ``h`` with 4-neighbour ``Δh = 0`` where ``inside`` and ``h = d`` elsewhere
    (Neumann at the array's edge). d (C,1,h,w) float64, inside (1,1,h,w) in {0,1}. Preconditioned conjugate
    gradients; the preconditioner is the exact inverse Laplacian of the bounding box (fast sine transform)."""
    outside = 1 - inside
    count = _neighbour_sum(torch.ones_like(inside))
    rhs = _neighbour_sum(d * outside) * inside
    ring = (_neighbour_sum(inside) * outside > 0).double()
    x = (d * ring).sum(dim=(2, 3), keepdim=True) / ring.sum().clamp(min=1) * inside  # mean boundary value
    precondition = _rect_inverse_laplacian(d.shape[-2], d.shape[-1], d)

    def apply_a(v):  # v is zero outside Ω
        return (count * v - _neighbour_sum(v)) * inside

    r = rhs - apply_a(x)
    z = precondition(r) * inside
    p = z.clone()
    rz = (r * z).sum(dim=(1, 2, 3), keepdim=True)
    stop = (tol ** 2) * (rhs * rhs).sum(dim=(1, 2, 3), keepdim=True).clamp(min=1e-30)
    for _ in range(max_iter):
        if bool(((r * r).sum(dim=(1, 2, 3), keepdim=True) <= stop).all()):
            break
        ap = apply_a(p)
        denom = (p * ap).sum(dim=(1, 2, 3), keepdim=True)
        step = torch.where(denom > 0, rz / denom.clamp(min=1e-300), torch.zeros_like(rz))
        x = x + step * p
        r = r - step * ap
        z = precondition(r) * inside
        rz_new = (r * z).sum(dim=(1, 2, 3), keepdim=True)
        p = z + (rz_new / rz.clamp(min=1e-300)) * p
        rz = rz_new
    return x * inside + d * outside
