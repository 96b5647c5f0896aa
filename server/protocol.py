"""Wire protocol v1: body decoding, strict field validation, images and masks on the wire, error bodies.

Everything a client sends passes through here before it reaches a job or the engine; every problem
becomes a :class:`ProtocolError` (HTTP status, machine code, human message, offending field path).
The full description lives in ``docs/protocol.md``.

Images travel as raw bytes: ``{width, height, format, stride, data, x, y, name}`` with straight
(non-premultiplied) RGBA in that channel order, rows top to bottom, multi-byte samples little-endian.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import msgpack
import numpy as np

from server.bounded import DecodeLimits, MsgpackScanner
from server.errors import ProtocolError, error_body, invalid

PROTOCOL_VERSION = 1

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
JSON_TYPE = "application/json"

# name -> (numpy dtype, channels); little-endian on the wire whatever the host.
LAYER_FORMATS = {"rgba8": (np.dtype("u1"), 4), "rgba16": (np.dtype("<u2"), 4), "rgbaf32": (np.dtype("<f4"), 4)}
MASK_FORMATS = {"gray8": (np.dtype("u1"), 1), "grayf32": (np.dtype("<f4"), 1)}
# segment label maps (options.segments): one integer per pixel, each distinct value >= 0 one segment;
# "label32" is signed so that a pixel can belong to no segment (a negative value)
LABEL_FORMATS = {"label8": (np.dtype("u1"), 1), "label16": (np.dtype("<u2"), 1), "label32": (np.dtype("<i4"), 1)}
ENVELOPE_BYTES = 64 * 1024  # everything in a body but the pixel bytes (keys, options, names) fits easily
MAX_NAME_CHARS = 500  # layer names


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (all configurable from the command line).

    ``max_body_bytes`` defaults to what the largest layer the other limits allow needs: a ``max_pixels``
    rgbaf32 layer (16 B/px) plus its grayf32 selection (4 B/px) plus :data:`ENVELOPE_BYTES`."""

    max_body_bytes: Optional[int] = None  # None: derived from max_pixels (320 MiB + 64 KiB at 4096²)
    max_json_bytes: int = 1024 * 1024  # JSON is for small control requests only
    max_side: int = 8192
    min_side: int = 8  # below this no generator can say anything useful
    max_pixels: int = 4096 * 4096
    max_batch: int = 16
    max_edits: int = 32
    max_segments: int = 32  # segment indices in an edit's "segments" (core.session.MAX_SEGMENTS segments at most)
    max_steps: int = 20000  # server resource bound (validity, e.g. >= 1, is SessionOptions.validate's)
    max_timeout_s: float = 24 * 3600.0

    def __post_init__(self):
        if self.max_body_bytes is None:
            object.__setattr__(self, "max_body_bytes", self.max_pixels * (16 + 4) + ENVELOPE_BYTES)

    def decode(self) -> "DecodeLimits":
        """Structural bounds for msgpack bodies, from the largest request these limits allow."""
        # twice the longest list a request may hold: a list just over its limit still gets the 422 naming the field
        containers = 2 * max(self.max_batch, self.max_edits, 2)
        return DecodeLimits(max_str_len=4 * MAX_NAME_CHARS, max_bin_len=self.max_body_bytes,
                            max_array_len=containers, max_map_len=16,
                            max_objects=64 + 40 * self.max_batch + (8 + self.max_segments) * self.max_edits,
                            max_depth=6)


# ---------------------------------------------------------------------------------------------
# bodies
# ---------------------------------------------------------------------------------------------

