"""A small in-memory stand-in for Krita 5.1's Python API (the parts the Latent Edit plugin uses).

Pixels are stored per node as full-canvas bytearrays in Krita's layouts (U8/U16: BGRA, F16/F32: RGBA);
``Selection.pixelData`` is 1 byte/pixel. Behaviour copied from real Krita 5.1.5 where it matters
(see shared/research/krita-headless.md): ``add_new_transparency_mask`` builds the mask from the global
selection and clears it; ``childNodes`` lists bottom to top and returns fresh wrapper objects.
"""
from __future__ import annotations

import uuid

BYTES = {"U8": 1, "U16": 2, "F16": 2, "F32": 4}


class Rect:
    def __init__(self, x, y, w, h):
        self._r = (x, y, w, h)

    def x(self):
        return self._r[0]

    def y(self):
        return self._r[1]

    def width(self):
        return self._r[2]

    def height(self):
        return self._r[3]


class _Store:
    """The real node state (what Krita's C++ side holds); wrappers below are created per call."""

    def __init__(self, doc, name, kind, bpp):
        self.doc, self.name, self.kind, self.bpp = doc, name, kind, bpp
        self.id = uuid.uuid4()
        self.children = []  # bottom to top
        self.parent = None
        self.visible = True
        self.locked = False
        self.data = bytearray(doc.w * doc.h * bpp)
        self.bounds = None  # None: computed from non-zero pixels / canvas
        self.writes = 0


class Node:
    def __init__(self, store: _Store):
        self._s = store

    def __eq__(self, other):
        return isinstance(other, Node) and other._s is self._s

    def __hash__(self):
        return hash(self._s.id)

    def name(self):
        return self._s.name

    def setName(self, name):
        self._s.name = name

    def type(self):
        return self._s.kind

    def uniqueId(self):
        return self._s.id

    def visible(self):
        return self._s.visible

    def locked(self):
        return self._s.locked

    def setLocked(self, on):
        self._s.locked = bool(on)

    def remove(self):
        """Krita's Node.remove(): detach from the parent."""
        if self._s.parent is None:
            return False
        self._s.parent.children.remove(self._s)
        self._s.parent = None
        return True

    def colorModel(self):
        return self._s.doc.model

    def colorDepth(self):
        return self._s.doc.depth

    def colorProfile(self):
        return self._s.doc.profile

    def bounds(self):
        if self._s.bounds is not None:
            return Rect(*self._s.bounds)
        return Rect(0, 0, self._s.doc.w, self._s.doc.h)

    def parentNode(self):
        return Node(self._s.parent) if self._s.parent is not None else None

    def childNodes(self):
        return [Node(c) for c in self._s.children]

    def addChildNode(self, child, above):
        st = child._s
        st.parent = self._s
        if above is None:
            self._s.children.append(st)
        else:
            idx = next(i for i, c in enumerate(self._s.children) if c is above._s)
            self._s.children.insert(idx + 1, st)
        return True

    def pixelData(self, x, y, w, h):
        d, bpp = self._s.doc, self._s.bpp
        out = bytearray(w * h * bpp)
        for r in range(h):
            yy = y + r
            if not 0 <= yy < d.h:
                continue
            for c0 in range(w):
                xx = x + c0
                if 0 <= xx < d.w:
                    s = (yy * d.w + xx) * bpp
                    out[(r * w + c0) * bpp:(r * w + c0 + 1) * bpp] = self._s.data[s:s + bpp]
        return bytes(out)

    def setPixelData(self, data, x, y, w, h):
        d, bpp = self._s.doc, self._s.bpp
        data = bytes(data)
        assert len(data) == w * h * bpp, (len(data), w, h, bpp)
        self._s.writes += 1
        for r in range(h):
            yy = y + r
            if not 0 <= yy < d.h:
                continue
            for c0 in range(w):
                xx = x + c0
                if 0 <= xx < d.w:
                    s = (yy * d.w + xx) * bpp
                    self._s.data[s:s + bpp] = data[(r * w + c0) * bpp:(r * w + c0 + 1) * bpp]


