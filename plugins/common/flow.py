"""The one edit flow both host plugins use: result naming, the method list and defaults the server
serves, edit-name checks, the session cache, and "create/batch -> wait -> render" over :mod:`client`.

Why one module of ~530 lines: it is the one host flow (issue 15) and both hosts import only it; splitting
naming, catalog and cache apart would spread one user action over several files.

Standard library only. Hosts read and write pixels (packed with :mod:`pixels`) and show progress; they
never talk HTTP or decide when to invert themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import client as cl
from . import pixels as px

GROUP_PREFIX = "Latent Edit"
SEP = " · "
PREVIEW_NAME = GROUP_PREFIX + SEP + "preview"

# Used only when the server's GET /v1/models predates the "methods"/"defaults" fields (protocol v1 servers
# before this change); a current server's list always wins.
_FALLBACK_METHODS = (
    {"name": "pti", "label": "Pivotal tuning (closest likeness; from the encoder's code where the model has one)"},
    {"name": "chunks", "label": "Segments (ChunkyGAN, selection only)"},
    {"name": "w", "label": "W (fast)"},
    {"name": "wplus", "label": "W+ (fast, more detail)"},
)
# Hosts that register their choices before any server is reachable (GIMP) list these: the fallback plus the
# methods only some models offer (a model lacking one is refused by check_request, naming those it offers).
STATIC_METHODS = _FALLBACK_METHODS + (
    {"name": "magec", "label": "Editability-aware (MAGEC)"},
    {"name": "encoder", "label": "Fast (encoder)"},
    {"name": "pti:w", "label": "Pivotal tuning, starting from the latent code (W; PTI's own, slower)"},
    {"name": "pti:magec", "label": "Pivotal tuning, starting from the editability-aware code (MAGEC)"},
    {"name": "pti:encoder", "label": "Pivotal tuning, starting from the encoder's code (fast)"},
)
_FALLBACK_FEATHER = 8.0  # core.session.SessionOptions.feather (layer pixels)
# where a session's segments come from (options.segments); hosts word the third as "From layer…"
SEGMENT_CHOICES = (
    ("selection", "Selection (one segment)"),
    ("auto", "Automatic (the model finds the face parts)"),
    ("layer", "From layer (each colour one segment)"),
)
SEGMENTS_METHOD = "chunks"  # segments other than the selection are ChunkyGAN segments
KEEP_DETAIL = "Keep photo detail"  # the checkbox for render fusion "relevance" (Yin et al. content features)
PIVOT_SEP = ":"  # a method choice "pti:magec" = method "pti" with options.pivot "magec"


def split_method(choice: str) -> tuple:
    """"pti:magec" -> ("pti", "magec"); "w" -> ("w", None)."""
    name, _, pivot = str(choice).partition(PIVOT_SEP)
    return name, (pivot or None)


class FlowError(Exception):
    """A choice the user must correct (message shown as is)."""


# --- naming ------------------------------------------------------------------------------------------

def format_strength(strength: float) -> str:
    """1.5 -> "+1.5", -2 -> "-2", 0.125 -> "+0.13" (two decimals at most, no trailing zeros)."""
    s = "%+.2f" % float(strength)
    s = s.rstrip("0").rstrip(".")
    return "+0" if s in ("+", "-", "-0", "+0") else s


def edit_label(edits) -> str:
    """[("smile", 1.5), ("age", -2)] -> "smile +1.5, age -2"; no edits -> "reconstruction"."""
    parts = ["%s %s" % (name, format_strength(strength)) for name, strength in edits]
    return ", ".join(parts) if parts else "reconstruction"


def edit_title(edits) -> str:
    """The result group's name in both hosts: "Latent Edit · smile +1.5"."""
    return GROUP_PREFIX + SEP + edit_label(edits)


def result_layer_name(source_name: str, edits) -> str:
    """The result layer's name in both hosts: "face (smile +1.5)"."""
    return "%s (%s)" % (source_name, edit_label(edits))


def is_result_group_name(name: str) -> bool:
    return str(name).startswith(GROUP_PREFIX + SEP) and name != PREVIEW_NAME


def stack_top(kinds_above) -> int:
    """How many of the siblings directly above a source belong to its result stack.

    ``kinds_above``: for each sibling above the source, nearest first, True when it is a result group (or
    the preview layer). The new result goes above the last of them, so every new edit is on top and visible.
    """
    n = 0
    for is_result in kinds_above:
        if not is_result:
            break
        n += 1
    return n


