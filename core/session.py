"""One editing session: a layer (+ selection) -> inversion state -> ``render(edits)`` -> a result layer.

The server's view of the engine. ``create_session`` inverts the layer once (method "w", "wplus", "pti" or
"chunks"); ``EditSession.render`` then costs one generator forward plus compositing and returns a new layer
``(H,W,4)`` float32 RGBA in [0,1] at the input's size: RGB edited inside the composite mask and equal to the
input elsewhere, alpha = composite mask × input alpha (0 outside the selection, so those pixels of the result
layer are transparent and its RGB there is the input's, bit for bit).

Geometry (``SessionOptions.align``):

* ``"none"``: the layer must be square and ``k`` times the generator's resolution. ``k = 1``: the generator's
  render is composited directly. ``k > 1``: inversion runs on the area-downsampled layer and the *edit delta*
  (edited render − unedited render) is upsampled and added to the full-resolution layer, which keeps its detail.
* ``"auto"``: core.align finds the face overlapping the selection most, the aligned crop is inverted, and the
  edit delta is warped back into the layer (STIT-style paste-back, alpha = selection ∩ crop).

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
import torch.nn.functional as F

from core.blend import color_match as _color_match
from core.blend import feather_mask, poisson_blend
from core.chunks import BLENDS, ChunksOptions, SegmentSession, dilate, invert_segments, normalize_masks
from core.common import CancelLike, InvalidInput, LatentEditError, NoFace, check_cancel

METHODS = ("pti", "chunks", "w", "wplus")
ALIGNS = ("auto", "none")
# (projection steps, tuning steps) when SessionOptions leaves them None
METHOD_STEPS = {
    "w": (450, 0),  # PTI §4.5: 450 W projection steps
    "wplus": (450, 0),  # the same budget in W+
    "pti": (450, 350),  # PTI §4.5: 450 projection steps, then up to 350 tuning steps (early stop at LPIPS 0.06)
    "chunks": (200, 0),  # Chunkmogrify README: "100 or 200 is ok"; its PTI is optional ("30–50 iterations")
}
SESSION_FORMAT = "latent-edit-session"
SESSION_VERSION = 1


@dataclasses.dataclass
class SessionOptions:
    """How a session inverts and renders; ``None`` steps mean the method's default (``METHOD_STEPS``)."""

    method: str = "pti"  # PTI (Roich et al. 2021): best reconstruction of real photos
    align: str = "auto"  # FFHQ-aligned faces are what face generators know (ffhq-dataset recreate_aligned_images)
    project_steps: Optional[int] = None
    tune_steps: Optional[int] = None
    feather: float = 8.0  # inward feather radius in layer pixels; krita-ai-diffusion uses selection_feather 10
    blend: str = "alpha"  # "alpha" | "poisson" (Chunkmogrify's "blended" output mode is Poisson cloning)
    seed: int = 0
    color_match: bool = False  # krita-ai-diffusion color_match; off: edits may change colour on purpose
    space: str = "w+"  # chunks: ChunkyGAN's default space
    reg: float = 1.0  # chunks: ChunkyGAN λ_reg = 1 (only acts with several segments)
    min_face: int = 32  # align="auto": smallest face (eye-to-mouth box side, layer px) accepted; our choice

    def resolved_steps(self) -> tuple[int, int]:
        p, t = METHOD_STEPS[self.method]
        p = p if self.project_steps is None else int(self.project_steps)
        t = t if self.tune_steps is None else int(self.tune_steps)
        if self.method in ("w", "wplus"):
            t = 0
        return p, t

    def validate(self) -> "SessionOptions":
        if self.method not in METHODS:
            raise InvalidInput(f"method must be one of {METHODS}; got {self.method!r}")
        if self.align not in ALIGNS:
            raise InvalidInput(f"align must be one of {ALIGNS}; got {self.align!r}")
        if self.blend not in BLENDS:
            raise InvalidInput(f"blend must be one of {BLENDS}; got {self.blend!r}")
        if not (isinstance(self.feather, (int, float)) and math.isfinite(self.feather) and self.feather >= 0):
            raise InvalidInput(f"feather must be a finite radius >= 0; got {self.feather!r}")
        for name in ("project_steps", "tune_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0):
                raise InvalidInput(f"{name} must be an integer >= 0 or None; got {v!r}")
        if self.resolved_steps()[0] < 1:
            raise InvalidInput("project_steps must be at least 1")
        from core.chunks import SPACES  # server protocol checks: validity lives here, once

        if self.space not in SPACES:
            raise InvalidInput(f"space must be one of {SPACES}; got {self.space!r}")
        if not (isinstance(self.reg, (int, float)) and math.isfinite(self.reg) and self.reg >= 0):
            raise InvalidInput(f"reg must be a finite weight >= 0; got {self.reg!r}")
        for name, lo, hi in (("min_face", 1, None), ("seed", 0, 2**32 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                raise InvalidInput(f"{name} must be an integer in [{lo}, {hi if hi is not None else 'inf'}]; got {v!r}")
        return self


# ------------------------------------------------------------------------------------------------ validation

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


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H,W,3) [0,1] -> (1,3,H,W) [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() * 2 - 1


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """(1,3,H,W) [-1,1] -> (H,W,3) [0,1] float32, clamped."""
    return ((x[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).detach().cpu().numpy().astype(np.float32)


class _Progress:
    """Maps each stage's own progress onto one overall fraction (stages weighted by their step counts)."""

    def __init__(self, fn, weights: dict):
        self.fn = fn
        self.weights = {k: float(v) for k, v in weights.items() if v > 0}
        self.total = sum(self.weights.values()) or 1.0

    def __call__(self, stage: str, fraction: float, message: str = "", preview=None):
        if self.fn is None:
            return
        done = 0.0
        for name, w in self.weights.items():
            if name == stage:
                done += w * min(max(fraction, 0.0), 1.0)
                break
            done += w
        self.fn(stage, done / self.total, message, preview)


def _preview(img) -> Optional[np.ndarray]:
    if img is None or not torch.is_tensor(img):
        return None
    return _to_numpy(img[:1])


# --------------------------------------------------------------------------------------------------- session

class EditSession:
    """Inversion state of one layer and the recipe to turn edits into a result layer (see module docstring)."""

    def __init__(self, G, image: np.ndarray, selection: np.ndarray, segments: SegmentSession,
                 options: SessionOptions, geometry: dict, directions: Optional[Mapping] = None,
                 info: Optional[dict] = None, reference: Optional[torch.Tensor] = None):
        self.G = G
        self.image = image
        self.selection = selection
        self.segments = segments
        self.options = options
        self.geometry = geometry
        self.directions = dict(directions or {})
        self.segments.directions = self.directions
        self.info = dict(info or {})
        self._base = _to_tensor(image[..., :3])
        # the "unedited" generator-resolution image an edit delta is measured against (None: the reconstruction;
        # a hole-filled session keeps its parent's, so its baked-in edit shows)
        self.reference = reference

    @property
    def tuned(self) -> bool:
        return self.segments.tuned

    def render(self, edits=None, feather: Optional[float] = None, blend: Optional[str] = None,
               color_match: Optional[bool] = None) -> np.ndarray:
        """The result layer ``(H,W,4)`` float32 RGBA in [0,1] for ``edits`` = [(name | Direction | W tensor,
        strength[, (first, last)]), ...] (names resolved through the session's directions).

        One generator forward (none for no edits) plus compositing. Where the composite alpha is 0 the RGB is
        the input's, bit for bit, and alpha is 0.
        """
        o = self.options
        feather = o.feather if feather is None else feather
        blend = o.blend if blend is None else blend
        color_match = o.color_match if color_match is None else bool(color_match)
        if blend not in BLENDS:
            raise InvalidInput(f"blend must be one of {BLENDS}; got {blend!r}")
        if not (isinstance(feather, (int, float)) and math.isfinite(feather) and feather >= 0):
            raise InvalidInput(f"feather must be a finite radius >= 0; got {feather!r}")
        edits = list(edits or [])
        seg = self.segments
        with torch.no_grad():
            # compositing runs on the CPU, next to the numpy layer (the generator may live on a GPU)
            gen = seg.generated(edits).cpu()
            rec = (seg.generated() if self.reference is None else self.reference).cpu()
            image, support = seg.image.cpu(), seg.support.cpu()
            if color_match:
                gen = _color_match(rec, image, seg.coverage.cpu(), target=gen)
            kind = self.geometry["kind"]
            if kind == "identity":
                window = (0, 0, self.image.shape[1], self.image.shape[0])
                alpha = self._alpha(feather, window)
                overlay = gen
                if blend == "poisson":
                    overlay = poisson_blend(image, overlay, alpha > 0)
            else:
                # the edit delta at generator resolution (made seamless there when asked), lifted to the layer
                res_overlay = torch.where(support, image + (gen - rec), image)
                if blend == "poisson":
                    res_overlay = poisson_blend(image, res_overlay, support)
                window = self._window(feather)
                x0, y0, x1, y1 = window
                delta = self._lift(res_overlay - image, window)
                alpha = self._alpha(feather, window)
                overlay = self._base[..., y0:y1, x0:x1] + delta
        x0, y0, x1, y1 = window
        a = alpha[0, 0].numpy().astype(np.float32)
        src = self.image[y0:y1, x0:x1]
        out = self.image.copy()
        out[..., 3] = 0
        out[y0:y1, x0:x1, :3] = np.where(a[..., None] > 0, _to_numpy(overlay), src[..., :3])
        out[y0:y1, x0:x1, 3] = np.where(a > 0, a * src[..., 3], np.float32(0))
        return out

    def _alpha(self, feather: float, window) -> torch.Tensor:
        """Feathered (selection × generator footprint) over ``window``, cached per radius."""
        key = (float(feather), tuple(window))
        cache = self.__dict__.setdefault("_alpha_cache", {})
        if key not in cache:
            x0, y0, x1, y1 = window
            sel = torch.from_numpy(self.selection[y0:y1, x0:x1])[None, None]
            cache.clear()
            cache[key] = feather_mask(self._valid(window) * sel, feather)
        return cache[key]

    def _window(self, feather: float) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the region that can change (selection ∩ generator footprint) grown by the feather."""
        x0, y0, x1, y1 = self.geometry["window"]
        H, W = self.image.shape[:2]
        pad = int(math.ceil(feather)) + 2
        return max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, W), min(y1 + pad, H)

    def _lift(self, delta: torch.Tensor, window) -> torch.Tensor:
        """Generator-resolution delta (1,3,r,r) -> the delta over the layer ``window`` (1,3,h,w)."""
        g = self.geometry
        x0, y0, x1, y1 = window
        if g["kind"] == "scale":
            # upsample only the low-resolution pixels the window needs (+1 px so no clamped border is used)
            k, r = int(g["scale"]), delta.shape[-1]
            lx0, ly0 = max(x0 // k - 1, 0), max(y0 // k - 1, 0)
            lx1, ly1 = min(-(-x1 // k) + 1, r), min(-(-y1 // k) + 1, r)
            up = F.interpolate(delta[..., ly0:ly1, lx0:lx1], scale_factor=k, mode="bilinear", align_corners=False)
            return up[..., y0 - ly0 * k:y1 - ly0 * k, x0 - lx0 * k:x1 - lx0 * k]
        if g["kind"] == "align":
            from core.align import warp_back

            d = warp_back(delta[0].permute(1, 2, 0).numpy().astype(np.float32), self._transform(), window)
            return torch.from_numpy(np.ascontiguousarray(d)).permute(2, 0, 1)[None].float()
        raise LatentEditError(f"unknown session geometry {g['kind']!r}")

    def _valid(self, window) -> torch.Tensor:
        """Where the generator's footprint covers the layer ``window`` (1,1,h,w): all of it when scaled,
        the aligned face square (eroded, hard edge: the feather comes after) for faces."""
        x0, y0, x1, y1 = window
        if self.geometry["kind"] != "align":
            return torch.ones(1, 1, y1 - y0, x1 - x0)  # identity / scale: the generator covers the layer
        from core.align import face_alpha

        return torch.from_numpy(face_alpha(self._transform(), window, feather=0.0))[None, None]

    def _transform(self):
        if getattr(self, "_align_transform", None) is None:
            from core.align import AlignTransform

            self._align_transform = AlignTransform.from_json(self.geometry["transform"])
        return self._align_transform

    def refine(self, correction, edits, steps: Optional[int] = None, progress=None,
               cancel: CancelLike = None) -> "EditSession":
        """Hole filling (ChunkyGAN §5): a new session where ``edits`` are baked in and the edited content may
        continue into ``correction`` ((H,W) float in [0,1], layer coordinates, e.g. where glasses should reach
        past the selection). The selection grows to include the correction; ``self`` is unchanged."""
        H, W = self.image.shape[:2]
        corr = check_selection(correction, (H, W))
        kind, res = self.geometry["kind"], self.segments.image.shape[-1]
        if kind == "identity":
            c_res = corr
        elif kind == "scale":
            c_res = F.interpolate(torch.from_numpy(corr)[None, None], size=(res, res), mode="area")[0, 0].numpy()
        else:
            from core.align import warp_crop

            c_res = np.clip(warp_crop(corr[..., None], self._transform())[..., 0], 0, 1)
        if not (c_res > 0).any():
            raise InvalidInput("the correction mask lies outside the region the generator covers")
        C = torch.from_numpy(np.ascontiguousarray(c_res, dtype=np.float32)).to(self.segments.image.device)
        prog = None if progress is None else (lambda s, t, loss=None, *a: progress("refine", s / max(t, 1),
                                                                                 f"refine step {s}/{t}", None))
        seg = self.segments.refine(C, edits=list(edits or []), steps=steps, progress=prog, cancel=cancel)
        selection = np.maximum(self.selection, corr)
        geometry = dict(self.geometry)
        geometry["window"] = [min(a, b) if i < 2 else max(a, b)
                              for i, (a, b) in enumerate(zip(self.geometry["window"], _bbox(corr > 0)))]
        reference = self.segments.generated() if self.reference is None else self.reference
        return EditSession(self.G, self.image, selection, seg, self.options, geometry, self.directions,
                           dict(self.info, refined=True), reference=reference.detach().cpu())

    # ---- persistence ----
    def save(self, directory) -> pathlib.Path:
        """Write ``session.json`` (metadata), ``tensors.pt`` (plain tensors) and, when the generator was tuned,
        ``generator_delta.pt`` (core.stylegan2.formats delta against the base generator)."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        seg = self.segments
        tensors = {"image": torch.from_numpy(self.image), "selection": torch.from_numpy(self.selection)}
        tensors.update({f"seg_{k}": v.detach().cpu() for k, v in seg.state_dict().items()})
        if self.reference is not None:
            tensors["reference"] = self.reference.detach().cpu()
        geometry = {k: v for k, v in self.geometry.items() if not torch.is_tensor(v)}
        tensors.update({f"geom_{k}": v.detach().cpu() for k, v in self.geometry.items() if torch.is_tensor(v)})
        torch.save(tensors, d / "tensors.pt")
        if seg.tuned:
            from core.stylegan2.formats import save_generator

            save_generator(seg.G, d / "generator_delta.pt", base=seg.base_G)
        meta = {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "options": dataclasses.asdict(self.options),
            "chunks_options": dataclasses.asdict(seg.options),
            "geometry": geometry,
            "tuned": seg.tuned,
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
            chunks_options = ChunksOptions(**meta["chunks_options"])
            image, selection, geometry = tensors["image"].numpy(), tensors["selection"].numpy(), dict(meta["geometry"])
        except (KeyError, TypeError, AttributeError) as err:
            raise InvalidInput(f"the saved session in {d} is incomplete or damaged: {err!r}") from err
        G_seg = G
        if meta.get("tuned"):
            from core.stylegan2.formats import load_generator

            G_seg = load_generator(d / "generator_delta.pt", base=G)
        device = G.w_avg.device
        state = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("seg_")}
        seg = SegmentSession.from_state(G_seg, state, chunks_options, base_G=G)
        geometry.update({k[5:]: v for k, v in tensors.items() if k.startswith("geom_")})
        return cls(G, image, selection, seg, options, geometry, directions=directions, info=meta.get("info"),
                   reference=tensors.get("reference"))


def _fingerprint(G) -> str:
    """core.stylegan2.formats.fingerprint (sha256 of architecture and weights) of a base generator."""
    from core.stylegan2.formats import fingerprint

    return fingerprint(G)


# ---------------------------------------------------------------------------------------------------- create

def create_session(G, image, selection=None, options: Optional[SessionOptions] = None, progress=None,
                   cancel: CancelLike = None, directions: Optional[Mapping] = None) -> EditSession:
    """Invert ``image`` (numpy ``(H,W,4)`` float32 RGBA in [0,1]) inside ``selection`` (``(H,W)`` in [0,1] or
    None = all) with ``options.method`` and return the :class:`EditSession`.

    ``progress(stage, fraction, message, preview)``: stages "align", "project", "tune", "render"; ``fraction`` of
    the whole job in [0,1]; ``preview`` None or ``(r,r,3)`` float32 in [0,1]. ``cancel`` raises Cancelled.
    ``G`` is never modified (tuning works on a copy).
    """
    opts = dataclasses.replace(options) if options is not None else SessionOptions()
    opts.validate()
    layer = check_layer(image)
    H, W = layer.shape[:2]
    sel = check_selection(selection, (H, W))
    p_steps, t_steps = opts.resolved_steps()
    report = _Progress(progress, {"align": 0.02 * (p_steps + t_steps) + 1 if opts.align == "auto" else 0,
                                  "project": p_steps, "tune": t_steps, "render": 1})
    t0 = time.perf_counter()
    res = int(G.resolution)
    check_cancel(cancel)
    if opts.align == "none":
        target, mask, geometry = _plain_geometry(layer, sel, res)
    else:
        report("align", 0.0, "finding the face")
        target, mask, geometry = _align_geometry(layer, sel, res, min_face=opts.min_face)
        report("align", 1.0, f"face at {geometry.get('box')}")
    check_cancel(cancel)
    device = G.w_avg.device
    seg = _invert(G, target.to(device), mask.to(device), opts, p_steps, t_steps, report, cancel)
    report("render", 0.0, "rendering")
    seg.reconstructions()  # cache the unedited render: later renders are one forward
    info = {"method": opts.method, "project_steps": p_steps, "tune_steps": t_steps,
            "seconds": time.perf_counter() - t0, "resolution": res}
    session = EditSession(G, layer, sel, seg, opts, geometry, directions, info)
    report("render", 1.0, "ready")
    return session


def _plain_geometry(layer: np.ndarray, sel: np.ndarray, res: int):
    H, W = layer.shape[:2]
    if H != W or H % res:
        raise InvalidInput(f"the layer is {W}×{H}; with align='none' it must be square and a multiple of the "
                           f"generator's {res}×{res} (crop or scale it, or use align='auto' for faces)")
    k = H // res
    rgb = _to_tensor(layer[..., :3])
    m = torch.from_numpy(sel)[None, None]
    window = list(_bbox(sel > 0))
    if k == 1:
        return rgb, m[0], {"kind": "identity", "scale": 1, "window": window}
    target = F.interpolate(rgb, size=(res, res), mode="area")
    mask = F.interpolate(m, size=(res, res), mode="area")[0].clamp(0, 1)
    return target, mask, {"kind": "scale", "scale": k, "window": window}


def _bbox(region: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels of ``region`` (H,W)."""
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _invert(G, target, mask, opts: SessionOptions, p_steps: int, t_steps: int, report, cancel) -> SegmentSession:
    """Run the chosen method on ``target`` (1,3,r,r) with the selection ``mask`` (1,r,r)."""
    chunks_opts = ChunksOptions(seed=opts.seed)
    if opts.method == "chunks":
        def prog(step, total, loss=None, preview=None, *rest):
            stage = "project" if step <= p_steps else "tune"
            frac = step / max(p_steps, 1) if stage == "project" else (step - p_steps) / max(t_steps, 1)
            report(stage, frac, f"{stage} step {step}/{total}" + ("" if loss is None else f" loss {loss:.4f}"),
                   _preview(preview))

        return invert_segments(G, target, mask, steps=p_steps, space=opts.space, reg=opts.reg,
                               tune_steps=t_steps, progress=prog, cancel=cancel, options=chunks_opts)

    from core.projection import ProjectOptions, project

    S, coverage = normalize_masks(mask[:, None] if mask.ndim == 3 else mask)
    whole = bool((mask >= 1).all())
    region = None if whole else dilate((S.sum(0, keepdim=True) > 0).float(), chunks_opts.dilate)

    def prog_stage(stage, total):
        def prog(step, tot, loss=None, preview=None, *rest):
            msg = f"{stage} step {step}/{tot}" + ("" if loss is None else f" loss {loss:.4f}")
            report(stage, step / max(tot, 1), msg, _preview(preview))
        return prog

    space = "w+" if opts.method == "wplus" else "w"
    # "w"/"wplus": global projection of the whole crop, composited inside the selection;
    # "pti": W pivot, fitted (like the tuning) to the selection's dilated region when there is a selection.
    proj_mask = region if opts.method == "pti" else None
    ws = project(G, target, space=space, steps=p_steps, mask=proj_mask, progress=prog_stage("project", p_steps),
                 cancel=cancel, options=ProjectOptions(seed=opts.seed))
    G_seg = G
    if opts.method == "pti" and t_steps > 0:
        from core.pti import pivotal_tune

        G_seg = pivotal_tune(G, ws, target, steps=t_steps, mask=region, progress=prog_stage("tune", t_steps),
                             cancel=cancel)
    return SegmentSession(G_seg, target, S, coverage, ws, chunks_opts, base_G=G,
                          info={"method": opts.method, "space": space})


# ----------------------------------------------------------------------------------------------------- faces

def _align_geometry(layer: np.ndarray, sel: np.ndarray, res: int, min_face: int):
    """Detect faces, take the one the selection covers most, FFHQ-align it to a ``res``² crop.

    Returns the crop (1,3,r,r) in [-1,1], the selection in crop coordinates (1,r,r) (0 where the crop lies
    outside the layer) and the geometry (transform JSON, face box, window of the layer that can change)."""
    from core.align import align_face, face_alpha, find_face, warp_crop

    face = find_face(layer, sel, min_size=min_face)
    crop, transform = align_face(layer[..., :3], face, res)
    sel_crop = warp_crop(sel[..., None], transform)[..., 0]
    # crop pixels whose centre falls outside the layer hold mirrored padding, not selected content
    ij = np.stack(np.meshgrid(np.arange(res), np.arange(res), indexing="xy"), -1).reshape(-1, 2)
    xy = transform.crop_to_image(ij).reshape(res, res, 2)
    H, W = layer.shape[:2]
    inside = (xy[..., 0] > -0.5) & (xy[..., 0] < W - 0.5) & (xy[..., 1] > -0.5) & (xy[..., 1] < H - 0.5)
    sel_crop = np.clip(sel_crop, 0, 1) * inside
    region = (face_alpha(transform, feather=0.0) > 0) & (sel > 0)
    if not (sel_crop > 0).any() or not region.any():
        raise NoFace("the selection does not overlap the aligned face region; select (part of) a face")
    geometry = {"kind": "align", "transform": transform.to_json(), "box": [float(v) for v in face.box],
                "window": list(_bbox(region))}
    target = _to_tensor(np.clip(crop, 0, 1))
    return target, torch.from_numpy(sel_crop.astype(np.float32))[None], geometry
