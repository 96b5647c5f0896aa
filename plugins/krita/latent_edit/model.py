"""The editing flow without Qt: options, a worker thread for the HTTP work, the session cache that makes
re-edits render-only, and ``apply_steps`` — the generator the UI (or the automation entry) drives.

Threading: Krita's API is touched only from the generator, which runs on the UI thread between event
loop turns; the worker thread only talks HTTP and converts bytes. The UI polls ``EditRun.status()``.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from . import document, layers
from ._common import client as cl

POLL_MS = 100  # UI polling period while the server works
METHODS = ("pti", "chunks", "w", "wplus")
METHOD_LABELS = {"pti": "PTI (best, slow)", "chunks": "Segments (ChunkyGAN)", "w": "W (fast)", "wplus": "W+"}


@dataclass
class EditOptions:
    """What one Apply asks for. ``None`` lets the server pick the method's default."""

    edits: list = field(default_factory=list)  # [(direction, strength)]
    model: Optional[str] = None  # None: the server's default model
    method: str = "pti"  # the highest-fidelity method (design.md §2) by default
    align: str = "auto"
    feather: float = 8.0  # core.session.SessionOptions default (architecture.md)
    project_steps: Optional[int] = None
    tune_steps: Optional[int] = None
    seed: Optional[int] = None
    use_selection: bool = True

    def session_options(self) -> dict:
        out = {}
        for key in ("project_steps", "tune_steps", "seed"):
            v = getattr(self, key)
            if v is not None:
                out[key] = int(v)
        return out

    def inversion_key(self) -> tuple:
        """Everything that changes the inversion (not the edits or the feather)."""
        return (self.model, self.method, self.align, self.project_steps, self.tune_steps, self.seed)


@dataclass
class Status:
    state: str = "idle"  # idle | uploading | running | rendering | done | failed | cancelled
    progress: float = 0.0  # 0..1 over the whole Apply
    stage: str = ""
    message: str = ""


def item_key(server_url: str, item: document.LayerPixels, options: EditOptions) -> str:
    """Identity of an inversion: same pixels, selection, placement and inversion options -> same session."""
    h = hashlib.sha1()
    h.update(repr((server_url, item.rect.x, item.rect.y, item.rect.width, item.rect.height,
                   item.layer["format"], options.inversion_key())).encode())
    h.update(item.layer["data"])
    h.update(item.selection["data"] if item.selection else b"-")
    return h.hexdigest()


