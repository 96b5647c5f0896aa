"""BiSeNet face parsing for automatic segments on checkpoints other than the embedded one.

The network is BiSeNet (Yu et al., ECCV 2018) as trained on CelebAMask-HQ by zllrunning/face-parsing.PyTorch
(MIT licence; its ``79999_iter.pth`` is the file STIT, facexlib and others use).  Users place it beside their
checkpoint as ``<stem>.faceparsing.pth`` (``core.segmenter.FACE_PARSING_SUFFIX``); ``core.segmenter`` turns it
into a :class:`core.segmenter.Segmenter` with this image network, so ``segments="auto"`` gives one static
segment per part group inside the selection (no segment code X^S: a face parser sees pixels, not latents).

The architecture is written here to match that file's tensor names and shapes, so a plain ``torch.save`` of
its ``state_dict`` (with or without DataParallel's ``module.`` prefix) loads with ``weights_only=True``:
ResNet-18 context path (``cp.resnet.*``), attention refinement at 1/16 and 1/32 (``cp.arm16``, ``cp.arm32``),
feature fusion of the 1/8 ResNet features with the context (``ffm``), and the output head (``conv_out``).  The
two auxiliary heads (``conv_out16``, ``conv_out32``) are training-only: loaded, never run.  Parity with
facexlib 0.3.0's implementation of the same network: ``tests/fixtures/faceparsing``.
"""
from __future__ import annotations

import pathlib
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.common import InvalidInput

# CelebAMask-HQ's 19 labels in the order face-parsing.PyTorch trains them (its prepropess_data.py: 0 = background)
CELEBAMASK_CLASSES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
                      "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
# One segment per group, named as core.demo.PARTS names its parts (CelebAMask-HQ has no beard label); ours
PART_GROUPS: dict[str, tuple[str, ...]] = {
    "background": ("background",), "skin": ("skin", "nose", "l_ear", "r_ear", "neck"), "hair": ("hair",),
    "eyes": ("l_eye", "r_eye"), "brows": ("l_brow", "r_brow"), "mouth": ("mouth", "u_lip", "l_lip"),
    "glasses": ("eye_g",), "shirt": ("cloth",), "extra": ("hat", "ear_r", "neck_l"),
}
PARSE_SIZE = 512  # face-parsing.PyTorch test.py: faces resized to 512x512 (bilinear) before parsing
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # face-parsing.PyTorch test.py: torchvision Normalize, ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm, then ReLU in forward; tensors ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _ResidualBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1-conv shortcut (``downsample.0/1``)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ResNet18(nn.Module):
    """ResNet-18 trunk without its classifier: features at 1/8, 1/16, 1/32 (128, 256, 512 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (cin, cout, stride) in enumerate(widths, 1):
            setattr(self, f"layer{i}", nn.Sequential(_ResidualBlock(cin, cout, stride), _ResidualBlock(cout, cout, 1)))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


class _AttentionRefinement(nn.Module):
    """BiSeNet's ARM: features reweighted per channel by a sigmoid of their global average."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBN(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        f = self.conv(x)
        return f * torch.sigmoid(self.bn_atten(self.conv_atten(f.mean((2, 3), keepdim=True))))


class _ContextPath(nn.Module):
    """ResNet-18 with ARMs at 1/32 and 1/16 and a global-context term: ``(f8, context at 1/8)``."""

    def __init__(self):
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16, self.arm32 = _AttentionRefinement(256, 128), _AttentionRefinement(512, 128)
        self.conv_head32, self.conv_head16 = _ConvBN(128, 128), _ConvBN(128, 128)
        self.conv_avg = _ConvBN(512, 128, k=1)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        glob = self.conv_avg(f32.mean((2, 3), keepdim=True))  # broadcast over the 1/32 grid (nearest upsampling)
        c32 = self.conv_head32(F.interpolate(self.arm32(f32) + glob, size=f16.shape[-2:], mode="nearest"))
        c16 = self.conv_head16(F.interpolate(self.arm16(f16) + c32, size=f8.shape[-2:], mode="nearest"))
        return f8, c16