_EDIT = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*[=:]?\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*$")


def parse_edits(text: str):
    """"smile=1.5; age -1, gaze:+0.5" -> [("smile", 1.5), ("age", -1.0), ("gaze", 0.5)]."""
    edits = []
    for part in re.split(r"[;,\n]", text or ""):
        if not part.strip():
            continue
        m = _EDIT.match(part)
        if not m:
            raise FlowError("Cannot read the edit \"%s\". Write it as name=strength, for example smile=1.5."
                            % part.strip())
        edits.append((m.group(1), float(m.group(2))))
    return edits


def parse_segments(text) -> Optional[list]:
    """"1, 3" -> [1, 3] (the segments an edit applies to, as the result metadata numbers them); "" -> None
    (every segment)."""
    parts = [p for p in re.split(r"[\s,;]+", str(text or "").strip()) if p]
    if not parts:
        return None
    if not all(p.isdigit() for p in parts):
        raise FlowError("Cannot read the segments \"%s\". Write segment numbers, for example 1, 3." % text)
    out = []
    for v in (int(p) for p in parts):
        if v not in out:
            out.append(v)
    return out


def wire_edits(edits, segments=None) -> list:
    """The render's edit entries for ``[(name, strength)]``: plain pairs, or with ``segments`` (indices) each
    ``{direction, strength, segments}`` so the edit changes only those segments."""
    if not segments:
        return [(name, float(strength)) for name, strength in edits]
    return [{"direction": name, "strength": float(strength), "segments": list(segments)} for name, strength in edits]


# --- what the server offers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    label: str
    project_steps: Optional[int] = None  # the method's default (None: not reported)
    tune_steps: Optional[int] = None
    aliases: tuple = ()  # other names of the same choice ("pti:encoder" where PTI starts from the encoder anyway)


def uses_projection_steps(method: Method) -> bool:
    """Whether a "Projection steps" setting means anything for ``method``: not where the server reports no
    projection at all (the encoder, or PTI starting from the encoder's code); unknown counts as yes."""
    return method.project_steps != 0


@dataclass
class Catalog:
    """``GET /v1/models`` read once: models, the default model, methods and defaults."""

    models: list
    default_model: Optional[str]
    feather: float
    methods: dict  # model name -> [Method]

    def model(self, name=None) -> dict:
        """The model dict for ``name`` (None: the server's default); FlowError naming the known ones."""
        want = name or self.default_model or (self.models[0]["name"] if self.models else None)
        for m in self.models:
            if m.get("name") == want:
                return m
        raise FlowError("The server has no model \"%s\". It offers: %s." % (want, ", ".join(
            str(m.get("name")) for m in self.models) or "none"))

    def methods_for(self, name=None) -> list:
        model = self.model(name)["name"] if self.models else None
        return self.methods.get(model) or [Method(**m) for m in _FALLBACK_METHODS]

    def method(self, choice: str, model=None) -> Optional[Method]:
        """The Method of a method choice (``"pti"``, ``"pti:magec"``, an alias) for ``model``, or None."""
        return next((m for m in self.methods_for(model) if choice == m.name or choice in m.aliases), None)


def _method(entry) -> Method:
    if isinstance(entry, str):
        return Method(entry, entry)
    steps = entry.get("default_steps") if isinstance(entry.get("default_steps"), dict) else entry
    as_int = lambda v: int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    return Method(str(entry["name"]), str(entry.get("label") or entry["name"]),
                  as_int(steps.get("project_steps")), as_int(steps.get("tune_steps")))


