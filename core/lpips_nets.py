"""LPIPS (Zhang et al. 2018) built here: VGG16 / AlexNet feature extractors + the calibrated linear heads.

torchvision cannot be imported with the CPU torch used here, so the two backbones are written out below
with the same module layout as ``torchvision.models.{vgg16,alexnet}().features``; their state-dict keys
(``features.0.weight`` ...) therefore match the standard torch-hub files ``vgg16-397923af.pth`` and
``alexnet-owt-7be5be79.pth``, which are loaded from ``weights_dir``, ``$TORCH_HOME/hub/checkpoints`` or
``~/.cache/torch/hub/checkpoints`` when present.  The linear heads are read from the installed ``lpips``
package's weight files (``lpips/weights/v0.1/{vgg,alex}.pth``) without importing that package (it imports
torchvision).

Fallback when no ImageNet backbone file exists: the same architecture with a *fixed, seeded* random
initialisation (Kaiming-normal, fan-out, as torchvision initialises these nets), and uniform linear heads
(every channel of a layer weighted by that layer's mean calibrated weight, so the layers keep LPIPS'
relative scale).  The calibrated per-channel heads are not used with a random backbone because they were
fitted to ImageNet channels and mean nothing for random ones (``heads_mode="lpips"`` forces them).  This is not a
calibrated perceptual metric: it is a deterministic multi-scale, channel-normalised feature distance.
``backbone_name`` / ``pretrained`` say which one is active, so every result can report it.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.common import InvalidInput, LatentEditError

# torch-hub file names of the torchvision ImageNet weights (torchvision.models VGG16_Weights / AlexNet_Weights).
HUB_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
# LPIPS' ImageNet input normalisation, for inputs in [-1,1] (lpips/pretrained_networks.py ScalingLayer).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
FALLBACK_SEED = 0
MIN_SIZE = 32  # AlexNet's stride-4 stem + 3 max-pools need at least ~31 px; smaller inputs are upsampled


class _TappedFeatures(nn.Module):
    """A torchvision-layout ``features`` stack whose forward returns the activations at ``taps``."""

    taps: tuple = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in self.taps:
            for i in range(start, end):
                x = self.features[i](x)
            out.append(x)
            start = end
        return out


class VGG16Features(_TappedFeatures):
    """``torchvision.models.vgg16().features`` layout; taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""

    channels = (64, 128, 256, 512, 512)
    # exclusive slice ends in ``features`` (lpips/pretrained_networks.py vgg16 slices 0:4, 4:9, 9:16, 16:23, 23:30)
    taps = (4, 9, 16, 23, 30)

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for block, (c, n) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
            if block:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = c
        layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)


class AlexNetFeatures(_TappedFeatures):
    """``torchvision.models.alexnet().features`` layout; taps after relu1..relu5."""

    channels = (64, 192, 384, 256, 256)
    # exclusive slice ends (lpips/pretrained_networks.py alexnet slices 0:2, 2:5, 5:8, 8:10, 10:12)
    taps = (2, 5, 8, 10, 12)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, 2),
        )


_ARCH = {"vgg": VGG16Features, "alex": AlexNetFeatures}