class _FeatureFusion(nn.Module):
    """BiSeNet's FFM: concatenation, 1x1 conv+BN, then a squeeze-excitation residual reweighting."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = _ConvBN(cin, cout, k=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, a, b):
        f = self.convblk(torch.cat([a, b], 1))
        return f + f * torch.sigmoid(self.conv2(F.relu(self.conv1(f.mean((2, 3), keepdim=True)))))


class _OutputHead(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = _ConvBN(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """``(N,3,H,W)`` ImageNet-normalised RGB -> class logits ``(N,classes,H,W)`` (bilinear, corners aligned, as
    the reference upsamples its 1/8 output)."""

    def __init__(self, classes: int = len(CELEBAMASK_CLASSES)):
        super().__init__()
        self.cp = _ContextPath()
        self.ffm = _FeatureFusion(256, 256)
        self.conv_out = _OutputHead(256, 256, classes)
        self.conv_out16 = _OutputHead(128, 64, classes)  # auxiliary training heads: loaded, not run
        self.conv_out32 = _OutputHead(128, 64, classes)

    def forward(self, x):
        f8, context = self.cp(x)
        logits = self.conv_out(self.ffm(f8, context))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


class FaceParser(nn.Module):
    """A face parser as a segmenter's image network: ``(N,3,H,W)`` in [-1,1] -> ``(N,len(parts),H,W)`` log
    probabilities of the part groups (:data:`PART_GROUPS`: the class probabilities summed per group).  Faces are
    resized to ``size`` (the network's training resolution) and the result back to ``(H,W)``."""

    def __init__(self, net: BiSeNet, size: int = PARSE_SIZE):
        super().__init__()
        self.net, self.size = net, int(size)
        self.parts = tuple(PART_GROUPS)
        index = {name: i for i, name in enumerate(CELEBAMASK_CLASSES)}
        groups = torch.zeros(len(self.parts), len(CELEBAMASK_CLASSES))
        for g, names in enumerate(PART_GROUPS.values()):
            groups[g, [index[n] for n in names]] = 1.0
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def class_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(N,3,H,W)`` in [-1,1] -> the 19 CelebAMask-HQ class logits ``(N,19,H,W)``."""
        H, W = images.shape[-2:]
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        if (H, W) != (self.size, self.size):  # antialiased when shrinking, as PIL's BILINEAR in the reference test.py
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=min(H, W) > self.size)
        logits = self.net(x)
        if (H, W) != (self.size, self.size):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.class_logits(images), 1)
        return torch.log(torch.einsum("gc,nchw->nghw", self.groups, probs).clamp_min(1e-12))


def load_face_parser(path, size: int = PARSE_SIZE) -> FaceParser:
    """Read a face-parsing.PyTorch BiSeNet ``state_dict`` file (``weights_only=True``; a ``module.`` prefix is
    stripped).  InvalidInput naming the file and what is wrong: unreadable, not a BiSeNet, not 19 classes."""
    path = pathlib.Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # objects beyond tensors: refused, never unpickled
        raise InvalidInput(f"cannot read the face-parsing file {path.name}: it holds Python objects besides "
                           "tensors (only plain state_dict files are read)") from exc
    except Exception as exc:  # noqa: BLE001 - empty, truncated, or not a torch file
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InvalidInput(f"cannot read the face-parsing file {path.name}: {why}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInput(f"{path.name} is not a BiSeNet state_dict (a mapping of tensor names to tensors)")
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    head = state.get("conv_out.conv_out.weight")
    if head is None or head.ndim != 4:
        raise InvalidInput(f"{path.name} is not a face-parsing BiSeNet file (no conv_out.conv_out.weight)")
    if head.shape[0] != len(CELEBAMASK_CLASSES):
        raise InvalidInput(f"{path.name} parses {head.shape[0]} classes; the CelebAMask-HQ BiSeNet has "
                           f"{len(CELEBAMASK_CLASSES)} (face-parsing.PyTorch's 79999_iter.pth)")
    net = BiSeNet()
    want = net.state_dict()
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise InvalidInput(f"{path.name} does not match the BiSeNet face parser ({'; '.join(parts)})")
    net.load_state_dict({k: state.get(k, want[k]) for k in want})
    return FaceParser(net.eval().requires_grad_(False), size).eval()