def _methods(entries) -> list:
    """[Method] from a ``methods`` list; a "pti" entry's non-default ``pivots`` follow it as "pti:<pivot>"
    choices labelled in the same words ("Pivotal tuning, starting from …")."""
    out = []
    for e in entries or []:
        m = _method(e)
        pivots = [p for p in (e.get("pivots") or []) if isinstance(p, dict) and p.get("name")] \
            if isinstance(e, dict) else []
        if pivots:  # the plain choice starts where the server starts a request without a pivot: the first
            first = pivots[0]
            tune = _as_int(first.get("tune_steps"))
            label = m.label if first["name"] == "w" else "%s, starting from %s" % (m.label, _lower(first))
            m = Method(m.name, label, _as_int(first.get("project_steps")) if first["name"] != "w" else m.project_steps,
                       tune if tune is not None else m.tune_steps, (m.name + PIVOT_SEP + str(first["name"]),))
        out.append(m)
        for p in pivots[1:]:
            tune = _as_int(p.get("tune_steps"))
            out.append(Method(m.name + PIVOT_SEP + str(p["name"]), "%s, starting from %s" % (
                m.label.split(" (")[0], _lower(p)), _as_int(p.get("project_steps")),
                tune if tune is not None else _as_int(e.get("tune_steps"))))
    return out


def _lower(pivot: dict) -> str:
    label = str(pivot.get("label") or pivot["name"])
    return label[:1].lower() + label[1:]


def _as_int(v):
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def read_catalog(body) -> Catalog:
    """Build a Catalog from the ``GET /v1/models`` answer (a map, or a bare list from old servers)."""
    body = body if isinstance(body, dict) else {"models": list(body or [])}
    models = [m for m in body.get("models") or [] if isinstance(m, dict) and m.get("name")]
    top = _methods(body.get("methods"))
    methods = {m["name"]: (_methods(m.get("methods")) or top) for m in models}
    defaults = body.get("defaults") if isinstance(body.get("defaults"), dict) else {}
    feather = defaults.get("feather")
    return Catalog(models, body.get("default_model"), float(feather) if feather is not None else _FALLBACK_FEATHER,
                   methods)


def fetch_catalog(client) -> Catalog:
    return read_catalog(client.request("GET", "/v1/models"))


def direction_specs(model_info: dict) -> list:
    """[(name, default_strength, lo, hi, description)] from a model entry (names or dicts)."""
    out = []
    for d in model_info.get("directions") or []:
        if isinstance(d, str):
            out.append((d, 1.0, -3.0, 3.0, ""))
            continue
        lo, hi = (d.get("range") or [-3.0, 3.0])[:2]
        out.append((str(d["name"]), float(d.get("default_strength", 1.0)), float(lo), float(hi),
                    str(d.get("description") or "")))
    return out


def has_segmenter(model_info: dict) -> bool:
    """Whether the model finds segments itself ("Automatic"); ``GET /v1/models``' ``segmenter``."""
    return bool(model_info.get("segmenter"))


def segmenter_missing(model_info: dict) -> str:
    """Why "Automatic" segments are unavailable for a model, in user words (empty when they are available)."""
    if has_segmenter(model_info):
        return ""
    why = str((model_info.get("unavailable") or {}).get("segmenter") or "").strip().rstrip(".")
    return "Model \"%s\" cannot find segments by itself%s." % (
        model_info.get("name"), (": " + why) if why else ". Use the selection or a label layer")


def check_request(catalog: Catalog, options: "EditOptions") -> dict:
    """Refuse unknown models, methods, edit names and segment sources before any upload; returns the model dict."""
    model = catalog.model(options.model)
    methods = catalog.methods_for(model["name"])
    names = [m.name for m in methods]
    if options.method not in names + [a for m in methods for a in m.aliases]:
        raise FlowError("Unknown method \"%s\". Choose one of: %s." % (options.method, ", ".join(names)))
    sources = [c[0] for c in SEGMENT_CHOICES]
    if options.segments not in sources:
        raise FlowError("Unknown segment source \"%s\". Choose one of: %s." % (options.segments, ", ".join(sources)))
    if options.segments != "selection" and options.method != SEGMENTS_METHOD:
        label = next((m.label for m in catalog.methods_for(model["name"]) if m.name == SEGMENTS_METHOD), SEGMENTS_METHOD)
        raise FlowError("Several segments need the method \"%s\"; choose it, or use the selection as one segment."
                        % label)
    if options.segments == "auto" and not has_segmenter(model):
        raise FlowError(segmenter_missing(model))
    known = [s[0] for s in direction_specs(model)]
    unknown = [n for n, _s in options.edits if n not in known]
    if unknown:
        raise FlowError("Model \"%s\" has no edit named %s. Its edits are: %s." % (
            model["name"], ", ".join('"%s"' % n for n in unknown), ", ".join(known) or "none"))
    return model


# --- one request --------------------------------------------------------------------------------------