def media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(raw: bytes, content_type: Optional[str], limits: Limits) -> dict:
    """Decode a request body (msgpack or small JSON) into a dict; never unpickles, never evaluates.

    msgpack bodies are first checked by :class:`MsgpackScanner` (object count, nesting, lengths), then unpacked
    with the same length limits, so no body can make more than a few thousand Python objects."""
    kind = media_type(content_type)
    if kind in MSGPACK_TYPES:
        dl = limits.decode()
        scanner = MsgpackScanner(dl)
        scanner.feed(raw, final=True)
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
                                    max_str_len=dl.max_str_len, max_bin_len=dl.max_bin_len,
                                    max_array_len=dl.max_array_len, max_map_len=dl.max_map_len,
                                    max_ext_len=dl.max_str_len)
        except ProtocolError:
            raise
        except Exception as exc:  # every unpack failure is the client's: truncated, trailing data, bad utf-8...
            raise ProtocolError(400, "bad_msgpack", f"the body is not valid msgpack ({exc.__class__.__name__})") from None
    elif kind == JSON_TYPE:
        if len(raw) > limits.max_json_bytes:
            raise ProtocolError(413, "payload_too_large",
                                f"JSON bodies are limited to {limits.max_json_bytes} bytes; send layers as msgpack")
        try:
            value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except ProtocolError:
            raise
        except Exception as exc:  # includes RecursionError for absurd nesting
            raise ProtocolError(400, "bad_json", f"the body is not valid JSON ({exc.__class__.__name__})") from None
    else:
        raise ProtocolError(415, "unsupported_media_type",
                            f"Content-Type must be application/msgpack or application/json, not {kind or 'missing'!r}")
    if not isinstance(value, dict):
        raise ProtocolError(400, "bad_request", f"the body must be a map/object, not {_type_name(value)}")
    return value


def _reject_ext(code, data):
    raise ProtocolError(400, "bad_msgpack", f"msgpack extension types are not accepted (type {code})")


def _reject_constant(name):
    raise ProtocolError(400, "bad_json", f"JSON constant {name} is not accepted")


def wants_msgpack(accept: Optional[str], content_type: Optional[str]) -> bool:
    """Answer in msgpack when Accept names it, or when Accept is absent/any and the request was msgpack."""
    accept = (accept or "").lower()
    if any(t in accept for t in MSGPACK_TYPES):
        return True
    if JSON_TYPE in accept:
        return False
    return media_type(content_type) in MSGPACK_TYPES


def encode_body(obj: Any, msgpack_out: bool) -> tuple[bytes, str]:
    """Serialise a response; in JSON, bytes become base64 strings."""
    if msgpack_out:
        return msgpack.packb(obj, use_bin_type=True), MSGPACK_TYPES[0]
    return json.dumps(_json_safe(obj), allow_nan=False).encode(), JSON_TYPE


def _json_safe(obj):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------
# fields
# ---------------------------------------------------------------------------------------------

def _type_name(v) -> str:
    if v is None:
        return "nil"
    return {bool: "boolean", int: "integer", float: "number", str: "string", bytes: "bytes",
            list: "array", dict: "map"}.get(type(v), type(v).__name__)


def check_map(obj, path: str, allowed: set, required: set = frozenset()) -> dict:
    """``obj`` must be a map with string keys drawn from ``allowed`` and containing ``required``."""
    if not isinstance(obj, dict):
        raise invalid(path or "body", f"must be a map, not {_type_name(obj)}")
    for key in obj:
        if not isinstance(key, str):
            raise invalid(path or "body", "keys must be strings")
        if key not in allowed:
            raise invalid(_join(path, key), f"unknown field (allowed: {', '.join(sorted(allowed))})",
                          code="unknown_field")
    for key in sorted(required):
        if obj.get(key) is None:
            raise invalid(_join(path, key), "is required", code="missing_field")
    return obj


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def get_str(obj: dict, key: str, path: str, default=None, choices=None, max_len: int = 200) -> Optional[str]:
    field = _join(path, key)
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise invalid(field, f"must be a string, not {_type_name(v)}")
    if not v or len(v) > max_len:
        raise invalid(field, f"must be 1..{max_len} characters")
    if choices is not None and v not in choices:
        raise invalid(field, f"must be one of {', '.join(choices)} (got {v[:40]!r})")
    return v


def get_int(obj: dict, key: str, path: str, lo: int, hi: int, default=None) -> Optional[int]:
    field = _join(path, key)
    v = obj.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON clients may send 64.0
        else:
            raise invalid(field, f"must be an integer, not {_type_name(v)}")
    if not lo <= v <= hi:
        raise invalid(field, f"must be in [{lo}, {hi}] (got {v})")
    return v


