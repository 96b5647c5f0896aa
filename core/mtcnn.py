"""MTCNN face detector (Zhang et al. 2016) built in pure torch, with the weights of the facenet-pytorch wheel.

The three networks (PNet, RNet, ONet) match the state-dict keys of ``facenet_pytorch/data/{pnet,rnet,onet}.pt``.
Licences: facenet-pytorch (Tim Esler) is MIT; its weights are the original MTCNN Caffe models of Zhang et al.
(kpzhang93/MTCNN_face_detection_alignment, MIT) as converted by davidsandberg/facenet (MIT). Only the weight
files are read: the package itself is never imported (it imports torchvision). Non-maximum suppression, the image pyramid, box regression and landmark decoding are here.

Coordinates follow the reference implementation: boxes ``(x0, y0, x1, y1)`` and landmarks ``(x, y)`` in
pixel-index coordinates of the image the detector ran on.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.common import LatentEditError

INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"


class MissingWeights(LatentEditError):
    """The MTCNN weight files could not be found or loaded."""

    code = "missing_weights"


@dataclass(frozen=True)
class MTCNNOptions:
    """Detector settings (pixel sizes are in the image the detector sees)."""

    min_face_size: float = 20.0  # facenet-pytorch MTCNN default (minsize=20)
    thresholds: tuple = (0.6, 0.7, 0.7)  # MTCNN paper / facenet-pytorch: P-, R-, O-Net score thresholds
    factor: float = 0.709  # MTCNN reference: pyramid scale step (≈ 1/sqrt(2))
    nms_pnet_scale: float = 0.5  # facenet-pytorch: NMS IoU inside one pyramid scale
    nms_pnet: float = 0.7  # facenet-pytorch: NMS IoU across scales
    nms_rnet: float = 0.7  # facenet-pytorch
    nms_onet: float = 0.7  # facenet-pytorch: "Min" overlap in the last stage


# ----------------------------------------------------------------------------------------------- networks


class PNet(nn.Module):
    """Proposal net: fully convolutional, (N,3,H,W) in [-1,1] -> (box offsets (N,4,h,w), face prob (N,h,w))."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.prelu1(self.conv1(x))
        x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)[:, 1]


def _flatten_transposed(x):
    # The weights come from Caffe models trained on transposed images: the dense layers expect the
    # (W,H,C) flattening order.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement net: (N,3,24,24) in [-1,1] -> (box offsets (N,4), face prob (N,))."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_transposed(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net: (N,3,48,48) in [-1,1] -> (box offsets (N,4), landmarks (N,10) = 5 x then 5 y, face prob (N,))."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_transposed(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


# ----------------------------------------------------------------------------------------------- weights