@dataclass
class EditOptions:
    """What one Apply asks for. ``None`` lets the server pick the method's default."""

    edits: list = field(default_factory=list)  # [(direction, strength)]
    model: Optional[str] = None  # None: the server's default model
    method: str = "pti"  # the highest-fidelity method (design.md §2)
    align: str = "auto"
    feather: Optional[float] = None  # None: the server's default (Catalog.feather)
    project_steps: Optional[int] = None
    tune_steps: Optional[int] = None
    seed: Optional[int] = None
    use_selection: bool = True
    each_region: bool = False  # every separate selected region is one face: all inverted in one batch job
    segments: str = "selection"  # SEGMENT_CHOICES: "layer" = each Item's ``segments`` label map
    label_layer: Optional[str] = None  # segments "layer": the host's id (or name) of the label layer
    keep_detail: bool = False  # KEEP_DETAIL: render with fusion "relevance"
    edit_segments: Optional[list] = None  # the segments the edits change (parse_segments); None: all

    def session_options(self) -> dict:
        out = {}
        for key in ("project_steps", "tune_steps", "seed"):
            v = getattr(self, key)
            if v is not None:
                out[key] = int(v)
        pivot = split_method(self.method)[1]
        if pivot:
            out["pivot"] = pivot
        if self.segments == "auto":
            out["segments"] = "auto"
        return out

    @property
    def fusion(self) -> Optional[str]:
        """The render's ``fusion``: "relevance" with "Keep photo detail", else None (the server's default)."""
        return "relevance" if self.keep_detail else None

    @property
    def wire_method(self) -> str:
        """The protocol's ``method`` ("pti" for the choice "pti:magec"; its pivot is in session_options)."""
        return split_method(self.method)[0]

    def inversion_key(self) -> tuple:
        """Everything that changes the inversion (not the edits or the feather)."""
        return (self.model, self.method, self.align, self.project_steps, self.tune_steps, self.seed, self.segments)


@dataclass
class Item:
    """One layer to edit: protocol maps (``pixels.pack_layer`` / ``pack_selection``; ``segments``: a label map
    from :func:`label_map`, for EditOptions.segments "layer")."""

    layer: dict
    selection: Optional[dict] = None
    segments: Optional[dict] = None


# --- segments from a label layer ("each colour one segment") -------------------------------------------

OPAQUE_ALPHA = 128  # label-layer pixels below half opacity belong to no segment (they are left as they are)
MIN_COLOUR_SHARE = 0.001  # colours on fewer of the opaque pixels are edge blends: merged into the nearest colour
MAX_BLEND_SHARE = 0.1  # more blended pixels than this: the layer is not a flat-colour label map
MAX_SEGMENTS = 32  # core.session.MAX_SEGMENTS


@dataclass
class LabelMap:
    """A label layer read as segments: ``wire`` the protocol's label map (options.segments), ``colours`` the
    segment colours (0xRRGGBB) in label order, ``areas`` their pixel counts (edge blends included)."""

    wire: dict
    colours: list
    areas: list