def get_number(obj: dict, key: str, path: str, lo: float, hi: float, default=None) -> Optional[float]:
    field = _join(path, key)
    v = obj.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(field, f"must be a number, not {_type_name(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise invalid(field, "must be finite (NaN and infinity are not accepted)")
    if not lo <= v <= hi:
        raise invalid(field, f"must be in [{lo:g}, {hi:g}] (got {v:g})")
    return v


def get_bool(obj: dict, key: str, path: str, default=None) -> Optional[bool]:
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(_join(path, key), f"must be a boolean, not {_type_name(v)}")
    return v


def get_list(obj: dict, key: str, path: str, max_len: int, min_len: int = 0, default=None) -> Optional[list]:
    field = _join(path, key)
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, list):
        raise invalid(field, f"must be an array, not {_type_name(v)}")
    if not min_len <= len(v) <= max_len:
        raise invalid(field, f"must hold {min_len}..{max_len} entries (got {len(v)})")
    return v


# ---------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------

@dataclass
class WirePixels:
    """Decoded pixels in their wire dtype, ``(H,W,C)``, plus placement in the document."""

    array: np.ndarray
    format: str
    x: int = 0
    y: int = 0
    name: Optional[str] = None

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


_PIXEL_KEYS = {"width", "height", "format", "stride", "data", "x", "y", "name"}


def decode_pixels(obj, path: str, formats: dict, limits: Limits) -> WirePixels:
    """Validate a layer or mask map and return its pixels ``(H,W,C)`` in the wire dtype (native order)."""
    check_map(obj, path, _PIXEL_KEYS, {"width", "height", "format", "data"})
    fmt = get_str(obj, "format", path, choices=tuple(formats))
    width = get_int(obj, "width", path, 1, 1 << 30)
    height = get_int(obj, "height", path, 1, 1 << 30)
    for key, v in (("width", width), ("height", height)):
        if v > limits.max_side:
            raise invalid(_join(path, key), f"{v} is larger than the server's limit of {limits.max_side} pixels")
        if v < limits.min_side:
            raise invalid(_join(path, key), f"{v} is smaller than the minimum of {limits.min_side} pixels")
    if width * height > limits.max_pixels:
        raise invalid(path, f"{width}x{height} exceeds the server's limit of {limits.max_pixels} pixels")
    dtype, channels = formats[fmt]
    row_bytes = width * channels * dtype.itemsize
    stride = get_int(obj, "stride", path, 1, 1 << 40, default=row_bytes)
    if stride < row_bytes:
        raise invalid(_join(path, "stride"), f"{stride} is less than width*bytes-per-pixel = {row_bytes}")
    data = obj["data"]
    if not isinstance(data, (bytes, bytearray)):
        raise invalid(_join(path, "data"), f"must be raw bytes (msgpack bin), not {_type_name(data)}")
    full, tight_last = stride * height, stride * (height - 1) + row_bytes
    if len(data) not in (full, tight_last):
        raise invalid(_join(path, "data"), f"holds {len(data)} bytes; {width}x{height} {fmt} with stride {stride} "
                                           f"needs {full}" + (f" (or {tight_last})" if tight_last != full else ""))
    x = get_int(obj, "x", path, -(1 << 30), 1 << 30, default=0)
    y = get_int(obj, "y", path, -(1 << 30), 1 << 30, default=0)
    name = None
    if "name" in obj:
        name = get_str(obj, "name", path, max_len=500)
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) < full:
        buf = np.concatenate([buf, np.zeros(full - len(buf), np.uint8)])
    rows = buf.reshape(height, stride)[:, :row_bytes]
    array = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise invalid(_join(path, "data"), "contains NaN or infinity")
    return WirePixels(array, fmt, x, y, name)


def to_unit_float(array: np.ndarray) -> np.ndarray:
    """Wire pixels (uint8, uint16 or float32) -> float32 in [0,1] (floats are clipped)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def encode_layer(rgba: np.ndarray, fmt: str, x: int = 0, y: int = 0, name: Optional[str] = None) -> dict:
    """Float RGBA ``(H,W,4)`` in [0,1] -> the wire map (tight stride, little-endian)."""
    rgba = np.nan_to_num(np.asarray(rgba, dtype=np.float32), nan=0.0)
    rgba = np.clip(rgba, 0.0, 1.0)
    if fmt == "rgba8":
        arr = np.rint(rgba * 255.0).astype(np.uint8)
    elif fmt == "rgba16":
        arr = np.rint(rgba * 65535.0).astype("<u2")
    elif fmt == "rgbaf32":
        arr = rgba.astype("<f4")
    else:
        raise ValueError(f"unknown layer format {fmt!r}")
    h, w = rgba.shape[:2]
    out = {"width": int(w), "height": int(h), "format": fmt, "stride": int(w * 4 * arr.dtype.itemsize),
           "data": np.ascontiguousarray(arr).tobytes(), "x": int(x), "y": int(y)}
    if name is not None:
        out["name"] = name
    return out


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One layer to invert, with its optional selection and segment label map (same size, same placement)."""

    layer: WirePixels
    selection: Optional[WirePixels]
    segments: Optional[np.ndarray] = None  # (H,W) int32 label map (options.segments as a map), else None


