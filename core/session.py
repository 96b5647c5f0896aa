"""One editing session: a layer (+ selection) -> inversion state -> ``render(edits)`` -> a result layer.

The server's view of the engine. ``create_session`` inverts the layer once (method "w", "wplus", "pti" or
"chunks"); ``EditSession.render`` then costs one generator forward plus compositing and returns a new layer
``(H,W,4)`` float32 RGBA in [0,1] at the input's size: RGB edited inside the composite mask and equal to the
input elsewhere, alpha = composite mask × input alpha (0 outside the selection, so those pixels of the result
layer are transparent and its RGB there is the input's, bit for bit).

Pieces: every method returns a :class:`core.inversion.Inversion` (codes, segment masks, tuned generator); a
:class:`core.geometry.LayerGeometry` maps the layer onto the generator square (``SessionOptions.align``:
"none" -> direct, or upsampled for a layer ``k`` times the generator size; "auto" -> the FFHQ-aligned face
crop); ``core.compositing.compose`` is the one path from an edited render to overlay + alpha (feather in
layer pixels).

Selection: ``None`` or all ones means the whole layer (documented: the static region is empty, every pixel may
change; with ``align="auto"`` the face crop still bounds the change).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Mapping, Optional

import numpy as np
import torch

from core.chunks import ChunksOptions, dilate, invert_segments, normalize_masks
from core.chunks import refine as refine_inversion
from core.common import CancelLike, InvalidInput, ProgressFn, Stages, check_cancel
from core.compositing import DEFAULT_FEATHER, check_render_options, compose
from core.expanded import FusedRender, check_fusion
from core.geometry import LayerGeometry, aligned_geometry, plain_geometry, to_numpy, to_tensor
from core.inversion import Inversion
from core.pti import ENCODER_PIVOT_LR, ENCODER_PIVOT_TUNE_STEPS

ALIGNS = ("auto", "none")
# The inversion methods, their defaults and the SessionOptions fields each uses: the one source the server's
# GET /v1/models and the plugins read (method_catalog()).  Steps = (projection, tuning) when left None.
_CATALOG = (
    # PTI §4.5: 450 projection steps, then up to 350 tuning steps (early stop: core.pti.PTIOptions)
    ("pti", "Pivotal tuning (closest likeness)", 450, 350, ("project_steps", "tune_steps", "pivot", "locality",
                                                            "seed")),
    # Chunkmogrify README: "100 or 200 is ok"; its PTI is optional ("30–50 iterations")
    ("chunks", "Segments (ChunkyGAN)", 200, 0, ("project_steps", "tune_steps", "space", "reg", "segments", "seed")),
    ("w", "Latent code only (W)", 450, 0, ("project_steps", "seed")),  # PTI §4.5: 450 W projection steps
    ("wplus", "Latent code per layer (W+)", 450, 0, ("project_steps", "seed")),  # the same budget in W+
    # MAGEC §4: two phases of 100 steps; project_steps is the total, split 100 + 100
    ("magec", "Editability-aware (MAGEC)", 200, 0, ("project_steps", "seed")),
    ("encoder", "Fast (encoder)", 0, 0, ()),  # e4e/pSp: one forward pass, no optimisation
)
METHODS = tuple(m[0] for m in _CATALOG)
METHOD_STEPS = {m[0]: (m[2], m[3]) for m in _CATALOG}
# PTI's pivot ("Start from"): the W projection (PTI's own), a MAGEC W+ code, or the encoder's W+ code; each
# with its projection budget (project_steps when left None) and the capability a model needs for it.
_PIVOTS = (
    ("w", "The latent code (W)", 450, None),  # PTI §4.5: 450 W projection steps
    # PTI's 450 W projection steps with MAGEC's consistency term (core.magec.magec_pivot_report, MAGEC_PIVOT_WEIGHT)
    ("magec", "The editability-aware code (MAGEC)", 450, "magec"),
    ("encoder", "The encoder's code (fast)", 0, "encoder"),  # PTI's repository can start from e4e's code
)
PIVOTS = tuple(p[0] for p in _PIVOTS)
PIVOT_STEPS = {p[0]: p[2] for p in _PIVOTS}
# a pivot's own tuning (default steps, learning rate) where it differs from PTI's 350 at 3e-4: the encoder's fast
# path tunes 250 steps at 2e-3 without the plateau rule (measured: core.pti.ENCODER_PIVOT_LR)
PIVOT_TUNING = {"encoder": (ENCODER_PIVOT_TUNE_STEPS, ENCODER_PIVOT_LR)}
# what a model must offer for a method (or a pivot) beyond a generator: a descriptor + LinkNet, an encoder
NEEDS = {"magec": "magec", "encoder": "encoder"}
# the pivot a PTI request without one gets where the model has an encoder (server, plugins; SessionOptions keeps
# PTI's own "w"): bench/editability.py (4 held-out faces, seed 1616, default steps) measured the encoder pivot's
# edit-delta score 0.82 / 0.92 (small / large features) vs W's 0.78 / 0.88, reconstruction MSE 3.6e-4 vs 4.8e-4,
# in 31 s vs 131 s (1 thread); bench/speed.py: README "Benchmarks"
DEFAULT_PIVOT_WITH_ENCODER = "encoder"
# "segmenter": the model can segment a face itself (SessionOptions.segments="auto"; core.segmenter)
CAPABILITIES = ("magec", "encoder", "segmenter")
# SessionOptions.segments: the selection as one segment, the model's own segmenter, or a label map (an array)
SEGMENT_SOURCES = ("selection", "auto", "labels")
MAX_SEGMENTS = 32  # bounded work: each segment costs one generator image per optimisation step; our choice


def default_pivot(capabilities=CAPABILITIES) -> str:
    """The pivot PTI starts from when a request names none: the encoder's code where the model has an encoder
    (:data:`DEFAULT_PIVOT_WITH_ENCODER`), else PTI's own W projection."""
    return DEFAULT_PIVOT_WITH_ENCODER if "encoder" in set(capabilities) else "w"


