"""Writing results: a new group "Latent Edit · smile +1.5" above each source layer holding a paint layer
with the result and a transparency mask from the selection. The source layer is never written.

Insertion is a generator that yields milliseconds to wait: Krita 5.1 needs the event loop to run between
adding nodes and acting on them (setActiveNode on a fresh node fails silently otherwise). The caller
drives it with QTimer.singleShot (see ``extension.drive``); tests iterate it directly.
"""
from __future__ import annotations

import hashlib

from ._common import flow

SETTLE_MS = 250  # event-loop time Krita 5.1.5 needs after adding nodes (krita-headless.md)
group_name = flow.edit_title  # -> "Latent Edit · smile +1.5" (the same names as in GIMP)
result_layer_name = flow.result_layer_name  # -> "face (smile +1.5)"


def unique_name(parent, name: str) -> str:
    """``name``, or ``name 2``, ``name 3``... when a sibling already has it."""
    taken = {n.name() for n in parent.childNodes()}
    if name not in taken:
        return name
    k = 2
    while "%s %d" % (name, k) in taken:
        k += 1
    return "%s %d" % (name, k)


def is_result_group(node) -> bool:
    return node.type() == "grouplayer" and flow.is_result_group_name(node.name())


def is_preview(node) -> bool:
    return node.type() == "paintlayer" and node.name() == flow.PREVIEW_NAME


def _in_stack(node) -> bool:
    return is_result_group(node) or is_preview(node)


def insertion_anchor(parent, source):
    """The node to insert a new result group above: the source, or the topmost of the result groups
    (and the live preview) stacked directly on it, so the newest edit is on top and visible."""
    siblings = parent.childNodes()  # bottom to top
    ids = [str(n.uniqueId()) for n in siblings]
    try:
        i = ids.index(str(source.uniqueId()))
    except ValueError:
        return source
    n = flow.stack_top(_in_stack(node) for node in siblings[i + 1:])
    return siblings[i + n]


def source_of(node):
    """The source layer a result group / result layer / its mask / the preview was made from, or None
    when ``node`` is not a Latent Edit result (then it is its own source)."""
    if node.type() == "transparencymask" and node.parentNode() is not None:
        node = node.parentNode()
    parent = node.parentNode()
    if node.type() == "paintlayer" and parent is not None and is_result_group(parent):
        node = parent
    if not _in_stack(node):
        return None
    parent = node.parentNode()
    if parent is None:
        return None
    siblings = parent.childNodes()
    ids = [str(n.uniqueId()) for n in siblings]
    i = ids.index(str(node.uniqueId()))
    while i > 0 and _in_stack(siblings[i - 1]):
        i -= 1
    return siblings[i - 1] if i > 0 else None


def content_digest(item) -> str:
    """Identity of what a layer read gave (Krita bytes + selection + placement), cheap enough for the UI thread."""
    h = hashlib.sha1(repr((item.node.uniqueId(), item.rect)).encode())
    h.update(item.raw if item.raw is not None else item.layer["data"])
    h.update(item.selection_bytes or b"-")
    return h.hexdigest()


class Preview:
    """The live preview: one locked paint layer "Latent Edit · preview" above the source's result stack.

    ``show`` writes rendered pixels into it (creating it on first use); ``matches`` tells Apply that the
    preview is exactly what it would render, so its pixels become the result without another render.
    """

    def __init__(self, source, digest: str):
        self.source, self.digest = source, digest
        self.node = None
        self.pixels = None
        self.edits, self.feather, self.keep_detail, self.segments = None, None, False, None

    def show(self, doc, rect, pixels: bytes, edits, feather, keep_detail: bool = False, segments=None) -> None:
        if self.node is None or self.node.parentNode() is None:
            parent = self.source.parentNode() or doc.rootNode()
            self.node = doc.createNode(flow.PREVIEW_NAME, "paintlayer")
            parent.addChildNode(self.node, insertion_anchor(parent, self.source))
        self.node.setLocked(False)
        self.node.setPixelData(pixels, rect.x, rect.y, rect.width, rect.height)
        self.node.setLocked(True)  # painting on a preview would be lost at the next slider move
        self.pixels, self.edits, self.feather, self.keep_detail = pixels, list(edits), feather, keep_detail
        self.segments = segments
        doc.refreshProjection()

    def matches(self, item, options) -> bool:
        return (self.node is not None and self.pixels is not None and list(options.edits) == self.edits
                and options.feather == self.feather and bool(options.keep_detail) == self.keep_detail
                and options.edit_segments == self.segments
                and content_digest(item) == self.digest)

    def remove(self, doc):
        """Generator: delete the preview layer (if any); yields ms to wait."""
        if self.node is not None and self.node.parentNode() is not None:
            self.node.setLocked(False)
            self.node.remove()
            doc.waitForDone()
            yield SETTLE_MS
        self.node = None


