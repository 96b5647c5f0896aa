"""Writing results: a new group "Latent Edit · smile +1.5" above each source layer holding a paint layer
with the result and a transparency mask from the selection. The source layer is never written.

Insertion is a generator that yields milliseconds to wait: Krita 5.1 needs the event loop to run between
adding nodes and acting on them (setActiveNode on a fresh node fails silently otherwise). The caller
drives it with QTimer.singleShot (see ``extension.drive``); tests iterate it directly.
"""
from __future__ import annotations

from ._common import flow

GROUP_PREFIX, SEP = flow.GROUP_PREFIX, flow.SEP  # result naming is shared with the GIMP plug-in
SETTLE_MS = 250  # event-loop time Krita 5.1.5 needs after adding nodes (krita-headless.md)
format_strength = flow.format_strength  # 1.5 -> "+1.5"
edit_label = flow.edit_label  # [("smile", 1.5)] -> "smile +1.5"
group_name = flow.edit_title  # -> "Latent Edit · smile +1.5"


def result_layer_name(source_name: str, edits) -> str:
    return "%s (%s)" % (source_name, edit_label(edits))


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
    return node.type() == "grouplayer" and node.name().startswith(GROUP_PREFIX + SEP)


def insertion_anchor(parent, source):
    """The node to insert a new result group above: the source, or the topmost of the result groups
    stacked directly on it (so the newest edit is on top and visible, and earlier ones stay below)."""
    siblings = parent.childNodes()  # bottom to top
    ids = [str(n.uniqueId()) for n in siblings]
    try:
        i = ids.index(str(source.uniqueId()))
    except ValueError:
        return source
    anchor = source
    for node in siblings[i + 1:]:
        if not is_result_group(node):
            break
        anchor = node
    return anchor


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