def label_map(rgba8, width: int, height: int, layer_name: str = "the label layer") -> LabelMap:
    """Segments from a label layer's straight RGBA8 pixels over the edited layer's rectangle: each flat colour
    is one segment, numbered in reading order (the colour met first from the top-left is segment 0); pixels
    under half opacity are in no segment (label -1: left unchanged); colours covering under 0.1 % of the opaque
    pixels (anti-aliased edges) join the nearest flat colour. FlowError when nothing is painted, when over 10 %
    of the pixels are blends (a photo, a soft brush) or when there are more than 32 colours."""
    import struct
    from collections import Counter

    data = bytes(rgba8)
    if len(data) != width * height * 4:
        raise FlowError("The label layer holds %d bytes for %d×%d pixels." % (len(data), width, height))
    keys = [v & 0xFFFFFF if v >> 24 >= OPAQUE_ALPHA else -1 for (v,) in struct.iter_unpack("<I", data)]
    counts = Counter(keys)
    counts.pop(-1, None)
    opaque = sum(counts.values())
    if not opaque:
        raise FlowError("Layer \"%s\" has no painted pixel over this layer. Paint each segment in its own colour."
                        % layer_name)
    flat = [c for c, n in counts.items() if n >= MIN_COLOUR_SHARE * opaque]  # first-seen order
    blended = opaque - sum(counts[c] for c in flat)
    if blended > MAX_BLEND_SHARE * opaque:
        raise FlowError("Layer \"%s\" does not look like a label layer: %d%% of its pixels are blends of %d "
                        "colours. Paint each segment in one flat colour (a hard-edged brush, no anti-aliasing)."
                        % (layer_name, round(100 * blended / opaque), len(counts)))
    if len(flat) > MAX_SEGMENTS:
        raise FlowError("Layer \"%s\" has %d colours; at most %d segments are possible. Merge some colours."
                        % (layer_name, len(flat), MAX_SEGMENTS))
    rgb = lambda c: ((c >> 0) & 255, (c >> 8) & 255, (c >> 16) & 255)  # noqa: E731 - little-endian R, G, B
    lut = {c: i for i, c in enumerate(flat)}
    lut[-1] = -1
    for c in counts:
        if c not in lut:  # an edge blend: the nearest flat colour
            r, g, b = rgb(c)
            lut[c] = min(range(len(flat)), key=lambda i: sum((p - q) ** 2 for p, q in zip((r, g, b), rgb(flat[i]))))
    labels = [lut[k] for k in keys]
    areas = [0] * len(flat)
    for c, n in counts.items():
        areas[lut[c]] += n
    if opaque < width * height:  # some pixels in no segment: a signed map
        fmt, data = "label32", struct.pack("<%di" % len(labels), *labels)
    else:
        fmt, data = "label8", bytes(labels)
    colours = [(r << 16) | (g << 8) | b for r, g, b in (rgb(c) for c in flat)]
    return LabelMap({"width": width, "height": height, "format": fmt, "data": data}, colours, areas)


def item_key(server_url: str, item: Item, options: EditOptions) -> str:
    """Identity of an inversion: same pixels, selection, placement and inversion options -> same session."""
    h = hashlib.sha1()
    lay = item.layer
    h.update(repr((server_url, lay.get("x", 0), lay.get("y", 0), lay["width"], lay["height"], lay["format"],
                   options.inversion_key())).encode())
    h.update(bytes(lay["data"]))
    h.update(bytes(item.selection["data"]) if item.selection else b"-")
    h.update(bytes(item.segments["data"]) if item.segments else b"-")
    return h.hexdigest()


class SessionCache:
    """item_key -> server session id, most recent last, bounded; kept in ``path`` (JSON) when given,
    so a host that starts a new process per call (GIMP) still re-renders instead of inverting again."""

    def __init__(self, max_items: int = 32, path=None):
        self.max_items, self.path, self._d = max_items, path, {}
        self._lock = threading.Lock()
        if path:
            try:
                with open(path, "r", encoding="utf-8") as f:
                    loaded = json.load(f)
                self._d = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._d = {}

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            return self._d.get(key)

    def put(self, key: str, session_id: str) -> None:
        with self._lock:
            self._d.pop(key, None)
            self._d[key] = session_id
            while len(self._d) > self.max_items:
                self._d.pop(next(iter(self._d)))
            self._save()

    def drop(self, key: str) -> None:
        with self._lock:
            self._d.pop(key, None)
            self._save()

    def _save(self) -> None:
        if not self.path:
            return
        tmp = "%s.%d.tmp" % (self.path, os.getpid())
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self._d, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only profile only costs the re-use, never the edit


@dataclass
class Progress:
    """What a host shows: ``fraction`` 0..1 over the whole Apply and one line of user wording."""

    fraction: float
    message: str
    job_id: str = ""
    preview_seq: int = 0  # grows when the server has a new inversion preview (GET /v1/jobs/{id}/preview)


_STAGE_WORDS = {"queued": "Waiting for the server", "align": "Finding the face", "project": "Projecting",
                "tune": "Tuning the generator", "render": "Rendering", "upload": "Sending the layer"}


def progress_text(job: dict) -> str:
    """The job's message (the engine words it: "Projecting 44/300"), else its stage in user words."""
    msg = str(job.get("message") or "").strip()
    if msg:
        return msg
    stage = str(job.get("stage") or job.get("state") or "").strip()
    return _STAGE_WORDS.get(stage, stage.capitalize())


def job_fraction(job: dict) -> float:
    v = job.get("fraction", job.get("progress"))
    try:
        return min(max(float(v or 0.0), 0.0), 1.0)
    except (TypeError, ValueError):
        return 0.0


