"""Procedural cartoon faces, version 2: the same 13 attributes drawn legibly at 64 px (issue 16).

Same API as :mod:`core.demo.renderer` (``render``, ``render_parts``, ``sample_params``, ``ATTRIBUTES``,
``EXTRAS``, ``PARTS``), so the embedded default switches renderer by one import.  What changed from v1,
and why (measured with ``python -m core.demo.renderer_v2 --measure``, table in ``core/demo/TRAINING.md``):

* the face fills more of the frame (half-width 17..22 px instead of 13..18 px at 64 px);
* eyes are 1.25× wider relative to the face, with a dark outline, a large dark iris and a black pupil, so
  gaze moves ~2 px of high-contrast iris per 2 units of strength and eye openness moves the lids;
* brows are 2 px strokes, darker than the hair, with a larger height range;
* the mouth is a 1.5 px dark line between pink lips of a fixed colour, so it reads on every skin tone;
  the smile's corner lift and the opening are about twice v1's in pixels;
* glasses are 1.6 px frames (opacity = the attribute) without a lens tint, so their part is the frame.

Drawn with Pillow at ``supersample``× and box-filtered (anti-aliased); deterministic.  ``render_parts``
labels every output pixel with the index in ``PARTS`` of the topmost shape covering most of it; labels
follow the shapes' geometry regardless of opacity (a faint beard or glasses frame is still labelled).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from core.common import InvalidInput
from core.demo.renderer import (  # noqa: F401  (re-exported: the same attributes, parts, extras and helpers as v1)
    _HAIR, _SKIN, ATTRIBUTE_PARTS, ATTRIBUTES, DESCRIPTIONS, EXTRAS, NUM_ATTRIBUTES, PARTS, _background, _Canvas,
    _ellipse_pts, _lerp_palette, _shade, contact_sheet, params_from_dict, sample_params)

# v2 draws each attribute in the same parts as v1 (ATTRIBUTE_PARTS holds here too: brows and beard take shades
# of the hair colour, the beard lets the skin through, and the glasses are frames only).  Shapes are drawn on
# v1's canvas: a layer's pixels are labelled where its alpha reaches half its nominal opacity (``full``).

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


def _checked(params, extras, size, supersample):
    p = np.asarray(params, dtype=np.float64)
    if p.ndim not in (1, 2) or p.shape[-1] != NUM_ATTRIBUTES:
        raise InvalidInput(f"render: params must be ({NUM_ATTRIBUTES},) or (N,{NUM_ATTRIBUTES}), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise InvalidInput("render: params contain NaN or infinity")
    if size < 16 or supersample < 1:
        raise InvalidInput(f"render: size must be >= 16 and supersample >= 1, got {size}, {supersample}")
    extras = tuple(extras or ())
    for e in extras:
        if e not in EXTRAS:
            raise InvalidInput(f"unknown extra {e!r}; known: {', '.join(EXTRAS)}")
    return p, extras


def _run(params, extras, size, supersample, parts: bool) -> np.ndarray:
    p, extras = _checked(params, extras, size, supersample)
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
    """Part labels aligned with :func:`render` of the same arguments: ``uint8 (size,size)`` or ``(N,size,size)``,
    each pixel the index in ``PARTS`` of the topmost shape group covering most of its ``supersample``² samples."""
    return _run(params, extras, size, supersample, parts=True)