def method_catalog(capabilities=CAPABILITIES) -> list[dict]:
    """``[{name, label, project_steps, tune_steps, options[, pivots]}]`` for the methods a model with
    ``capabilities`` (a subset of :data:`CAPABILITIES`: "magec" = a descriptor for MAGEC, "encoder" = an
    encoder, "segmenter" = automatic segments) supports, the default first; ``label`` in user words, steps the
    defaults used when ``SessionOptions`` leaves them None, ``options`` the SessionOptions fields the method
    reads (besides align, feather, blend, color_match, which all use); "pti" also lists ``pivots``
    [{name, label, project_steps, tune_steps}] (``options.pivot``, the default first: :func:`default_pivot`)
    and ``default_pivot``, the one a request without ``pivot`` gets; "chunks" lists ``segments``, the
    segment sources it offers (:data:`SEGMENT_SOURCES`; "auto" only with a segmenter)."""
    caps = set(capabilities)
    out = []
    for name, label, p, t, fields in _CATALOG:
        if NEEDS.get(name, "") and NEEDS[name] not in caps:
            continue
        entry = {"name": name, "label": label, "project_steps": p, "tune_steps": t, "options": list(fields)}
        if name == "pti":
            first = default_pivot(caps)
            pivots = [{"name": v, "label": lab, "project_steps": steps, "tune_steps": PIVOT_TUNING.get(v, (t,))[0]}
                      for v, lab, steps, need in _PIVOTS if need is None or need in caps]
            entry["pivots"] = sorted(pivots, key=lambda p: p["name"] != first)
            entry["default_pivot"] = first
        if name == "chunks":
            entry["segments"] = [v for v in SEGMENT_SOURCES if v != "auto" or "segmenter" in caps]
        out.append(entry)
    return out


@dataclasses.dataclass
class MethodAssets:
    """What methods beyond a generator need: MAGEC's ``descriptor`` (core.magec.Descriptor) and ``linknet``
    (core.magec.LinkNet fitted for this generator), an e4e/pSp ``encoder`` (core.encoder.Encoder) for it;
    None where the model has none (``core.models.LoadedModel.method_assets`` builds them)."""

    descriptor: object = None
    linknet: object = None
    encoder: object = None
    missing: dict = dataclasses.field(default_factory=dict)  # {"magec"|"encoder"|"segmenter": why unavailable}
    segmenter: object = None  # core.segmenter.Segmenter for segments="auto"
    content: object = None  # core.expanded.ContentExtractor: render(fusion="relevance") in one forward, no fit


SESSION_FORMAT = "latent-edit-session"
SESSION_VERSION = 1


