"""The one compositing path: an :class:`~core.inversion.Inversion`'s edited render -> overlay + alpha on a layer.

``compose`` is used by ``EditSession.render`` (any geometry) and ``SegmentSession.layers`` (the generator image
itself: direct geometry).  The feather radius is in *layer pixels* (for the direct geometry the layer is the
generator image) and is applied once, to the layer-resolution selection × generator footprint, with
:func:`core.blend.feather_mask` (inward: alpha is exactly 0 outside the selection).

* direct geometry: the overlay is the edited render itself (Poisson: solved inside alpha > 0);
* upsampled / aligned: the edit *delta* is formed at generator resolution (made seamless there with Poisson
  inside the selection when asked) and lifted onto the layer with ``LayerGeometry.delta_to_layer``, so the
  layer keeps its own detail.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Optional

import torch

from core.blend import color_match as _color_match
from core.blend import feather_mask, poisson_blend
from core.common import InvalidInput
from core.geometry import LayerGeometry
from core.inversion import Inversion

BLENDS = ("alpha", "poisson")
DEFAULT_FEATHER = 8.0  # inward feather radius, layer pixels; krita-ai-diffusion uses selection_feather 10


def check_render_options(feather, blend) -> float:
    """Validate a render's ``feather`` (finite radius >= 0, layer px) and ``blend``; returns the feather."""
    if blend not in BLENDS:
        raise InvalidInput(f"blend must be one of {BLENDS}; got {blend!r}")
    if not (isinstance(feather, numbers.Real) and math.isfinite(feather) and feather >= 0):
        raise InvalidInput(f"feather must be a finite radius >= 0; got {feather!r}")
    return float(feather)


def alpha_for(geometry: LayerGeometry, selection: torch.Tensor, feather: float, window,
              cache: Optional[dict] = None) -> torch.Tensor:
    """Feathered (selection × generator footprint) over ``window`` (1,1,h,w); ``selection`` (1,1,H,W) in [0,1]
    at layer resolution.  ``cache`` (a dict owned by the caller) keeps the last radius's result."""
    key = (float(feather), tuple(window))
    if cache is not None and key in cache:
        return cache[key]
    x0, y0, x1, y1 = window
    alpha = feather_mask(geometry.footprint(window).to(selection) * selection[..., y0:y1, x0:x1], feather)
    if cache is not None:
        cache.clear()
        cache[key] = alpha
    return alpha


@torch.no_grad()
def compose(inv: Inversion, geometry: LayerGeometry, base: torch.Tensor, selection: torch.Tensor, edits=None,
            directions: Optional[Mapping] = None, feather: float = DEFAULT_FEATHER, blend: str = "alpha",
            color_match: bool = False, segments=None, reference: Optional[torch.Tensor] = None,
            device=None, cache: Optional[dict] = None):
    """``(overlay (1,3,h,w), alpha (1,1,h,w), window)`` for ``edits`` over the layer ``window`` that can change.

    ``base`` (1,3,H,W) in [-1,1]: the layer's RGB; ``selection`` (1,1,H,W) in [0,1]; ``reference`` the unedited
    generator-resolution image a delta is measured against (None: the reconstruction).  ``color_match`` maps
    the unedited reconstruction's colours onto the input's first.  Runs on ``device`` (default: the
    inversion's).  Outside alpha > 0 the caller keeps the layer's own pixels.
    """
    feather = check_render_options(feather, blend)
    device = inv.image.device if device is None else torch.device(device)
    gen = inv.generated(edits, directions, segments).to(device)
    rec = (inv.generated() if reference is None else reference).to(device)
    image, support = inv.image.to(device), inv.support.to(device)
    if color_match:
        gen = _color_match(rec, image, inv.coverage.to(device), target=gen)
    window = geometry.grown_window(feather)
    alpha = alpha_for(geometry, selection.to(device), feather, window, cache)
    if geometry.kind == "direct":
        overlay = poisson_blend(image, gen, alpha > 0) if blend == "poisson" else gen
        x0, y0, x1, y1 = window
        return overlay[..., y0:y1, x0:x1], alpha, window
    # the edit delta at generator resolution (made seamless there when asked), lifted to the layer
    res_overlay = torch.where(support, image + (gen - rec), image)
    if blend == "poisson":
        res_overlay = poisson_blend(image, res_overlay, support)
    x0, y0, x1, y1 = window
    overlay = base.to(device)[..., y0:y1, x0:x1] + geometry.delta_to_layer(res_overlay - image, window).to(device)
    return overlay, alpha, window
