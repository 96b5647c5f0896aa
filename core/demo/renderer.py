"""Procedural cartoon-face renderer: the embedded default domain (design.md §6, issue 16).

A face is a parameter vector ``p`` of ``len(ATTRIBUTES)`` floats in ``[0,1]``; :func:`render` maps it
deterministically to a ``uint8 (size,size,3)`` image.  Shapes are drawn with Pillow at ``supersample``
times the output size and box-filtered down, so every edge is anti-aliased.  Every attribute changes
the image monotonically over its whole range, so a scorer can recover it and an edit can measure it.

``extras`` draws things the training set never contains (``EXTRAS``), for out-of-domain tests.

:func:`render_parts` labels every output pixel with the index in ``PARTS`` of the shape group drawn on top
there (the nose counts as skin, ears and neck too); ``ATTRIBUTE_PARTS`` says which parts each attribute draws.

The small features are drawn to be legible at 64 px (this is the second design, "v2"; the first drew mouths,
pupils and frames as blobs a 64 px generator could not reproduce, and its edits barely showed — issue 16;
``core/demo/TRAINING.md`` has the measured comparison):

* the face fills much of the frame (half-width 17..22 px at 64 px);
* eyes have a dark outline, a large dark iris and a black pupil, so gaze moves ~2 px of high-contrast iris per
  2 units of strength and eye openness moves the lids;
* brows are 2 px strokes, darker than the hair;
* the mouth is a 1.5 px dark line between pink lips of a fixed colour, so it reads on every skin tone;
* glasses are 1.6 px frames (opacity = the attribute) without a lens tint, so their part is the frame.
"""
from __future__ import annotations

import colorsys
import math
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from core.common import InvalidInput

ATTRIBUTES: tuple[str, ...] = (
    "smile",           # mouth corners: 0 frown .. 1 broad smile
    "mouth_open",      # 0 closed .. 1 open with teeth
    "eye_openness",    # 0 closed .. 1 wide open
    "gaze",            # pupils: 0 looking left .. 1 looking right (image left/right)
    "eyebrow_height",  # 0 low .. 1 raised
    "hair_color",      # 0 black .. brown .. auburn .. 1 blond
    "hair_length",     # 0 short crop .. 1 shoulder length
    "glasses",         # frame opacity: 0 none .. 1 solid frames
    "beard",           # beard density: 0 shaven .. 1 full
    "skin_tone",       # 0 light .. 1 dark
    "head_x",          # yaw-like shift: 0 left .. 1 right, features turn with the head
    "face_scale",      # 0 small .. 1 large face
    "background_hue",  # hue 0 (red) .. 0.8 (purple) of the backdrop
)
NUM_ATTRIBUTES = len(ATTRIBUTES)

DESCRIPTIONS: dict[str, str] = {
    "smile": "mouth corners from frown to broad smile",
    "mouth_open": "mouth from closed to open with teeth",
    "eye_openness": "eyes from closed to wide open",
    "gaze": "pupils from looking left to looking right",
    "eyebrow_height": "eyebrows from low to raised",
    "hair_color": "hair from black through brown and auburn to blond",
    "hair_length": "hair from short crop to shoulder length",
    "glasses": "glasses frames from none to solid",
    "beard": "beard from shaven to full",
    "skin_tone": "skin from light to dark",
    "head_x": "head position and yaw-like turn from left to right",
    "face_scale": "face from small to large",
    "background_hue": "backdrop hue from red through green and blue to purple",
}

EXTRAS: tuple[str, ...] = ("bindi", "mask", "face_paint", "sticker")

# Part labels of render_parts (uint8 index into PARTS).
PARTS: tuple[str, ...] = ("background", "skin", "hair", "eyes", "brows", "mouth", "glasses", "beard", "shirt",
                          "extra")
_PART = {name: i for i, name in enumerate(PARTS)}