@dataclass
class SessionRequest:
    items: list
    model: Optional[str]
    options: dict  # SessionOptions fields (method, align, project_steps, tune_steps, feather, blend, seed)
    timeout_s: Optional[float]


# wire name -> (type check, server resource bound or None); validity (ranges, choices) is SessionOptions.validate's
_OPTION_TYPES = {"project_steps": "int", "tune_steps": "int", "feather": "number", "blend": "str", "seed": "int",
                 "color_match": "bool", "space": "str", "reg": "number", "min_face": "int", "locality": "bool",
                 "pivot": "str"}
_OPTION_KEYS = set(_OPTION_TYPES) | {"timeout_s", "segments"}


def _session_options_type():
    from core.session import SessionOptions  # the one validated options type (imports torch: lazily)

    return SessionOptions


def _wire_value(obj: dict, key: str, path: str, kind: str, limits: Limits):
    if kind == "int":
        return get_int(obj, key, path, -(2**63), 2**63 - 1)
    if kind == "number":
        return get_number(obj, key, path, -math.inf, math.inf)
    if kind == "bool":
        return get_bool(obj, key, path)
    return get_str(obj, key, path)


def session_catalog() -> dict:
    """What ``GET /v1/models`` says about sessions, from core.session (the type the protocol validates
    against): ``methods`` (core.session.method_catalog: name, label, default steps, options used) and
    ``defaults`` (the SessionOptions defaults a client shows: method, align, feather, blend)."""
    import core.session as cs

    defaults = {f.name: f.default for f in dataclasses.fields(cs.SessionOptions)}
    catalog = getattr(cs, "method_catalog", None)
    return {"methods": catalog() if catalog is not None else [{"name": m} for m in cs.METHODS],
            "defaults": {k: defaults[k] for k in ("method", "align", "feather", "blend", "segments")
                         if k in defaults and isinstance(defaults[k], (str, int, float, bool))}}


SEGMENTER = "segmenter"  # the capability core.session.CAPABILITIES names for an automatic segment source


def model_listing(models: list) -> list:
    """``GET /v1/models``' model entries: the registry's, each with ``segmenter: bool`` — whether
    ``options.segments: "auto"`` works for it (core.session.CAPABILITIES holds "segmenter" and the model does
    not list it under ``unavailable``, which then says what to add)."""
    import core.session as cs

    known = SEGMENTER in getattr(cs, "CAPABILITIES", ())
    out = []
    for m in models:
        m = dict(m)
        caps = m.get("capabilities")
        has = SEGMENTER in caps if isinstance(caps, (list, tuple)) else \
            known and SEGMENTER not in (m.get("unavailable") or {})
        m["segmenter"] = bool(has)
        out.append(m)
    return out


def build_options(fields: dict, labels: Optional[np.ndarray] = None) -> dict:
    """``SessionOptions(**fields).validate()``; an InvalidInput becomes a 422 naming the field. ``labels``: a
    label map validated as ``segments`` but not returned (it travels with its item, not in the JSON job record)."""
    from core.common import InvalidInput

    cls = _session_options_type()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((set(fields) | ({"segments"} if labels is not None else set())) - known)
    if unknown:  # a wire option this engine's SessionOptions does not have (yet)
        raise invalid(f"options.{unknown[0]}", "is not supported by this server's engine", code="unknown_field")
    try:
        cls(**fields, **({} if labels is None else {"segments": labels})).validate()
    except InvalidInput as exc:
        text = str(exc)
        names = set(fields) | ({"segments"} if labels is not None else set())
        name = next((k for k in sorted(names, key=len, reverse=True) if text.startswith(k)), None)
        path = None if name is None else (name if name in ("method", "align") else f"options.{name}")
        raise ProtocolError(422, "invalid_field", f"{path}: {text}" if path else text, path) from None
    return fields


