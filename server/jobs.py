"""The job manager: a bounded queue, worker threads for inversions, progress, cancel, retry, long-poll waits.

One worker thread by default (the local backend).  An engine with a ``parallel_jobs`` attribute (the Ray
backend, :mod:`server.ray_backend`) gets that many threads, each running one job at a time on the engine,
and its ``close()`` is called when the manager stops.

Cancellation sets a ``threading.Event`` that the engine checks between steps (the progress callback checks it
too).  A per-job timeout sets the same event and the job ends ``failed`` with error ``timeout``.  Renders do
not go through here: :class:`server.render.Renderer` runs them on their own thread, so a finished session
answers in one generator forward even while a minutes-long inversion is running.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import shutil
import threading
import time
from typing import Callable, Optional

import numpy as np

from core.common import Cancelled, LatentEditError
from server import protocol
from server.job import RETRYABLE, TERMINAL, Job, JobConflict, QueueFull, new_id
from server.live import LiveSessions
from server.storage import Retention, Storage, dir_size
from server.thumbs import png_thumbnail

log = logging.getLogger("server.jobs")

EVENT_INTERVAL_S = 0.1  # at most ~10 visible progress changes per second per job (stage changes always count)
PERSIST_INTERVAL_S = 1.0  # progress is written to SQLite at most once a second
PREVIEW_INTERVAL_S = 0.5
MAX_JOBS_IN_MEMORY = 2000  # older finished jobs are served from SQLite (without their last preview)


class JobManager:
    """Owns the queue and the worker thread; everything the routes need about jobs goes through here."""

    def __init__(self, storage: Storage, engine, live: LiveSessions, *, max_queue: int = 16,
                 default_timeout_s: float = 3600.0, cache_max_bytes: int = 2 << 30,
                 retention: Retention = Retention(), workers: Optional[int] = None):
        """``workers``: jobs run at once (default: the engine's ``parallel_jobs``, else 1)."""
        self.storage, self.engine, self.live = storage, engine, live
        self.workers = max(1, int(workers if workers is not None else getattr(engine, "parallel_jobs", 1)))
        self.max_queue, self.default_timeout_s, self.cache_max_bytes = max_queue, default_timeout_s, cache_max_bytes
        self.retention = retention
        self._jobs: dict = {}  # id -> Job, for every job this process has touched
        self._queue: "collections.deque[Job]" = collections.deque()
        self._reserved = 0
        self._running: dict = {}  # id -> Job under way, at most ``workers``
        self._cv = threading.Condition()
        self._stopping = False
        self._threads: list = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._waiters: dict = collections.defaultdict(set)  # job id -> {asyncio.Future} (long polls)
        self.interrupted_at_start = storage.mark_interrupted()
        if self.interrupted_at_start:
            log.warning("marked %d job(s) interrupted by the previous shutdown: %s", len(self.interrupted_at_start),
                        ", ".join(self.interrupted_at_start))
        orphans = storage.remove_orphans()
        if orphans:
            log.info("removed %d folder(s) left by unfinished requests or sessions", orphans)
        self._bound_disk()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, warm_model: Optional[str] = None) -> None:
        self._loop = loop
        for i in range(self.workers):  # the first one warms the engine up
            t = threading.Thread(target=self._worker, args=(warm_model, i == 0),
                                 name="latent-edit-worker" + (f"-{i}" if i else ""), daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            for job in self._running.values():
                job.cancel.set()
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    # --- queries ---------------------------------------------------------------------------------
    def counts(self) -> dict:
        with self._cv:
            return {"queued": len(self._queue), "running": len(self._running), "max_queued": self.max_queue}

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

    async def wait_change(self, job_id: str, after: int, timeout: float) -> Optional[Job]:
        """The job once its ``version`` exceeds ``after`` or it is finished, or after ``timeout`` s (long poll).
        Runs on the event loop; changes arrive from the worker thread through ``call_soon_threadsafe``."""
        job = self.get(job_id)
        if job is None or job.version > after or job.state in TERMINAL or timeout <= 0:
            return job
        fut = asyncio.get_running_loop().create_future()
        self._waiters[job_id].add(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    self._waiters.pop(job_id, None)
        return self.get(job_id)

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
            self.storage.save_inputs(
                job_id, [(it.layer.array, None if it.selection is None else it.selection.array) for it in req.items])
            for i, it in enumerate(req.items):  # a label map (options.segments) is an input too: saved first
                if getattr(it, "segments", None) is not None:
                    self.storage.save_segments(job_id, i, it.segments)
            try:
                self.storage.save_thumbnail(job_id, png_thumbnail(req.items[0].layer.array))
            except Exception as exc:  # a thumbnail is a nicety
                log.debug("no thumbnail for %s: %s", job_id, exc)
            job = Job(job_id, kind, params, session_ids, created=now)
            self.storage.insert_job(
                {"id": job_id, "kind": kind, "state": "queued", "params": params, "session_ids": session_ids,
                 "inputs_bytes": dir_size(self.storage.job_dir(job_id)), "created": now},
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
            self._prune_memory()
        log.info("queued %s job %s (%d item(s), model %s, method %s)", kind, job_id, len(req.items), model,
                 req.options["method"])
        self._emit(job)
        return job

    def _prune_memory(self) -> None:
        """Forget the oldest finished jobs beyond MAX_JOBS_IN_MEMORY (their rows stay in SQLite)."""
        excess = len(self._jobs) - MAX_JOBS_IN_MEMORY
        if excess <= 0:
            return
        for jid in [j.id for j in sorted(self._jobs.values(), key=lambda j: j.created) if j.state in TERMINAL][:excess]:
            if jid not in self._waiters:
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
        """Re-queue a failed, cancelled or interrupted job under the same id (its inputs were kept); only the
        items without a ready session run again."""
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
            fresh = Job(job.id, job.kind, job.params, job.session_ids, attempts=job.attempts, created=job.created,
                        version=job.version + 1)
            self._jobs[job_id] = fresh
            self.storage.update_job(job_id, state="queued", stage="", progress=0.0, message="retrying", error=None,
                                    error_message=None, started=None, finished=None)
            self.storage.update_sessions_of_job(job_id, ["failed", "cancelled", "interrupted"], state="pending")
            for sid in job.session_ids:
                self.live.drop(sid)
            fresh.message = "retrying"
            self._queue.append(fresh)
            self._cv.notify_all()
        self._emit(fresh)
        return fresh

    def drop_preview(self, job_id: str) -> None:
        """Forget the job's in-memory engine preview (a picture of the user's photo)."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is not None:
                job.preview_png = None

    def forget(self, job_ids) -> None:
        """Drop jobs removed by retention from memory."""
        with self._cv:
            for jid in job_ids:
                job = self._jobs.get(jid)
                if job is not None and job.state in TERMINAL:
                    del self._jobs[jid]

    # --- change notification ---------------------------------------------------------------------
    def _emit(self, job: Job, force: bool = False) -> None:
        now = time.monotonic()
        if not force and job.state == "running" and now - job._last_event < EVENT_INTERVAL_S:
            return
        job._last_event = now
        job.version += 1
        if self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._wake, job.id)
        except RuntimeError:  # loop shutting down
            pass

    def _wake(self, job_id: str) -> None:
        for fut in list(self._waiters.get(job_id, ())):
            if not fut.done():
                fut.set_result(None)

    # --- worker ----------------------------------------------------------------------------------
    def _worker(self, warm_model: Optional[str], warm: bool = True) -> None:
        try:
            if warm:
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
                self._running[job.id] = job
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
                    self._running.pop(job.id, None)

    def _execute(self, job: Job) -> None:
        timeout = job.params.get("timeout_s") or self.default_timeout_s
        timer = threading.Timer(timeout, self._on_timeout, args=(job,))
        timer.daemon = True
        timer.start()
        items = job.params["items"]
        model = job.params["model"]
        done_ids: list = []
        todo = set(self.storage.sessions_of_job(job.id, ["pending"]))
        try:
            inputs = self.storage.load_inputs(job.id, len(items))
            for i, ((layer, sel), sid) in enumerate(zip(inputs, job.session_ids)):
                if sid not in todo:  # a retry: this item's session is already ready
                    continue
                if job.cancel.is_set():
                    raise Cancelled("cancelled by the user")
                image = protocol.to_unit_float(layer)
                selection = None if sel is None else protocol.to_unit_float(sel)[..., 0]
                options = dict(job.params["options"])
                labels = self.storage.load_segments(job.id, i)
                if labels is not None:  # the item's label map (kept out of the JSON job record)
                    options["segments"] = labels
                session = self.engine.create(model, image, selection, options,
                                             self._progress_fn(job, i, len(items)), job.cancel)
                size = self.storage.save_session(sid, session.save)
                self.storage.update_session(sid, state="ready", size_bytes=size, last_used=time.time())
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
            self.storage.delete_inputs(job.id)  # the sessions hold what is needed now; the thumbnail stays
            outcome = ("done", None, "done")
        finally:
            timer.cancel()
        # bound the disk before announcing the end, so a client that saw the end sees the final disk state
        self._bound_disk(keep=done_ids, keep_jobs=(job.id,))
        self._finish(job, outcome[0], outcome[1], self.storage.relative(outcome[2]))

    def _bound_disk(self, keep=(), keep_jobs=()) -> None:
        """Retention (age and count of finished jobs, idle sessions), then the --cache-mb LRU bound."""
        evicted, removed = self.storage.apply_retention(self.retention, keep=keep, keep_jobs=keep_jobs)
        evicted += self.storage.evict(self.cache_max_bytes, keep=keep)
        for sid in evicted:
            self.live.drop(sid)
        if removed:
            self.forget(removed)
            log.info("retention: removed %d finished job(s) and their files", len(removed))

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
        """The engine's progress callback for item ``index`` of ``count``: takes a ``core.common.ProgressEvent``
        (stage, step, total, fraction, message, preview) or the positional ``(stage, fraction, message, preview)``."""
        def progress(event=None, fraction=None, message=None, preview=None, *_rest):
            if job.cancel.is_set():
                raise Cancelled("cancelled by the user")
            stage, step, total = event, None, None
            if hasattr(event, "fraction") and hasattr(event, "stage"):
                stage, step, total = event.stage, getattr(event, "step", None), getattr(event, "total", None)
                fraction, message, preview = event.fraction, getattr(event, "message", None), getattr(event, "preview", None)
            now = time.monotonic()
            changed = stage is not None and stage != job.stage
            if stage is not None:
                job.stage = str(stage)
            if step is not None and total is not None:
                job.step, job.total = int(step), int(total)
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
