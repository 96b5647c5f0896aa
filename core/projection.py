"""GAN inversion by optimisation: the Karras et al. (2020) projector as PTI uses it, in W or W+.

``project(G, target)`` finds ``ws`` ``(N,num_ws,w_dim)`` with ``G.synthesis(ws, noise_mode="const") ≈ target``.
Per step: lr ramps up over the first 5 % and cosine-ramps down over the last 25 %; Gaussian noise of
``0.05·w_std`` (decaying quadratically to 0 at 75 % of the steps) is added to the code; the per-layer noise
maps are optimised too (their own copies: the caller's ``G`` is never modified) with the auto-correlation
regulariser (weight 1e5) and renormalised after every step.  The optimised noise is discarded at the end, as
in the reference projector; only ``ws`` is returned.

Without ImageNet backbone weights, LPIPS runs on a seeded random backbone (core.lpips_nets) and the projector
adds a pixel term.  Measured (``python bench/pti.py --loss-study``) on 4 known-W targets of random tiny
generators (seeds 0,1 × targets 5,6; W, 150 steps, lr 0.1), means (image MSE / MS-SSIM / per-layer latent error):

    L2 only                  0.161 / 0.819 / 3.92
    random-VGG LPIPS         0.538 / 0.855 / 3.31   exact on 2 targets (latent error 0.05, 0.09), colour drift on 1
    random-AlexNet LPIPS     0.906 / 0.792 / 5.17
    random-Alex + 1.0·L2     0.154 / 0.839 / 3.94
    random-VGG + 1.0·L2      0.150 / 0.849 / 3.76
    random-VGG + 0.3·L2      0.147 / 0.883 / 3.44
    random-VGG + 0.1·L2      0.148 / 0.882 / 3.12   <- the fallback (FALLBACK_L2_WEIGHT)

The random VGG features match structure well (they found the exact code where L2 alone did not) but are
blind to some colour shifts; a small L2 term fixes that without losing the structure matching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from core.common import CancelLike, InvalidInput, ProgressFn
from core.losses import ImageLoss, as_mask, noise_regularization, normalize_noise_, perceptual_loss
from core.optim import Schedule, optimise
from core.optim import learning_rate as _scheduled_lr


FALLBACK_L2_WEIGHT = 0.1  # ours, measured (module docstring): pixel term added when LPIPS has no ImageNet backbone


@dataclass
class ProjectOptions:
    """Projector settings; defaults are PTI's (PTI@da94d59 training/projectors/w_projector.py, base_coach.py)."""

    initial_learning_rate: float = 0.01  # w_projector.py: initial_learning_rate=0.01 (overrides first_inv_lr=5e-3)
    lr_rampup_length: float = 0.05  # Karras et al. projector: lr_rampup_length=0.05
    lr_rampdown_length: float = 0.25  # Karras et al. projector: lr_rampdown_length=0.25
    initial_noise_factor: float = 0.05  # Karras et al. projector: initial_noise_factor=0.05 (× w_std)
    noise_ramp_length: float = 0.75  # Karras et al. projector: noise_ramp_length=0.75
    regularize_noise_weight: float = 1e5  # Karras et al. projector: regularize_noise_weight=1e5
    w_avg_samples: int = 600  # PTI base_coach.py: w_avg_samples=600 (the NVIDIA projector's default is 10000)
    optimize_noise: bool = True  # Karras et al.: noise maps are optimised and renormalised every step
    lpips_net: str = "vgg"  # PTI / Karras et al.: VGG16 LPIPS for the projection
    lpips_size: int = 256  # PTI w_projector.py: area-downsample to 256×256 when larger
    lpips_weight: float = 1.0  # Karras et al.: the perceptual distance is the only image term
    # None = automatic: 0 with an ImageNet backbone (Karras et al.: no pixel term), FALLBACK_L2_WEIGHT when the
    # LPIPS backbone is the random fallback (measured: see the module docstring)
    l2_weight: Optional[float] = None
    crop_to_mask: bool = True  # ours: with a mask, compute the loss on its bounding box only (same gradients, less work)
    crop_pad: int = 8  # ours: context pixels kept around the mask's bounding box
    seed: int = 0  # ours: seeds w_avg sampling, initial noise maps and the code noise (deterministic runs)
    preview_every: int = 10  # ours: pass a preview image to ``progress`` every this many steps (and at the end)
    weights_dir: Optional[str] = None  # ours: where to look for ImageNet backbone files (see core.lpips_nets)

    def schedule(self) -> Schedule:
        """The lr / latent-noise schedule these options describe (core.optim)."""
        return Schedule(self.initial_learning_rate, self.lr_rampup_length, self.lr_rampdown_length,
                        self.initial_noise_factor, self.noise_ramp_length)


def effective_l2_weight(o: ProjectOptions, lpips=None) -> float:
    """The pixel-loss weight a projection uses: ``o.l2_weight``, or the automatic choice when it is None."""
    if o.l2_weight is not None:
        return float(o.l2_weight)
    if not o.lpips_weight:
        return 1.0  # no perceptual term at all: the pixel loss is the whole objective
    if lpips is None:
        lpips = perceptual_loss(o.lpips_net, "cpu", o.weights_dir)
    return 0.0 if lpips.pretrained else FALLBACK_L2_WEIGHT


def learning_rate(step: int, total: int, o: ProjectOptions) -> float:
    """The projector's lr schedule at ``step`` of ``total`` (core.optim.learning_rate of ``o.schedule()``)."""
    return _scheduled_lr(step, total, o.schedule())


