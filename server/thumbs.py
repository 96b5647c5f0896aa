"""Small PNG images of layers and engine previews, for the status page and ``GET /v1/jobs/{id}/preview``."""
from __future__ import annotations

import io

import numpy as np

from server.protocol import to_unit_float

THUMB_SIZE = 128  # px, longest side


def png_thumbnail(pixels: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """``(H,W,C)`` or ``(C,H,W)`` uint8 / uint16 / float in [0,1] (C = 1, 3 or 4) -> PNG bytes, at most ``size`` px."""
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C,H,W) previews
    if arr.ndim == 4:
        arr = arr[0]
    if arr.dtype != np.uint8:
        arr = to_unit_float(arr.astype(np.float32) if arr.dtype.kind == "f" else arr)
        arr = np.rint(arr * 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    img = Image.fromarray(arr)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
