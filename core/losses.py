"""Losses for inversion and tuning; every image loss takes an optional soft mask.

Images are ``(N,3,H,W)`` in [-1,1]; masks ``(N,1,H,W)``, ``(1,1,H,W)`` or ``(H,W)`` in [0,1] (1 = counts).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from core.common import InvalidInput
from core.lpips_nets import LPIPS


@functools.lru_cache(maxsize=8)
def _cached_lpips(net: str, device: str, weights_dir: Optional[str]) -> LPIPS:
    return LPIPS(net, weights_dir=weights_dir).to(device)


def perceptual_loss(net: str = "vgg", device="cpu", weights_dir: Optional[os.PathLike] = None) -> LPIPS:
    """The cached LPIPS module for ``net`` ("vgg" | "alex") on ``device``.

    Call it as ``loss(x, y, mask=None) -> (N,)``.  ``.backbone`` / ``.backbone_name`` names what is active
    (``lpips-vgg16-imagenet`` or the clearly named random-backbone fallback) and ``.pretrained`` says whether
    ImageNet weights were found.  The module is shared: do not modify it.
    """
    return _cached_lpips(net, str(torch.device(device)), None if weights_dir is None else str(weights_dir))


def as_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Normalise ``mask`` to ``(N|1,1,H,W)`` float on ``like``'s device; None stays None."""
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != like.shape[-2:]:
        raise InvalidInput(f"mask of shape {tuple(mask.shape)} does not match images of shape {tuple(like.shape)}")
    if mask.shape[0] not in (1, like.shape[0]):
        raise InvalidInput(f"mask batch {mask.shape[0]} does not match image batch {like.shape[0]}")
    mask = mask.to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise InvalidInput("mask values must be finite and in [0,1]")
    if float(mask.amax()) <= 0:
        raise InvalidInput("mask is empty (no pixel selected)")
    return mask