def make_selection(krita_module, gray8: bytes, rect):
    sel = krita_module.Selection()
    sel.setPixelData(gray8, rect.x, rect.y, rect.width, rect.height)
    return sel


def insert_result(app, krita_module, doc, source, rect, pixels: bytes, selection_bytes, edits, log=None):
    """Generator: add group + result layer (+ transparency mask) above ``source``; yields ms to wait.

    ``pixels``: bytes for ``setPixelData`` over ``rect`` in the source's colour space.
    ``selection_bytes``: gray8 over ``rect`` or None (whole layer: the mask is left fully opaque).
    The generator's return value (StopIteration.value) is ``(group, layer, mask_or_None)``.
    """
    parent = source.parentNode() or doc.rootNode()
    group = doc.createGroupLayer(unique_name(parent, group_name(edits)))
    parent.addChildNode(group, insertion_anchor(parent, source))
    layer = doc.createNode(result_layer_name(source.name(), edits), "paintlayer")
    group.addChildNode(layer, None)
    layer.setPixelData(pixels, rect.x, rect.y, rect.width, rect.height)
    doc.waitForDone()
    yield SETTLE_MS
    mask = yield from add_transparency_mask(app, krita_module, doc, layer, rect, selection_bytes, log)
    doc.refreshProjection()
    return group, layer, mask


def add_transparency_mask(app, krita_module, doc, layer, rect, selection_bytes, log=None):
    """Generator: give ``layer`` a transparency mask equal to the selection over ``rect``.

    Krita >= 5.2 has ``Document.createTransparencyMask``; 5.1 only builds a mask with a pixel device
    through the ``add_new_transparency_mask`` action (from the global selection, which it consumes), so
    the user's selection is set, the action run, and the original selection restored afterwards.
    """
    name = "Selection"
    if hasattr(doc, "createTransparencyMask"):
        mask = doc.createTransparencyMask(name)
        layer.addChildNode(mask, None)
        if selection_bytes is not None:
            mask.setSelection(make_selection(krita_module, selection_bytes, rect))
        doc.waitForDone()
        yield SETTLE_MS
        return mask
    original = doc.selection()
    if selection_bytes is not None:
        doc.setSelection(make_selection(krita_module, selection_bytes, rect))
    else:
        doc.setSelection(None)
    doc.setActiveNode(layer)
    doc.waitForDone()
    yield SETTLE_MS
    before = {str(c.uniqueId()) for c in layer.childNodes()}
    action = app.action("add_new_transparency_mask")
    if action is None:
        if log:
            log("Krita has no add_new_transparency_mask action; result left without a mask")
        return None
    action.trigger()
    doc.waitForDone()
    yield SETTLE_MS
    masks = [c for c in layer.childNodes() if c.type() == "transparencymask"]
    new = [m for m in masks if str(m.uniqueId()) not in before] or masks
    mask = new[-1] if new else None
    if mask is None:
        if log:
            log("the transparency mask action did not add a mask to %r" % layer.name())
    else:
        mask.setName(name)
        if selection_bytes is not None:
            mask.setPixelData(selection_bytes, rect.x, rect.y, rect.width, rect.height)
    doc.setSelection(original)  # the action consumed the global selection: give the user theirs back
    doc.waitForDone()
    return mask
