"""GIMP 3 document access for Latent Edit: read a layer and the selection, write result layers.

Only this module touches pixels through Gegl; the plug-in entry point (latent-edit.py) stays about the
dialog and the flow.  Pixels always travel in perceptual (sRGB-encoded) RGBA with straight alpha: babl
converts from and to the image's own precision (8/16-bit integer, half, float; linear or perceptual).
"""
from __future__ import annotations

from dataclasses import dataclass

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp  # noqa: E402

# wire format name -> (babl format, bytes per pixel)
WIRE_FORMATS = {
    "rgba8": ("R'G'B'A u8", 4),
    "rgba16": ("R'G'B'A u16", 8),
    "rgbaf32": ("R'G'B'A float", 16),
}


class DocumentError(Exception):
    """Something about the image the user must change (message shown as is)."""


@dataclass
class LayerPixels:
    """One layer's pixels as they go on the wire."""

    name: str
    width: int
    height: int
    offset_x: int
    offset_y: int
    format: str  # rgba8 | rgba16 | rgbaf32
    data: bytes  # row-major RGBA, straight alpha, little-endian samples
    selection: bytes | None  # gray8 (width*height) in layer coordinates, or None = whole layer

    @property
    def stride(self) -> int:
        return self.width * WIRE_FORMATS[self.format][1]


def wire_format_for(image) -> str:
    """The lossless wire format for the image's precision."""
    nick = image.get_precision().value_nick  # e.g. "u8-non-linear", "u16-linear", "half-linear", "float-non-linear"
    if nick.startswith("u8"):
        return "rgba8"
    if nick.startswith("u16"):
        return "rgba16"
    return "rgbaf32"  # u32, half and float: float keeps everything that matters


def check_image(image) -> None:
    """Refuse image modes the engine cannot edit, with what to do instead."""
    base = image.get_base_type()
    if base == Gimp.ImageBaseType.INDEXED:
        raise DocumentError("Latent Edit needs an RGB image; this one is indexed. Use Image ▸ Mode ▸ RGB first.")
    if base == Gimp.ImageBaseType.GRAY:
        raise DocumentError("Latent Edit needs an RGB image; this one is grayscale. Use Image ▸ Mode ▸ RGB first.")


def read_layer(image, layer) -> LayerPixels:
    """The layer's pixels and the part of the selection that covers it (image coords → layer coords)."""
    check_image(image)
    if layer.is_group() if hasattr(layer, "is_group") else isinstance(layer, Gimp.GroupLayer):
        raise DocumentError(f"'{layer.get_name()}' is a layer group. Select a normal layer in the Layers dialog.")
    w, h = layer.get_width(), layer.get_height()
    _ok, ox, oy = layer.get_offsets()
    fmt = wire_format_for(image)
    babl = WIRE_FORMATS[fmt][0]
    rect = Gegl.Rectangle.new(0, 0, w, h)
    data = bytes(layer.get_buffer().get(rect, 1.0, babl, Gegl.AbyssPolicy.CLAMP))
    selection = None
    if not Gimp.Selection.is_empty(image):
        sbuf = image.get_selection().get_buffer()
        sel = bytes(sbuf.get(Gegl.Rectangle.new(ox, oy, w, h), 1.0, "Y u8", Gegl.AbyssPolicy.NONE))
        if not any(sel):
            raise DocumentError(f"The selection does not touch the layer '{layer.get_name()}'. Select part of "
                                "it, or use Select ▸ None to edit the whole layer.")
        selection = sel
    return LayerPixels(layer.get_name(), w, h, ox, oy, fmt, data, selection)


def read_label_layer(label, source) -> tuple[str, bytes]:
    """The label layer's straight RGBA8 pixels over ``source``'s rectangle (transparent where it does not
    reach), for ``flow.label_map``: each flat colour one segment."""
    if label is None:
        raise DocumentError("Choose the label layer whose colours are the segments (the 'Label layer' option).")
    if label.is_group():
        raise DocumentError(f"'{label.get_name()}' is a layer group; the label layer must be a normal layer with "
                            "one flat colour per segment.")
    if label.get_id() == source.get_id():
        raise DocumentError("The label layer must be another layer than the photo: paint each segment in its own "
                            "flat colour on a new layer.")
    _ok, sx, sy = source.get_offsets()
    _ok, lx, ly = label.get_offsets()
    rect = Gegl.Rectangle.new(sx - lx, sy - ly, source.get_width(), source.get_height())
    return label.get_name(), bytes(label.get_buffer().get(rect, 1.0, "R'G'B'A u8", Gegl.AbyssPolicy.NONE))


def result_position(image, source, is_result_group_name, stack_top) -> int:
    """Where a new result group goes in the source's parent: above the source's topmost result group
    (GIMP positions count from the top, 0 = topmost), so every new edit is on top and visible."""
    parent = source.get_parent()
    siblings = parent.get_children() if parent is not None else image.get_layers()  # top to bottom
    pos = image.get_item_position(source)
    above = [item.is_group() and is_result_group_name(item.get_name()) for item in reversed(siblings[:pos])]
    return pos - stack_top(above)


def insert_result(image, source, title: str, results: list[tuple[str, bytes]], fmt: str, has_selection: bool,
                  position: int):
    """Insert ``results`` [(layer name, RGBA bytes at the source's size)] into a new group named ``title``
    at ``position`` in the source's parent (see :func:`result_position`), each with a layer mask (from the
    selection, else white). Returns the group. The caller wraps this in an undo group; ``source`` is never
    modified."""
    w, h = source.get_width(), source.get_height()
    _ok, ox, oy = source.get_offsets()
    babl = WIRE_FORMATS[fmt][0]
    group = Gimp.GroupLayer.new(image, title)
    image.insert_layer(group, source.get_parent(), position)
    for name, data in results:
        expected = w * h * WIRE_FORMATS[fmt][1]
        if len(data) != expected:
            raise DocumentError(f"The server sent {len(data)} bytes for '{name}'; expected {expected}.")
        layer = Gimp.Layer.new(image, name, w, h, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
        image.insert_layer(layer, group, 0)
        layer.set_offsets(ox, oy)
        buf = layer.get_buffer()
        buf.set(Gegl.Rectangle.new(0, 0, w, h), babl, data)
        buf.flush()
        layer.update(0, 0, w, h)
        mask_type = Gimp.AddMaskType.SELECTION if has_selection else Gimp.AddMaskType.WHITE
        layer.add_mask(layer.create_mask(mask_type))
    return group