def mask_bbox(mask: torch.Tensor, pad: int = 0, multiple: int = 1) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` (exclusive ends) around the pixels where any mask in the batch is > 0.

    The box is grown by ``pad`` pixels and to a multiple of ``multiple`` where the image allows.
    """
    m = mask.reshape(-1, *mask.shape[-2:]).amax(0) > 0
    if not m.any():
        raise InvalidInput("mask is empty (no pixel selected)")
    H, W = m.shape
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    box = []
    for lo, hi, size in ((int(rows[0]), int(rows[-1]) + 1, H), (int(cols[0]), int(cols[-1]) + 1, W)):
        lo, hi = max(0, lo - pad), min(size, hi + pad)
        extra = (-(hi - lo)) % multiple
        grow_hi = min(extra, size - hi)
        hi += grow_hi
        lo = max(0, lo - (extra - grow_hi))
        box += [lo, hi]
    return box[0], box[1], box[2], box[3]


def masked_mse(x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error per image ``(N,)``; with a mask, the mask-weighted mean over pixels and channels."""
    d = (x - y).square()
    if mask is None:
        return d.mean((1, 2, 3))
    mask = as_mask(mask, x)
    return (d * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * x.shape[1]).clamp_min(1e-8)


def downsample_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample ``x`` so its longer side is at most ``size`` (the projector's 256² LPIPS input)."""
    h, w = x.shape[-2:]
    if max(h, w) <= size:
        return x
    s = size / max(h, w)
    return F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")


class ImageLoss:
    """``lpips_weight·LPIPS + l2_weight·MSE`` against a fixed ``target`` ``(N,3,H,W)``, per image.

    The target's LPIPS features are computed once.  ``mask`` restricts both terms; ``crop`` evaluates them on
    the mask's bounding box (grown by ``crop_pad``) only; ``max_size`` area-downsamples the LPIPS inputs (the
    MSE always uses full resolution).  ``loss(x) -> (total (N,), lpips (N,), mse (N,))``.
    """

    def __init__(self, target: torch.Tensor, mask: Optional[torch.Tensor] = None, lpips: Optional[LPIPS] = None,
                 lpips_weight: float = 1.0, l2_weight: float = 0.0, max_size: Optional[int] = None,
                 crop: bool = False, crop_pad: int = 8):
        mask = as_mask(mask, target)
        self.box = mask_bbox(mask, pad=crop_pad) if (mask is not None and crop) else None
        if self.box is not None:
            y0, y1, x0, x1 = self.box
            mask, target = mask[..., y0:y1, x0:x1], target[..., y0:y1, x0:x1]
        self.target, self.mask = target, mask
        self.lpips, self.lpips_weight, self.l2_weight, self.max_size = lpips, lpips_weight, l2_weight, max_size
        self.ref = None
        if lpips is not None and lpips_weight:
            ys, ms = target, mask
            if max_size is not None:
                ys, ms = downsample_to(target, max_size), None if mask is None else downsample_to(mask, max_size)
            self.ref = lpips.prepare(ys, ms)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.box is not None:
            y0, y1, x0, x1 = self.box
            x = x[..., y0:y1, x0:x1]
        mse = masked_mse(x, self.target, self.mask)
        if self.ref is not None:
            lp = self.lpips.compare(downsample_to(x, self.max_size) if self.max_size is not None else x, self.ref)
        else:
            lp = torch.zeros_like(mse)
        return self.lpips_weight * lp + self.l2_weight * mse, lp, mse


# --- noise (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN", projector) -------------

def noise_regularization(noises: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over noise maps and pyramid levels (down to 8×8) of squared auto-correlations at shift 1 in x and y."""
    reg = 0.0
    for n in noises:
        n = n.reshape(-1, 1, *n.shape[-2:])  # (N,1,H,W): each image's maps are regularised separately
        while True:
            for dim in (3, 2):
                reg = reg + (n * torch.roll(n, 1, dims=dim)).mean((1, 2, 3)).square().sum()
            if n.shape[-1] <= 8 or n.shape[-2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return torch.as_tensor(reg)


@torch.no_grad()
def normalize_noise_(noises: Sequence[torch.Tensor]) -> None:
    """Renormalise each ``(N,1,H,W)`` noise map in place to zero mean, unit variance per image (every step)."""
    for n in noises:
        dims = tuple(range(1, n.ndim)) if n.ndim > 2 else tuple(range(n.ndim))
        n.sub_(n.mean(dims, keepdim=True)).div_(n.std(dims, keepdim=True).clamp_min(1e-8))


# --- PTI locality regularisation (Roich et al. 2021, §3.3; criteria/localitly_regulizer.py) --------------------

def locality_codes(G, w_pivot: torch.Tensor, n: int, alpha: float, psi: float = 0.5,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``w_r = w_p + α (w_z − w_p) / ‖w_z − w_p‖`` for ``n`` random ``w_z = mapping(z, ψ)``.

    ``w_pivot`` ``(1,num_ws,w_dim)``; returns ``(n,num_ws,w_dim)``.  The norm is over the whole code, as in PTI.
    PTI samples w_z with truncation ψ=0.5 (localitly_regulizer.py ball_holder_loss_lazy).
    """
    z = torch.randn(n, G.z_dim, generator=generator, device="cpu").to(w_pivot.device)
    with torch.no_grad():
        wz = G.mapping(z, truncation_psi=psi)
    d = wz - w_pivot
    norms = d.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)
    return w_pivot + alpha * d / norms


def locality_loss(G_new, G_orig, ws_r: torch.Tensor, lpips: Optional[LPIPS], l2_weight: float,
                  lpips_weight: float, max_size: Optional[int] = None, noise_mode: str = "none") -> torch.Tensor:
    """Mean over the codes ``ws_r`` of ``l2_weight·MSE + lpips_weight·LPIPS`` between ``G_new`` and ``G_orig``.

    PTI renders the regulariser's images with ``noise_mode='none'``.
    """
    new = G_new.synthesis(ws_r, noise_mode=noise_mode)
    with torch.no_grad():
        old = G_orig.synthesis(ws_r, noise_mode=noise_mode)
    total, _, _ = ImageLoss(old, None, lpips, lpips_weight=lpips_weight, l2_weight=l2_weight, max_size=max_size)(new)
    return total.mean()