@dataclasses.dataclass
class SessionOptions:
    """How a session inverts and renders; ``None`` steps mean the method's default (``METHOD_STEPS``)."""

    method: str = "pti"  # PTI (Roich et al. 2021): best reconstruction of real photos
    align: str = "auto"  # FFHQ-aligned faces are what face generators know (ffhq-dataset recreate_aligned_images)
    project_steps: Optional[int] = None
    tune_steps: Optional[int] = None
    feather: float = DEFAULT_FEATHER  # inward feather radius, layer px (core.compositing.DEFAULT_FEATHER)
    blend: str = "alpha"  # "alpha" | "poisson" (Chunkmogrify's "blended" output mode is Poisson cloning)
    seed: int = 0
    color_match: bool = False  # krita-ai-diffusion color_match; off: edits may change colour on purpose
    space: str = "w+"  # chunks: ChunkyGAN's default space
    reg: float = 1.0  # chunks: ChunkyGAN λ_reg = 1 (only acts with several segments; per element: see invert)
    min_face: int = 32  # align="auto": smallest face (eye-to-mouth box side, layer px) accepted; our choice
    locality: bool = False  # pti: PTI §3.3 locality regulariser (PTI@da94d59 ships it off) with its settings
    pivot: str = "w"  # pti: PTI's own pivot is the W projection (PTI §3.1); "magec" | "encoder" (PIVOTS)
    # chunks: "selection" = the selection is one segment (ChunkyGAN §5, static mask); "auto" = the model's
    # segmenter inside the selection (ChunkyGAN §3); or an (H,W) integer label map in layer coordinates, each
    # distinct value >= 0 one segment (Chunkmogrify: "each colour one segment"), negative = no segment (kept)
    segments: object = "selection"

    def needs(self) -> set:
        """The model capabilities (:data:`CAPABILITIES`) these options use."""
        out = {NEEDS[self.method]} if self.method in NEEDS else set()
        if self.method == "pti" and self.pivot in NEEDS:
            out.add(NEEDS[self.pivot])
        if self.segment_source() == "auto":
            out.add("segmenter")
        return out

    def segment_source(self) -> str:
        """"selection", "auto" or "labels" (a label-map array in ``segments``)."""
        return "labels" if isinstance(self.segments, np.ndarray) else str(self.segments)

    def resolved_steps(self) -> tuple[int, int]:
        """(projection, tuning) steps; for "magec" the projection is MAGEC's total of both phases (the MAGEC
        pivot: PTI's W projection steps); the encoder (and its pivot) projects nothing."""
        p, t = METHOD_STEPS[self.method]
        if self.method == "pti":
            p = PIVOT_STEPS.get(self.pivot, p)
            t = PIVOT_TUNING.get(self.pivot, (t,))[0]
        p = p if self.project_steps is None else int(self.project_steps)
        t = t if self.tune_steps is None else int(self.tune_steps)
        if self.method in ("w", "wplus", "magec", "encoder"):
            t = 0
        if self.method == "encoder" or (self.method == "pti" and self.pivot == "encoder"):
            p = 0
        return p, t

    def validate(self) -> "SessionOptions":
        if self.method not in METHODS:
            raise InvalidInput(f"method must be one of {METHODS}; got {self.method!r}")
        if self.align not in ALIGNS:
            raise InvalidInput(f"align must be one of {ALIGNS}; got {self.align!r}")
        check_render_options(self.feather, self.blend)
        if not isinstance(self.locality, (bool, np.bool_)):
            raise InvalidInput(f"locality must be true or false; got {self.locality!r}")
        for name in ("project_steps", "tune_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0):
                raise InvalidInput(f"{name} must be an integer >= 0 or None; got {v!r}")
        if self.pivot not in PIVOTS:
            raise InvalidInput(f"pivot must be one of {PIVOTS}; got {self.pivot!r}")
        if self.pivot != "w" and self.method != "pti":
            raise InvalidInput(f"pivot {self.pivot!r} is for method 'pti' (its starting code); method "
                               f"{self.method!r} takes no pivot")
        p = self.resolved_steps()[0]
        if self.method == "magec" and p < 2:
            raise InvalidInput("project_steps must be at least 2 for MAGEC (its two phases)")
        if p < 1 and "encoder" not in self.needs():
            raise InvalidInput("project_steps must be at least 1")
        from core.chunks import SPACES  # server protocol checks: validity lives here, once

        if self.space not in SPACES:
            raise InvalidInput(f"space must be one of {SPACES}; got {self.space!r}")
        if not (isinstance(self.reg, (int, float)) and math.isfinite(self.reg) and self.reg >= 0):
            raise InvalidInput(f"reg must be a finite weight >= 0; got {self.reg!r}")
        check_segments_option(self.segments, self.method)
        for name, lo, hi in (("min_face", 1, None), ("seed", 0, 2**32 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                raise InvalidInput(f"{name} must be an integer in [{lo}, {hi if hi is not None else 'inf'}]; got {v!r}")
        return self


# ------------------------------------------------------------------------------------------------ validation

def check_segments_option(segments, method: str, shape: Optional[tuple] = None) -> None:
    """InvalidInput unless ``segments`` is "selection", "auto" or an ``(H,W)`` integer label map (matching
    ``shape`` when given, at most :data:`MAX_SEGMENTS` distinct values >= 0, at least one); anything but
    "selection" needs method "chunks"."""
    if isinstance(segments, np.ndarray):
        if segments.ndim != 2:
            raise InvalidInput(f"segments: a label map must be (H,W) integers; got shape {segments.shape}")
        if not (np.issubdtype(segments.dtype, np.integer) or segments.dtype == bool):
            raise InvalidInput(f"segments: a label map must hold integers (one value per segment); got dtype "
                               f"{segments.dtype}")
        if shape is not None and segments.shape != tuple(shape):
            raise InvalidInput(f"segments: the label map is {segments.shape[1]}×{segments.shape[0]} but the layer "
                               f"is {shape[1]}×{shape[0]}")
        values = np.unique(segments)
        values = values[values >= 0]
        if values.size == 0:
            raise InvalidInput("segments: the label map has no segment (every value is negative)")
        if values.size > MAX_SEGMENTS:
            raise InvalidInput(f"segments: the label map has {values.size} distinct values; at most {MAX_SEGMENTS} "
                               "segments are supported (merge some colours)")
    elif not isinstance(segments, str) or segments not in ("selection", "auto"):
        raise InvalidInput(f"segments must be 'selection', 'auto' or an (H,W) integer label map; got {segments!r}")
    if not (isinstance(segments, str) and segments == "selection") and method != "chunks":
        raise InvalidInput(f"segments other than 'selection' need method 'chunks' (ChunkyGAN segments); method "
                           f"{method!r} inverts the selection as one region")


def segment_layer_masks(labels: np.ndarray, selection: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """A label map ``(H,W)`` ints and the selection ``(H,W)`` in [0,1] -> ``(n,H,W)`` float32 masks (each
    distinct value >= 0 intersected with the selection; values whose region misses the selection are dropped)
    and the label value of each mask."""
    masks, values = [], []
    for v in np.unique(labels):
        if v < 0:
            continue
        m = np.where(labels == v, selection, np.float32(0)).astype(np.float32)
        if (m > 0).any():
            masks.append(m)
            values.append(int(v))
    if not masks:
        raise InvalidInput("segments: no segment of the label map overlaps the selection")
    return np.stack(masks), values


def check_layer(image) -> np.ndarray:
    """``(H,W,4)`` (or ``(H,W,3)``, alpha 1) float RGBA in [0,1] -> float32 ``(H,W,4)``."""
    if not isinstance(image, np.ndarray):
        raise InvalidInput(f"image must be a numpy array (H,W,4) float32 RGBA, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInput(f"image must be (H,W,4) RGBA; got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise InvalidInput(f"image must be float32 RGBA in [0,1]; got dtype {image.dtype} (divide uint8 by 255)")
    if not np.isfinite(image).all():
        raise InvalidInput("image contains NaN or infinite values")
    if image.min() < 0 or image.max() > 1:
        raise InvalidInput(f"image values must lie in [0,1]; got [{image.min():.3g}, {image.max():.3g}]")
    if image.shape[2] == 3:
        image = np.concatenate([image, np.ones(image.shape[:2] + (1,), image.dtype)], axis=2)
    return np.ascontiguousarray(image, dtype=np.float32)


def check_selection(selection, shape: tuple[int, int]) -> np.ndarray:
    """``(H,W)`` float in [0,1] (bool accepted) matching the layer; None = everything."""
    if selection is None:
        return np.ones(shape, np.float32)
    if not isinstance(selection, np.ndarray):
        raise InvalidInput(f"selection must be a numpy array (H,W) float32 in [0,1], got {type(selection).__name__}")
    if selection.ndim == 3 and selection.shape[2] == 1:
        selection = selection[..., 0]
    if selection.ndim != 2:
        raise InvalidInput(f"selection must be (H,W); got shape {selection.shape}")
    if selection.shape != tuple(shape):
        raise InvalidInput(f"selection is {selection.shape[1]}×{selection.shape[0]} but the layer is "
                           f"{shape[1]}×{shape[0]}")
    if selection.dtype == bool:
        selection = selection.astype(np.float32)
    if not np.issubdtype(selection.dtype, np.floating):
        raise InvalidInput(f"selection must be float32 in [0,1]; got dtype {selection.dtype} (divide uint8 by 255)")
    if not np.isfinite(selection).all():
        raise InvalidInput("selection contains NaN or infinite values")
    if selection.min() < 0 or selection.max() > 1:
        raise InvalidInput(f"selection values must lie in [0,1]; got [{selection.min():.3g}, {selection.max():.3g}]")
    if not (selection > 0).any():
        raise InvalidInput("the selection is empty: select the region to edit (or pass no selection for all)")
    return np.ascontiguousarray(selection, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- session

class EditSession:
    """One layer's inversion (:class:`core.inversion.Inversion`), its :class:`core.geometry.LayerGeometry` and
    the recipe to turn edits into a result layer (see the module docstring).  Never modified after creation:
    :meth:`refine` returns a new session."""

    def __init__(self, G, image: np.ndarray, selection: np.ndarray, inversion: Inversion, options: SessionOptions,
                 geometry: LayerGeometry, directions: Optional[Mapping] = None, info: Optional[dict] = None,
                 reference: Optional[torch.Tensor] = None):
        self.G = G
        self.image = image
        self.selection = selection
        self.inversion = inversion
        self.options = options
        self.geometry = geometry
        self.directions = dict(directions or {})
        self.info = dict(info or {})
        self._base = to_tensor(image[..., :3])
        self._selection = torch.from_numpy(selection)[None, None]
        self._alpha_cache: dict = {}
        self._fused: Optional[FusedRender] = None  # content fusion (render(fusion="relevance")), made once
        # a learned content extractor for this generator (core.expanded); None: the content is fitted instead
        self.content_extractor = None
        self._segment_masks: Optional[np.ndarray] = None  # segment_masks, computed once
        # the "unedited" generator-resolution image an edit delta is measured against (None: the reconstruction;
        # a hole-filled session keeps its parent's, so its baked-in edit shows)
        self.reference = reference

    @property
    def tuned(self) -> bool:
        return self.inversion.tuned

    @property
    def segment_masks(self) -> np.ndarray:
        """The segments' masks ``(n,H,W)`` float32 in [0,1] in layer coordinates (the inversion's segment
        weights lifted onto the layer, within the selection and the generator's footprint; one mask when the
        selection is the only segment).  Index i is segment i of an edit's ``"segments"``."""
        if self._segment_masks is None:
            geo, (H, W) = self.geometry, self.image.shape[:2]
            masks = self.inversion.masks[:, 0][None].detach().float().cpu()  # (1,n,r,r): segments as channels
            lifted = geo.delta_to_layer(masks, (0, 0, W, H))[0].clamp(0, 1) * geo.footprint((0, 0, W, H))[0]
            self._segment_masks = (lifted * torch.from_numpy(self.selection > 0)).numpy().astype(np.float32)
        return self._segment_masks

    def segment_info(self) -> list[dict]:
        """``[{"index": i, "area": layer pixels}, ...]`` (area = the soft mask's sum, rounded) — the result
        metadata the server returns; label-map sessions add each segment's ``"label"`` value."""
        labels = self.inversion.info.get("segment_labels")
        out = []
        for i, m in enumerate(self.segment_masks):
            entry = {"index": i, "area": int(round(float(m.sum(dtype=np.float64))))}
            if isinstance(labels, (list, tuple)) and i < len(labels):
                entry["label"] = int(labels[i])
            out.append(entry)
        return out

    def render(self, edits=None, feather: Optional[float] = None, blend: Optional[str] = None,
               color_match: Optional[bool] = None, fusion: str = "none") -> np.ndarray:
        """The result layer ``(H,W,4)`` float32 RGBA in [0,1] for ``edits`` = [(name | Direction | W tensor,
        strength[, (first, last)]), ...] (names resolved through the session's directions).

        One generator forward (none for no edits) plus compositing (core.compositing; on the CPU, next to the
        numpy layer, while the generator may live on a GPU). Where the composite alpha is 0 the RGB is the
        input's, bit for bit, and alpha is 0.  ``fusion``: "none" (the edited code's render) or "relevance"
        (Yin et al. content fusion, core.expanded: the photo's own content is kept where the edit does not
        change the generator's features; the content is fitted on the first such render, then cached, so a
        re-edit stays one forward).
        """
        o = self.options
        inversion = self.inversion if check_fusion(fusion) == "none" else self.fused_inversion()
        overlay, alpha, window = compose(
            inversion, self.geometry, self._base, self._selection, list(edits or []), self.directions,
            o.feather if feather is None else feather, o.blend if blend is None else blend,
            o.color_match if color_match is None else bool(color_match), reference=self.reference, device="cpu",
            cache=self._alpha_cache)
        x0, y0, x1, y1 = window
        a = alpha[0, 0].numpy().astype(np.float32)
        src = self.image[y0:y1, x0:x1]
        out = self.image.copy()
        out[..., 3] = 0
        out[y0:y1, x0:x1, :3] = np.where(a[..., None] > 0, to_numpy(overlay), src[..., :3])
        out[y0:y1, x0:x1, 3] = np.where(a > 0, a * src[..., 3], np.float32(0))
        return out

    def fused_inversion(self) -> FusedRender:
        """The inversion's renders with content fusion (core.expanded.FusedRender), made once per session: by the
        learned ``content_extractor`` when the model has one, else fitted."""
        if self._fused is None:
            self._fused = FusedRender(self.inversion, extractor=self.content_extractor)
        return self._fused

    def refine(self, correction, edits, steps: Optional[int] = None, progress: ProgressFn = None,
               cancel: CancelLike = None) -> "EditSession":
        """Hole filling (ChunkyGAN §5): a new session where ``edits`` are baked in and the edited content may
        continue into ``correction`` ((H,W) float in [0,1], layer coordinates, e.g. where glasses should reach
        past the selection). The selection grows to include the correction; ``self`` is unchanged.
        ``progress(ProgressEvent)`` with stage "refine"."""
        H, W = self.image.shape[:2]
        corr = check_selection(correction, (H, W))
        c_res = self.geometry.to_generator(corr)
        if not (c_res > 0).any():
            raise InvalidInput("the correction mask lies outside the region the generator covers")
        inv = self.inversion
        C = torch.from_numpy(np.ascontiguousarray(c_res, dtype=np.float32)).to(inv.image.device)
        refined = refine_inversion(inv, C, list(edits or []), self.directions, steps,
                                   options=ChunksOptions(seed=self.options.seed), progress=progress, cancel=cancel)
        reference = inv.generated() if self.reference is None else self.reference
        session = EditSession(self.G, self.image, np.maximum(self.selection, corr), refined, self.options,
                              self.geometry.including(corr > 0), self.directions, dict(self.info, refined=True),
                              reference=reference.detach().cpu())
        session.content_extractor = self.content_extractor  # the same generator: its extractor still applies
        return session

    # ---- persistence ----
    def save(self, directory) -> pathlib.Path:
        """Write ``session.json`` (metadata), ``tensors.pt`` (plain tensors) and, when the generator was tuned,
        ``generator_delta.pt`` (core.stylegan2.formats delta against the base generator)."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        inv = self.inversion
        tensors = {"image": torch.from_numpy(self.image), "selection": torch.from_numpy(self.selection)}
        tensors.update({f"seg_{k}": v.detach().cpu() for k, v in inv.state_dict().items()})
        if self.reference is not None:
            tensors["reference"] = self.reference.detach().cpu()
        if isinstance(self.options.segments, np.ndarray):
            tensors["segments"] = torch.from_numpy(self.options.segments.astype(np.int64))
        if inv.info.get("segment_labels") is not None:
            tensors["segment_labels"] = torch.tensor(inv.info["segment_labels"], dtype=torch.int64)
        torch.save(tensors, d / "tensors.pt")
        if inv.tuned:
            from core.stylegan2.formats import save_generator

            save_generator(inv.G, d / "generator_delta.pt", base=inv.base_G)
        meta = {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "options": _options_json(self.options),
            "method": inv.method,
            "noise_mode": inv.noise_mode,
            "geometry": self.geometry.to_json(),
            "tuned": inv.tuned,
            "base_fingerprint": _fingerprint(self.G),
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }
        (d / "session.json").write_text(json.dumps(meta, indent=2))
        return d

    @classmethod
    def load(cls, directory, G, directions: Optional[Mapping] = None) -> "EditSession":
        """Read a session written by :meth:`save` for the base generator ``G`` (tensors with
        ``weights_only=True``; a tuned generator is re-applied as a delta on ``G``)."""
        d = pathlib.Path(directory)
        try:
            meta = json.loads((d / "session.json").read_text())
            tensors = torch.load(d / "tensors.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise InvalidInput(f"cannot read a saved session from {d}: {err}") from err
        if meta.get("format") != SESSION_FORMAT or meta.get("version") != SESSION_VERSION:
            raise InvalidInput(f"{d} is not a version-{SESSION_VERSION} {SESSION_FORMAT} directory")
        saved = meta.get("base_fingerprint")
        if saved and saved != _fingerprint(G):
            raise InvalidInput(f"the session in {d} was created with a different model than the one given")
        try:
            options = SessionOptions(**meta["options"])
            if options.segments == "labels":  # the label map itself is saved with the tensors
                options.segments = tensors["segments"].numpy()
            image, selection = tensors["image"].numpy(), tensors["selection"].numpy()
            geometry = LayerGeometry.from_json(meta["geometry"], image.shape[:2], int(G.resolution))
            noise_mode = meta.get("noise_mode") or meta.get("chunks_options", {}).get("noise_mode", "const")
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise InvalidInput(f"the saved session in {d} is incomplete or damaged: {err!r}") from err
        G_inv = G
        if meta.get("tuned"):
            from core.stylegan2.formats import load_generator

            G_inv = load_generator(d / "generator_delta.pt", base=G)
        device = G.w_avg.device
        state = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("seg_")}
        inv = Inversion.from_state(meta.get("method", options.method), G_inv, state, base_G=G, noise_mode=noise_mode)
        if "segment_labels" in tensors:
            inv.info["segment_labels"] = [int(v) for v in tensors["segment_labels"]]
        return cls(G, image, selection, inv, options, geometry, directions=directions, info=meta.get("info"),
                   reference=tensors.get("reference"))


def _options_json(options: SessionOptions) -> dict:
    """``options`` as JSON: a label map becomes ``"labels"`` (the array is saved with the tensors)."""
    out = dataclasses.asdict(dataclasses.replace(options, segments="selection"))
    out["segments"] = options.segment_source() if isinstance(options.segments, np.ndarray) else options.segments
    return out


def _fingerprint(G) -> str:
    """core.stylegan2.formats.fingerprint (sha256 of architecture and weights) of a base generator."""
    from core.stylegan2.formats import fingerprint

    return fingerprint(G)


# ---------------------------------------------------------------------------------------------------- create

def check_assets(opts: SessionOptions, assets: Optional[MethodAssets]) -> MethodAssets:
    """``assets`` (or empty ones) after checking they hold what ``opts`` needs; InvalidInput saying why not
    (the reason the model gave in ``assets.missing``, e.g. the descriptor file to add)."""
    assets = assets if assets is not None else MethodAssets()
    have = {"magec": assets.linknet is not None and assets.descriptor is not None, "encoder": assets.encoder is not None,
            "segmenter": assets.segmenter is not None}
    for need in sorted(opts.needs()):
        if not have[need]:
            what = {"magec": "MAGEC", "encoder": "the encoder", "segmenter": "Automatic segments"}[need]
            why = assets.missing.get(need) or (
                f"{what} needs model assets: pass assets=core.models.LoadedModel.method_assets(...)")
            raise InvalidInput(f"{what} is not available for this model: {why}")
    return assets


def create_session(G, image, selection=None, options: Optional[SessionOptions] = None, progress: ProgressFn = None,
                   cancel: CancelLike = None, directions: Optional[Mapping] = None,
                   assets: Optional[MethodAssets] = None) -> EditSession:
    """Invert ``image`` (numpy ``(H,W,4)`` float32 RGBA in [0,1]) inside ``selection`` (``(H,W)`` in [0,1] or
    None = all) with ``options.method`` and return the :class:`EditSession`.

    ``progress(ProgressEvent)``: stages "align", "project", "tune", "render"; ``fraction`` of the whole job in
    [0,1] (non-decreasing, 1 at the end); ``preview`` None or ``(r,r,3)`` uint8. ``cancel`` raises Cancelled.
    ``G`` is never modified (tuning works on a copy).  ``assets``: what "magec" / "encoder" (and those pivots)
    need (:class:`MethodAssets`); without them those options raise InvalidInput before any work.
    """
    opts = dataclasses.replace(options) if options is not None else SessionOptions()
    opts.validate()
    assets = check_assets(opts, assets)
    layer = check_layer(image)
    H, W = layer.shape[:2]
    sel = check_selection(selection, (H, W))
    check_segments_option(opts.segments, opts.method, (H, W))
    p_steps, t_steps = opts.resolved_steps()
    encode = "encoder" in opts.needs()  # one encoder forward, weighed like a projection step
    stages = Stages(progress, {"align": 0.02 * (p_steps + t_steps) + 1 if opts.align == "auto" else 0,
                               "encode": 1 if encode else 0, "project": p_steps, "tune": t_steps, "render": 1})
    t0 = time.perf_counter()
    res = int(G.resolution)
    check_cancel(cancel)
    if opts.align == "none":
        target, mask, geometry = plain_geometry(layer, sel, res)
    else:
        stages.say("align", 0.0, "Finding the face")
        target, mask, geometry = aligned_geometry(layer, sel, res, min_face=opts.min_face)
        stages.say("align", 1.0, "Found the face")
    check_cancel(cancel)
    device = G.w_avg.device
    labels = None
    if opts.segment_source() == "labels":
        mask, labels = label_masks_for(geometry, opts.segments, sel, mask)
    inv = invert(G, target.to(device), mask.to(device), opts, p_steps, t_steps, stages, cancel, directions, assets)
    if labels is not None:
        inv.info["segment_labels"] = labels
    stages.say("render", 0.0, "Rendering")
    inv.reconstructions()  # cache the unedited render: later renders are one forward
    info = {"method": opts.method, "project_steps": p_steps, "tune_steps": t_steps,
            "seconds": time.perf_counter() - t0, "resolution": res}
    if opts.method == "pti":
        info["pivot"] = opts.pivot
    info["segment_source"] = opts.segment_source()
    info.update({k: inv.info[k] for k in _REPORTED if k in inv.info})
    session = EditSession(G, layer, sel, inv, opts, geometry, directions, info)
    session.content_extractor = assets.content
    stages.say("render", 1.0, "Ready")
    return session


def label_masks_for(geometry: LayerGeometry, labels: np.ndarray, sel: np.ndarray, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, list[int]]:
    """The label map's segments (:func:`segment_layer_masks`) at generator resolution, ``(n,r,r)`` each within
    the generator-resolution selection ``mask`` (1,r,r), and their label values; InvalidInput for a segment
    too small to cover a generator pixel (merge it or use a larger layer)."""
    layer_masks, values = segment_layer_masks(labels, sel)
    inside = (mask[0] > 0).numpy()
    out = np.stack([geometry.to_generator(m) * inside for m in layer_masks]).astype(np.float32)
    empty = [v for v, m in zip(values, out) if not (m > 0).any()]
    if empty:
        raise InvalidInput(f"segments: label value(s) {empty} cover no pixel of the generator's "
                           f"{geometry.resolution}×{geometry.resolution} crop; merge them with a neighbour")
    return torch.from_numpy(out), values


def auto_segments(G, target: torch.Tensor, mask: torch.Tensor, assets: MethodAssets):
    """segments="auto": ``(masks, mask_generator, info)`` for core.chunks.invert_segments from the model's
    segmenter (``assets.segmenter``): with a part head on G's features (DatasetGAN), the masks are
    ``S = G^S(X^S)`` with X^S optimised jointly (ChunkyGAN §3), starting from the encoder's code of ``target``
    when the model has an encoder (else the mean code); with an image network only (a face parser), static
    masks from its labels of ``target``.  Each segment is one part inside the selection ``mask`` (1,r,r);
    ``info["segment_labels"]`` their part indices, ``info["segment_parts"]`` their names."""
    from core.segmenter import image_part_masks, part_mask_generator

    seg = assets.segmenter
    support = (mask[None] > 0) if mask.ndim == 3 else mask > 0
    if seg.head is not None:
        seg.check_generator(G)
        if assets.encoder is not None:
            from core.encoder import encoder_pivot

            xs = encoder_pivot(assets.encoder, target).to(target.device)
        else:
            xs = G.w_avg.reshape(1, 1, -1).expand(1, int(G.num_ws), -1).clone()
        fn, kept = part_mask_generator(G, seg, xs, support)
        masks, generator = mask, (fn, xs)
    else:
        masks, kept = image_part_masks(seg, target, support)
        masks, generator = masks * mask, None
    return masks, generator, {"segment_labels": kept, "segment_parts": [seg.parts[k] for k in kept]}


# Inversion.info entries create_session copies into the session info (scalars: they are saved with it)
_REPORTED = ("steps_run", "early_stopped", "stop_rule", "lpips_backbone", "magec_edits", "descriptor", "id_term")


def invert(G, target, mask, opts: SessionOptions, p_steps: int, t_steps: int, stages: Optional[Stages] = None,
           cancel: CancelLike = None, directions: Optional[Mapping] = None,
           assets: Optional[MethodAssets] = None) -> Inversion:
    """Run ``opts.method`` on ``target`` (1,3,r,r) in [-1,1] with the selection ``mask`` (1,r,r) in [0,1].

    "w"/"wplus": global projection of the whole crop, composited inside the selection; "magec": core.magec's
    W+ inversion of the whole crop (``p_steps`` split over its two phases, edits from ``directions``);
    "encoder": the encoder's W+ code (one forward); "pti": a pivot — ``opts.pivot`` "w" is PTI's W projection
    fitted (like the tuning) to the selection's dilated region when there is a selection, "magec" the same
    projection with MAGEC's consistency term (core.magec.magec_pivot_report), "encoder" the whole-crop code
    above — then pivotal tuning on the region (with PTI's locality regulariser when
    ``opts.locality``); "chunks": core.chunks segment inversion (``mask`` (n,r,r): one mask per segment, the
    selection alone is one) with optional segment-restricted tuning.  ``assets`` (:class:`MethodAssets`) as
    checked by :func:`check_assets`."""
    stages = stages or Stages(None, {"encode": 1, "project": p_steps, "tune": t_steps})
    assets = assets if assets is not None else MethodAssets()
    # λ_reg per element / W variance (ChunksOptions.reg_normalise), not Eq. 2's plain sum: at this scale the plain
    # sum with the paper's λ=1 pulls every segment onto one code (bench/chunks.py, 100 steps, 2 held-out faces:
    # L2 57× global W+ on renders, 3.7× on photos; normalised 1.02× / 1.33×)
    chunks_opts = ChunksOptions(seed=opts.seed, reg_normalise=True)
    if opts.method == "chunks":
        masks, generator, info = mask, None, {}
        if opts.segment_source() == "auto":
            masks, generator, info = auto_segments(G, target, mask, assets)
        # invert_segments' own fraction spans its projection and tuning, as the session's do
        inv = invert_segments(G, target, masks, steps=p_steps, space=opts.space, reg=opts.reg, tune_steps=t_steps,
                              progress=stages.span("project", "tune"), cancel=cancel, options=chunks_opts,
                              mask_generator=generator).inversion
        inv.info.update(info)
        return inv

    S, coverage = normalize_masks(mask[:, None] if mask.ndim == 3 else mask)
    whole = bool((mask >= 1).all())
    region = None if whole else dilate((S.sum(0, keepdim=True) > 0).float(), chunks_opts.dilate)
    source = opts.pivot if opts.method == "pti" else opts.method
    info: dict = {}
    if source == "encoder":
        from core.encoder import check_compatible, encoder_pivot

        check_compatible(assets.encoder, G)
        check_cancel(cancel)
        stages.say("encode", 0.0, "Encoding the face")
        ws = encoder_pivot(assets.encoder, target).to(target.device)
        stages.say("encode", 1.0, "Encoded")
        info["space"] = "w+"
    elif source == "magec" and opts.method == "pti":
        from core.magec import magec_pivot_report
        from core.projection import ProjectOptions

        res = magec_pivot_report(G, target, assets.linknet, assets.descriptor, directions, steps=p_steps,
                                 mask=region, options=ProjectOptions(seed=opts.seed),
                                 progress=stages.callback("project"), cancel=cancel)
        ws = res.ws
        info.update(space="w", magec_edits=res.edits, descriptor=res.descriptor, id_term=res.id_term)
    elif source == "magec":
        from core.magec import MagecOptions, invert_magec_report

        res = invert_magec_report(G, target, assets.linknet, assets.descriptor, directions, steps=p_steps,
                                  options=MagecOptions(seed=opts.seed), progress=stages.callback("project"),
                                  cancel=cancel)
        ws = res.ws
        info.update(space="w+", magec_edits=res.edits, descriptor=res.descriptor, id_term=res.id_term)
    else:
        from core.projection import ProjectOptions, project

        space = "w+" if opts.method == "wplus" else "w"
        proj_mask = region if opts.method == "pti" else None
        ws = project(G, target, space=space, steps=p_steps, mask=proj_mask, progress=stages.callback("project"),
                     cancel=cancel, options=ProjectOptions(seed=opts.seed))
        info["space"] = space
    G_inv = G
    if opts.method == "pti" and t_steps > 0:
        from core.pti import PTIOptions, pivotal_tune_report

        tuning = PTIOptions()
        if opts.pivot in PIVOT_TUNING:  # the fast path runs its whole budget (core.pti: the plateau rule cuts it short)
            tuning = dataclasses.replace(tuning, learning_rate=PIVOT_TUNING[opts.pivot][1], plateau_window=None)
        G_inv, report = pivotal_tune_report(G, ws, target, steps=t_steps, mask=region, locality=opts.locality,
                                            progress=stages.callback("tune"), cancel=cancel, options=tuning)
        info.update(tune_steps_run=report.steps_run, steps_run=report.steps_run,
                    early_stopped=report.stopped_early, stop_rule=report.stop_rule,
                    lpips_backbone=report.lpips_backbone, locality=bool(opts.locality),
                    locality_terms=report.locality_terms)
    return Inversion(opts.method, target, ws, S, coverage, G_inv, G, "const", info)
