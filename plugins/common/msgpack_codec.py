"""A complete MessagePack encoder/decoder in the standard library only (spec: github.com/msgpack/msgpack/spec.md).

Host plugins (Krita's and GIMP's embedded Python) have no ``msgpack`` package, so this module carries the
whole format: nil, bool, every int width (positive/negative fixint, uint8..uint64, int8..int64), float32 and
float64, str8/16/32, bin8/16/32, fixarray/array16/array32, fixmap/map16/map32, fixext/ext8/16/32.

Mapping to Python: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` (``bytearray`` and
``memoryview`` are encoded as bin too), ``list``/``tuple`` -> array (decoded as ``list``), ``dict`` -> map,
:class:`ExtType` for extension types. Floats are written as float64 unless ``use_single_float`` is set;
float32 on the wire decodes to the exact Python float it represents.
"""
from __future__ import annotations

import struct
from typing import Any, NamedTuple

__all__ = ["ExtType", "MsgpackError", "packb", "unpackb"]


class MsgpackError(ValueError):
    """Malformed, truncated or unsupported MessagePack data, or an object that cannot be encoded."""


class ExtType(NamedTuple):
    """An extension value passed through untouched: ``code`` in [-128, 127], ``data`` raw bytes."""

    code: int
    data: bytes


_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
_MAX_DEPTH = 200  # guards against stack exhaustion from hostile nesting


def packb(obj: Any, use_single_float: bool = False) -> bytes:
    """Serialise ``obj`` to MessagePack bytes; raises :class:`MsgpackError` for unsupported types."""
    out = bytearray()
    _pack(obj, out, use_single_float, 0)
    return bytes(out)


