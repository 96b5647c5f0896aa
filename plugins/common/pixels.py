"""Pixel packing between host layouts and the wire (stdlib only, host-agnostic).

Wire layers (docs/protocol.md): straight RGBA, rows top to bottom, multi-byte samples little-endian,
formats ``rgba8`` (1 byte/sample), ``rgba16`` (uint16), ``rgbaf32`` (float32, 0..1 nominal).
Selections: ``gray8`` (1 byte/pixel, 255 = selected).

Host layouts handled here: interleaved BGRA or RGBA at 8 bit, 16 bit, half float and float32
(Krita gives BGRA for integer depths and RGBA for float depths; GIMP gives whatever format it is asked for).
"""
from __future__ import annotations

import math
import struct
import sys
from array import array

LAYER_FORMATS = {"rgba8": 1, "rgba16": 2, "rgbaf32": 4}  # bytes per sample
_BIG = sys.byteorder == "big"


class PixelError(ValueError):
    """Pixel data whose size or format does not match what it claims."""


def _typed(code: str, data) -> array:
    """Little-endian wire samples -> an ``array`` of ``code`` ("H" uint16, "f" float32) in native order."""
    a = array(code)
    a.frombytes(bytes(data))
    if _BIG:
        a.byteswap()
    return a


def _u16(data) -> array:
    return _typed("H", data)


def _f32(data) -> array:
    return _typed("f", data)


def _le_bytes(a: array) -> bytes:
    if _BIG:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def swap_red_blue(data, sample_bytes: int) -> bytes:
    """BGRA <-> RGBA for interleaved 4-channel pixels with 1, 2 or 4 bytes per sample (an involution)."""
    data = bytes(data)
    px = 4 * sample_bytes
    if len(data) % px:
        raise PixelError("pixel buffer of %d bytes is not a whole number of %d-byte pixels" % (len(data), px))
    out = bytearray(data)
    for k in range(sample_bytes):
        out[k::px] = data[2 * sample_bytes + k::px]
        out[2 * sample_bytes + k::px] = data[k::px]
    return bytes(out)


