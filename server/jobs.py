"""Jobs: a bounded queue, one worker thread for inversions, one render thread, progress fan-out, cancel.

States: ``queued -> running -> done | failed | cancelled``; jobs found queued/running at start-up are
``interrupted`` (re-runnable with :meth:`JobManager.retry`).  Cancellation sets a ``threading.Event``
that the engine checks between steps (the progress callback checks it too).  A per-job timeout sets the
same event and the job ends ``failed`` with error ``timeout``.

Renders do not queue behind inversions: they run on their own single thread (:class:`Renderer`) so a
finished session answers in one generator forward even while a minutes-long inversion is running.
"""
from __future__ import annotations

import asyncio
import collections
import io
import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from core.common import Cancelled, LatentEditError
from server import protocol
from server.storage import Storage, dir_size

log = logging.getLogger("server.jobs")

TERMINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
RETRYABLE = frozenset({"failed", "cancelled", "interrupted"})
EVENT_INTERVAL_S = 0.1  # at most ~10 progress events per second per job (stage changes always go out)
PERSIST_INTERVAL_S = 1.0  # progress is written to SQLite at most once a second
PREVIEW_INTERVAL_S = 0.5
MAX_JOBS_IN_MEMORY = 2000  # older finished jobs are served from SQLite (without their last preview)
THUMB_SIZE = 128


class QueueFull(Exception):
    pass


