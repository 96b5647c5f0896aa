"""Wire protocol v1: body decoding, strict field validation, images and masks on the wire, error bodies.

Everything a client sends passes through here before it reaches a job or the engine; every problem
becomes a :class:`ProtocolError` (HTTP status, machine code, human message, offending field path).
The full description lives in ``docs/protocol.md``.

Images travel as raw bytes: ``{width, height, format, stride, data, x, y, name}`` with straight
(non-premultiplied) RGBA in that channel order, rows top to bottom, multi-byte samples little-endian.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
JSON_TYPE = "application/json"

# name -> (numpy dtype, channels); little-endian on the wire whatever the host.
LAYER_FORMATS = {"rgba8": (np.dtype("u1"), 4), "rgba16": (np.dtype("<u2"), 4), "rgbaf32": (np.dtype("<f4"), 4)}
MASK_FORMATS = {"gray8": (np.dtype("u1"), 1), "grayf32": (np.dtype("<f4"), 1)}
METHODS = ("pti", "chunks", "w", "wplus")
ALIGNS = ("auto", "none")
BLENDS = ("alpha", "poisson")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (all configurable from the command line)."""

    max_body_bytes: int = 256 * 1024 * 1024  # a 4096² rgbaf32 layer plus its float mask fits
    max_json_bytes: int = 1024 * 1024  # JSON is for small control requests only
    max_side: int = 8192
    min_side: int = 8  # below this no generator can say anything useful
    max_pixels: int = 4096 * 4096
    max_batch: int = 16
    max_edits: int = 32
    max_steps: int = 20000
    max_timeout_s: float = 24 * 3600.0


class ProtocolError(Exception):
    """A client fault: ``status`` (4xx), ``code`` (stable, machine readable), message, field path."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: Optional[str] = None) -> dict:
    return {"error": code, "message": message, "field": field}


def invalid(field: str, message: str, status: int = 422, code: str = "invalid_field") -> ProtocolError:
    return ProtocolError(status, code, f"{field}: {message}", field)


# ---------------------------------------------------------------------------------------------
# bodies
# ---------------------------------------------------------------------------------------------

def media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(raw: bytes, content_type: Optional[str], limits: Limits) -> dict:
    """Decode a request body (msgpack or small JSON) into a dict; never unpickles, never evaluates."""
    kind = media_type(content_type)
    if kind in MSGPACK_TYPES:
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext)
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
        except Exception as exc:
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
    """One layer to invert, with its optional selection (same size, same placement)."""

    layer: WirePixels
    selection: Optional[WirePixels]


@dataclass
class SessionRequest:
    items: list
    model: Optional[str]
    options: dict  # SessionOptions fields (method, align, project_steps, tune_steps, feather, blend, seed)
    timeout_s: Optional[float]


_OPTION_KEYS = {"project_steps", "tune_steps", "feather", "blend", "seed", "color_match", "space", "reg", "min_face",
                "timeout_s"}
SPACES = ("w", "w+")


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


def _common_session_fields(body: dict, limits: Limits) -> tuple:
    model = get_str(body, "model", "")
    options = {"method": get_str(body, "method", "", default="pti", choices=METHODS),
               "align": get_str(body, "align", "", default="auto", choices=ALIGNS)}
    opts = body.get("options")
    opts = {} if opts is None else opts
    check_map(opts, "options", _OPTION_KEYS)
    for key in ("project_steps", "tune_steps"):
        v = get_int(opts, key, "options", 0, limits.max_steps)
        if v is not None:
            options[key] = v
    v = get_number(opts, "feather", "options", 0.0, 512.0)
    if v is not None:
        options["feather"] = v
    v = get_str(opts, "blend", "options", choices=BLENDS)
    if v is not None:
        options["blend"] = v
    v = get_int(opts, "seed", "options", 0, 2**31 - 1)
    if v is not None:
        options["seed"] = v
    v = get_bool(opts, "color_match", "options")
    if v is not None:
        options["color_match"] = v
    v = get_str(opts, "space", "options", choices=SPACES)
    if v is not None:
        options["space"] = v
    v = get_number(opts, "reg", "options", 0.0, 1e6)
    if v is not None:
        options["reg"] = v
    v = get_int(opts, "min_face", "options", 1, limits.max_side)
    if v is not None:
        options["min_face"] = v
    timeout_s = get_number(opts, "timeout_s", "options", 1.0, limits.max_timeout_s)
    return model, options, timeout_s


def parse_session_request(body: dict, limits: Limits) -> SessionRequest:
    """``POST /v1/sessions``: {layer, selection?, model?, method?, align?, options?}."""
    check_map(body, "", {"layer", "selection", "model", "method", "align", "options"}, {"layer"})
    model, options, timeout_s = _common_session_fields(body, limits)
    return SessionRequest([_item(body, "", limits)], model, options, timeout_s)


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


def parse_render_request(body: dict, limits: Limits, directions: set, num_ws: Optional[int] = None) -> RenderRequest:
    """``POST /v1/sessions/{id}/render``: {edits: [{direction, strength, layers?}], feather?, blend?, format?,
    color_match?}; ``layers`` = [first, last] W+ rows the edit applies to (inclusive)."""
    check_map(body, "", {"edits", "feather", "blend", "format", "color_match"}, {"edits"})
    raw = get_list(body, "edits", "", limits.max_edits)
    top = (num_ws - 1) if num_ws else 1 << 10
    edits = []
    for i, e in enumerate(raw):
        path = f"edits[{i}]"
        check_map(e, path, {"direction", "strength", "layers"}, {"direction", "strength"})
        name = get_str(e, "direction", path)
        if name not in directions:
            known = ", ".join(sorted(directions)) or "none"
            raise invalid(_join(path, "direction"), f"unknown direction {name[:60]!r} for this model (known: {known})")
        edit = (name, get_number(e, "strength", path, -100.0, 100.0))
        if e.get("layers") is not None:
            lpath = _join(path, "layers")
            pair = get_list(e, "layers", path, 2, min_len=2)
            first = get_int({"first": pair[0]}, "first", lpath, 0, top)
            last = get_int({"last": pair[1]}, "last", lpath, 0, top)
            if first > last:
                raise invalid(lpath, f"first ({first}) must not exceed last ({last})")
            edit = edit + ((first, last),)
        edits.append(edit)
    return RenderRequest(edits, get_number(body, "feather", "", 0.0, 512.0), get_str(body, "blend", "", choices=BLENDS),
                         get_str(body, "format", "", choices=tuple(LAYER_FORMATS)), get_bool(body, "color_match", ""))
