"""Reconstruction metrics: MSE, PSNR, LPIPS (names its backbone), MS-SSIM, and an optional identity score.

Images are ``(N,3,H,W)`` in [-1,1]; every metric returns ``(N,)`` float tensors (no gradients).
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
from typing import Optional

import torch
import torch.nn.functional as F

from core.common import InvalidInput
from core.losses import perceptual_loss

# Wang, Simoncelli & Bovik 2003, "Multi-scale structural similarity": per-scale exponents, 11-px σ=1.5 window
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise InvalidInput(f"metrics need two (N,C,H,W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


@torch.no_grad()
def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the [-1,1] scale (as PTI / HyperStyle report it)."""
    _check_pair(x, y)
    return (x.float() - y.float()).square().mean((1, 2, 3))


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB with the [-1,1] data range (peak-to-peak 2), i.e. the same as on [0,1] images."""
    return 10 * torch.log10(4.0 / mse(x, y).clamp_min(1e-12))


@torch.no_grad()
def lpips(x: torch.Tensor, y: torch.Tensor, net: str = "alex", weights_dir=None) -> torch.Tensor:
    """LPIPS distance; see :func:`lpips_backbone` for what backbone produced it (random fallback or ImageNet)."""
    _check_pair(x, y)
    return perceptual_loss(net, x.device, weights_dir)(x.float(), y.float())


def lpips_backbone(net: str = "alex", weights_dir=None) -> str:
    """The name of the LPIPS backbone :func:`lpips` uses, e.g. ``lpips-alexnet-imagenet``."""
    return perceptual_loss(net, "cpu", weights_dir).backbone_name


def _gauss_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma * sigma))
    return g / g.sum()


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, win: torch.Tensor, data_range: float):
    """Mean SSIM and mean contrast-structure term per image (valid filtering, per channel)."""
    C = x.shape[1]
    k = win.numel()
    wx = win.view(1, 1, 1, k).expand(C, 1, 1, k).to(x)
    wy = win.view(1, 1, k, 1).expand(C, 1, k, 1).to(x)

    def blur(t):
        return F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return ssim.mean((1, 2, 3)), cs.mean((1, 2, 3))


def ms_ssim_levels(size: int) -> tuple[int, int]:
    """``(scales, window)`` used for an image whose shorter side is ``size``.

    The standard 5 scales with an 11-px window need a 176-px image; smaller images use fewer scales (the
    coarsest at least 8 px) and a window no larger than the coarsest scale (odd, at least 3).
    """
    if size < 3:
        raise InvalidInput(f"MS-SSIM needs images of at least 3 px, got {size}")
    scales = max(1, min(5, 1 + int(math.floor(math.log2(size / 8))) if size >= 8 else 1))
    coarsest = size >> (scales - 1)
    window = min(11, coarsest if coarsest % 2 else coarsest - 1)
    return scales, max(3, window)


@torch.no_grad()
def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) on [-1,1] images; 1 = identical.  See :func:`ms_ssim_levels`."""
    _check_pair(x, y)
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    scales, window = ms_ssim_levels(min(x.shape[-2:]))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    win = _gauss_window(window)
    values = []
    for s in range(scales):
        ssim, cs = _ssim_parts(x, y, win, 1.0)
        values.append(ssim if s == scales - 1 else cs)
        if s < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    vals = torch.stack(values, 1).clamp_min(0)  # (N, scales); negative cs would give NaN powers
    return (vals ** weights.to(vals)).prod(1)


# --- identity (optional: dlib's 128-D face descriptor, offline via face_recognition_models) --------------------

def identity_available() -> tuple[bool, str]:
    """Whether :func:`identity` can run, and why not."""
    if importlib.util.find_spec("dlib") is None:
        return False, "identity score unavailable: dlib not installed (pip install dlib-bin face_recognition_models)"
    if importlib.util.find_spec("face_recognition_models") is None:
        return False, "identity score unavailable: face_recognition_models not installed"
    return True, "dlib_face_recognition_resnet_model_v1 (128-D), cosine similarity"