class SessionCache:
    """item_key -> server session id, most recent last, bounded."""

    def __init__(self, max_items: int = 32):
        self.max_items, self._d = max_items, {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            return self._d.get(key)

    def put(self, key: str, session_id: str) -> None:
        with self._lock:
            self._d.pop(key, None)
            self._d[key] = session_id
            while len(self._d) > self.max_items:
                self._d.pop(next(iter(self._d)))

    def drop(self, key: str) -> None:
        with self._lock:
            self._d.pop(key, None)


class EditRun:
    """Invert (unless cached) and render ``items`` on a worker thread; poll ``status()`` from the UI.

    After ``finished``: ``results`` is a list of Krita pixel bytes (one per item, in the item's colour
    space over its rect) or ``error`` holds the exception (a ClientError/DocumentError has a user message).
    """

    def __init__(self, client, items, options: EditOptions, cache: SessionCache):
        self.client, self.items, self.options, self.cache = client, list(items), options, cache
        self._status = Status()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.finished = threading.Event()
        self.results: list = []
        self.error: Optional[BaseException] = None
        self.reused = 0  # how many items skipped the inversion thanks to the cache
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

    def _set(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._status, k, v)

    def join(self, timeout=None) -> None:
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            try:
                self._render_all(self._sessions())
            except cl.ServerError as e:
                if e.status not in (404, 410) or not self.reused:
                    raise
                # the server forgot a cached session (restart, eviction): invert again once
                for it in self.items:
                    self.cache.drop(item_key(self.client.url, it, self.options))
                self.results = []
                self._render_all(self._sessions())
            self._set(state="done", progress=1.0, stage="", message="done")
        except cl.JobCancelled as e:
            self.error = e
            self._set(state="cancelled", message="cancelled")
        except BaseException as e:  # shown to the user by the UI; nothing escapes the thread
            self.error = e
            self._set(state="failed", message=str(e) or e.__class__.__name__)
        finally:
            self.finished.set()

    def _render_all(self, sessions) -> None:
        self._set(state="rendering", stage="render", progress=0.9, message="rendering")
        for i, (item, sid) in enumerate(zip(self.items, sessions)):
            if self._cancel.is_set():
                raise cl.JobCancelled("cancelled")
            body = self.client.render(sid, self.options.edits, feather=self.options.feather, format=item.layer["format"])
            layer = cl.result_layers(body)[0]
            self.results.append(document.wire_to_krita(layer, item.space, item.rect))
            self._set(progress=0.9 + 0.1 * (i + 1) / len(self.items))

    def _sessions(self) -> list:
        for item in self.items:
            document.prepare(item)  # Krita layout -> wire, here rather than on the UI thread
        keys = [item_key(self.client.url, it, self.options) for it in self.items]
        sessions = [self.cache.get(k) for k in keys]
        self.reused = sum(s is not None for s in sessions)
        todo = [i for i, s in enumerate(sessions) if s is None]
        if not todo:
            return sessions
        self._set(state="uploading", stage="upload", progress=0.0, message="sending %d layer(s)" % len(todo))
        o = self.options
        if len(todo) == 1:
            out = self.client.create_session(self.items[todo[0]].layer, self.items[todo[0]].selection, model=o.model,
                                             method=o.method, align=o.align, options=o.session_options())
            new_ids = [out["session_id"]]
        else:
            out = self.client.batch([_wire_item(self.items[i]) for i in todo], model=o.model, method=o.method,
                                    align=o.align, options=o.session_options())
            new_ids = list(out.get("session_ids") or [])
            if len(new_ids) != len(todo):
                raise cl.ServerError(0, "bad_response", "the server answered a batch of %d with %d sessions"
                                     % (len(todo), len(new_ids)))
        self._set(state="running", stage="queued", message="waiting for the server")
        self.client.wait_job(out["job_id"], on_progress=self._on_job, should_cancel=self._cancel.is_set)
        for i, sid in zip(todo, new_ids):
            sessions[i] = sid
            self.cache.put(keys[i], sid)
        return sessions

    def _on_job(self, job: dict) -> None:
        stage = str(job.get("stage") or job.get("state") or "")
        self._set(progress=0.9 * float(job.get("progress") or 0.0), stage=stage,
                  message=str(job.get("message") or stage))


def _wire_item(item: document.LayerPixels) -> dict:
    out = {"layer": item.layer}
    if item.selection is not None:
        out["selection"] = item.selection
    return out


def apply_steps(app, krita_module, doc, nodes, options: EditOptions, client, cache: SessionCache,
                on_status=None, on_run=None, log=None):
    """Generator for one Apply over ``nodes`` (one = single edit, several = batch); yields ms to wait.

    Reads pixels now (UI thread), runs the server work on a worker thread, then inserts one group per
    source. ``on_status(Status)`` is called at each poll; ``on_run(run)`` receives the EditRun (for cancel).
    Returns the list of ``(group, layer, mask)``; raises the run's error (ClientError, DocumentError...).
    """
    if not nodes:
        raise document.DocumentError("No layer selected. Select the layer with the face first.")
    items = [document.read_layer(doc, n, use_selection=options.use_selection, convert=False) for n in nodes]
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
    added = []
    for item, pixels in zip(items, run.results):
        result = yield from layers.insert_result(app, krita_module, doc, item.node, item.rect, pixels,
                                                 item.selection_bytes, options.edits, log=log)
        added.append(result)
    return added


def drive_blocking(gen, sleep=time.sleep):
    """Run a step generator to completion outside Qt (tests, scripts): sleeps the yielded ms."""
    try:
        while True:
            sleep(next(gen) / 1000.0)
    except StopIteration as stop:
        return stop.value