def default_weights_dir() -> pathlib.Path:
    """``facenet_pytorch/data`` of the installed facenet-pytorch, found without importing the package."""
    try:
        spec = importlib.util.find_spec("facenet_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeights(
            "MTCNN face-detector weights not found: the facenet-pytorch package is not installed "
            f"(install it with `{INSTALL_HINT}`) and no weights_dir was given"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.lru_cache(maxsize=4)
def _load_nets(weights_dir: str, stamp: tuple):
    nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    for name, net in nets.items():
        path = pathlib.Path(weights_dir) / f"{name}.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        except Exception as exc:  # corrupt file, wrong keys or shapes
            raise MissingWeights(f"cannot load MTCNN weights from {path}: {exc}") from exc
        net.eval().requires_grad_(False)
    return nets["pnet"], nets["rnet"], nets["onet"]


def load_mtcnn(weights_dir=None):
    """(PNet, RNet, ONet) in eval mode; ``weights_dir`` holds pnet.pt, rnet.pt, onet.pt (default: the installed
    facenet-pytorch's data folder). Cached per folder and file versions."""
    folder = (pathlib.Path(weights_dir) if weights_dir is not None else default_weights_dir()).resolve()
    stamp = []
    for name in ("pnet", "rnet", "onet"):
        path = folder / f"{name}.pt"
        if not path.is_file():
            raise MissingWeights(f"MTCNN weight file missing: {path} (install it with `{INSTALL_HINT}`)")
        st = path.stat()
        stamp.append((st.st_size, st.st_mtime_ns))
    return _load_nets(str(folder), tuple(stamp))


# ----------------------------------------------------------------------------------------------- box utilities


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression.

    boxes (N,4) x0,y0,x1,y1; scores (N,). Overlap is intersection / union (``mode="union"``) or
    intersection / smaller area (``mode="min"``). Returns the kept indices, best score first.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x0, y0, x1, y1 = (boxes[:, i].astype(np.float64) for i in range(4))
    area = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0)
        ih = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0)
        inter = iw * ih
        if mode == "min":
            denom = np.minimum(area[i], area[rest])
        else:
            denom = area[i] + area[rest] - inter
        overlap = np.where(denom > 0, inter / np.maximum(denom, 1e-12), 0.0)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _regress(boxes: np.ndarray, offsets: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Apply MTCNN box regression: offsets (N,4) are fractions of the box width/height."""
    w = boxes[:, 2] - boxes[:, 0] + (1 if plus_one else 0)
    h = boxes[:, 3] - boxes[:, 1] + (1 if plus_one else 0)
    out = boxes.copy()
    out[:, 0] += offsets[:, 0] * w
    out[:, 1] += offsets[:, 1] * h
    out[:, 2] += offsets[:, 2] * w
    out[:, 3] += offsets[:, 3] * h
    return out


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre (side = the longer side)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out = boxes.copy()
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _crop_patches(integral: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Crop integer boxes (the reference's 1-based inclusive convention) and area-resize them to size².

    ``integral`` (3,H+1,W+1) float64 is the summed-area table of the image; pixels outside the image count as
    zero, as in the reference MATLAB code. Each output cell averages the source cells adaptive average pooling
    would (start = floor(i·n/size), end = ceil((i+1)·n/size)), for all boxes at once.
    Returns (N,3,size,size) normalised to [-1,1] as the networks expect.
    """
    _, H1, W1 = integral.shape
    ib = np.trunc(boxes[:, :4]).astype(np.int64)
    i = np.arange(size)

    def cells(start, n):  # (N,size) start and end source indices of each output cell
        n = np.maximum(n, 1)[:, None]
        return start[:, None] + (i * n) // size, start[:, None] - ((-(i + 1) * n) // size)

    xs, xe = cells(ib[:, 0] - 1, ib[:, 2] - ib[:, 0] + 1)
    ys, ye = cells(ib[:, 1] - 1, ib[:, 3] - ib[:, 1] + 1)
    count = ((ye - ys)[:, :, None] * (xe - xs)[:, None, :]).astype(np.float64)
    xs, xe = np.clip(xs, 0, W1 - 1), np.clip(xe, 0, W1 - 1)
    ys, ye = np.clip(ys, 0, H1 - 1), np.clip(ye, 0, H1 - 1)

    def corner(y, x):
        return integral[:, y[:, :, None], x[:, None, :]]  # (3,N,size,size)

    total = corner(ye, xe) - corner(ys, xe) - corner(ye, xs) + corner(ys, xs)
    patches = torch.from_numpy((total / count).astype(np.float32)).permute(1, 0, 2, 3)
    return (patches - 127.5) * 0.0078125


def _summed_area(image: np.ndarray) -> np.ndarray:
    """(H,W,3) -> (3,H+1,W+1) float64 summed-area table with a zero first row and column."""
    table = np.zeros((3, image.shape[0] + 1, image.shape[1] + 1))
    table[:, 1:, 1:] = np.cumsum(np.cumsum(np.moveaxis(image, 2, 0), axis=1, dtype=np.float64), axis=2)
    return table


@torch.no_grad()
def run_mtcnn(image: np.ndarray, options: MTCNNOptions | None = None, weights_dir=None):
    """Detect faces in a uint8 RGB image (H,W,3).

    Returns ``boxes (N,4) float64 x0,y0,x1,y1``, ``scores (N,)`` and ``landmarks (N,5,2)`` (left eye, right eye,
    nose, left mouth corner, right mouth corner; x,y), sorted by score, best first.
    """
    opt = options or MTCNNOptions()
    pnet, rnet, onet = load_mtcnn(weights_dir)
    img = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    H, W = img.shape[1:]
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))

    # Stage 1: PNet over an image pyramid, smallest detectable face = min_face_size.
    m = 12.0 / opt.min_face_size
    scales, side = [], min(H, W) * m
    while side >= 12:
        scales.append(m * opt.factor ** len(scales))
        side *= opt.factor
    candidates = []
    for scale in scales:
        size = (int(H * scale + 1), int(W * scale + 1))
        level = F.interpolate(img[None], size=size, mode="area")
        level = ((level - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last)  # ~1.7x faster convs
        reg, prob = pnet(level)
        ys, xs = np.nonzero(prob[0].numpy() >= opt.thresholds[0])
        if ys.size == 0:
            continue
        score = prob[0].numpy()[ys, xs].astype(np.float64)
        offsets = reg[0].numpy()[:, ys, xs].T.astype(np.float64)
        cells = np.stack([xs, ys], 1).astype(np.float64)
        q0 = np.floor((2 * cells + 1) / scale)  # stride 2, 12-pixel cells, 1-based as in the reference
        q1 = np.floor((2 * cells + 12) / scale)
        boxes = np.concatenate([q0, q1, score[:, None], offsets], 1)
        candidates.append(boxes[nms(boxes[:, :4], boxes[:, 4], opt.nms_pnet_scale)])
    if not candidates:
        return empty
    boxes = np.concatenate(candidates)
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], opt.nms_pnet)]
    boxes = np.concatenate([_regress(boxes[:, :4], boxes[:, 5:9], plus_one=False), boxes[:, 4:5]], 1)
    boxes = _square(boxes)

    # Stage 2: RNet on 24x24 crops.
    integral = _summed_area(image)
    offsets, score = rnet(_crop_patches(integral, boxes, 24))
    keep = score.numpy() > opt.thresholds[1]
    if not keep.any():
        return empty
    boxes = np.concatenate([boxes[keep, :4], score.numpy()[keep, None].astype(np.float64)], 1)
    offsets = offsets.numpy()[keep].astype(np.float64)
    pick = nms(boxes[:, :4], boxes[:, 4], opt.nms_rnet)
    boxes, offsets = boxes[pick], offsets[pick]
    boxes = _square(np.concatenate([_regress(boxes[:, :4], offsets), boxes[:, 4:5]], 1))

    # Stage 3: ONet on 48x48 crops -> final boxes, scores and five landmarks.
    offsets, points, score = onet(_crop_patches(integral, boxes, 48))
    keep = score.numpy() > opt.thresholds[2]
    if not keep.any():
        return empty
    boxes = np.concatenate([boxes[keep, :4], score.numpy()[keep, None].astype(np.float64)], 1)
    offsets = offsets.numpy()[keep].astype(np.float64)
    points = points.numpy()[keep].astype(np.float64)
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    landmarks = np.stack([w[:, None] * points[:, :5] + boxes[:, :1] - 1,
                          h[:, None] * points[:, 5:] + boxes[:, 1:2] - 1], axis=2)
    boxes = np.concatenate([_regress(boxes[:, :4], offsets), boxes[:, 4:5]], 1)
    pick = nms(boxes[:, :4], boxes[:, 4], opt.nms_onet, mode="min")
    boxes, landmarks = boxes[pick], landmarks[pick]
    order = np.argsort(-boxes[:, 4], kind="stable")
    return boxes[order, :4], boxes[order, 4], landmarks[order]