def half_to_float32(data) -> bytes:
    """Little-endian IEEE half floats -> little-endian float32 (same sample count)."""
    data = bytes(data)
    if len(data) % 2:
        raise PixelError("half-float buffer has an odd number of bytes")
    values = struct.unpack("<%de" % (len(data) // 2), data)
    return struct.pack("<%df" % len(values), *values)


def float32_to_half(data) -> bytes:
    """Little-endian float32 -> little-endian half floats (values beyond ±65504 clip to it)."""
    values = [min(65504.0, max(-65504.0, v)) for v in _f32(data)]
    return struct.pack("<%de" % len(values), *values)


def convert_samples(data, src: str, dst: str) -> bytes:
    """Convert interleaved samples between wire formats (channel order untouched).

    rgba8 <-> rgba16 is exact (v*257 and rounding division); floats are clamped to [0,1] going to integers.
    """
    if src not in LAYER_FORMATS or dst not in LAYER_FORMATS:
        raise PixelError("unknown pixel format %r -> %r" % (src, dst))
    data = bytes(data)
    if src == dst:
        return data
    if src == "rgba8" and dst == "rgba16":
        out = bytearray(2 * len(data))
        out[0::2] = data
        out[1::2] = data  # v * 257 == (v << 8) | v
        return bytes(out)
    if src == "rgba16" and dst == "rgba8":
        return bytes((v * 255 + 32767) // 65535 for v in _u16(data))
    if src == "rgba8" and dst == "rgbaf32":
        lut = [v / 255.0 for v in range(256)]
        return _le_bytes(array("f", [lut[v] for v in data]))
    if src == "rgba16" and dst == "rgbaf32":
        return _le_bytes(array("f", [v / 65535.0 for v in _u16(data)]))
    # from float
    vals = _f32(data)
    if dst == "rgba8":
        return bytes(int(min(1.0, max(0.0, v)) * 255.0 + 0.5) if v == v else 0 for v in vals)
    return _le_bytes(array("H", [int(min(1.0, max(0.0, v)) * 65535.0 + 0.5) if v == v else 0 for v in vals]))


# --- transfer curves (for documents whose profile is linear, e.g. Krita's default for 16-bit/float) ---

def _srgb_encode(v: float) -> float:
    if v <= 0.0031308:
        return 12.92 * v if v > 0.0 else 0.0
    return 1.055 * math.pow(min(v, 1.0), 1.0 / 2.4) - 0.055


def _srgb_decode(v: float) -> float:
    if v <= 0.04045:
        return v / 12.92 if v > 0.0 else 0.0
    return math.pow((min(v, 1.0) + 0.055) / 1.055, 2.4)


def transfer_rgb(data, fmt: str, to_srgb: bool) -> bytes:
    """Apply the sRGB encode (linear -> sRGB, ``to_srgb``) or decode curve to R,G,B; alpha untouched.

    Works on RGBA or BGRA alike (alpha is the 4th sample). rgba8 is not supported (too lossy to linearise).
    """
    f = _srgb_encode if to_srgb else _srgb_decode
    if fmt == "rgba16":
        lut = [int(f(v / 65535.0) * 65535.0 + 0.5) for v in range(65536)]
        a = _u16(data)
        for c in range(3):
            a[c::4] = array("H", [lut[v] for v in a[c::4]])
        return _le_bytes(a)
    if fmt == "rgbaf32":
        a = _f32(data)
        for c in range(3):
            a[c::4] = array("f", [f(v) if v == v else 0.0 for v in a[c::4]])
        return _le_bytes(a)
    raise PixelError("transfer curves need rgba16 or rgbaf32, not %r" % fmt)


# --- wire maps ---

def pack_layer(data, width: int, height: int, fmt: str, x: int = 0, y: int = 0, name=None) -> dict:
    """Tightly packed RGBA samples in wire order -> the protocol's layer map."""
    if fmt not in LAYER_FORMATS:
        raise PixelError("unknown layer format %r (expected one of %s)" % (fmt, ", ".join(LAYER_FORMATS)))
    stride = width * 4 * LAYER_FORMATS[fmt]
    data = bytes(data)
    if len(data) != stride * height:
        raise PixelError("%dx%d %s needs %d bytes, got %d" % (width, height, fmt, stride * height, len(data)))
    out = {"width": int(width), "height": int(height), "format": fmt, "stride": stride, "data": data,
           "x": int(x), "y": int(y)}
    if name is not None:
        out["name"] = str(name)
    return out


def pack_selection(gray8, width: int, height: int, x: int = 0, y: int = 0) -> dict:
    """1 byte per pixel selection (0 = not selected, 255 = selected) -> the protocol's mask map."""
    gray8 = bytes(gray8)
    if len(gray8) != width * height:
        raise PixelError("%dx%d selection needs %d bytes, got %d" % (width, height, width * height, len(gray8)))
    return {"width": int(width), "height": int(height), "format": "gray8", "stride": int(width), "data": gray8,
            "x": int(x), "y": int(y)}


def unpack_layer(layer: dict):
    """A wire layer map -> ``(data, width, height, fmt, x, y)`` with rows tightly packed (stride removed)."""
    try:
        width, height, fmt, data = int(layer["width"]), int(layer["height"]), layer["format"], bytes(layer["data"])
    except (KeyError, TypeError, ValueError) as e:
        raise PixelError("The server sent a malformed layer map: %s." % e) from None
    if fmt not in LAYER_FORMATS:
        raise PixelError("The server sent an unknown layer format %r." % (fmt,))
    row = width * 4 * LAYER_FORMATS[fmt]
    stride = int(layer.get("stride") or row)
    if stride < row or len(data) < stride * (height - 1) + row:
        raise PixelError("layer data of %d bytes is too short for %dx%d %s, stride %d" % (len(data), width, height, fmt, stride))
    if stride != row:
        data = b"".join(data[r * stride:r * stride + row] for r in range(height))
    else:
        data = data[:row * height]
    return data, width, height, fmt, int(layer.get("x", 0)), int(layer.get("y", 0))


_RUN = None


def selection_regions(gray8, width: int, height: int) -> list:
    """Bounding boxes ``(x0, y0, x1, y1)`` (exclusive ends) of the 8-connected selected regions (bytes > 0),
    largest area first. Row runs are joined with a union-find, so a 4k selection takes well under a second."""
    import re

    global _RUN
    if _RUN is None:
        _RUN = re.compile(rb"\x01+")
    binary = bytes(gray8).translate(bytes([0] + [1] * 255))
    parent, boxes = [], []  # per run: union-find parent, bbox

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev = []  # (start, end, run index) of the previous row
    for y in range(height):
        cur = []
        for m in _RUN.finditer(binary, y * width, (y + 1) * width):
            s, e = m.start() - y * width, m.end() - y * width
            i = len(parent)
            parent.append(i)
            boxes.append([s, y, e, y + 1])
            for ps, pe, j in prev:
                if ps <= e and pe >= s:  # touching, diagonals included (8-connected)
                    a, b = find(i), find(j)
                    if a != b:
                        parent[b] = a
            cur.append((s, e, i))
        prev = cur
    merged = {}
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        r = find(i)
        box = merged.setdefault(r, [x0, y0, x1, y1])
        box[0], box[1], box[2], box[3] = min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)
    return sorted((tuple(b) for b in merged.values()), key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


def crop_rows(data, width: int, bpp: int, box) -> bytes:
    """The ``box`` (x0, y0, x1, y1) of a tightly packed image ``width`` px wide with ``bpp`` bytes per pixel."""
    x0, y0, x1, y1 = box
    row = width * bpp
    return b"".join(bytes(data[y * row + x0 * bpp:y * row + x1 * bpp]) for y in range(y0, y1))


def paste_rows(dest: bytearray, width: int, bpp: int, src, src_width: int, box, at) -> None:
    """Copy ``box`` (x0, y0, x1, y1, in ``src`` coordinates) of ``src`` into ``dest`` with its corner at ``at``."""
    x0, y0, x1, y1 = box
    ax, ay = at
    n = (x1 - x0) * bpp
    for r in range(y1 - y0):
        s = ((y0 + r) * src_width + x0) * bpp
        d = ((ay + r) * width + ax) * bpp
        dest[d:d + n] = src[s:s + n]