def _item(obj: dict, path: str, limits: Limits) -> Item:
    layer = decode_pixels(obj.get("layer"), _join(path, "layer"), LAYER_FORMATS, limits)
    sel = None
    if obj.get("selection") is not None:
        spath = _join(path, "selection")
        sel = decode_pixels(obj["selection"], spath, MASK_FORMATS, limits)
        if (sel.width, sel.height) != (layer.width, layer.height):
            raise invalid(spath, f"is {sel.width}x{sel.height} but the layer is {layer.width}x{layer.height}; "
                                 "send the selection cropped to the layer's bounds")
        if not (sel.array > 0).any():
            raise invalid(spath, "is empty (no selected pixel); omit it to edit the whole layer")
    return Item(layer, sel)


def decode_labels(obj, path: str, item: Item, limits: Limits) -> np.ndarray:
    """A label map ``{width, height, format: label8|label16|label32, data, stride?}`` at the layer's size ->
    ``(H,W)`` int32 (its values are SessionOptions.validate's to judge: segments, no segment, how many)."""
    lab = decode_pixels(obj, path, LABEL_FORMATS, limits)
    if (lab.width, lab.height) != (item.layer.width, item.layer.height):
        raise invalid(path, f"is {lab.width}x{lab.height} but the layer is {item.layer.width}x{item.layer.height}; "
                            "send the label map at the layer's size")
    return lab.array[..., 0].astype(np.int32)


def _segments_option(opts: dict) -> tuple:
    """``options.segments``: ("selection" | "auto", None) or (None, the label map's wire map)."""
    v = opts.get("segments")
    if v is None or isinstance(v, str):  # which names are valid is SessionOptions.validate's
        return get_str(opts, "segments", "options"), None
    if isinstance(v, dict):
        return None, v
    raise invalid("options.segments", f"must be \"selection\", \"auto\" or a label map "
                                      f"{{width, height, format, data}}, not {_type_name(v)}")


def _common_session_fields(body: dict, limits: Limits, item: Optional[Item] = None) -> tuple:
    """Wire types here; validity in :meth:`core.session.SessionOptions.validate`; resource bounds (steps,
    timeout, segments) from ``limits``. ``item``: the one layer a label map (options.segments) belongs to; it
    gets the decoded map (``item.segments``), batches (``item`` None) refuse one."""
    model = get_str(body, "model", "")
    options = {"method": get_str(body, "method", "", default="pti"), "align": get_str(body, "align", "", default="auto")}
    opts = body.get("options")
    opts = {} if opts is None else opts
    check_map(opts, "options", _OPTION_KEYS)
    for key, kind in _OPTION_TYPES.items():
        v = _wire_value(opts, key, "options", kind, limits)
        if v is not None:
            options[key] = v
    for key in ("project_steps", "tune_steps"):
        if options.get(key) is not None and options[key] > limits.max_steps:
            raise invalid(f"options.{key}", f"{options[key]} is more than the server's limit of {limits.max_steps}")
    source, label_map = _segments_option(opts)
    if source is not None:
        options["segments"] = source
    if label_map is not None:
        if item is None:
            raise invalid("options.segments", "a label map belongs to one layer: send it with POST /v1/sessions "
                                              "(a batch takes \"selection\" or \"auto\")")
        item.segments = decode_labels(label_map, "options.segments", item, limits)
    timeout_s = get_number(opts, "timeout_s", "options", 1.0, limits.max_timeout_s)
    return model, build_options(options, None if item is None else item.segments), timeout_s


def parse_session_request(body: dict, limits: Limits) -> SessionRequest:
    """``POST /v1/sessions``: {layer, selection?, model?, method?, align?, options?}."""
    check_map(body, "", {"layer", "selection", "model", "method", "align", "options"}, {"layer"})
    item = _item(body, "", limits)
    model, options, timeout_s = _common_session_fields(body, limits, item)
    return SessionRequest([item], model, options, timeout_s)