def _pack(obj: Any, out: bytearray, single: bool, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise MsgpackError("object nested deeper than %d levels" % _MAX_DEPTH)
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif isinstance(obj, int):
        _pack_int(int(obj), out)
    elif isinstance(obj, float):
        if single:
            out.append(0xCA)
            out += struct.pack(">f", obj)
        else:
            out.append(0xCB)
            out += struct.pack(">d", obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        if len(data) < 32:
            out.append(0xA0 | len(data))
        else:
            _sized_header(len(data), (0xD9, 0xDA, 0xDB), "string", out)
        out += data
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = obj.tobytes() if isinstance(obj, memoryview) else obj
        _sized_header(len(data), (0xC4, 0xC5, 0xC6), "binary", out)
        out += data
    elif isinstance(obj, ExtType):
        code, data = obj
        if not -128 <= code <= 127:
            raise MsgpackError("ext type code %d outside [-128, 127]" % code)
        if len(data) in _FIXEXT:
            out.append(_FIXEXT[len(data)])
        else:
            _sized_header(len(data), (0xC7, 0xC8, 0xC9), "ext data", out)
        out += struct.pack(">b", code)
        out += data
    elif isinstance(obj, (list, tuple)):
        _pack_len(len(obj), 0x90, 0xDC, 0xDD, out)
        for item in obj:
            _pack(item, out, single, depth + 1)
    elif isinstance(obj, dict):
        _pack_len(len(obj), 0x80, 0xDE, 0xDF, out)
        for key, value in obj.items():
            _pack(key, out, single, depth + 1)
            _pack(value, out, single, depth + 1)
    else:
        raise MsgpackError("cannot encode object of type %s" % type(obj).__name__)


def _sized_header(n: int, codes, what: str, out: bytearray) -> None:
    """The str8/16/32, bin8/16/32 or ext8/16/32 header (``codes``) for a payload of ``n`` bytes."""
    if n < 0x100:
        out += bytes((codes[0], n))
    elif n < 0x10000:
        out += bytes((codes[1],)) + struct.pack(">H", n)
    elif n < 0x100000000:
        out += bytes((codes[2],)) + struct.pack(">I", n)
    else:
        raise MsgpackError("%s too long for msgpack (%d bytes)" % (what, n))


def _pack_int(v: int, out: bytearray) -> None:
    if 0 <= v < 0x80:
        out.append(v)
    elif -32 <= v < 0:
        out.append(v & 0xFF)
    elif v >= 0:
        if v < 0x100:
            out += bytes((0xCC, v))
        elif v < 0x10000:
            out += b"\xcd" + struct.pack(">H", v)
        elif v < 0x100000000:
            out += b"\xce" + struct.pack(">I", v)
        elif v < 0x10000000000000000:
            out += b"\xcf" + struct.pack(">Q", v)
        else:
            raise MsgpackError("integer %d does not fit in uint64" % v)
    else:
        if v >= -0x80:
            out += b"\xd0" + struct.pack(">b", v)
        elif v >= -0x8000:
            out += b"\xd1" + struct.pack(">h", v)
        elif v >= -0x80000000:
            out += b"\xd2" + struct.pack(">i", v)
        elif v >= -0x8000000000000000:
            out += b"\xd3" + struct.pack(">q", v)
        else:
            raise MsgpackError("integer %d does not fit in int64" % v)


def _pack_len(n: int, fix: int, c16: int, c32: int, out: bytearray) -> None:
    if n < 16:
        out.append(fix | n)
    elif n < 0x10000:
        out.append(c16)
        out += struct.pack(">H", n)
    elif n < 0x100000000:
        out.append(c32)
        out += struct.pack(">I", n)
    else:
        raise MsgpackError("container too long for msgpack (%d items)" % n)


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode exactly one MessagePack object from ``data``; trailing bytes are an error.

    Maps become ``dict`` (keys must be hashable: str, int, bytes, bool, None, float or ExtType; array keys
    decode as tuples), arrays become ``list``, bin becomes ``bytes``, unknown ext types :class:`ExtType`.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    obj, pos = _Unpacker(buf).read(0, 0)
    if pos != len(buf):
        raise MsgpackError("%d trailing bytes after the msgpack object" % (len(buf) - pos))
    return obj


_STRUCTS = {
    0xCA: struct.Struct(">f"), 0xCB: struct.Struct(">d"),
    0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"), 0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"), 0xD1: struct.Struct(">h"), 0xD2: struct.Struct(">i"), 0xD3: struct.Struct(">q"),
}
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class _Unpacker:
    def __init__(self, buf):
        self.buf = buf
        self.n = len(buf)

    def _need(self, pos: int, k: int) -> None:
        if pos + k > self.n:
            raise MsgpackError("truncated msgpack data: need %d bytes at offset %d, have %d" % (k, pos, self.n - pos))

    def _raw(self, pos: int, k: int):
        self._need(pos, k)
        return bytes(self.buf[pos:pos + k]), pos + k

    def _len(self, pos: int, width: int):
        self._need(pos, width)
        s = _U16 if width == 2 else _U32
        return (self.buf[pos] if width == 1 else s.unpack_from(self.buf, pos)[0]), pos + width

    def read(self, pos: int, depth: int):
        if depth > _MAX_DEPTH:
            raise MsgpackError("msgpack data nested deeper than %d levels" % _MAX_DEPTH)
        self._need(pos, 1)
        b = self.buf[pos]
        pos += 1
        if b <= 0x7F:
            return b, pos
        if b >= 0xE0:
            return b - 0x100, pos
        if 0xA0 <= b <= 0xBF:
            return self._str(pos, b & 0x1F)
        if 0x90 <= b <= 0x9F:
            return self._array(pos, b & 0x0F, depth)
        if 0x80 <= b <= 0x8F:
            return self._map(pos, b & 0x0F, depth)
        if b == 0xC0:
            return None, pos
        if b == 0xC2:
            return False, pos
        if b == 0xC3:
            return True, pos
        if b in _STRUCTS:
            s = _STRUCTS[b]
            self._need(pos, s.size)
            return s.unpack_from(self.buf, pos)[0], pos + s.size
        if b in (0xD9, 0xDA, 0xDB):
            n, pos = self._len(pos, {0xD9: 1, 0xDA: 2, 0xDB: 4}[b])
            return self._str(pos, n)
        if b in (0xC4, 0xC5, 0xC6):
            n, pos = self._len(pos, {0xC4: 1, 0xC5: 2, 0xC6: 4}[b])
            return self._raw(pos, n)
        if b in (0xDC, 0xDD):
            n, pos = self._len(pos, 2 if b == 0xDC else 4)
            return self._array(pos, n, depth)
        if b in (0xDE, 0xDF):
            n, pos = self._len(pos, 2 if b == 0xDE else 4)
            return self._map(pos, n, depth)
        if 0xD4 <= b <= 0xD8:
            return self._ext(pos, 1 << (b - 0xD4))
        if b in (0xC7, 0xC8, 0xC9):
            n, pos = self._len(pos, {0xC7: 1, 0xC8: 2, 0xC9: 4}[b])
            return self._ext(pos, n)
        raise MsgpackError("invalid msgpack type byte 0x%02x at offset %d" % (b, pos - 1))

    def _str(self, pos: int, n: int):
        raw, pos = self._raw(pos, n)
        try:
            return raw.decode("utf-8"), pos
        except UnicodeDecodeError as e:
            raise MsgpackError("invalid UTF-8 in msgpack string at offset %d: %s" % (pos - n, e)) from None

    def _ext(self, pos: int, n: int):
        self._need(pos, 1 + n)
        code = struct.unpack_from(">b", self.buf, pos)[0]
        raw, pos = self._raw(pos + 1, n)
        return ExtType(code, raw), pos

    def _array(self, pos: int, n: int, depth: int):
        if n > self.n - pos:  # each element takes at least one byte
            raise MsgpackError("truncated msgpack array: %d items declared" % n)
        items = []
        for _ in range(n):
            item, pos = self.read(pos, depth + 1)
            items.append(item)
        return items, pos

    def _map(self, pos: int, n: int, depth: int):
        if 2 * n > self.n - pos:
            raise MsgpackError("truncated msgpack map: %d pairs declared" % n)
        out = {}
        for _ in range(n):
            key, pos = self.read(pos, depth + 1)
            if isinstance(key, list):
                key = _freeze(key)
            elif isinstance(key, dict):
                raise MsgpackError("map used as a map key at offset %d" % pos)
            value, pos = self.read(pos, depth + 1)
            out[key] = value
        return out, pos


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        raise MsgpackError("map inside an array used as a map key")
    return value
