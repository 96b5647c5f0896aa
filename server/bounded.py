"""Bounded msgpack: what a request body may hold, checked header by header while the body arrives.

``msgpack.unpackb`` limits each container's length, not the number of objects nor their nesting, so a body of
nested or many small containers still becomes millions of Python objects (~64 bytes each).  The scanner here
walks the headers without building anything and refuses the body at the first byte that breaks a bound.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.errors import ProtocolError


@dataclass(frozen=True)
class DecodeLimits:
    """What a msgpack body may hold: longest str (bytes) / bin / array / map, all objects together, nesting."""

    max_str_len: int
    max_bin_len: int
    max_array_len: int
    max_map_len: int
    max_objects: int
    max_depth: int


# msgpack first bytes -> (kind, fixed payload bytes or length-field size); see the msgpack spec
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2,
          0xd2: 4, 0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}
_SIZED = {0xc4: ("bin", 1), 0xc5: ("bin", 2), 0xc6: ("bin", 4), 0xd9: ("str", 1), 0xda: ("str", 2),
          0xdb: ("str", 4), 0xc7: ("ext", 1), 0xc8: ("ext", 2), 0xc9: ("ext", 4)}
_CONTAINERS = {0xdc: ("array", 2), 0xdd: ("array", 4), 0xde: ("map", 2), 0xdf: ("map", 4)}


class MsgpackScanner:
    """Walks msgpack headers without building objects, as the bytes arrive, and raises :class:`ProtocolError`
    (400) the moment the body breaks a :class:`DecodeLimits` bound, so a hostile body is refused after its
    first few kilobytes instead of being read to the size limit and then unpacked into millions of objects.
    Work per body is bounded by ``max_objects`` headers (bin and str payloads are skipped, not read)."""

    def __init__(self, limits: DecodeLimits):
        self.limits = limits
        self.pos = 0  # next header offset in the whole body
        self.objects = 0
        self.stack: list = []  # remaining children of each open container
        self.done = False  # the top-level object is complete

    def _fail(self, message: str):
        raise ProtocolError(400, "bad_msgpack", f"the body is not an acceptable msgpack request: {message}")

    def feed(self, buf, final: bool = False) -> None:
        """``buf``: every byte received so far (a growing buffer); ``final``: nothing more will come."""
        lim, n = self.limits, len(buf)
        while not self.done and self.pos < n:
            b = buf[self.pos]
            need, length, kind = 1, 0, None
            if 0xa0 <= b <= 0xbf:
                kind, length = "str", b & 0x1f
            elif 0x80 <= b <= 0x8f:
                kind, length = "map", b & 0x0f
            elif 0x90 <= b <= 0x9f:
                kind, length = "array", b & 0x0f
            elif b in _FIXED:
                need += _FIXED[b]
            elif b in _SIZED or b in _CONTAINERS:
                kind, width = _SIZED.get(b) or _CONTAINERS[b]
                if self.pos + 1 + width > n:
                    break  # the length field has not arrived yet
                length = int.from_bytes(buf[self.pos + 1: self.pos + 1 + width], "big")
                need += width + (1 if kind == "ext" else 0)
            elif b == 0xc1:
                self._fail("byte 0xc1 is never used in msgpack")
            self.objects += 1
            if self.objects > lim.max_objects:
                self._fail(f"more than {lim.max_objects} values")
            if kind in ("str", "bin", "ext"):
                cap = lim.max_bin_len if kind == "bin" else lim.max_str_len
                if length > cap and kind == "bin":
                    raise ProtocolError(413, "payload_too_large", f"the body holds a bin of {length} bytes; the "
                                        f"server's limit is {cap} bytes (start it with a larger --max-body-mb)")
                if length > cap:
                    self._fail(f"a {kind} of {length} bytes (at most {cap})")
                need += length
            elif kind in ("array", "map"):
                cap = lim.max_array_len if kind == "array" else lim.max_map_len
                if length > cap:
                    self._fail(f"an {kind} of {length} entries (at most {cap})")
            self.pos += need
            if self.stack:
                self.stack[-1] -= 1
            if kind in ("array", "map") and length:
                if len(self.stack) + 1 > lim.max_depth:
                    self._fail(f"nesting deeper than {lim.max_depth}")
                self.stack.append(length * (2 if kind == "map" else 1))
            while self.stack and self.stack[-1] == 0:
                self.stack.pop()
            if not self.stack:
                self.done = True
        if final and not self.done:
            self._fail("the body ends inside a value")
        if self.done and self.pos < n:
            self._fail(f"{n - self.pos} bytes after the end of the request")
