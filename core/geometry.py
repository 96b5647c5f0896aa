"""How a layer maps onto the generator's square: :class:`LayerGeometry` and the functions that build it.

Three kinds (``SessionOptions.align``):

* ``"direct"`` (align "none", layer = generator size): generator pixels are layer pixels.
* ``"upsampled"`` (align "none", layer ``k`` times the generator size): inversion runs on the area-downsampled
  layer; an edit's *delta* (edited render − unedited render) is bilinearly upsampled onto the full-resolution
  layer, which keeps its detail.
* ``"aligned"`` (align "auto"): the FFHQ-aligned crop of the face overlapping the selection is inverted and the
  delta is warped back into the layer (STIT-style paste-back, footprint = the eroded crop square).

``window`` ``(x0, y0, x1, y1)`` is the layer box that can change (selection ∩ generator footprint).  Feather
radii are always in layer pixels and applied once, to the layer-resolution selection (core.compositing).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from core.common import InvalidInput, LatentEditError, NoFace

KINDS = ("direct", "upsampled", "aligned")
_OLD_KINDS = {"identity": "direct", "scale": "upsampled", "align": "aligned"}  # session files before issue 15


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H,W,3) [0,1] -> (1,3,H,W) [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() * 2 - 1


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """(1,3,H,W) [-1,1] -> (H,W,3) [0,1] float32, clamped."""
    return ((x[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).detach().cpu().numpy().astype(np.float32)


def bbox(region: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels of ``region`` (H,W)."""
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """Layer ``size`` (H, W) ↔ generator square ``resolution``; see the module docstring for ``kind``."""

    kind: str
    size: tuple
    resolution: int
    window: tuple  # (x0, y0, x1, y1) layer box that can change
    scale: int = 1  # "upsampled": layer px per generator px
    transform: Optional[dict] = None  # "aligned": core.align.AlignTransform.to_json()
    box: Optional[tuple] = None  # "aligned": the detected face box (layer px)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LatentEditError(f"unknown session geometry {self.kind!r}")

    # ---- layer <-> generator ----
    def to_generator(self, layer_mask: np.ndarray) -> np.ndarray:
        """A layer-resolution mask ``(H,W)`` in [0,1] -> the generator square ``(r,r)`` in [0,1]."""
        r = self.resolution
        if self.kind == "direct":
            return np.ascontiguousarray(layer_mask, dtype=np.float32)
        if self.kind == "upsampled":
            m = torch.from_numpy(np.ascontiguousarray(layer_mask, dtype=np.float32))[None, None]
            return F.interpolate(m, size=(r, r), mode="area")[0, 0].clamp(0, 1).numpy()
        from core.align import warp_crop

        return np.clip(warp_crop(layer_mask[..., None], self.align_transform())[..., 0], 0, 1).astype(np.float32)

    def delta_to_layer(self, delta: torch.Tensor, window) -> torch.Tensor:
        """A generator-resolution change ``(1,3,r,r)`` -> the change over the layer ``window`` ``(1,3,h,w)``."""
        x0, y0, x1, y1 = window
        if self.kind == "direct":
            return delta[..., y0:y1, x0:x1]
        if self.kind == "upsampled":
            # upsample only the low-resolution pixels the window needs (+1 px so no clamped border is used)
            k, r = self.scale, delta.shape[-1]
            lx0, ly0 = max(x0 // k - 1, 0), max(y0 // k - 1, 0)
            lx1, ly1 = min(-(-x1 // k) + 1, r), min(-(-y1 // k) + 1, r)
            up = F.interpolate(delta[..., ly0:ly1, lx0:lx1], scale_factor=k, mode="bilinear", align_corners=False)
            return up[..., y0 - ly0 * k:y1 - ly0 * k, x0 - lx0 * k:x1 - lx0 * k]
        from core.align import warp_back

        d = warp_back(delta[0].permute(1, 2, 0).numpy().astype(np.float32), self.align_transform(), window)
        return torch.from_numpy(np.ascontiguousarray(d)).permute(2, 0, 1)[None].float()

    def footprint(self, window) -> torch.Tensor:
        """Where the generator covers the layer ``window`` (1,1,h,w): all of it unless aligned, where it is the
        aligned face square (eroded, hard edge: the feather comes after)."""
        x0, y0, x1, y1 = window
        if self.kind != "aligned":
            return torch.ones(1, 1, y1 - y0, x1 - x0)
        from core.align import face_alpha

        return torch.from_numpy(face_alpha(self.align_transform(), window, feather=0.0))[None, None]

    def grown_window(self, feather: float) -> tuple[int, int, int, int]:
        """The layer box a render touches: all of a direct layer, else ``window`` grown by the feather."""
        H, W = self.size
        if self.kind == "direct":
            return 0, 0, W, H
        x0, y0, x1, y1 = self.window
        pad = int(math.ceil(feather)) + 2
        return max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, W), min(y1 + pad, H)

    def including(self, region: np.ndarray) -> "LayerGeometry":
        """The same geometry whose ``window`` also covers the True pixels of ``region`` (H,W)."""
        b = bbox(region)
        w = tuple(min(a, c) if i < 2 else max(a, c) for i, (a, c) in enumerate(zip(self.window, b)))
        return dataclasses.replace(self, window=w)

    def align_transform(self):
        from core.align import AlignTransform

        cached = self.__dict__.get("_transform")
        if cached is None:
            cached = AlignTransform.from_json(self.transform)
            object.__setattr__(self, "_transform", cached)
        return cached

    # ---- persistence ----
    def to_json(self) -> dict:
        out = {"kind": self.kind, "size": list(self.size), "resolution": self.resolution,
               "window": list(self.window), "scale": self.scale}
        if self.transform is not None:
            out["transform"] = self.transform
        if self.box is not None:
            out["box"] = list(self.box)
        return out

    @classmethod
    def from_json(cls, data: dict, size: tuple, resolution: int) -> "LayerGeometry":
        """Read :meth:`to_json` output (or a pre-issue-15 geometry dict; ``size``/``resolution`` fill in)."""
        kind = _OLD_KINDS.get(data["kind"], data["kind"])
        return cls(kind, tuple(data.get("size") or size), int(data.get("resolution") or resolution),
                   tuple(int(v) for v in data["window"]), int(data.get("scale", 1)), data.get("transform"),
                   None if data.get("box") is None else tuple(float(v) for v in data["box"]))


def plain_geometry(layer: np.ndarray, sel: np.ndarray, res: int):
    """align="none": ``(target (1,3,r,r), mask (1,r,r), LayerGeometry)`` for a square layer ``k·r`` px wide."""
    H, W = layer.shape[:2]
    if H != W or H % res:
        raise InvalidInput(f"the layer is {W}×{H}; with align='none' it must be square and a multiple of the "
                           f"generator's {res}×{res} (crop or scale it, or use align='auto' for faces)")
    k = H // res
    rgb = to_tensor(layer[..., :3])
    geometry = LayerGeometry("direct" if k == 1 else "upsampled", (H, W), res, bbox(sel > 0), scale=k)
    if k == 1:
        return rgb, torch.from_numpy(sel)[None], geometry
    target = F.interpolate(rgb, size=(res, res), mode="area")
    return target, torch.from_numpy(geometry.to_generator(sel))[None], geometry


def aligned_geometry(layer: np.ndarray, sel: np.ndarray, res: int, min_face: int):
    """align="auto": detect faces, take the one the selection covers most, FFHQ-align it to a ``res``² crop.

    Returns the crop (1,3,r,r) in [-1,1], the selection in crop coordinates (1,r,r) (0 where the crop lies
    outside the layer) and the :class:`LayerGeometry`."""
    from core.align import align_face, face_alpha, find_face

    face = find_face(layer, sel, min_size=min_face)
    crop, transform = align_face(layer[..., :3], face, res)
    H, W = layer.shape[:2]
    geometry = LayerGeometry("aligned", (H, W), res, (0, 0, W, H), transform=transform.to_json(),
                             box=tuple(float(v) for v in face.box))
    sel_crop = geometry.to_generator(sel)
    # crop pixels whose centre falls outside the layer hold mirrored padding, not selected content
    ij = np.stack(np.meshgrid(np.arange(res), np.arange(res), indexing="xy"), -1).reshape(-1, 2)
    xy = transform.crop_to_image(ij).reshape(res, res, 2)
    inside = (xy[..., 0] > -0.5) & (xy[..., 0] < W - 0.5) & (xy[..., 1] > -0.5) & (xy[..., 1] < H - 0.5)
    sel_crop = sel_crop * inside
    region = (face_alpha(transform, feather=0.0) > 0) & (sel > 0)
    if not (sel_crop > 0).any() or not region.any():
        raise NoFace("the selection does not overlap the aligned face region; select (part of) a face")
    geometry = dataclasses.replace(geometry, window=bbox(region))
    target = to_tensor(np.clip(crop, 0, 1))
    return target, torch.from_numpy(sel_crop.astype(np.float32))[None], geometry