def hub_checkpoint_dirs(weights_dir: Optional[os.PathLike] = None) -> list[pathlib.Path]:
    """Folders searched for the torchvision backbone files, in order."""
    dirs = []
    if weights_dir is not None:
        dirs.append(pathlib.Path(weights_dir))
    if os.environ.get("TORCH_HOME"):
        dirs.append(pathlib.Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints")
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        dirs.append(pathlib.Path(xdg) / "torch" / "hub" / "checkpoints")
    dirs.append(pathlib.Path.home() / ".cache" / "torch" / "hub" / "checkpoints")
    return dirs


def find_backbone_file(net: str, weights_dir: Optional[os.PathLike] = None) -> Optional[pathlib.Path]:
    """The torchvision ImageNet weight file for ``net`` ("vgg" | "alex"), or None when absent."""
    name = HUB_FILES[_check_net(net)]
    for d in hub_checkpoint_dirs(weights_dir):
        if (d / name).is_file():
            return d / name
    return None


def lpips_heads_file(net: str) -> Optional[pathlib.Path]:
    """``lpips/weights/v0.1/{net}.pth`` of the installed lpips package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = pathlib.Path(loc) / "weights" / "v0.1" / f"{_check_net(net)}.pth"
        if path.is_file():
            return path
    return None


def _read_heads(net: str) -> Optional[list[torch.Tensor]]:
    """The five calibrated LPIPS heads ``(1,C,1,1)`` for ``net``, or None when the lpips package is absent."""
    path = lpips_heads_file(net)
    if path is None:
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{k}.model.1.weight"].float() for k in range(5)]


def _check_net(net: str) -> str:
    if net not in _ARCH:
        raise InvalidInput(f"unknown LPIPS network {net!r}; expected 'vgg' or 'alex'")
    return net


def _seeded_init(module: nn.Module, seed: int) -> None:
    """Kaiming-normal (fan-out, ReLU) conv weights, zero biases, from a private RNG (global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5)
                m.bias.zero_()


class LPIPS(nn.Module):
    """LPIPS distance ``forward(x, y, mask=None) -> (N,)`` for images ``(N,3,H,W)`` in [-1,1].

    ``mask`` ``(N|1,1,H,W)`` in [0,1]: both images are multiplied by it (outside pixels become 0 in both, so
    they cannot influence the distance) and each layer's spatial distance map is averaged with the mask
    (area-resized to that layer) as weights.
    """

    def __init__(self, net: str = "vgg", weights_dir: Optional[os.PathLike] = None,
                 fallback_seed: int = FALLBACK_SEED, heads_mode: str = "auto"):
        super().__init__()
        self.net = _check_net(net)
        with torch.random.fork_rng(devices=[]):  # nn.Conv2d's default init must not consume the caller's RNG
            self.features = _ARCH[net]()
        arch_name = {"vgg": "vgg16", "alex": "alexnet"}[net]
        path = find_backbone_file(net, weights_dir)
        if path is not None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                feats = {k: v for k, v in state.items() if k.startswith("features.")}
                self.features.load_state_dict(feats, strict=True)
            except Exception as exc:  # corrupt / truncated download, or not the torchvision file
                raise LatentEditError(f"cannot use ImageNet backbone {path}: {exc}") from exc
            self.pretrained = True
            self.backbone_name = f"lpips-{arch_name}-imagenet"
            self.backbone_file = str(path)
        else:
            _seeded_init(self.features, fallback_seed)
            self.pretrained = False
            self.backbone_name = f"lpips-{arch_name}-random-backbone(seed={fallback_seed}) (fallback: no ImageNet weights)"
            self.backbone_file = None
        heads = _read_heads(net)
        self.heads_file = str(lpips_heads_file(net)) if heads is not None else None
        if heads_mode == "auto":
            heads_mode = "lpips" if self.pretrained else "uniform"
        if heads_mode == "lpips" and heads is None:
            raise LatentEditError("the lpips package's weight files (lpips/weights/v0.1) were not found")
        if heads_mode == "lpips":
            tensors = heads
        elif heads_mode == "uniform":
            # each channel gets its layer's mean calibrated weight: the layers keep LPIPS' relative scale
            means = [float(h.mean()) for h in heads] if heads is not None else [0.1] * 5
            tensors = [torch.full((1, c, 1, 1), m) for c, m in zip(self.features.channels, means)]
        else:
            raise InvalidInput(f"unknown LPIPS heads {heads_mode!r}; expected 'auto', 'lpips' or 'uniform'")
        self.heads_mode = heads_mode
        if heads_mode != ("lpips" if self.pretrained else "uniform"):
            self.backbone_name += f" [{heads_mode} heads]"
        self.heads = nn.ParameterList([nn.Parameter(t.clone()) for t in tensors])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @property
    def backbone(self) -> str:
        return self.backbone_name

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r}"

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or y.shape[1:] != x.shape[1:]:
            raise InvalidInput(f"LPIPS expects two (N,3,H,W) images of one size, got {tuple(x.shape)} and {tuple(y.shape)}")
        return self.compare(x, self.prepare(y, mask))

    def prepare(self, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "PreparedTarget":
        """Features of a fixed reference ``y`` (and its mask), so repeated :meth:`compare` calls skip them."""
        if y.ndim != 4 or y.shape[1] != 3:
            raise InvalidInput(f"LPIPS expects (N,3,H,W) images, got {tuple(y.shape)}")
        size = tuple(y.shape[-2:])
        work = _min_size(size) if min(size) < MIN_SIZE else size
        m = None
        if mask is not None:
            m = F.interpolate(mask, size=work, mode="bilinear", align_corners=False) if work != size else mask
        with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):  # a constant target: no graph
            feats = [_unit(f) for f in self._features(y * mask if mask is not None else y, work)]
        maps = None if m is None else [F.adaptive_avg_pool2d(m, f.shape[-2:]) for f in feats]
        return PreparedTarget(size, work, mask, m, feats, maps)

    def compare(self, x: torch.Tensor, ref: "PreparedTarget") -> torch.Tensor:
        """LPIPS of ``x`` ``(N,3,H,W)`` to a prepared reference (same H,W; batch N or broadcastable)."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != ref.size:
            raise InvalidInput(f"LPIPS input {tuple(x.shape)} does not match the reference size {ref.size}")
        if ref.mask is not None:
            x = x * ref.mask
        total = 0.0
        for a, b, head, m in zip(self._features(x, ref.work), ref.features, self.heads, ref.maps or [None] * 5):
            d = ((_unit(a) - b).square() * head).sum(1, keepdim=True)  # (N,1,h,w)
            if m is None:
                total = total + d.mean((1, 2, 3))
            else:
                total = total + (d * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp_min(1e-8)
        return total

    def _features(self, x: torch.Tensor, work: tuple) -> list[torch.Tensor]:
        if tuple(x.shape[-2:]) != tuple(work):
            x = F.interpolate(x, size=work, mode="bilinear", align_corners=False)
        return self.features((x - self.shift) / self.scale)


@dataclass
class PreparedTarget:
    """A reference image's LPIPS features: input ``size``, network input size ``work``, mask at both sizes,
    channel-normalised ``features`` per tap and the mask area-resized to each tap (``maps``)."""

    size: tuple
    work: tuple
    mask: Optional[torch.Tensor]
    mask_work: Optional[torch.Tensor]
    features: list
    maps: Optional[list]


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Channel-normalise features as LPIPS does (lpips/__init__.py normalize_tensor)."""
    return f / (f.square().sum(1, keepdim=True).sqrt() + eps)


def _min_size(hw: Sequence[int]) -> tuple[int, int]:
    h, w = int(hw[0]), int(hw[1])
    s = MIN_SIZE / min(h, w)
    return max(MIN_SIZE, round(h * s)), max(MIN_SIZE, round(w * s))
