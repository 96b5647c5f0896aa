"""Krita document access: read a layer's pixels and the selection, convert to/from the wire.

No Qt import here: only calls on Krita's ``Document`` / ``Node`` / ``Selection`` objects (so the logic
runs against tests/fake_krita). Krita 5 pixel layouts (``Node.pixelData``): row-major, tightly packed;
U8 and U16 are **BGRA** (U16 little-endian), F16 and F32 are **RGBA**. ``Selection.pixelData`` is one
byte per pixel. Coordinates are image coordinates; a layer's content rectangle is ``Node.bounds()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._common import flow
from ._common import pixels as px

# Krita depth -> (wire format, bytes per sample in Krita, Krita channel order)
DEPTHS = {
    "U8": ("rgba8", 1, "BGRA"),
    "U16": ("rgba16", 2, "BGRA"),
    "F16": ("rgbaf32", 2, "RGBA"),
    "F32": ("rgbaf32", 4, "RGBA"),
}
MIN_SIDE = 8  # the server refuses smaller layers


class DocumentError(Exception):
    """A document or layer the plugin cannot work on; ``str()`` is the message for the user."""


class UnsupportedColorModel(DocumentError):
    pass


@dataclass
class Rect:
    x: int
    y: int
    width: int
    height: int

    def is_empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def intersect(self, other: "Rect") -> "Rect":
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.width, other.x + other.width)
        y1 = min(self.y + self.height, other.y + other.height)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


@dataclass
class ColorSpace:
    model: str
    depth: str
    profile: str

    @property
    def linear(self) -> bool:
        """True for linear-light profiles (Krita's default for 16-bit and float RGB: ``*-g10.icc``)."""
        p = (self.profile or "").lower()
        return "g10" in p or "linear" in p

    @property
    def wire_format(self) -> str:
        return DEPTHS[self.depth][0]


@dataclass
class LayerPixels:
    """One layer region ready for the wire: ``layer`` and ``selection`` are protocol maps."""

    node: object
    name: str
    rect: Rect
    space: ColorSpace
    layer: Optional[dict]  # None until prepare(): the conversion may be slow, so it runs off the UI thread
    selection: Optional[dict]
    selection_bytes: Optional[bytes]  # gray8 over ``rect`` (what the transparency mask gets)
    raw: Optional[bytes] = None  # Krita's pixelData over ``rect``, until prepare() converts it
    segments: Optional[dict] = None  # the label map (flow.label_map) when segments come from a label layer
    label: Optional[tuple] = None  # (name, pixelData over ``rect``, ColorSpace) of that layer, until prepare()


def prepare(item: LayerPixels) -> LayerPixels:
    """Convert ``item.raw`` to the wire layer map (pure Python, thread-safe: no Krita calls)."""
    if item.layer is None:
        r = item.rect
        item.layer = px.pack_layer(krita_to_wire(item.raw, item.space), r.width, r.height, item.space.wire_format,
                                   r.x, r.y, item.name)
        item.raw = None
    if item.label is not None:
        name, raw, space = item.label
        rgba8 = px.convert_samples(krita_to_wire(raw, space), space.wire_format, "rgba8")
        item.segments = flow.label_map(rgba8, item.rect.width, item.rect.height, name).wire
        item.label = None
    return item


def find_node(doc, key: str):
    """The node whose uniqueId (or, failing that, name) is ``key``; None when there is none."""
    def walk(node):
        for child in node.childNodes():
            yield child
            yield from walk(child)

    nodes = list(walk(doc.rootNode()))
    return next((n for n in nodes if str(n.uniqueId()) == key), None) or \
        next((n for n in nodes if n.name() == key), None)


def read_label_layer(doc, item: LayerPixels, key: Optional[str]) -> LayerPixels:
    """Attach the label layer ``key`` (uniqueId or name) over ``item.rect``: its flat colours become the
    segments in :func:`prepare` (``flow.label_map``: each colour one segment, transparent = no segment)."""
    node = find_node(doc, key) if key else None
    if node is None:
        raise DocumentError("Choose the label layer whose colours are the segments (Segments ▸ From layer…).")
    if node.type() != "paintlayer":
        raise DocumentError("\"%s\" is a %s; the label layer must be a paint layer with one flat colour per "
                            "segment." % (node.name(), node.type().replace("layer", " layer")))
    if str(node.uniqueId()) == str(item.node.uniqueId()):
        raise DocumentError("The label layer must be another layer than the photo: paint each segment in its "
                            "own flat colour on a new layer.")
    space = color_space(node)
    r = item.rect
    item.label = (node.name(), bytes(node.pixelData(r.x, r.y, r.width, r.height)), space)
    return item


def qrect(r) -> Rect:
    """A QRect (or anything with x()/y()/width()/height()) -> Rect."""
    return Rect(int(r.x()), int(r.y()), int(r.width()), int(r.height()))


def color_space(node) -> ColorSpace:
    """The node's colour space; raises UnsupportedColorModel unless RGB(A) at U8/U16/F16/F32."""
    model, depth, profile = node.colorModel(), node.colorDepth(), node.colorProfile()
    if model != "RGBA":
        raise UnsupportedColorModel(
            "Layer \"%s\" uses the %s colour model; Latent Edit works on RGB/Alpha layers. Convert it with "
            "Image ▸ Convert Image Color Space (or Layer ▸ Convert ▸ Convert Layer Color Space) to RGB/Alpha first."
            % (node.name(), model))
    if depth not in DEPTHS:
        raise UnsupportedColorModel("Layer \"%s\" has an unsupported channel depth %r (expected 8-bit, 16-bit or "
                                    "float)." % (node.name(), depth))
    return ColorSpace(model, depth, profile or "")


def layer_rect(doc, node) -> Rect:
    """The part of the layer's content inside the canvas."""
    rect = qrect(node.bounds()).intersect(Rect(0, 0, int(doc.width()), int(doc.height())))
    if rect.is_empty():
        raise DocumentError("Layer \"%s\" is empty (no pixels inside the canvas)." % node.name())
    if rect.width < MIN_SIDE or rect.height < MIN_SIDE:
        raise DocumentError("Layer \"%s\" is only %dx%d pixels; Latent Edit needs at least %dx%d."
                            % (node.name(), rect.width, rect.height, MIN_SIDE, MIN_SIDE))
    return rect


def krita_to_wire(raw: bytes, space: ColorSpace) -> bytes:
    """Krita ``pixelData`` bytes -> wire RGBA samples (sRGB-encoded: the models were trained on sRGB)."""
    fmt, sample, order = DEPTHS[space.depth]
    data = bytes(raw)
    if order == "BGRA":
        data = px.swap_red_blue(data, sample)
    if space.depth == "F16":
        data = px.half_to_float32(data)
    if space.linear and fmt != "rgba8":
        data = px.transfer_rgb(data, fmt, to_srgb=True)
    return data


def wire_to_krita(layer: dict, space: ColorSpace, rect: Rect) -> bytes:
    """A wire result layer -> bytes for ``Node.setPixelData`` over ``rect`` in the node's colour space."""
    data, width, height, fmt, _x, _y = px.unpack_layer(layer)
    if (width, height) != (rect.width, rect.height):
        raise DocumentError("The server returned a %dx%d layer for a %dx%d request." % (width, height, rect.width, rect.height))
    want, sample, order = DEPTHS[space.depth]
    data = px.convert_samples(data, fmt, want)
    if space.linear and want != "rgba8":
        data = px.transfer_rgb(data, want, to_srgb=False)
    if space.depth == "F16":
        data = px.float32_to_half(data)
    if order == "BGRA":
        data = px.swap_red_blue(data, sample)
    return data


def read_selection(doc, rect: Rect) -> Optional[bytes]:
    """The global selection over ``rect`` as gray8 bytes, or None when there is no selection."""
    sel = doc.selection()
    if sel is None:
        return None
    if int(sel.width()) <= 0 or int(sel.height()) <= 0:
        return None
    return bytes(sel.pixelData(rect.x, rect.y, rect.width, rect.height))


def read_layer(doc, node, use_selection: bool = True, convert: bool = True) -> LayerPixels:
    """Read ``node``'s pixels (its own, never the projection of children) and the selection over them.

    With ``convert=False`` the wire conversion is left to :func:`prepare` (call it on a worker thread).
    """
    if node is None:
        raise DocumentError("No active layer. Select the layer with the face first.")
    kind = node.type()
    if kind.endswith("mask"):
        raise DocumentError("\"%s\" is a mask. Latent Edit reads paint layers: select the paint layer it belongs "
                            "to." % node.name())
    if kind not in ("paintlayer",):
        raise DocumentError("\"%s\" is a %s. Latent Edit reads paint layers: select a paint layer, or convert this "
                            "one with Layer ▸ Convert ▸ to Paint Layer." % (node.name(), kind.replace("layer", " layer")))
    space = color_space(node)
    rect = layer_rect(doc, node)
    raw = bytes(node.pixelData(rect.x, rect.y, rect.width, rect.height))
    expected = rect.width * rect.height * 4 * DEPTHS[space.depth][1]
    if len(raw) != expected:
        raise DocumentError("Krita returned %d bytes for a %dx%d %s layer (expected %d)."
                            % (len(raw), rect.width, rect.height, space.depth, expected))
    sel_bytes = read_selection(doc, rect) if use_selection else None
    sel_map = None
    if sel_bytes is not None:
        if sel_bytes.count(0) == len(sel_bytes):
            raise DocumentError("The selection does not overlap layer \"%s\". Select (part of) the face, or "
                                "deselect to edit the whole layer." % node.name())
        sel_map = px.pack_selection(sel_bytes, rect.width, rect.height, rect.x, rect.y)
    item = LayerPixels(node, node.name(), rect, space, None, sel_map, sel_bytes, raw)
    return prepare(item) if convert else item