def w_statistics(G, samples: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Mean W ``(1,1,w_dim)`` and scalar spread ``sqrt(E‖w − w̄‖²)`` over ``samples`` seeded mapping outputs."""
    gen = torch.Generator().manual_seed(seed)
    device = G.w_avg.device
    with torch.no_grad():
        z = torch.randn(samples, G.z_dim, generator=gen).to(device)
        w = G.mapping(z)[:, :1].float()  # (S,1,w_dim)
    w_avg = w.mean(0, keepdim=True)
    w_std = float(((w - w_avg).square().sum() / samples).sqrt())
    return w_avg, w_std


def check_target(G, target: torch.Tensor, name: str = "target") -> torch.Tensor:
    """Validate ``(N,3,R,R)`` at the generator's resolution, finite; returns it as float on G's device."""
    if not torch.is_tensor(target) or target.ndim != 4 or target.shape[1] != 3:
        shape = tuple(target.shape) if torch.is_tensor(target) else type(target).__name__
        raise InvalidInput(f"{name} must be a (N,3,H,W) tensor in [-1,1], got {shape}")
    if tuple(target.shape[-2:]) != (G.resolution, G.resolution):
        raise InvalidInput(f"{name} is {target.shape[-1]}×{target.shape[-2]} but the generator makes "
                           f"{G.resolution}×{G.resolution} images; resize or align it first")
    if not torch.isfinite(target).all():
        raise InvalidInput(f"{name} contains NaN or infinite values")
    return target.detach().to(G.w_avg.device, torch.float32)


def initial_noise(G, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Fresh N(0,1) noise maps ``(n,1,R,R)`` per conv (the projector re-randomises the noise at start)."""
    out = []
    for conv in G.convs:
        r = conv.noise_const.shape[-1]
        out.append(torch.randn(n, 1, r, r, generator=gen).to(G.w_avg.device))
    return out


def project(G, target: torch.Tensor, space: str = "w", steps: int = 450, mask: Optional[torch.Tensor] = None,
            progress: ProgressFn = None, cancel: CancelLike = None,
            options: Optional[ProjectOptions] = None,
            latent_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Invert ``target`` ``(N,3,R,R)`` in [-1,1] into ``ws`` ``(N,num_ws,w_dim)`` (N=1 in the public contract).

    ``space``: "w" (one code repeated over the layers) or "w+" (one code per layer).  ``mask`` ``(N|1,1,R,R)``
    or ``(R,R)`` in [0,1] restricts the loss.  ``progress(ProgressEvent)`` after every step (stage "project",
    ``preview`` the first current image ``(R,R,3)`` uint8 every ``options.preview_every`` steps and at the last);
    ``cancel`` is checked before every step and raises :class:`core.common.Cancelled`.  ``G`` is not modified.
    ``latent_loss(ws (N,num_ws,w_dim)) -> (N,)``, when given, is added to every step's loss on the code
    synthesised (with its exploration noise): e.g. MAGEC's consistency term for the MAGEC pivot.
    """
    o = options or ProjectOptions()
    if space not in ("w", "w+"):
        raise InvalidInput(f"space must be 'w' or 'w+', got {space!r}")
    if int(steps) < 1:
        raise InvalidInput(f"steps must be at least 1, got {steps}")
    steps = int(steps)
    target = check_target(G, target)
    n = target.shape[0]
    mask = as_mask(mask, target)
    device = target.device
    lpips = perceptual_loss(o.lpips_net, device, o.weights_dir) if o.lpips_weight else None
    l2_weight = effective_l2_weight(o, lpips)

    loss_fn = ImageLoss(target, mask, lpips, lpips_weight=o.lpips_weight, l2_weight=l2_weight,
                        max_size=o.lpips_size, crop=o.crop_to_mask, crop_pad=o.crop_pad)
    w_avg, w_std = w_statistics(G, o.w_avg_samples, o.seed)
    gen = torch.Generator().manual_seed(o.seed + 1)
    rows = 1 if space == "w" else G.num_ws
    w_opt = w_avg.repeat(n, rows, 1).to(device).requires_grad_(True)
    noises = initial_noise(G, n, gen) if o.optimize_noise else None
    params = [w_opt] + ([nz.requires_grad_(True) for nz in noises] if noises else [])  # G itself gets no gradient

    def objective(noise_scale: float):
        w_noise = torch.randn(w_opt.shape, generator=gen).to(device) * noise_scale
        ws = (w_opt + w_noise).expand(n, G.num_ws, -1) if space == "w" else w_opt + w_noise
        synth = G.synthesis(ws, noise_mode="const", noise=noises)
        total, _, _ = loss_fn(synth)
        loss = total.sum()
        if latent_loss is not None:
            loss = loss + latent_loss(ws).sum()
        if noises:
            loss = loss + o.regularize_noise_weight * noise_regularization(noises)
        return loss, total.detach().mean(), synth

    optimise(objective, params, steps, o.schedule(), w_std=w_std,
             after_step=(lambda: normalize_noise_(noises)) if noises else None, progress=progress, cancel=cancel,
             stage="project", preview_every=o.preview_every)
    w = w_opt.detach()
    return w.expand(n, G.num_ws, -1).clone() if space == "w" else w.clone()


def project_w(G, target, steps: int = 450, **kwargs) -> torch.Tensor:
    """:func:`project` in W: one code, repeated over the ``num_ws`` layers."""
    return project(G, target, space="w", steps=steps, **kwargs)


def project_wplus(G, target, steps: int = 450, **kwargs) -> torch.Tensor:
    """:func:`project` in W+: one code per layer, all starting at the mean W."""
    return project(G, target, space="w+", steps=steps, **kwargs)