def parse_batch_request(body: dict, limits: Limits) -> SessionRequest:
    """``POST /v1/batch``: {items: [{layer, selection?}], model?, method?, align?, options?}."""
    check_map(body, "", {"items", "model", "method", "align", "options"}, {"items"})
    model, options, timeout_s = _common_session_fields(body, limits)
    raw_items = get_list(body, "items", "", limits.max_batch, min_len=1)
    items = []
    for i, entry in enumerate(raw_items):
        path = f"items[{i}]"
        check_map(entry, path, {"layer", "selection"}, {"layer"})
        items.append(_item(entry, path, limits))
    return SessionRequest(items, model, options, timeout_s)


@dataclass
class RenderRequest:
    edits: list  # [(direction name, strength)] or [(name, strength, (first, last))]
    feather: Optional[float]
    blend: Optional[str]
    format: Optional[str]
    color_match: Optional[bool] = None
    fusion: Optional[str] = None  # None: the engine's default ("none")
    segments: list = dataclasses.field(default_factory=list)  # per edit: None (all segments) or [index, ...]


def _segment_indices(e: dict, path: str, limits: Limits) -> Optional[list]:
    """An edit's ``segments``: 1..max_segments distinct indices in [0, max_segments), or None (all)."""
    raw = get_list(e, "segments", path, limits.max_segments, min_len=1)
    if raw is None:
        return None
    spath = _join(path, "segments")
    out = [get_int({i: v}, i, spath, 0, limits.max_segments - 1) if v is not None else None for i, v in enumerate(raw)]
    if None in out:
        raise invalid(spath, "must be segment indices (integers), not nil")
    if len(set(out)) != len(out):
        raise invalid(spath, f"lists a segment twice ({out})")
    return out


def parse_render_request(body: dict, limits: Limits, directions: set, num_ws: Optional[int] = None) -> RenderRequest:
    """``POST /v1/sessions/{id}/render``: {edits: [{direction, strength, layers?, segments?}], feather?, blend?,
    format?, color_match?, fusion?}; ``layers`` = [first, last] W+ rows the edit applies to (inclusive),
    ``segments`` = the session's segments it applies to (absent: all)."""
    check_map(body, "", {"edits", "feather", "blend", "format", "color_match", "fusion"}, {"edits"})
    raw = get_list(body, "edits", "", limits.max_edits)
    top = (num_ws - 1) if num_ws else 1 << 10
    edits, segments = [], []
    for i, e in enumerate(raw):
        path = f"edits[{i}]"
        check_map(e, path, {"direction", "strength", "layers", "segments"}, {"direction", "strength"})
        name = get_str(e, "direction", path)
        if name not in directions:
            known = ", ".join(sorted(directions)) or "none"
            raise invalid(_join(path, "direction"), f"unknown direction {name[:60]!r} for this model (known: {known})")
        edit = (name, get_number(e, "strength", path, -100.0, 100.0))
        if e.get("layers") is not None:
            lpath = _join(path, "layers")
            pair = get_list(e, "layers", path, 2, min_len=2)
            if any(v is None for v in pair):
                raise invalid(lpath, "must be two integers [first, last], not nil")
            first = get_int({0: pair[0]}, 0, lpath, 0, top)
            last = get_int({1: pair[1]}, 1, lpath, 0, top)
            if first > last:
                raise invalid(lpath, f"first ({first}) must not exceed last ({last})")
            edit = edit + ((first, last),)
        edits.append(edit)
        segments.append(_segment_indices(e, path, limits))
    try:  # the compositing modes the engine knows (core.compositing since issue 15, core.chunks before)
        from core.compositing import BLENDS
    except ImportError:
        from core.chunks import BLENDS

    return RenderRequest(edits, get_number(body, "feather", "", 0.0, 512.0), get_str(body, "blend", "", choices=BLENDS),
                         get_str(body, "format", "", choices=tuple(LAYER_FORMATS)), get_bool(body, "color_match", ""),
                         get_str(body, "fusion", "", choices=_fusions()), segments)


def _fusions() -> tuple:
    """The render fusions the engine knows (core.expanded.FUSIONS: "none", "relevance" = Yin et al.'s content
    fusion, "Keep photo detail"); an engine without fusion knows only "none"."""
    try:
        from core.expanded import FUSIONS
    except ImportError:
        return ("none",)
    return tuple(FUSIONS)
