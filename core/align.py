"""Real photos: face detection, FFHQ alignment and full-resolution paste-back inside the selection.

Coordinates are pixel-index coordinates: the centre of pixel ``image[i, j]`` is ``(x=j, y=i)``.
Layer images are numpy ``(H,W,C)`` (or ``(H,W)``) arrays of dtype uint8, uint16 or float; integer images are
worked on as float32 in [0,1] (value / 255 or / 65535) and converted back, float images keep their range.

Pipeline: ``detect_faces`` (MTCNN, :mod:`core.mtcnn`) -> ``choose_face`` (the face the selection covers most)
-> ``align_face`` (FFHQ quad, reflect padding blurred outside the image, antialiased resampling) -> the generator
works on the crop -> ``paste_back`` (inverse warp to the layer's resolution, alpha = selection ∩ feathered face
region, composite; pixels where alpha == 0 are the original's, bit for bit).

Size (~620 lines, over the ~500 guideline on purpose): the module is that one pipeline in five sections (faces,
transform, image helpers, align, paste back) that share the private resampling helpers and the
``AlignTransform`` invariants; split, the halves would import each other's internals.  The detector network
itself lives in :mod:`core.mtcnn`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.common import InvalidInput, NoFace
from core.mtcnn import MTCNNOptions, run_mtcnn

MIN_FACE_PX = 32  # ours: a face box side below this has too few pixels for a meaningful edit


# ----------------------------------------------------------------------------------------------- faces


@dataclass(eq=False)
class Face:
    """One detected face: ``box`` (x0,y0,x1,y1), ``landmarks`` (5,2) float64 x,y of left eye, right eye, nose,
    left mouth corner, right mouth corner ("left" = the image's left), detector ``score`` in [0,1]."""

    box: tuple
    landmarks: np.ndarray
    score: float

    @property
    def size(self) -> float:
        """Shorter side of the box in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    def to_json(self) -> dict:
        return {"box": [float(v) for v in self.box], "landmarks": self.landmarks.tolist(), "score": float(self.score)}

    @classmethod
    def from_json(cls, data: dict) -> "Face":
        return cls(tuple(float(v) for v in data["box"]), _landmarks(data["landmarks"]), float(data["score"]))


@dataclass(frozen=True)
class DetectOptions:
    """Face detection settings."""

    max_side: int = 1024  # ours: detect on the photo downscaled to this long side (speed); faces below
    #                       min_face_size * long_side / max_side original pixels are missed
    mtcnn: MTCNNOptions = MTCNNOptions()  # facenet-pytorch defaults: min face 20 px, thresholds 0.6/0.7/0.7


def detect_faces(image_uint8_rgb: np.ndarray, options: DetectOptions | None = None, weights_dir=None) -> list:
    """Faces in a uint8 RGB image ``(H,W,3)``, best score first (MTCNN; see :func:`as_uint8_rgb` for other inputs).

    Large photos are downscaled to ``options.max_side`` for detection and the results mapped back to the
    original's pixel coordinates. ``weights_dir`` overrides where pnet.pt/rnet.pt/onet.pt are read from.
    """
    image = image_uint8_rgb
    if not isinstance(image, np.ndarray):
        raise InvalidInput(f"detect_faces needs a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidInput(f"detect_faces needs a uint8 RGB image, got dtype {image.dtype} (use as_uint8_rgb)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput(f"detect_faces needs an (H,W,3) RGB image, got shape {tuple(image.shape)}")
    if min(image.shape[:2]) < 12:
        raise InvalidInput(f"image too small for face detection: {image.shape[1]}x{image.shape[0]} px")
    opt = options or DetectOptions()
    H, W = image.shape[:2]
    small = image
    if opt.max_side and max(H, W) > opt.max_side:
        s = opt.max_side / max(H, W)
        size = (max(1, round(W * s)), max(1, round(H * s)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    sx, sy = small.shape[1] / W, small.shape[0] / H
    boxes, scores, landmarks = run_mtcnn(small, opt.mtcnn, weights_dir)
    # map pixel-index coordinates back through the resize (pixel centres stay pixel centres)
    boxes = (boxes + 0.5) / np.array([sx, sy, sx, sy]) - 0.5
    landmarks = (landmarks + 0.5) / np.array([sx, sy]) - 0.5
    return [Face(tuple(float(v) for v in b), lm, float(s)) for b, s, lm in zip(boxes, scores, landmarks)]


def as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """(H,W), (H,W,1), (H,W,3) or (H,W,4) uint8/uint16/float [0,1] -> uint8 (H,W,3) for :func:`detect_faces`."""
    x, _, _ = _to_float(_check_image(image, "image"))
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return np.clip(np.rint(x[:, :, :3] * 255.0), 0, 255).astype(np.uint8)


def layer_selection(selection, layer_shape, offset=(0, 0)) -> np.ndarray | None:
    """The part of ``selection`` covering a layer, as float32 ``(H,W)`` in [0,1] (0 where it does not reach).

    ``selection``: None (everything selected), or ``(Hs,Ws)`` bool / uint8 / uint16 / float in [0,1] in canvas
    coordinates; ``offset`` = (x, y) of the layer's top-left pixel in those coordinates.
    """
    if selection is None:
        return None
    sel = np.asarray(selection)
    if sel.ndim == 3 and sel.shape[2] == 1:
        sel = sel[:, :, 0]
    if sel.ndim != 2:
        raise InvalidInput(f"selection must be an (H,W) mask, got shape {tuple(sel.shape)}")
    if sel.dtype == bool:
        sel = sel.astype(np.float32)
    elif sel.dtype in (np.uint8, np.uint16):
        sel = sel.astype(np.float32) / np.iinfo(sel.dtype).max
    elif np.issubdtype(sel.dtype, np.floating):
        if not np.isfinite(sel).all():
            raise InvalidInput("selection contains NaN or infinite values")
        sel = np.clip(sel.astype(np.float32), 0.0, 1.0)
    else:
        raise InvalidInput(f"selection dtype {sel.dtype} is not supported (bool, uint8, uint16 or float)")
    H, W = layer_shape[:2]
    ox, oy = (int(v) for v in offset)
    out = np.zeros((H, W), np.float32)
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + W, sel.shape[1]), min(oy + H, sel.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = sel[y0:y1, x0:x1]
    return out


def choose_face(faces, selection=None, *, min_size: float = MIN_FACE_PX) -> Face:
    """The face whose box holds the most selection (the largest face when ``selection`` is None).

    ``selection``: ``(H,W)`` float in [0,1] in the layer's coordinates (see :func:`layer_selection`).
    Raises InvalidInput when there is no face, no face in the selection, or the chosen face is smaller
    than ``min_size`` pixels (shorter box side).
    """
    faces = list(faces)
    if not faces:
        raise NoFace("no face found in the layer")
    if selection is None:
        best = max(faces, key=lambda f: ((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.score))
    else:
        sel = np.asarray(selection, dtype=np.float32)
        H, W = sel.shape
        overlaps = []
        for f in faces:
            x0, y0 = max(int(math.floor(f.box[0])), 0), max(int(math.floor(f.box[1])), 0)
            x1, y1 = min(int(math.ceil(f.box[2])) + 1, W), min(int(math.ceil(f.box[3])) + 1, H)
            overlaps.append(float(sel[y0:y1, x0:x1].sum()) if x1 > x0 and y1 > y0 else 0.0)
        if max(overlaps) <= 0:
            raise NoFace(
                f"the selection contains no face ({len(faces)} face(s) found in the layer, none inside the selection)"
            )
        best = faces[max(range(len(faces)), key=lambda i: (overlaps[i], faces[i].score))]
    if best.size < min_size:
        raise InvalidInput(f"the face is too small: {best.size:.0f} px across; at least {min_size:g} px is needed")
    return best


def find_face(image, selection=None, *, offset=(0, 0), min_size: float = MIN_FACE_PX,
              options: DetectOptions | None = None, weights_dir=None) -> Face:
    """Detect faces in a layer image (any supported dtype/channels) and choose the one in the selection.

    ``selection`` is in canvas coordinates with the layer's top-left at ``offset`` (see :func:`layer_selection`).
    """
    img = _check_image(image, "image")
    faces = detect_faces(as_uint8_rgb(img), options, weights_dir)
    return choose_face(faces, layer_selection(selection, img.shape, offset), min_size=min_size)


# ----------------------------------------------------------------------------------------------- transform


def _landmarks(value) -> np.ndarray:
    lm = np.asarray(getattr(value, "landmarks", value), dtype=np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise InvalidInput(f"face landmarks must be a finite (5,2) array, got shape {lm.shape}")
    return lm


def ffhq_quad(landmarks) -> np.ndarray:
    """FFHQ crop quad (4,2) float64 (top-left, bottom-left, bottom-right, top-right) from 5 landmarks.

    NVlabs/ffhq-dataset recreate_aligned_images: eye centres and mouth corners; side = 2·max(|e2e|·2.0,
    |e2m|·1.8), centred at eye_avg + 0.1·e2m, rotated so the eyes are level.
    """
    lm = _landmarks(landmarks)
    eye_left, eye_right, _, mouth_left, mouth_right = lm
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) * 0.5 - eye_avg
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    norm = np.hypot(*x)
    if norm < 1e-6:
        raise InvalidInput("face landmarks are degenerate (eyes and mouth coincide)")
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / norm
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


@dataclass(eq=False)
class AlignTransform:
    """Where an aligned crop sits in its layer.

    ``quad`` (4,2) float64: the layer points (pixel-index coordinates) of the crop's outer corners, in the order
    top-left, bottom-left, bottom-right, top-right (a square for FFHQ); ``size``: crop side in pixels;
    ``image_size``: (H, W) of the layer; ``kind``: "face" (paste-back fades out before the crop's edges) or
    "whole" (the crop is the whole layer, ``align: none``).
    """

    quad: np.ndarray
    size: int
    image_size: tuple
    kind: str = "face"

    def __post_init__(self):
        self.quad = np.asarray(self.quad, dtype=np.float64)
        self.size = int(self.size)
        self.image_size = tuple(int(v) for v in self.image_size)
        if self.quad.shape != (4, 2) or not np.isfinite(self.quad).all():
            raise InvalidInput(f"transform quad must be a finite (4,2) array, got shape {self.quad.shape}")
        if self.size < 1 or len(self.image_size) != 2 or min(self.image_size) < 1:
            raise InvalidInput(f"bad transform sizes: size={self.size}, image_size={self.image_size}")
        if self.kind not in ("face", "whole"):
            raise InvalidInput(f"transform kind must be 'face' or 'whole', got {self.kind!r}")
        q = self.quad
        side = max(np.hypot(*(q[3] - q[0])), np.hypot(*(q[1] - q[0])))
        if side <= 0 or np.hypot(*(q[0] + q[2] - q[1] - q[3])) > 1e-6 * side + 1e-9:
            raise InvalidInput("transform quad must be a non-degenerate parallelogram")

    @property
    def matrix(self) -> np.ndarray:
        """(3,3) float64 mapping crop pixel (x,y,1) to layer pixel (x,y,1) (pixel-index coordinates)."""
        q = self.quad
        ex = (q[3] - q[0]) / self.size
        ey = (q[1] - q[0]) / self.size
        t = q[0] + 0.5 * (ex + ey)
        return np.array([[ex[0], ey[0], t[0]], [ex[1], ey[1], t[1]], [0.0, 0.0, 1.0]])

    @property
    def inverse(self) -> np.ndarray:
        """(3,3) float64 mapping layer pixel (x,y,1) to crop pixel (x,y,1)."""
        return np.linalg.inv(self.matrix)

    @property
    def scale(self) -> float:
        """Layer pixels per crop pixel (geometric mean of the two axes)."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))

    def crop_to_image(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return p @ self.matrix[:2, :2].T + self.matrix[:2, 2]

    def image_to_crop(self, points) -> np.ndarray:
        inv = self.inverse
        p = np.asarray(points, dtype=np.float64)
        return p @ inv[:2, :2].T + inv[:2, 2]

    def resized(self, size: int) -> "AlignTransform":
        """The same quad sampled at another crop size (e.g. a generator output larger than the aligned crop)."""
        return AlignTransform(self.quad, size, self.image_size, self.kind)

    def to_json(self) -> dict:
        """JSON-ready dict; floats are written with repr, so ``from_json`` restores the quad exactly."""
        return {"quad": self.quad.tolist(), "size": self.size, "image_size": list(self.image_size), "kind": self.kind}

    @classmethod
    def from_json(cls, data: dict) -> "AlignTransform":
        try:
            return cls(np.array(data["quad"], dtype=np.float64), int(data["size"]), tuple(data["image_size"]),
                       str(data.get("kind", "face")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"bad alignment transform: {exc}") from exc


def face_transform(face, size: int, image_size) -> AlignTransform:
    """The FFHQ transform of a face (a :class:`Face` or (5,2) landmarks) for a ``size``² crop of an (H,W) layer."""
    return AlignTransform(ffhq_quad(face), _check_size(size), tuple(image_size[:2]), "face")


# ----------------------------------------------------------------------------------------------- image helpers


def _check_size(size) -> int:
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise InvalidInput(f"crop size must be a positive integer, got {size!r}")
    return int(size)


def _check_image(image, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InvalidInput(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise InvalidInput(f"{name} must be (H,W) or (H,W,C) with C in 1,3,4; got shape {tuple(image.shape)}")
    if not (image.dtype in (np.uint8, np.uint16) or np.issubdtype(image.dtype, np.floating)):
        raise InvalidInput(f"{name} dtype {image.dtype} is not supported (uint8, uint16 or float)")
    return image


def _scale_of(dtype) -> float | None:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None


def _to_float(image: np.ndarray):
    """-> (float32 array, original dtype, integer scale or None)."""
    scale = _scale_of(image.dtype)
    x = image.astype(np.float32)
    if scale is not None:
        x /= scale
    elif not np.isfinite(x).all():
        raise InvalidInput("image contains NaN or infinite values")
    return x, image.dtype, scale


def _from_float(x: np.ndarray, dtype, scale) -> np.ndarray:
    if scale is None:
        return x.astype(dtype)
    return np.clip(np.rint(x * scale), 0, scale).astype(dtype)


def _reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices start..stop-1 folded into [0,n) by mirror reflection (numpy 'reflect', any distance)."""
    i = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def _box_reduce(x: np.ndarray, f: int) -> np.ndarray:
    """Average f×f blocks of (h,w,C); h and w must be multiples of f."""
    if f <= 1:
        return x
    h, w, c = x.shape
    return x.reshape(h // f, f, w // f, f, c).mean(axis=(1, 3), dtype=np.float32)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of (h,w,C) float32 (reflect borders); large sigmas are blurred at reduced resolution."""
    if sigma <= 0:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
    h, w = t.shape[2:]
    d = max(1, int(sigma // 2))
    if d > 1:
        t = F.interpolate(t, size=(max(1, math.ceil(h / d)), max(1, math.ceil(w / d))), mode="area")
    s = sigma / d
    r = max(1, int(math.ceil(3 * s)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / s) ** 2)
    k = (k / k.sum())
    c = t.shape[1]
    for dim in (2, 3):
        pad = min(r, t.shape[dim] - 1)
        if pad > 0:
            t = F.pad(t, (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad), mode="reflect")
        kk = k[r - pad: r + pad + 1]
        weight = (kk.view(1, 1, -1, 1) if dim == 2 else kk.view(1, 1, 1, -1)).repeat(c, 1, 1, 1)
        t = F.conv2d(t, weight, groups=c)
    if d > 1:
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).numpy()


def _lanczos3(t: np.ndarray) -> np.ndarray:
    """Lanczos kernel with 3 lobes (PIL's LANCZOS), support |t| < 3."""
    t = np.asarray(t, dtype=np.float64)
    return np.where(np.abs(t) < 3, np.sinc(t) * np.sinc(t / 3), 0.0)


def _resample(src: np.ndarray, dst_to_src: np.ndarray, out_shape, origin=(0, 0),
              max_points: int = 1 << 22) -> np.ndarray:
    """Sample (h,w,C) float32 ``src`` at the pixels of an (Ho,Wo) window of a destination image.

    ``dst_to_src`` (3,3): destination pixel (x,y,1) -> src pixel coordinates; the window's top-left destination
    pixel is ``origin`` (x, y). Bicubic interpolation. When src is denser than the destination (k src px per
    dst px, k > 1) it is antialiased like PIL's resize: bicubic samples on a grid ss = ceil(k) times denser than
    the destination, then a separable Lanczos-3 filter at the destination's scale (support ±3 px), stride ss.
    Callers pre-reduce src by an integer factor when it is more than 4× denser. Returns (Ho,Wo,C) float32.
    """
    Ho, Wo = out_shape
    h, w, c = src.shape
    A = np.asarray(dst_to_src, dtype=np.float64)
    k = math.sqrt(abs(np.linalg.det(A[:2, :2])))
    ss = max(1, math.ceil(k - 1e-6))
    m = 3 if ss > 1 else 0  # extra destination pixels each side for the filter support
    src_t = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32)).permute(2, 0, 1)[None]
    sub = (np.arange(ss) + 0.5) / ss - 0.5
    xs = (origin[0] + np.arange(-m, Wo + m)[:, None] + sub[None]).reshape(-1)
    if ss > 1:
        taps = torch.from_numpy(_lanczos3(-3.5 + (np.arange(7 * ss) + 0.5) / ss).astype(np.float32))
        taps = taps / taps.sum()
        wx = taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        wy = taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    out = np.empty((Ho, Wo, c), np.float32)
    rows = max(1, max_points // max(1, (Wo + 2 * m) * ss * ss) - 2 * m)
    for r0 in range(0, Ho, rows):
        r1 = min(Ho, r0 + rows)
        ys = (origin[1] + np.arange(r0 - m, r1 + m)[:, None] + sub[None]).reshape(-1)
        gx = A[0, 0] * xs[None, :] + A[0, 1] * ys[:, None] + A[0, 2]
        gy = A[1, 0] * xs[None, :] + A[1, 1] * ys[:, None] + A[1, 2]
        grid = np.stack([(2 * gx + 1) / w - 1, (2 * gy + 1) / h - 1], axis=-1).astype(np.float32)
        res = F.grid_sample(src_t, torch.from_numpy(grid)[None], mode="bicubic", padding_mode="border",
                            align_corners=False)
        if ss > 1:
            res = F.conv2d(F.conv2d(res, wx, stride=(1, ss), groups=c), wy, stride=(ss, 1), groups=c)
        out[r0:r1] = res[0].permute(1, 2, 0).numpy()
    return out


def _shrink_factor(k: float) -> int:
    # NVlabs/ffhq-dataset: shrink by floor(k/2) with a box filter when the source is ≥ 4× denser
    return int(math.floor(k / 2)) if k >= 4 else 1


# ----------------------------------------------------------------------------------------------- align


@dataclass(frozen=True)
class AlignOptions:
    pad_blur: float = 0.02  # FFHQ: Gaussian sigma of the padding blur, as a fraction of the quad side
    pad_width: float = 0.3  # FFHQ: padding ramps over at least this fraction of the quad side


def align_face(image: np.ndarray, face, size: int, options: AlignOptions | None = None):
    """FFHQ-align a face: ``(crop (size,size,C) of image's dtype, AlignTransform)``.

    ``image`` (H,W,C) or (H,W), uint8/uint16/float; ``face`` a :class:`Face` or (5,2) landmarks.
    Outside the image the crop is mirror-padded and blurred towards the median colour, as FFHQ does.
    """
    img = _check_image(image, "image")
    transform = face_transform(face, size, img.shape[:2])
    return warp_crop(img if np.ndim(image) == 3 else image, transform, options), transform


def warp_crop(image: np.ndarray, transform: AlignTransform, options: AlignOptions | None = None) -> np.ndarray:
    """Resample the crop described by ``transform`` from a layer image (same dtype as the image)."""
    opt = options or AlignOptions()
    img = _check_image(image, "image")
    H, W = img.shape[:2]
    if (H, W) != transform.image_size:
        raise InvalidInput(f"image is {W}x{H} px but the transform was made for "
                           f"{transform.image_size[1]}x{transform.image_size[0]} px")
    S, k = transform.size, transform.scale
    f = _shrink_factor(k)
    q = transform.quad
    margin = int(math.ceil(3 * k)) + 3 * f + 2  # antialias support (±3 crop px) + bicubic support + rounding
    rx0 = int(math.floor(q[:, 0].min())) - margin
    ry0 = int(math.floor(q[:, 1].min())) - margin
    nw = -(-(int(math.ceil(q[:, 0].max())) + margin + 1 - rx0) // f)
    nh = -(-(int(math.ceil(q[:, 1].max())) + margin + 1 - ry0) // f)
    xs = _reflect_indices(rx0, rx0 + nw * f, W)
    ys = _reflect_indices(ry0, ry0 + nh * f, H)
    region, dtype, scale = _to_float(img[ys[:, None], xs[None, :]])
    region = _box_reduce(region, f)
    # reduced pixel (j,i) has its centre at layer (rx0 + f*j + (f-1)/2, ry0 + f*i + (f-1)/2)
    cx = rx0 + f * np.arange(nw) + (f - 1) / 2
    cy = ry0 + f * np.arange(nh) + (f - 1) / 2
    if rx0 < 0 or ry0 < 0 or rx0 + nw * f > W or ry0 + nh * f > H:
        region = _blur_padding(region, cx, cy, W, H, S * k / f, opt)
    # crop pixel -> layer pixel -> reduced-region pixel
    to_region = np.array([[1 / f, 0, -(rx0 + (f - 1) / 2) / f], [0, 1 / f, -(ry0 + (f - 1) / 2) / f], [0, 0, 1]])
    crop = _from_float(_resample(region, to_region @ transform.matrix, (S, S)), dtype, scale)
    return crop[:, :, 0] if np.ndim(image) == 2 else crop


def _blur_padding(region, cx, cy, W, H, qsize, opt: AlignOptions):
    """FFHQ padding treatment of the mirrored pixels outside the layer (distances in reduced pixels).

    FFHQ blends towards a Gaussian blur (weight clip(3m+1)) and the median colour (weight clip(m)), where m is the
    distance into the padding over the pad width; here the blur weight is clip(3m) so pixels inside the layer
    are never changed (FFHQ also blurs a band inside the image edge).
    """
    step = cx[1] - cx[0] if len(cx) > 1 else 1.0
    pad_min = max(opt.pad_width * qsize, 1.0)
    out_l, out_r = np.maximum(-0.5 - cx, 0) / step, np.maximum(cx - (W - 0.5), 0) / step
    out_t, out_b = np.maximum(-0.5 - cy, 0) / step, np.maximum(cy - (H - 0.5), 0) / step
    mx = np.maximum(out_l / max(out_l.max(), pad_min), out_r / max(out_r.max(), pad_min))
    my = np.maximum(out_t / max(out_t.max(), pad_min), out_b / max(out_b.max(), pad_min))
    m = np.maximum(mx[None, :], my[:, None])[:, :, None].astype(np.float32)
    inside = m[:, :, 0] == 0
    blurred = _gaussian_blur(region, opt.pad_blur * qsize)
    region = region + (blurred - region) * np.clip(m * 3.0, 0.0, 1.0)
    median = np.median(region[inside], axis=0) if inside.any() else np.median(region.reshape(-1, region.shape[2]), 0)
    return region + (median - region) * np.clip(m, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- paste back


@dataclass(frozen=True)
class PasteOptions:
    erode: float = 0.05  # ours: the face region stops this fraction of the quad side inside the crop's edge
    feather: float = 8.0  # ours (= SessionOptions.feather): width in layer pixels of the face region's soft edge


def face_alpha(transform: AlignTransform, window=None, *, feather: float = PasteOptions.feather,
               erode: float = PasteOptions.erode) -> np.ndarray:
    """Soft face region (float32 in [0,1]) over ``window`` = (x0, y0, x1, y1) of the layer (default: all of it).

    The crop's square, eroded by ``erode`` × quad side, with a smoothstep edge ``feather`` layer pixels wide
    lying inside the eroded square. A "whole" transform covers the whole layer (alpha 1).
    """
    H, W = transform.image_size
    x0, y0, x1, y1 = window if window is not None else (0, 0, W, H)
    if transform.kind == "whole":
        return np.ones((y1 - y0, x1 - x0), np.float32)
    inv, S, k = transform.inverse, transform.size, transform.scale
    xs = np.arange(x0, x1, dtype=np.float64)[None, :]
    ys = np.arange(y0, y1, dtype=np.float64)[:, None]
    u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2] + 0.5  # continuous crop coordinates in [0,S]
    v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2] + 0.5
    dist = np.minimum(np.minimum(u, S - u), np.minimum(v, S - v)) * k - erode * S * k  # layer px inside the edge
    if feather <= 0:
        return (dist > 0).astype(np.float32)
    t = np.clip(dist / feather, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def warp_back(crop: np.ndarray, transform: AlignTransform, window=None) -> np.ndarray:
    """Inverse-warp a float32 crop (S,S,C) onto ``window`` = (x0, y0, x1, y1) of the layer -> (y1-y0, x1-x0, C).

    Bicubic; antialiased (box pre-reduction + supersampling) when the crop is denser than the layer.
    """
    t = transform.resized(crop.shape[0])
    H, W = t.image_size
    x0, y0, x1, y1 = window if window is not None else (0, 0, W, H)
    f = _shrink_factor(1.0 / t.scale)
    src = crop
    if f > 1:
        S = crop.shape[0]
        n = -(-S // f) * f
        idx = _reflect_indices(0, n, S)
        src = _box_reduce(crop[idx[:, None], idx[None, :]], f)
    to_src = np.array([[1 / f, 0, -(f - 1) / 2 / f], [0, 1 / f, -(f - 1) / 2 / f], [0, 0, 1]]) @ t.inverse
    return _resample(src, to_src, (y1 - y0, x1 - x0), origin=(x0, y0))


def paste_back(original: np.ndarray, edited_crop: np.ndarray, transform: AlignTransform, selection=None,
               feather: float = PasteOptions.feather, *, offset=(0, 0), erode: float = PasteOptions.erode,
               reference_crop: np.ndarray | None = None, return_alpha: bool = False):
    """Composite an edited aligned crop back into the full-resolution layer.

    original: the layer (H,W,C) or (H,W), uint8/uint16/float; edited_crop: (S',S',C) or (S',S',3) with C=4
    (then only RGB is replaced), float on the original's float scale ([0,1] for integer layers) or an integer
    dtype; any square size S' (the transform's quad is what counts). selection: None or a mask in canvas
    coordinates with the layer's top-left at ``offset`` (x, y). alpha = min(selection, face region feathered
    over ``feather`` layer pixels); out = original + alpha·(warped − original), and every pixel with alpha == 0
    is the original's, bit for bit. With ``reference_crop`` (the unedited crop or its reconstruction) only the
    change ``edited − reference`` is warped back and added, keeping the layer's own detail.
    Returns the new layer (original's dtype and shape), plus the (H,W) float32 alpha when ``return_alpha``.
    """
    orig = _check_image(original, "original")
    H, W, C = orig.shape
    if (H, W) != transform.image_size:
        raise InvalidInput(f"layer is {W}x{H} px but the transform was made for "
                           f"{transform.image_size[1]}x{transform.image_size[0]} px")
    edited = _crop_as_float(edited_crop, orig, "edited_crop")
    reference = None if reference_crop is None else _crop_as_float(reference_crop, orig, "reference_crop")
    if reference is not None and reference.shape != edited.shape:
        raise InvalidInput(f"reference_crop shape {reference.shape} differs from edited_crop {edited.shape}")
    sel = layer_selection(selection, (H, W), offset)
    alpha_full = np.zeros((H, W), np.float32)
    result = orig.copy()

    # window: the crop's bounding box inside the layer, shrunk to where the selection is non-zero
    q = transform.quad
    x0, y0 = max(int(math.floor(q[:, 0].min())), 0), max(int(math.floor(q[:, 1].min())), 0)
    x1, y1 = min(int(math.ceil(q[:, 0].max())) + 1, W), min(int(math.ceil(q[:, 1].max())) + 1, H)
    if sel is not None and x1 > x0 and y1 > y0:
        rows, cols = np.nonzero(sel[y0:y1, x0:x1].any(axis=1))[0], np.nonzero(sel[y0:y1, x0:x1].any(axis=0))[0]
        if rows.size == 0:
            x1 = x0
        else:
            x0, x1, y0, y1 = x0 + cols[0], x0 + cols[-1] + 1, y0 + rows[0], y0 + rows[-1] + 1
    if x1 > x0 and y1 > y0:
        alpha = face_alpha(transform, (x0, y0, x1, y1), feather=feather, erode=erode)
        if sel is not None:
            alpha = np.minimum(alpha, sel[y0:y1, x0:x1])
        rows, cols = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
        if rows.size:
            x0, x1, y0, y1 = x0 + cols[0], x0 + cols[-1] + 1, y0 + rows[0], y0 + rows[-1] + 1
            alpha = alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            win = (x0, y0, x1, y1)
            n = edited.shape[2]
            block, dtype, scale = _to_float(orig[y0:y1, x0:x1])
            warped = warp_back(edited, transform, win)
            if reference is not None:
                warped = block[:, :, :n] + (warped - warp_back(reference, transform, win))
            mixed = block.copy()
            mixed[:, :, :n] += (warped - block[:, :, :n]) * alpha[:, :, None]
            keep = alpha[:, :, None] > 0
            result[y0:y1, x0:x1] = np.where(keep, _from_float(mixed, dtype, scale), orig[y0:y1, x0:x1])
            alpha_full[y0:y1, x0:x1] = alpha
    if np.ndim(original) == 2:
        result = result[:, :, 0]
    return (result, alpha_full) if return_alpha else result


def _crop_as_float(crop, orig: np.ndarray, name: str) -> np.ndarray:
    c = _check_image(crop, name)
    if c.shape[0] != c.shape[1]:
        raise InvalidInput(f"{name} must be square, got {c.shape[1]}x{c.shape[0]} px")
    C = orig.shape[2]
    if c.shape[2] != C and not (C == 4 and c.shape[2] == 3):
        raise InvalidInput(f"{name} has {c.shape[2]} channels but the layer has {C}")
    if np.issubdtype(c.dtype, np.integer):
        return _to_float(c)[0]
    x = c.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput(f"{name} contains NaN or infinite values")
    return x