FACE_PAD = 0.5  # context around each selected region (x its larger side), so the face detector sees the head


def split_regions(item: Item, pad: float = FACE_PAD) -> list:
    """One Item per separate selected region of ``item`` (cropped to the region plus ``pad`` context, clipped to
    the layer) and the region's box in layer pixels: ``[(Item, (x0, y0, x1, y1))]``. Regions under 8 px are left out."""
    data, w, h, fmt, lx, ly = px.unpack_layer(item.layer)
    sel = bytes(item.selection["data"])
    bpp = 4 * px.LAYER_FORMATS[fmt]
    out = []
    for box in px.selection_regions(sel, w, h):
        bw, bh = box[2] - box[0], box[3] - box[1]
        if min(bw, bh) < 8:
            continue
        m = int(round(pad * max(bw, bh)))
        crop = (max(0, box[0] - m), max(0, box[1] - m), min(w, box[2] + m), min(h, box[3] + m))
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        layer = px.pack_layer(px.crop_rows(data, w, bpp, crop), cw, ch, fmt, lx + crop[0], ly + crop[1],
                              item.layer.get("name"))
        out.append((Item(layer, px.pack_selection(px.crop_rows(sel, w, 1, crop), cw, ch, lx + crop[0], ly + crop[1])),
                    box))
    if not out:
        raise FlowError("No selected region is large enough to hold a face (at least 8×8 pixels).")
    return out


def merge_regions(item: Item, parts: list, results: list) -> dict:
    """One result layer over ``item``'s rect: each region's render pasted over its region box (transparent
    elsewhere). ``parts`` is :func:`split_regions`' list, ``results`` the rendered layer maps in that order."""
    lay = item.layer
    fmt = results[0]["format"]
    bpp = 4 * px.LAYER_FORMATS[fmt]
    full = bytearray(lay["width"] * lay["height"] * bpp)
    for (part, box), res in zip(parts, results):
        data, cw, _ch, _f, cx, cy = px.unpack_layer(res)
        ox, oy = cx - lay.get("x", 0), cy - lay.get("y", 0)
        px.paste_rows(full, lay["width"], bpp, data, cw, (box[0] - ox, box[1] - oy, box[2] - ox, box[3] - oy), box[:2])
    return px.pack_layer(bytes(full), lay["width"], lay["height"], fmt, lay.get("x", 0), lay.get("y", 0), lay.get("name"))


@dataclass
class Outcome:
    layers: list  # result layer maps, one per item, in order (empty when render=False)
    session_ids: list
    reused: int  # items that skipped the inversion thanks to the cache
    segments: list = field(default_factory=list)  # per rendered item: [{index, area[, label]}] or None


INVERT_SHARE = 0.9  # share of the progress bar the inversion takes when one runs


def run_edit(client, items, options: EditOptions, cache: SessionCache,
             on_progress: Optional[Callable[[Progress], None]] = None,
             should_cancel: Optional[Callable[[], bool]] = None, render: bool = True) -> Outcome:
    """Check the request against the server's catalog (a mistyped edit costs no inversion), invert the items
    the cache does not know (one job: a session, or a batch for several), then render ``options.edits`` for
    every item. A session the server forgot (restart, eviction) is inverted again once. With
    ``options.each_region`` a single item whose selection has several separate regions is a group photo: each
    region is cropped (with context), aligned and inverted as its own batch item, and the renders are merged
    back into one result layer over the item (Outcome.layers has one entry). Raises FlowError or
    client errors (JobFailed, JobCancelled, ServerNotRunning...) whose ``str()`` is for the user."""
    items = list(items)
    report = on_progress or (lambda p: None)
    check_request(fetch_catalog(client), options)
    if options.each_region and len(items) == 1 and items[0].selection is not None:
        parts = split_regions(items[0])
        if len(parts) > 1:  # a group photo: one batch job, one result layer
            out = _run_items(client, [p for p, _b in parts], options, cache, report, should_cancel, render)
            merged = [merge_regions(items[0], parts, out.layers)] if render else []
            return Outcome(merged, out.session_ids, out.reused, out.segments[:1])
    return _run_items(client, items, options, cache, report, should_cancel, render)


