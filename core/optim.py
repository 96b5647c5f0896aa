"""The one latent-optimisation loop shared by ``core.projection.project``, ``core.chunks`` segment inversion and
hole-filling refinement (Karras et al. 2020 projector schedule).

Per step: the learning rate ramps up linearly over the first ``lr_rampup_length`` of the steps and cosine-ramps
down over the last ``lr_rampdown_length``; the objective is told the latent-noise scale
``w_std·initial_noise_factor·max(0, 1 − t/noise_ramp_length)²`` (it adds the noise to its codes itself, so each
caller keeps its own noise shape); Adam steps on the given tensors only (gradients by ``torch.autograd.grad``:
the generator's parameters and their ``.grad`` are never touched).  The image objective's target features are
built once by the caller (``core.losses.ImageLoss``), never per step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch

from core.common import CancelLike, ProgressFn, check_cancel, report_step


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Learning-rate and latent-noise schedule of one optimisation (Karras et al. 2020 projector defaults)."""

    initial_learning_rate: float = 0.1  # Karras et al. projector: initial_learning_rate=0.1
    lr_rampup_length: float = 0.05  # Karras et al. projector: lr_rampup_length=0.05
    lr_rampdown_length: float = 0.25  # Karras et al. projector: lr_rampdown_length=0.25
    initial_noise_factor: float = 0.05  # Karras et al. projector: initial_noise_factor=0.05 (× w_std)
    noise_ramp_length: float = 0.75  # Karras et al. projector: noise_ramp_length=0.75


def learning_rate(step: int, total: int, s: Schedule) -> float:
    """The lr at ``step`` of ``total``: linear ramp-up, cosine ramp-down, peak ``s.initial_learning_rate``."""
    t = step / max(total, 1)
    ramp = min(1.0, (1.0 - t) / s.lr_rampdown_length)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * min(1.0, t / s.lr_rampup_length) if s.lr_rampup_length > 0 else ramp
    return s.initial_learning_rate * ramp


def noise_scale(step: int, total: int, s: Schedule, w_std: float) -> float:
    """Standard deviation of the Gaussian noise added to the code at ``step`` (0 from ``noise_ramp_length`` on)."""
    t = step / max(total, 1)
    return w_std * s.initial_noise_factor * max(0.0, 1.0 - t / s.noise_ramp_length) ** 2


Objective = Callable[[float], tuple]


def optimise(objective: Objective, params: Sequence[torch.Tensor], steps: int, schedule: Schedule, *,
             w_std: float = 0.0, extra_groups: Sequence[dict] = (), lr_scale: float = 1.0,
             after_step: Optional[Callable[[], None]] = None, progress: ProgressFn = None,
             cancel: CancelLike = None, stage: str = "project", preview_every: int = 10) -> list[float]:
    """Run ``steps`` Adam steps; returns the shown loss of every step.

    ``objective(noise_scale) -> (loss, shown, image)``: the scalar to minimise, the value to report (a float)
    and the current image ``(N,3,H,W)`` in [-1,1] for previews (or None).  ``params`` get the scheduled lr
    (× ``lr_scale``); ``extra_groups`` are further Adam groups (``{"params": [...], "lr": ...}``) at a fixed lr.
    ``after_step`` runs after every optimiser step (e.g. noise renormalisation).  ``cancel`` is checked before
    every step (raises Cancelled); ``progress`` gets a ProgressEvent of ``stage`` after every step, with a
    preview every ``preview_every`` steps and at the last.
    """
    groups = [{"params": list(params), "lr": schedule.initial_learning_rate}] + [dict(g) for g in extra_groups]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
    every = [p for g in opt.param_groups for p in g["params"]]
    losses: list[float] = []
    for step in range(steps):
        check_cancel(cancel)
        opt.param_groups[0]["lr"] = lr_scale * learning_rate(step, steps, schedule)
        loss, shown, image = objective(noise_scale(step, steps, schedule, w_std))
        grads = torch.autograd.grad(loss, every)
        for p, g in zip(every, grads):
            p.grad = g
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(float(shown))
        if progress is not None:
            show = step == steps - 1 or (preview_every and step % preview_every == 0)
            report_step(progress, stage, step + 1, steps, losses[-1], image.detach() if show and image is not None
                        else None)
    for p in every:
        p.grad = None
    return losses