class Selection:
    def __init__(self):
        self.data = None
        self.w = self.h = 0

    def setPixelData(self, data, x, y, w, h):
        self.data, self.rect = bytes(data), (x, y, w, h)

    def pixelData(self, x, y, w, h):
        sx, sy, sw, sh = self.rect
        out = bytearray(w * h)
        for r in range(h):
            for c in range(w):
                xx, yy = x + c - sx, y + r - sy
                if 0 <= xx < sw and 0 <= yy < sh:
                    out[r * w + c] = self.data[yy * sw + xx]
        return bytes(out)

    def x(self):
        return self.rect[0]

    def y(self):
        return self.rect[1]

    def width(self):
        return self.rect[2] if self.data and any(self.data) else 0

    def height(self):
        return self.rect[3] if self.data and any(self.data) else 0


class Document:
    def __init__(self, w, h, model="RGBA", depth="U8", profile="sRGB-elle-V2-srgbtrc.icc"):
        self.w, self.h, self.model, self.depth, self.profile = w, h, model, depth, profile
        self.root = _Store(self, "root", "grouplayer", 4 * BYTES.get(depth, 1))
        self._selection = None
        self._active = None
        self.refreshed = 0

    def width(self):
        return self.w

    def height(self):
        return self.h

    def colorDepth(self):
        return self.depth

    def colorModel(self):
        return self.model

    def rootNode(self):
        return Node(self.root)

    def topLevelNodes(self):
        return Node(self.root).childNodes()

    def createNode(self, name, kind):
        bpp = 1 if kind in ("transparencymask", "selectionmask") else 4 * BYTES.get(self.depth, 1)
        return Node(_Store(self, name, kind, bpp))

    def createGroupLayer(self, name):
        return self.createNode(name, "grouplayer")

    def nodeByName(self, name):
        def walk(s):
            for c in s.children:
                if c.name == name:
                    return c
                found = walk(c)
                if found:
                    return found
        found = walk(self.root)
        return Node(found) if found else None

    def selection(self):
        return self._selection

    def setSelection(self, sel):
        self._selection = sel

    def activeNode(self):
        return Node(self._active) if self._active is not None else None

    def setActiveNode(self, node):
        self._active = node._s

    def waitForDone(self):
        pass

    def refreshProjection(self):
        self.refreshed += 1


class Action:
    def __init__(self, app, name):
        self.app, self.name = app, name

    def trigger(self):
        self.app.triggered.append(self.name)
        if self.name == "add_new_transparency_mask":
            doc = self.app.document
            layer = doc.activeNode()
            mask = doc.createNode("Transparency Mask", "transparencymask")
            sel = doc.selection()
            if sel is None:
                mask._s.data[:] = b"\xff" * (doc.w * doc.h)
            else:
                mask._s.data[:] = sel.pixelData(0, 0, doc.w, doc.h)
            layer.addChildNode(mask, None)
            doc.setSelection(None)  # Krita 5.1.5 consumes the global selection


class Krita:
    _instance = None

    def __init__(self, document=None):
        self.document = document
        self.settings = {}
        self.triggered = []
        self.extensions = []

    @classmethod
    def instance(cls):
        if cls._instance is None:
            cls._instance = Krita()
        return cls._instance

    def activeDocument(self):
        return self.document

    def action(self, name):
        return Action(self, name)

    def readSetting(self, group, key, default):
        return self.settings.get((group, key), default)

    def writeSetting(self, group, key, value):
        self.settings[(group, key)] = value

    def addExtension(self, ext):
        self.extensions.append(ext)


def paint_layer(doc: Document, name: str, data: bytes, parent=None, above=None, bounds=None) -> Node:
    node = doc.createNode(name, "paintlayer")
    node._s.data[:] = data
    node._s.bounds = bounds
    (parent or doc.rootNode()).addChildNode(node, above)
    node._s.writes = 0
    return node