_DLIB = {}


def _dlib_models():
    if not _DLIB:
        import dlib  # optional dependency

        spec = importlib.util.find_spec("face_recognition_models")
        base = pathlib.Path(spec.origin).parent / "models"
        _DLIB["detector"] = dlib.get_frontal_face_detector()
        _DLIB["shape"] = dlib.shape_predictor(str(base / "shape_predictor_5_face_landmarks.dat"))
        _DLIB["rec"] = dlib.face_recognition_model_v1(str(base / "dlib_face_recognition_resnet_model_v1.dat"))
        _DLIB["rect"] = dlib.rectangle
    return _DLIB


def _embed(img: torch.Tensor):
    import numpy as np

    m = _dlib_models()
    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    arr = np.ascontiguousarray(arr)
    rects = m["detector"](arr, 1)
    # without a detection (small or unusual crops) the whole image is taken as the face box
    rect = max(rects, key=lambda r: r.area()) if len(rects) else m["rect"](0, 0, arr.shape[1] - 1, arr.shape[0] - 1)
    return torch.tensor(list(m["rec"].compute_face_descriptor(arr, m["shape"](arr, rect))))


@torch.no_grad()
def identity(x: torch.Tensor, y: torch.Tensor) -> tuple[Optional[torch.Tensor], str]:
    """Cosine similarity of dlib face descriptors per image pair ``((N,) | None, note)``; None when unavailable."""
    _check_pair(x, y)
    ok, note = identity_available()
    if not ok:
        return None, note
    sims = [F.cosine_similarity(_embed(a), _embed(b), dim=0) for a, b in zip(x, y)]
    return torch.stack(sims), note


def evaluate(x: torch.Tensor, y: torch.Tensor, net: str = "alex", with_identity: bool = True) -> dict:
    """All metrics for a batch, averaged over it, plus metadata naming the LPIPS backbone and the ID model."""
    out = {
        "mse": float(mse(x, y).mean()),
        "psnr": float(psnr(x, y).mean()),
        "lpips": float(lpips(x, y, net).mean()),
        "ms_ssim": float(ms_ssim(x, y).mean()),
        "lpips_backbone": lpips_backbone(net),
    }
    if with_identity:
        ids, note = identity(x, y)
        out["id"] = None if ids is None else float(ids.mean())
        out["id_note"] = note
    return out


@torch.no_grad()
def ecs(x: torch.Tensor, x_edit: torch.Tensor, x_cyc: torch.Tensor, distance: str = "lpips", net: str = "alex",
        weights_dir=None) -> torch.Tensor:
    """MAGEC's edit-consistency score (Grechka et al. 2021, Eq. 4) per image ``(N,)``:
    ``2·d(x, x_cyc) / (d(x, x_edit) + d(x_edit, x_cyc))``.

    ``x`` is the projection ``p(x_real)``, ``x_edit = G(e(p(x_real)))`` and ``x_cyc = G(e⁻¹(p(x_edit)))`` (the
    edit re-projected and undone), all ``(N,3,H,W)`` in [-1,1]; ``distance`` is ``"lpips"`` (:func:`lpips`, its
    ``net``) or ``"mse"``.  0 is perfect (the cycle returns to ``x``), 1 the paper's quality threshold, 2 when the
    cycle stays at ``x_edit``; NaN where both edit distances are 0.  ECS (Eq. 5) is the mean over images."""
    _check_pair(x, x_edit)
    _check_pair(x, x_cyc)
    if distance == "lpips":
        def dist(a, b):
            return lpips(a, b, net, weights_dir)
    elif distance == "mse":
        dist = mse
    else:
        raise InvalidInput(f"ecs distance must be 'lpips' or 'mse', got {distance!r}")
    num = 2 * dist(x, x_cyc)
    den = dist(x, x_edit) + dist(x_edit, x_cyc)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))
