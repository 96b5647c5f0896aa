"""The Krita side of the shared flow (``common/flow.py``), without Qt: a worker thread that runs
``flow.run_edit`` and ``apply_steps`` — the generator the dialog (or a test driver) drives.

Threading: Krita's API is touched only from the generator, which runs on the UI thread between event
loop turns; the worker thread only talks HTTP and converts bytes. The UI polls ``EditRun.status()``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

from . import document, layers
from ._common import client as cl
from ._common import flow

POLL_MS = 100  # UI polling period while the server works
EditOptions = flow.EditOptions
SessionCache = flow.SessionCache


@dataclass
class Status:
    state: str = "idle"  # idle | running | done | failed | cancelled
    progress: float = 0.0  # 0..1 over the whole Apply
    message: str = ""
    job_id: str = ""
    preview_seq: int = 0


class EditRun:
    """Run ``flow.run_edit`` over ``items`` on a worker thread; poll ``status()`` from the UI.

    After ``finished``: ``results`` is a list of Krita pixel bytes (one per item, in the item's colour
    space over its rect) or ``error`` holds the exception (a ClientError/DocumentError has a user message).
    ``render=False`` only inverts (the dialog's "Invert" for live preview).
    """

    def __init__(self, client, items, options: EditOptions, cache: SessionCache, render: bool = True):
        self.client, self.items, self.options, self.cache = client, list(items), options, cache
        self.render = render
        self._status = Status()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.finished = threading.Event()
        self.results: list = []
        self.session_ids: list = []
        self.error: Optional[BaseException] = None
        self.reused = 0  # how many items skipped the inversion thanks to the cache
        self.segments: list = []  # per rendered item: the server's [{index, area[, label]}] (result metadata)
        self._thread = threading.Thread(target=self._main, name="latent-edit-worker", daemon=True)

    def start(self) -> "EditRun":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def status(self) -> Status:
        with self._lock:
            return Status(**vars(self._status))

    def _on_progress(self, p: flow.Progress) -> None:
        with self._lock:
            s = self._status
            s.state, s.progress, s.message = "running", p.fraction, p.message
            if p.job_id:
                s.job_id, s.preview_seq = p.job_id, p.preview_seq

    def join(self, timeout=None) -> None:
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            wire = [flow.Item(document.prepare(it).layer, it.selection, it.segments) for it in self.items]
            out = flow.run_edit(self.client, wire, self.options, self.cache, on_progress=self._on_progress,
                                should_cancel=self._cancel.is_set, render=self.render)
            self.reused, self.session_ids, self.segments = out.reused, out.session_ids, out.segments
            self.results = [document.wire_to_krita(lay, it.space, it.rect) for lay, it in zip(out.layers, self.items)]
            self._set(state="done", progress=1.0, message="Done")
        except cl.JobCancelled as e:
            self.error = e
            self._set(state="cancelled", message="Cancelled")
        except BaseException as e:  # shown to the user by the UI; nothing escapes the thread
            self.error = e
            self._set(state="failed", message=str(e) or e.__class__.__name__)
        finally:
            self.finished.set()

    def _set(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._status, k, v)


def resolve_sources(doc, nodes) -> list:
    """The layers to edit: a result group, its layer or its mask stands for the source it was made from."""
    out = []
    for node in nodes:
        src = layers.source_of(node) if node is not None else None
        out.append(src if src is not None else node)
    return out


def read_items(doc, nodes, options: EditOptions) -> list:
    """The layers to send (UI thread): each node's pixels and selection, plus the label layer over the same
    rectangle when ``options.segments`` is "layer" (``options.label_layer``: its uniqueId or name)."""
    items = [document.read_layer(doc, n, use_selection=options.use_selection, convert=False) for n in nodes]
    if options.segments == "layer":
        items = [document.read_label_layer(doc, it, options.label_layer) for it in items]
    return items


def apply_steps(app, krita_module, doc, nodes, options: EditOptions, client, cache: SessionCache,
                on_status=None, on_run=None, log=None, preview=None):
    """Generator for one Apply over ``nodes`` (one = single edit, several = batch); yields ms to wait.

    Reads pixels now (UI thread), runs the server work on a worker thread, then inserts one group per
    source and makes the (first) source the active layer again, so the next Apply edits it too.
    ``preview``: a live preview of exactly these edits (``layers.Preview``) whose pixels become the result
    without a render. ``on_status(Status)`` is called at each poll; ``on_run(run)`` receives the EditRun.
    Returns the list of ``(group, layer, mask)``; raises the run's error (ClientError, DocumentError...).
    """
    nodes = resolve_sources(doc, nodes)
    if not nodes or nodes[0] is None:
        raise document.DocumentError("No layer is selected. Select the layer with the face first.")
    items = read_items(doc, nodes, options)
    if preview is not None and len(items) == 1 and preview.matches(items[0], options):
        results = [preview.pixels]
    else:
        run = EditRun(client, items, options, cache).start()
        if on_run is not None:
            on_run(run)
        while not run.finished.is_set():
            if on_status is not None:
                on_status(run.status())
            yield POLL_MS
        if on_status is not None:
            on_status(run.status())
        if run.error is not None:
            raise run.error
        results = run.results
    if preview is not None:
        yield from preview.remove(doc)
    added = []
    for item, pixels in zip(items, results):
        result = yield from layers.insert_result(app, krita_module, doc, item.node, item.rect, pixels,
                                                 item.selection_bytes, options.edits, log=log)
        added.append(result)
    doc.setActiveNode(items[0].node)  # Apply -> Apply: the source stays the layer the plugin edits
    doc.waitForDone()
    yield layers.SETTLE_MS
    return added


def drive_blocking(gen, sleep=time.sleep):
    """Run a step generator to completion outside Qt (tests, scripts): sleeps the yielded ms."""
    try:
        while True:
            sleep(next(gen) / 1000.0)
    except StopIteration as stop:
        return stop.value