class JobConflict(Exception):
    """The job exists but is in a state that forbids the request (``status`` 409 or 410)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def new_id() -> str:
    return uuid.uuid4().hex


def png_thumbnail(pixels: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """``(H,W,C)`` uint8 / uint16 / float in [0,1] (C = 1, 3 or 4) -> PNG bytes at most ``size`` px."""
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C,H,W) previews
    if arr.ndim == 4:
        arr = arr[0]
    if arr.dtype != np.uint8:
        arr = protocol.to_unit_float(arr.astype(np.float32) if arr.dtype.kind == "f" else arr)
        arr = np.rint(arr * 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    img = Image.fromarray(arr)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Job:
    id: str
    kind: str  # "session" | "batch"
    params: dict  # {"model", "options", "timeout_s", "items": [{"width", "height", "x", "y", "format", "name", "selection"}]}
    session_ids: list
    state: str = "queued"
    stage: str = ""
    progress: float = 0.0
    message: str = ""
    error: Optional[str] = None
    error_message: Optional[str] = None
    attempts: int = 0
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    preview_png: Optional[bytes] = None
    preview_seq: int = 0
    _last_event: float = 0.0
    _last_persist: float = 0.0
    _last_preview: float = 0.0

    @classmethod
    def from_row(cls, row: dict) -> "Job":
        keys = ("id", "kind", "params", "session_ids", "state", "stage", "progress", "message", "error",
                "error_message", "attempts", "created", "started", "finished")
        return cls(**{k: row[k] for k in keys})

    def public(self, queue_position: Optional[int] = None) -> dict:
        return {
            "job_id": self.id, "kind": self.kind, "state": self.state, "stage": self.stage,
            "progress": round(float(self.progress), 4), "message": self.message,
            "error": None if self.error is None else {"error": self.error, "message": self.error_message},
            "session_ids": list(self.session_ids), "attempts": self.attempts,
            "created": self.created, "started": self.started, "finished": self.finished,
            "cancel_requested": self.cancel.is_set() and self.state == "running",
            "queue_position": queue_position, "preview_seq": self.preview_seq,
        }


class LiveSessions:
    """In-memory LRU of loaded EditSession objects (they may hold a tuned generator each)."""

    def __init__(self, max_items: int):
        self.max_items = max(1, max_items)
        self._items: "collections.OrderedDict[str, object]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, sid: str, session) -> None:
        with self._lock:
            self._items[sid] = session
            self._items.move_to_end(sid)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, sid: str):
        with self._lock:
            s = self._items.get(sid)
            if s is not None:
                self._items.move_to_end(sid)
            return s

    def drop(self, sid: str) -> None:
        with self._lock:
            self._items.pop(sid, None)


class JobManager:
    """Owns the queue and the worker thread; everything the routes need about jobs goes through here."""

    def __init__(self, storage: Storage, engine, live: LiveSessions, *, max_queue: int = 16,
                 default_timeout_s: float = 3600.0, cache_max_bytes: int = 2 << 30):
        self.storage, self.engine, self.live = storage, engine, live
        self.max_queue, self.default_timeout_s, self.cache_max_bytes = max_queue, default_timeout_s, cache_max_bytes
        self._jobs: dict = {}  # id -> Job, for every job this process has touched
        self._queue: "collections.deque[Job]" = collections.deque()
        self._reserved = 0
        self._running: Optional[Job] = None
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._subs: dict = collections.defaultdict(set)  # job id -> {asyncio.Queue}
        self.interrupted_at_start = storage.mark_interrupted()
        if self.interrupted_at_start:
            log.warning("marked %d job(s) interrupted by the previous shutdown: %s", len(self.interrupted_at_start),
                        ", ".join(self.interrupted_at_start))
        orphans = storage.remove_orphans()
        if orphans:
            log.info("removed %d folder(s) left by unfinished requests or sessions", orphans)
        storage.evict(cache_max_bytes)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, warm_model: Optional[str] = None) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._worker, args=(warm_model,), name="latent-edit-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            if self._running is not None:
                self._running.cancel.set()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- queries ---------------------------------------------------------------------------------
    def counts(self) -> dict:
        with self._cv:
            return {"queued": len(self._queue), "running": 0 if self._running is None else 1, "max_queued": self.max_queue}

    def get(self, job_id: str) -> Optional[Job]:
        with self._cv:
            job = self._jobs.get(job_id)
        if job is not None:
            return job
        row = self.storage.get_job(job_id)
        return Job.from_row(row) if row else None

    def public(self, job: Job) -> dict:
        with self._cv:
            pos = next((i for i, j in enumerate(self._queue) if j.id == job.id), None)
        return job.public(queue_position=pos)

    def list_public(self, limit: int = 100) -> list:
        out = []
        for row in self.storage.list_jobs(limit):
            job = self._jobs.get(row["id"]) or Job.from_row(row)
            out.append(self.public(job))
        return out

    # --- submission ------------------------------------------------------------------------------
    def reserve(self) -> None:
        """Claim a queue slot before writing inputs (raises QueueFull)."""
        with self._cv:
            if len(self._queue) + self._reserved >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); try again later")
            self._reserved += 1

    def release(self) -> None:
        with self._cv:
            self._reserved -= 1

    def submit(self, kind: str, model: str, req: "protocol.SessionRequest") -> Job:
        """Save inputs, record the job and its sessions, enqueue.  Call after :meth:`reserve` (blocking I/O)."""
        job_id, now = new_id(), time.time()
        session_ids = [new_id() for _ in req.items]
        items_meta = [{"width": it.layer.width, "height": it.layer.height, "x": it.layer.x, "y": it.layer.y,
                       "format": it.layer.format, "name": it.layer.name, "selection": it.selection is not None}
                      for it in req.items]
        params = {"model": model, "options": req.options, "timeout_s": req.timeout_s, "items": items_meta}
        try:
            inputs_bytes = self.storage.save_inputs(
                job_id, [(it.layer.array, None if it.selection is None else it.selection.array) for it in req.items])
            try:
                thumb = png_thumbnail(req.items[0].layer.array)
                (self.storage.job_dir(job_id) / "thumb.png").write_bytes(thumb)
            except Exception as exc:  # a thumbnail is a nicety
                log.debug("no thumbnail for %s: %s", job_id, exc)
            job = Job(job_id, kind, params, session_ids, created=now)
            self.storage.insert_job(
                {"id": job_id, "kind": kind, "state": "queued", "params": params, "session_ids": session_ids,
                 "inputs_bytes": inputs_bytes, "created": now},
                [{"id": sid, "job_id": job_id, "item": i, "state": "pending", "model": model,
                  "method": req.options["method"], "width": m["width"], "height": m["height"], "x": m["x"],
                  "y": m["y"], "format": m["format"], "name": m["name"], "created": now, "last_used": now}
                 for i, (sid, m) in enumerate(zip(session_ids, items_meta))])
        except BaseException:
            shutil.rmtree(self.storage.job_dir(job_id), ignore_errors=True)
            self.release()
            raise
        with self._cv:
            self._reserved -= 1
            self._jobs[job_id] = job
            self._queue.append(job)
            self._cv.notify_all()
            self._prune()
        log.info("queued %s job %s (%d item(s), model %s, method %s)", kind, job_id, len(req.items), model,
                 req.options["method"])
        self._emit(job)
        return job

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond MAX_JOBS_IN_MEMORY (their rows stay in SQLite)."""
        excess = len(self._jobs) - MAX_JOBS_IN_MEMORY
        if excess <= 0:
            return
        for jid in [j.id for j in sorted(self._jobs.values(), key=lambda j: j.created) if j.state in TERMINAL][:excess]:
            if jid not in self._subs:
                del self._jobs[jid]

    def cancel(self, job_id: str) -> Optional[Job]:
        """Cancel a queued job now, or ask a running one to stop at its next step.  Idempotent."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None:
                return self.get(job_id)
            if job.state == "queued":
                self._queue.remove(job)
                job.cancel.set()
                self._finish(job, "cancelled", message="cancelled before it started")
                return job
            if job.state == "running":
                job.cancel.set()
                job.message = "cancelling"
                log.info("cancel requested for running job %s", job_id)
        self._emit(job, force=True)
        return job

    def retry(self, job_id: str) -> Job:
        """Re-queue a failed, cancelled or interrupted job under the same id (its inputs were kept)."""
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state not in RETRYABLE:
            raise JobConflict(409, "not_retryable", f"job {job_id} is {job.state}; only failed, cancelled or "
                                                    "interrupted jobs can be retried")
        if not self.storage.has_inputs(job_id):
            raise JobConflict(410, "inputs_evicted", f"the inputs of job {job_id} were evicted from the cache; "
                                                     "submit the layer again")
        self.reserve()
        with self._cv:
            self._reserved -= 1
            fresh = Job(job.id, job.kind, job.params, job.session_ids, attempts=job.attempts, created=job.created)
            self._jobs[job_id] = fresh
            self.storage.update_job(job_id, state="queued", stage="", progress=0.0, message="retrying", error=None,
                                    error_message=None, started=None, finished=None)
            self.storage.update_sessions_of_job(job_id, ["failed", "cancelled", "interrupted"], state="pending")
            fresh.message = "retrying"
            self._queue.append(fresh)
            self._cv.notify_all()
        self._emit(fresh)
        return fresh

    # --- events ----------------------------------------------------------------------------------
    def subscribe(self, job_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=64)
        self._subs[job_id].add(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self._subs.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                self._subs.pop(job_id, None)

    def _emit(self, job: Job, force: bool = False) -> None:
        now = time.monotonic()
        if not force and job.state == "running" and now - job._last_event < EVENT_INTERVAL_S:
            return
        job._last_event = now
        if self._loop is None or self._loop.is_closed():
            return
        snapshot = self.public(job)
        try:
            self._loop.call_soon_threadsafe(self._fanout, job.id, snapshot)
        except RuntimeError:  # loop shutting down
            pass

    def _fanout(self, job_id: str, snapshot: dict) -> None:
        for q in list(self._subs.get(job_id, ())):
            if q.full():
                try:
                    q.get_nowait()  # drop the oldest progress; the newest state matters
                except asyncio.QueueEmpty:
                    pass
            q.put_nowait(snapshot)

    # --- worker ----------------------------------------------------------------------------------
    def _worker(self, warm_model: Optional[str]) -> None:
        try:
            self.engine.warm_up(warm_model)
        except Exception:
            log.exception("warm-up failed")
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running = job
                job.state, job.started, job.attempts = "running", time.time(), job.attempts + 1
                job.stage, job.message = "starting", ""
            self.storage.update_job(job.id, state="running", started=job.started, attempts=job.attempts, stage="starting")
            self._emit(job, force=True)
            try:
                self._execute(job)
            except Exception:  # _execute handles everything; this is a last resort
                log.exception("worker: unexpected error in job %s", job.id)
                self._finish(job, "failed", "internal", "internal error; see the server log")
            finally:
                with self._cv:
                    self._running = None

    def _execute(self, job: Job) -> None:
        timeout = job.params.get("timeout_s") or self.default_timeout_s
        timer = threading.Timer(timeout, self._on_timeout, args=(job,))
        timer.daemon = True
        timer.start()
        items = job.params["items"]
        model = job.params["model"]
        done_ids: list = []
        try:
            inputs = self.storage.load_inputs(job.id, len(items))
            for i, ((layer, sel), sid) in enumerate(zip(inputs, job.session_ids)):
                if job.cancel.is_set():
                    raise Cancelled("cancelled by the user")
                image = protocol.to_unit_float(layer)
                selection = None if sel is None else protocol.to_unit_float(sel)[..., 0]
                session = self.engine.create(model, image, selection, dict(job.params["options"]),
                                             self._progress_fn(job, i, len(items)), job.cancel)
                d = self.storage.session_dir(sid)
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                session.save(d)
                now = time.time()
                self.storage.update_session(sid, state="ready", size_bytes=dir_size(d), last_used=now)
                self.live.put(sid, session)
                done_ids.append(sid)
        except Cancelled:
            if self._stopping:
                outcome = ("interrupted", None, "the server shut down while this job ran; POST /v1/jobs/{id}/retry")
            elif job.timed_out:
                outcome = ("failed", "timeout", f"the job ran longer than its {timeout:g} s limit")
            else:
                outcome = ("cancelled", None, "cancelled")
        except LatentEditError as exc:
            log.info("job %s failed: %s: %s", job.id, exc.__class__.__name__, exc)
            outcome = ("failed", getattr(exc, "code", "error"), str(exc) or exc.__class__.__name__)
        except MemoryError:
            log.exception("job %s ran out of memory", job.id)
            outcome = ("failed", "out_of_memory", "out of memory; try a smaller layer or fewer steps")
        except Exception as exc:
            log.exception("job %s crashed", job.id)
            outcome = ("failed", "internal", f"internal error ({exc.__class__.__name__}); see the server log")
        else:
            self.storage.delete_inputs(job.id)
            outcome = ("done", None, "done")
        finally:
            timer.cancel()
        # bound the cache before announcing the end, so a client that saw "end" sees the final disk state
        for sid in self.storage.evict(self.cache_max_bytes, keep=done_ids):
            self.live.drop(sid)
        self._finish(job, outcome[0], outcome[1], outcome[2])

    def _on_timeout(self, job: Job) -> None:
        if job.state == "running":
            log.warning("job %s timed out; cancelling", job.id)
            job.timed_out = True
            job.cancel.set()

    def _finish(self, job: Job, state: str, error: Optional[str] = None, message: str = "") -> None:
        job.state, job.finished = state, time.time()
        job.error, job.error_message = error, (message if error else None)
        job.message = message
        if state == "done":
            job.progress = 1.0
        self.storage.update_job(job.id, state=state, finished=job.finished, error=error, error_message=job.error_message,
                                message=message, progress=job.progress, stage=job.stage)
        session_state = {"done": "failed", "failed": "failed", "cancelled": "cancelled"}.get(state, state)
        self.storage.update_sessions_of_job(job.id, ["pending"], state=session_state)
        log.info("job %s %s%s", job.id, state, f" ({error}: {message})" if error else "")
        self._emit(job, force=True)

    def _progress_fn(self, job: Job, index: int, count: int) -> Callable:
        def progress(stage=None, fraction=None, message=None, preview=None, *_rest):
            if job.cancel.is_set():
                raise Cancelled("cancelled by the user")
            now = time.monotonic()
            changed = stage is not None and stage != job.stage
            if stage is not None:
                job.stage = str(stage)
            if fraction is not None:
                f = min(max(float(fraction), 0.0), 1.0) if fraction == fraction else 0.0
                job.progress = (index + f) / count
            if message is not None:
                job.message = str(message)[:500]
            if preview is not None and now - job._last_preview >= PREVIEW_INTERVAL_S:
                try:
                    job.preview_png = png_thumbnail(np.asarray(preview))
                    job.preview_seq += 1
                    job._last_preview = now
                except Exception as exc:
                    log.debug("bad preview from the engine: %s", exc)
            if now - job._last_persist >= PERSIST_INTERVAL_S or changed:
                job._last_persist = now
                self.storage.update_job(job.id, stage=job.stage, progress=job.progress, message=job.message)
            self._emit(job, force=changed)

        return progress


class Renderer:
    """Renders edits of finished sessions on a dedicated thread (never behind a queued inversion)."""

    def __init__(self, storage: Storage, engine, live: LiveSessions):
        self.storage, self.engine, self.live = storage, engine, live
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-edit-render")

    def session(self, row: dict):
        s = self.live.get(row["id"])
        if s is None:
            d = self.storage.session_dir(row["id"])
            if not d.is_dir():
                raise FileNotFoundError(d)
            s = self.engine.load(d, row["model"])
            self.live.put(row["id"], s)
        return s

    def render(self, row: dict, req: "protocol.RenderRequest") -> dict:
        """Blocking: one generator forward + compositing, encoded for the wire."""
        t0 = time.perf_counter()
        session = self.session(row)
        extra = {} if req.color_match is None else {"color_match": req.color_match}
        out = np.asarray(session.render(edits=req.edits, feather=req.feather, blend=req.blend, **extra))
        if out.shape != (row["height"], row["width"], 4):
            raise RuntimeError(f"engine returned {out.shape}, expected {(row['height'], row['width'], 4)}")
        layer = protocol.encode_layer(out, req.format or row["format"], row["x"], row["y"], row["name"])
        self.storage.update_session(row["id"], last_used=time.time())
        return {"session_id": row["id"], "layer": layer, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