def _run_items(client, items, options, cache, report, should_cancel, render) -> Outcome:
    keys = [item_key(client.url, it, options) for it in items]
    for attempt in (0, 1):
        sessions = [cache.get(k) for k in keys]
        reused = sum(s is not None for s in sessions)
        _invert_missing(client, items, options, keys, sessions, cache, report, should_cancel)
        try:
            bodies = _render(client, items, sessions, options, report, should_cancel, reused) if render else []
        except cl.ServerError as e:
            if attempt or not reused or e.status not in (404, 409, 410):
                raise
            for k in keys:
                cache.drop(k)
            continue
        report(Progress(1.0, "Done"))
        return Outcome([cl.result_layers(b)[0] for b in bodies], sessions, reused, [b.get("segments") for b in bodies])
    raise AssertionError("unreachable")


def _invert_missing(client, items, options, keys, sessions, cache, report, should_cancel) -> None:
    todo = [i for i, s in enumerate(sessions) if s is None]
    if not todo:
        return
    report(Progress(0.0, "Sending %s" % ("the layer" if len(todo) == 1 else "%d layers" % len(todo))))
    if len(todo) == 1:
        it = items[todo[0]]
        opts = options.session_options()
        if options.segments == "layer":
            if it.segments is None:
                raise FlowError("Choose the label layer whose colours are the segments.")
            opts["segments"] = it.segments
        out = client.create_session(it.layer, it.selection, model=options.model, method=options.wire_method,
                                    align=options.align, options=opts)
        new_ids = [out["session_id"]]
    else:
        if options.segments == "layer":
            raise FlowError("Segments from a label layer work on one layer and one face at a time; edit the "
                            "layers one by one, or use the selection or automatic segments.")
        wire = [dict({"layer": items[i].layer}, **({"selection": items[i].selection} if items[i].selection else {}))
                for i in todo]
        out = client.batch(wire, model=options.model, method=options.wire_method, align=options.align,
                           options=options.session_options())
        new_ids = list(out.get("session_ids") or [])
        if len(new_ids) != len(todo):
            raise cl.ServerError(0, "bad_response", "The server answered a batch of %d layers with %d sessions."
                                 % (len(todo), len(new_ids)))
    job_id = out["job_id"]
    report(Progress(0.0, "Waiting for the server", job_id))

    def on_job(job):
        report(Progress(INVERT_SHARE * job_fraction(job), progress_text(job), job_id, int(job.get("preview_seq") or 0)))

    client.wait_job(job_id, on_progress=on_job, should_cancel=should_cancel)
    for i, sid in zip(todo, new_ids):
        sessions[i] = sid
        cache.put(keys[i], sid)


def _render(client, items, sessions, options, report, should_cancel, reused) -> list:
    start = INVERT_SHARE if reused < len(items) else 0.0
    out = []
    for i, (item, sid) in enumerate(zip(items, sessions)):
        if should_cancel is not None and should_cancel():
            raise cl.JobCancelled("Cancelled.")
        report(Progress(start + (1 - start) * i / len(items), "Rendering the edit"))
        extra = {"fusion": options.fusion} if options.fusion else {}
        out.append(client.render(sid, wire_edits(options.edits, options.edit_segments), feather=options.feather,
                                 format=item.layer["format"], **extra))
    return out


# --- live preview: one render in flight, the latest request wins --------------------------------------

class LatestOnly:
    """Run ``fn(request)`` on one background thread, never two at once; a request submitted while one runs
    waits, and a newer one replaces it (slider drags coalesce to the last position). Poll ``take()`` from
    the UI thread for the newest finished ``(request, value, error)``."""

    def __init__(self, fn):
        self.fn = fn
        self._lock = threading.Lock()
        self._pending = None
        self._done = None
        self._running = False

    def submit(self, request) -> None:
        with self._lock:
            self._pending = (request,)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._loop, name="latent-edit-preview", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._pending is None:
                    self._running = False
                    return
                (request,), self._pending = self._pending, None
            try:
                value, error = self.fn(request), None
            except Exception as e:  # noqa: BLE001 - handed to the UI thread, never lost
                value, error = None, e
            with self._lock:
                self._done = (request, value, error)

    def take(self):
        """The newest finished ``(request, value, error)`` not taken yet, or None."""
        with self._lock:
            done, self._done = self._done, None
            return done

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running