# The parts whose pixels each attribute changes (its region in a part map); the one home of this mapping
# (bench/editability.py uses it).  Brows and beard are drawn in shades of the hair colour, and the skin shows
# through a partial beard; the glasses are frames only.
# head_x and face_scale move everything.
ATTRIBUTE_PARTS: dict[str, tuple[str, ...]] = {
    "smile": ("mouth",), "mouth_open": ("mouth",), "eye_openness": ("eyes",), "gaze": ("eyes",),
    "eyebrow_height": ("brows",), "hair_color": ("hair", "brows", "beard"), "hair_length": ("hair",),
    "glasses": ("glasses",), "beard": ("beard",), "skin_tone": ("skin", "beard"), "background_hue": ("background",),
    "head_x": PARTS, "face_scale": PARTS,
}

# Palettes (RGB) interpolated piecewise-linearly; each is monotone in lightness or hue.
_SKIN = np.array([[250, 222, 200], [226, 180, 145], [180, 125, 90], [120, 78, 52], [78, 50, 36]], np.float64)
_HAIR = np.array([[24, 20, 20], [70, 45, 28], [125, 70, 35], [175, 115, 55], [232, 200, 120]], np.float64)
_SHIRT = (58, 72, 100)
_IRIS = (70, 48, 30)
_PUPIL = (10, 8, 8)
_LID = (28, 18, 16)
_LIP = (204, 86, 104)        # fixed: reads on light and dark skin alike
_MOUTH_LINE = (58, 14, 24)
_MOUTH_IN = (64, 10, 22)
_TEETH = (248, 248, 244)
_FRAME = (20, 20, 26)
_BROW_DARK = (32, 22, 18)


def _lerp_palette(palette: np.ndarray, t: float) -> tuple[int, int, int]:
    x = float(np.clip(t, 0.0, 1.0)) * (len(palette) - 1)
    i = min(int(x), len(palette) - 2)
    c = palette[i] + (palette[i + 1] - palette[i]) * (x - i)
    return tuple(int(round(v)) for v in c)


def _shade(color: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * f)))) for c in color[:3])


