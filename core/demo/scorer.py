"""Attribute scorer: a small CNN that reads the renderer's parameters back from a 64 px face.

Used to fit InterfaceGAN directions on generated faces, to measure edits, and as a differentiable
attribute descriptor (``load_scorer()`` returns the ``nn.Module``).  Trained on renderer images with
their known parameters (``python -m core.demo.train``); weights ship in ``weights/scorer.pt``.
"""
from __future__ import annotations

import functools
import pathlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.common import InvalidInput
from core.demo.renderer import ATTRIBUTES, NUM_ATTRIBUTES

WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights" / "scorer.pt"
RESOLUTION = 64


class ScorerNet(nn.Module):
    """``(N,3,64,64)`` in ``[-1,1]`` -> ``(N, NUM_ATTRIBUTES)`` attribute estimates in ``[0,1]``."""

    def __init__(self, channels: tuple[int, int, int, int] = (24, 32, 48, 96), hidden: int = 192,
                 num_outputs: int = NUM_ATTRIBUTES):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.channels, self.hidden, self.num_outputs = tuple(channels), hidden, num_outputs

        def conv(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1), nn.LeakyReLU(0.2)]

        self.features = nn.Sequential(
            *conv(3, c0, 1), *conv(c0, c1, 2), *conv(c1, c1, 1),    # 64 -> 32
            *conv(c1, c2, 2), *conv(c2, c2, 1),                      # 32 -> 16
            *conv(c2, c3, 2), *conv(c3, c3, 2),                      # 16 -> 8 -> 4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 16, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != RESOLUTION or x.shape[-2] != RESOLUTION:
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area" if x.shape[-1] > RESOLUTION else "bilinear",
                              align_corners=None if x.shape[-1] > RESOLUTION else False)
        return torch.sigmoid(self.head(self.features(x)))


def to_tensor(images) -> torch.Tensor:
    """uint8 ``(N,H,W,3)``/``(H,W,3)`` (numpy or tensor) or float ``(N,3,H,W)`` in [-1,1] -> float ``(N,3,H,W)``."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise InvalidInput(f"score: numpy images must be uint8 (N,H,W,3), got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise InvalidInput(f"score: expected a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidInput(f"score: uint8 images must be (N,H,W,3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInput(f"score: float images must be (N,3,H,W) in [-1,1], got {tuple(images.shape)}")
    return images.float()


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur of ``(N,C,H,W)`` with ``sigma (N,)`` pixels (5-tap, separable)."""
    t = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)                                   # (N,5)
    n, c, h, w = x.shape
    y = x.reshape(1, n * c, h, w)
    kk = k.repeat_interleave(c, 0)                                   # (N*C,5)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kk[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kk[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


@dataclass
class ScorerTrainOptions:
    steps: int = 3000        # ours: ~5 epochs of a 40k cache; held-out MAE plateaus near here
    batch: int = 64          # ours
    lr: float = 2e-3         # ours: Adam, cosine decay to 5%
    blur_prob: float = 0.5   # ours: robustness to the generator's slightly soft samples
    max_blur: float = 0.9    # ours: sigma in pixels
    noise: float = 0.03      # ours: additive Gaussian noise std (in [-1,1] units)
    seed: int = 0


def train_scorer(images: np.ndarray, params: np.ndarray, options: ScorerTrainOptions | None = None,
                 progress: Optional[Callable[[int, int, float], None]] = None, init: ScorerNet | None = None) -> ScorerNet:
    """Fit a :class:`ScorerNet` to ``images`` uint8 ``(N,64,64,3)`` and ``params`` ``(N,K)`` in [0,1] (L1 loss).

    ``init``: continue from these weights (a copy is trained)."""
    o = options or ScorerTrainOptions()
    g = torch.Generator().manual_seed(o.seed)
    torch.manual_seed(o.seed)
    net = ScorerNet(num_outputs=params.shape[1])
    if init is not None:
        net.load_state_dict(init.state_dict())
    net.train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=o.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s, o.steps) / o.steps)))
    imgs = torch.from_numpy(images)
    target = torch.from_numpy(np.asarray(params, np.float32))
    n = len(imgs)
    for step in range(o.steps):
        idx = torch.randint(0, n, (o.batch,), generator=g)
        x = imgs[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        sig = torch.rand(o.batch, generator=g) * o.max_blur
        use = torch.rand(o.batch, generator=g) < o.blur_prob
        x = torch.where(use[:, None, None, None], blur(x, sig), x)
        x = x + o.noise * torch.randn(x.shape, generator=g)
        loss = (net(x) - target[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, o.steps, float(loss.detach()))
    return net.eval()


def save_scorer(net: ScorerNet, path: pathlib.Path, meta: dict | None = None) -> None:
    """Save weights + architecture (half precision; loads with ``weights_only=True``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "latent-edit-demo-scorer", "version": 1, "attributes": list(ATTRIBUTES),
                "channels": list(net.channels), "hidden": net.hidden, "meta": meta or {},
                "state_dict": {k: v.half() for k, v in net.state_dict().items()}}, path)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> ScorerNet:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != "latent-edit-demo-scorer":
        raise InvalidInput(f"{path} is not a demo scorer checkpoint")
    net = ScorerNet(tuple(ckpt["channels"]), ckpt["hidden"], len(ckpt["attributes"]))
    net.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    return net.eval().requires_grad_(False)


def load_scorer(path: pathlib.Path | str | None = None) -> ScorerNet:
    """The shipped scorer (cached; frozen, eval mode).  Differentiable w.r.t. its input."""
    return _load_cached(str(pathlib.Path(path) if path is not None else WEIGHTS))


def score(images, net: ScorerNet | None = None, batch: int = 256) -> dict[str, np.ndarray]:
    """Attribute estimates ``{name: (N,) float32 in [0,1]}`` for uint8 ``(N,64,64,3)`` or float ``(N,3,H,W)`` in [-1,1]."""
    net = net or load_scorer()
    x = to_tensor(images)
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(net(x[i:i + batch]))
    pred = torch.cat(outs).numpy() if outs else np.zeros((0, NUM_ATTRIBUTES), np.float32)
    return {name: pred[:, k].astype(np.float32) for k, name in enumerate(ATTRIBUTES)}