def sample_params(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random faces: ``(n, NUM_ATTRIBUTES)`` float32, each attribute uniform in ``[0,1]``."""
    if n < 0:
        raise InvalidInput(f"sample_params: n must be >= 0, got {n}")
    return np.random.default_rng(seed).random((n, NUM_ATTRIBUTES), dtype=np.float64).astype(np.float32)


def params_from_dict(values: dict[str, float], base: np.ndarray | None = None) -> np.ndarray:
    """A parameter vector from ``{attribute: value}`` (others from ``base`` or 0.5)."""
    p = np.full(NUM_ATTRIBUTES, 0.5, np.float32) if base is None else np.array(base, np.float32).copy()
    for k, v in values.items():
        if k not in ATTRIBUTES:
            raise InvalidInput(f"unknown attribute {k!r}; known: {', '.join(ATTRIBUTES)}")
        p[ATTRIBUTES.index(k)] = v
    return p


class _Canvas:
    """An RGBA Pillow canvas addressed in output-pixel units (floats), drawn at ``scale``×.

    With ``parts``, ``labels`` ``(size·scale,)²`` uint8 holds per drawing pixel the ``PARTS`` index of the last
    layer that covered it (see :meth:`merge`)."""

    def __init__(self, size: int, scale: int, background: Image.Image, parts: bool = False):
        self.size, self.scale = size, scale
        self.img = background
        self.labels = np.zeros(background.size[::-1], np.uint8) if parts else None

    def P(self, pts: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        s = self.scale
        return [(x * s, y * s) for x, y in pts]

    def box(self, x0, y0, x1, y1):
        s = self.scale
        return (x0 * s, y0 * s, x1 * s, y1 * s)

    def layer(self):
        lay = Image.new("RGBA", self.img.size, (0, 0, 0, 0))
        return lay, ImageDraw.Draw(lay)

    def merge(self, lay: Image.Image, mask: Image.Image | None = None, *, part: str, full: int = 255):
        """Composite ``lay`` (clipped to ``mask``) over the image.  With labels, the drawing pixels where the
        layer's alpha reaches half of ``full`` (the layer's nominal opacity: a faint beard or frame still counts
        by its geometry) become ``part``."""
        if mask is not None:
            a = lay.getchannel("A")
            a = Image.fromarray((np.asarray(a, np.uint16) * np.asarray(mask, np.uint16) // 255).astype(np.uint8))
            lay.putalpha(a)
        if self.labels is not None:
            self.labels[2 * np.asarray(lay.getchannel("A"), np.uint16) >= max(int(full), 1)] = _PART[part]
        self.img = Image.alpha_composite(self.img, lay)

    def part_map(self) -> np.ndarray:
        """``(size,size)`` uint8: per output pixel the label covering most of its ``scale``² drawing pixels
        (ties go to the earlier name in ``PARTS``)."""
        n, s = self.size, self.scale
        blocks = self.labels.reshape(n, s, n, s)
        counts = np.stack([(blocks == i).sum(axis=(1, 3)) for i in range(len(PARTS))])
        return counts.argmax(0).astype(np.uint8)


def _ellipse_pts(cx, cy, rx, ry, t0, t1, n=48):
    ts = np.linspace(t0, t1, n)
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in ts]


def _background(size: int, scale: int, hue01: float) -> Image.Image:
    S = size * scale
    r, g, b = colorsys.hsv_to_rgb(0.8 * float(np.clip(hue01, 0, 1)), 0.45, 0.85)
    top = np.array([r, g, b]) * 255
    bottom = top * 0.78
    t = np.linspace(0, 1, S)[:, None]
    rows = np.round(np.concatenate([top * (1 - t) + bottom * t, np.full((S, 1), 255.0)], axis=1)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (S, S, 4))), "RGBA")


def _render_one(p: np.ndarray, size: int, supersample: int, extras: Sequence[str], parts: bool):
    a = {k: float(np.clip(v, 0.0, 1.0)) for k, v in zip(ATTRIBUTES, p)}
    u = size / 64.0  # layout is designed in 64-px units
    cv = _Canvas(size, supersample, _background(size, supersample, a["background_hue"]), parts)

    def w(px: float) -> int:
        """A stroke width of ``px`` output pixels (64-px units), at least one drawing pixel."""
        return max(1, int(round(px * u * supersample)))

    skin = _lerp_palette(_SKIN, a["skin_tone"])
    hair = _lerp_palette(_HAIR, a["hair_color"])
    rx = (17.0 + 5.0 * a["face_scale"]) * u
    ry = 1.14 * rx
    turn = a["head_x"] - 0.5
    cx = 32 * u + turn * 10 * u
    cy = 33 * u
    fx = cx + turn * 0.26 * rx  # features shift further than the outline: a yaw-like turn

    # shoulders
    lay, d = cv.layer()
    sh_y = cy + ry * 0.9
    d.ellipse(cv.box(cx - 2.1 * rx, sh_y, cx + 2.1 * rx, sh_y + 2.2 * ry), fill=_SHIRT + (255,))
    cv.merge(lay, part="shirt")

    # hair behind the head (its length)
    lay, d = cv.layer()
    hb = cy + ry * (0.0 + 1.2 * a["hair_length"])
    hw = rx * (1.1 + 0.12 * a["hair_length"])
    back = _ellipse_pts(cx, cy - 0.05 * ry, hw, 1.1 * ry, math.pi, 2 * math.pi)
    back = [(cx - hw, hb - 0.2 * rx)] + back + [(cx + hw, hb - 0.2 * rx)]
    back += _ellipse_pts(cx, hb - 0.2 * rx, hw, 0.25 * rx, 0, math.pi, 16)
    d.polygon(cv.P(back), fill=hair + (255,))
    cv.merge(lay, part="hair")

    # neck, ears, face
    lay, d = cv.layer()
    nw = 0.4 * rx
    d.rectangle(cv.box(cx - nw, cy + 0.5 * ry, cx + nw, sh_y + 0.3 * ry), fill=_shade(skin, 0.86) + (255,))
    ear_y = cy - 0.02 * ry
    for side in (-1, 1):
        ex = cx + side * rx * 0.97 - turn * 0.15 * rx
        d.ellipse(cv.box(ex - 0.16 * rx, ear_y - 0.18 * ry, ex + 0.16 * rx, ear_y + 0.13 * ry),
                  fill=_shade(skin, 0.92) + (255,))
    d.ellipse(cv.box(cx - rx, cy - ry, cx + rx, cy + ry), fill=skin + (255,))
    cv.merge(lay, part="skin")
    face_mask = Image.new("L", cv.img.size, 0)
    ImageDraw.Draw(face_mask).ellipse(cv.box(cx - rx, cy - ry, cx + rx, cy + ry), fill=255)

    # beard (density = opacity), under the mouth
    if a["beard"] > 0:
        lay, d = cv.layer()
        jaw = _ellipse_pts(cx, cy, rx * 1.02, ry * 1.02, math.radians(-10), math.radians(190))
        top = [(x, max(y, cy + 0.36 * ry - 0.2 * ry * ((x - fx) / rx) ** 2)) for x, y in jaw]
        alpha = int(round(255 * 0.92 * a["beard"]))
        d.polygon(cv.P(top), fill=_shade(hair, 0.75) + (alpha,))
        cv.merge(lay, face_mask, part="beard", full=alpha)

    # hair cap with a hairline high over the forehead
    lay, d = cv.layer()
    cap = _ellipse_pts(cx, cy - 0.04 * ry, rx * 1.08, ry * 1.08, math.pi * 0.97, math.pi * 2.03)
    line = []
    for x in np.linspace(cx + rx * 1.06, cx - rx * 1.06, 24):
        q = (x - cx - 0.25 * turn * rx) / rx
        line.append((x, cy - 0.68 * ry + 0.36 * ry * q * q))
    d.polygon(cv.P(cap + line), fill=hair + (255,))
    cv.merge(lay, part="hair")

    # eyes: outlined white, a large iris + pupil following the gaze, clipped to the lids
    ew = 0.275 * rx
    eh = ew * (0.1 + 0.68 * a["eye_openness"])
    ey = cy - 0.04 * ry
    gaze = (a["gaze"] - 0.5) * 2 * 0.5 * ew
    eyes = [fx - 0.45 * rx, fx + 0.45 * rx]
    lay, d = cv.layer()
    lids = []
    for ex in eyes:
        d.ellipse(cv.box(ex - ew, ey - eh, ex + ew, ey + eh), fill=(252, 252, 252, 255))
        lids.append(_ellipse_pts(ex, ey, ew, eh, 0, 2 * math.pi, 48))
    white = lay.getchannel("A")
    inner, di = cv.layer()
    for ex in eyes:
        ir, ix = 0.58 * ew, ex + gaze
        di.ellipse(cv.box(ix - ir, ey - ir, ix + ir, ey + ir), fill=_IRIS + (255,))
        pr = 0.5 * ir
        di.ellipse(cv.box(ix - pr, ey - pr, ix + pr, ey + pr), fill=_PUPIL + (255,))
    lay = Image.alpha_composite(lay, Image.composite(inner, Image.new("RGBA", lay.size, (0, 0, 0, 0)), white))
    d = ImageDraw.Draw(lay)
    for pts in lids:  # the outline, thicker on the upper lid
        d.line(cv.P(pts[:25]), fill=_LID + (255,), width=w(0.6), joint="curve")      # lower: 0..pi
        d.line(cv.P(pts[24:] + pts[:1]), fill=_LID + (255,), width=w(1.1), joint="curve")  # upper
    cv.merge(lay, part="eyes")

    # eyebrows: thick, darker than the hair
    lay, d = cv.layer()
    brow_c = tuple(int(round(0.45 * h + 0.55 * c)) for h, c in zip(_shade(hair, 0.7), _BROW_DARK)) + (255,)
    by = ey - ew * (0.9 + 1.15 * a["eyebrow_height"])
    for side, ex in zip((-1, 1), eyes):
        pts = [(ex - 1.05 * ew, by + 0.3 * ew), (ex - 0.2 * side * ew, by - 0.15 * ew), (ex + 1.05 * ew, by + 0.3 * ew)]
        d.line(cv.P(pts), fill=brow_c, width=w(2.0), joint="curve")
    cv.merge(lay, part="brows")

    # nose
    lay, d = cv.layer()
    ny = cy + 0.24 * ry
    nx = fx + 0.1 * turn * rx
    d.line(cv.P([(nx - 0.02 * rx, cy + 0.04 * ry), (nx - 0.09 * rx, ny), (nx + 0.1 * rx, ny)]),
           fill=_shade(skin, 0.7) + (255,), width=w(0.8), joint="curve")
    cv.merge(lay, part="skin")

    # mouth: pink lips around a dark line; corners rise with the smile, opening shows interior and teeth
    mw = 0.42 * rx * (0.9 + 0.2 * a["smile"])
    my = cy + 0.52 * ry
    k = (a["smile"] - 0.35) * 0.5 * rx  # corner lift (negative: frown)
    oh = a["mouth_open"] * 0.36 * rx
    lip = 0.11 * rx                      # lip thickness at the middle
    xs = np.linspace(-1, 1, 33)

    def curve(off: float, sign: int = 1):
        return [(fx + mw * x, my - k * x * x + sign * off * (1 - x * x)) for x in xs]

    upper = curve(0.15 * oh, -1)                 # the upper lip's lower edge (the mouth line when closed)
    lower = curve(oh)                            # the lower lip's upper edge
    lay, d = cv.layer()
    d.polygon(cv.P(curve(0.15 * oh + lip, -1) + lower[::-1]), fill=_LIP + (255,))
    d.polygon(cv.P(upper + curve(oh + 1.2 * lip)[::-1]), fill=_LIP + (255,))
    if oh > 0.05 * u:
        d.polygon(cv.P(upper + lower[::-1]), fill=_MOUTH_IN + (255,))
        th = min(0.4, 1.6 * u / max(oh, 1e-6))
        teeth = [(x, y + th * 1.15 * oh * (1 - ((x - fx) / mw) ** 2)) for x, y in upper[::-1]]
        d.polygon(cv.P(upper + teeth), fill=_TEETH + (255,))
        d.line(cv.P(lower), fill=_MOUTH_LINE + (255,), width=w(0.9), joint="curve")
    d.line(cv.P(upper), fill=_MOUTH_LINE + (255,), width=w(1.5), joint="curve")
    cv.merge(lay, part="mouth")

    # glasses: bold frames, opacity = the attribute
    if a["glasses"] > 0:
        lay, d = cv.layer()
        alpha = int(round(255 * a["glasses"]))
        fr = _FRAME + (alpha,)
        gr = 1.32 * ew
        for ex in eyes:
            d.ellipse(cv.box(ex - gr, ey - 0.82 * gr, ex + gr, ey + 0.82 * gr), outline=fr, width=w(1.6))
        d.line(cv.P([(eyes[0] + 0.97 * gr, ey - 0.15 * gr), (eyes[1] - 0.97 * gr, ey - 0.15 * gr)]), fill=fr,
               width=w(1.4))
        for side, ex in zip((-1, 1), eyes):
            d.line(cv.P([(ex + side * 0.97 * gr, ey - 0.2 * gr), (cx + side * rx * 0.99, ey - 0.3 * gr)]), fill=fr,
                   width=w(1.2))
        cv.merge(lay, part="glasses", full=alpha)

    for name in extras:
        _draw_extra(cv, name, w, cx=cx, cy=cy, fx=fx, rx=rx, ry=ry, ey=ey, by=by, u=u, face_mask=face_mask)
    if parts:
        return cv.part_map()
    return np.asarray(cv.img.convert("RGB").resize((size, size), Image.BOX), np.uint8)


def _draw_extra(cv: _Canvas, name: str, w, *, cx, cy, fx, rx, ry, ey, by, u, face_mask):
    lay, d = cv.layer()
    clip = None
    if name == "bindi":
        r = 1.2 * u
        y = (by + ey) / 2 - 0.12 * ry
        d.ellipse(cv.box(fx - r, y - r, fx + r, y + r), fill=(200, 20, 40, 255))
    elif name == "mask":
        top = cy + 0.14 * ry
        pts = [(cx - 0.98 * rx, top + 0.05 * ry), (cx + 0.98 * rx, top + 0.05 * ry)]
        pts += _ellipse_pts(cx, cy + 0.25 * ry, 0.98 * rx, 0.8 * ry, math.radians(0), math.radians(180))
        d.polygon(cv.P(pts), fill=(170, 205, 230, 255))
        for i in range(3):
            y = top + (0.15 + 0.15 * i) * ry
            d.line(cv.P([(cx - 0.8 * rx, y), (cx + 0.8 * rx, y)]), fill=(130, 165, 195, 255), width=w(2.0))
        for side in (-1, 1):
            d.line(cv.P([(cx + side * 0.98 * rx, top + 0.1 * ry), (cx + side * 1.05 * rx, cy - 0.05 * ry)]),
                   fill=(235, 235, 240, 255), width=w(3.0))
    elif name == "face_paint":
        for side in (-1, 1):
            x0 = fx + side * 0.6 * rx
            for i, col in enumerate(((30, 60, 200, 220), (240, 240, 240, 220), (200, 30, 30, 220))):
                y = cy + (0.18 + 0.1 * i) * ry
                d.line(cv.P([(x0 - 0.2 * rx, y - 0.05 * ry), (x0 + 0.2 * rx, y + 0.05 * ry)]), fill=col,
                       width=w(1.6))
        clip = face_mask
    elif name == "sticker":
        sx, sy, R = fx + 0.5 * rx, cy - 0.66 * ry, 0.3 * rx
        star = []
        for i in range(10):
            rr = R if i % 2 == 0 else 0.45 * R
            t = -math.pi / 2 + i * math.pi / 5
            star.append((sx + rr * math.cos(t), sy + rr * math.sin(t)))
        d.polygon(cv.P(star), fill=(255, 215, 0, 255), outline=(120, 80, 0, 255), width=w(0.5))
    else:
        raise InvalidInput(f"unknown extra {name!r}; known: {', '.join(EXTRAS)}")
    cv.merge(lay, clip, part="extra")


def _run(params, extras, size: int, supersample: int, parts: bool) -> np.ndarray:
    name = "render_parts" if parts else "render"
    p = np.asarray(params, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] != NUM_ATTRIBUTES:
        raise InvalidInput(f"{name}: params must be ({NUM_ATTRIBUTES},) or (N,{NUM_ATTRIBUTES}), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise InvalidInput(f"{name}: params contain NaN or infinity")
    if size < 16 or supersample < 1:
        raise InvalidInput(f"{name}: size must be >= 16 and supersample >= 1, got {size}, {supersample}")
    extras = tuple(extras or ())
    for e in extras:
        if e not in EXTRAS:
            raise InvalidInput(f"unknown extra {e!r}; known: {', '.join(EXTRAS)}")
    if p.ndim == 1:
        return _render_one(p, size, supersample, extras, parts)
    out = np.empty((len(p), size, size) + (() if parts else (3,)), np.uint8)
    for i, row in enumerate(p):
        out[i] = _render_one(row, size, supersample, extras, parts)
    return out


def render(params, extras: Sequence[str] | None = None, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Render faces.

    ``params``: ``(NUM_ATTRIBUTES,)`` or ``(N, NUM_ATTRIBUTES)`` floats in ``[0,1]`` (clipped).
    Returns ``uint8 (size,size,3)`` or ``(N,size,size,3)``; drawn at ``supersample``× and box-filtered.
    ``extras``: names from ``EXTRAS`` drawn on top (never in the training distribution).
    """
    return _run(params, extras, size, supersample, parts=False)


def render_parts(params, extras: Sequence[str] | None = None, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Part maps aligned with :func:`render` of the same arguments: ``uint8 (size,size)`` or ``(N,size,size)``.

    Each pixel holds the index in ``PARTS`` of the shape group drawn last among those covering most of its
    ``supersample``² drawing pixels (the same geometry and draw order as ``render``; a layer covers a drawing
    pixel where its alpha reaches half its nominal opacity, so faint beards and frames are labelled by their
    shape).  Extras are labelled ``"extra"``.
    """
    return _run(params, extras, size, supersample, parts=True)


def contact_sheet(images: np.ndarray, cols: int = 8, scale: int = 2) -> Image.Image:
    """Tile ``(N,H,W,3) uint8`` images into one Pillow image (nearest-neighbour ``scale``× zoom)."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    img = Image.fromarray(sheet)
    return img.resize((cols * w * scale, rows * h * scale), Image.NEAREST) if scale != 1 else img
