"""The Ray backend (``python -m server --backend ray --ray-address ADDRESS``): inversions and renders on a Ray cluster.

The aiohttp server stays the only thing the plugins talk to; this module is an *engine* (the contract of
:class:`server.engine.Engine`) whose ``create`` and ``load`` run on Ray actors instead of in-process:

- :class:`SessionWorker` is the actor body: one per worker slot (``num_gpus=1`` where the cluster has GPUs,
  else ``num_cpus=threads``), spread over the nodes, each building the same engine as the server (the core
  engine over the models folder, or the ``--engine`` test factory) and holding its live sessions in an LRU.
  It is a threaded actor: progress polls, cancels and renders answer while an inversion runs.
- :class:`WorkerPool` (server side) keeps the actors, hands each job an idle one, replaces lost ones
  (Ray: ``max_restarts=0``; a replacement waits for resources like any actor) and places sessions.
- :meth:`RayEngine.create` runs one inversion on a pooled actor and relays its progress events (drained by
  an actor method every ``POLL_S``) to the job's callback; a cancel is sent the moment the job's event is
  set.  The finished session's files come back with the result, so the server's storage holds every
  finished result even if the node dies a moment later.  A worker lost mid-job (node gone, process
  killed) means the job re-runs from its inputs on another worker, at most ``retries`` times; then it fails
  with ``worker_lost`` (retryable with ``POST /v1/jobs/{id}/retry``).
- :class:`RemoteSession` is what the server's live-session cache holds: renders go to the actor that has the
  tuned generator in memory; when that actor is gone the session is loaded from the server's storage onto
  another one and the render answered there.

Ray is optional (``python3 install.py --with ray``): nothing here imports it until a RayEngine is made, and
:func:`require_ray` turns its absence into one clear sentence.
"""
from __future__ import annotations

import collections
import importlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from core.common import Cancelled, LatentEditError
from server.job import new_id

log = logging.getLogger("server.ray")

POLL_S = 0.1  # how often a running job's progress events are fetched from its actor (and the longest wait for its end)
RPC_TIMEOUT_S = 60.0  # an actor that does not answer a progress poll or a load within this is treated as lost
DEFAULT_WAIT_S = 120.0  # how long a job waits for any worker to exist (all lost, replacements pending) before failing
DEFAULT_RETRIES = 2  # re-runs of a job whose worker was lost mid-job
ACTOR_CONCURRENCY = 8  # threads per actor: one inversion + progress polls, cancels and renders beside it
EVENTS_KEPT = 64  # progress events an actor buffers between two polls (oldest dropped first)
INSTALL_HINT = "python3 install.py --with ray"


class BackendUnavailable(LatentEditError):
    """The Ray backend cannot start (Ray not installed, cluster unreachable)."""
    code = "backend_unavailable"


class WorkerLost(LatentEditError):
    """The Ray worker running a job or holding a session is gone (its node died or its process was killed)."""
    code = "worker_lost"


class SessionNotLoaded(LookupError):
    """Raised by an actor asked to render a session it does not hold (evicted from its LRU)."""


def check_reachable(address: Optional[str], timeout: float = 5.0) -> None:
    """BackendUnavailable when nothing listens at ``HOST:PORT`` (``ray.init`` would wait on it for minutes);
    ``None``/``"auto"`` and other forms are left to Ray."""
    import socket

    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or address in (None, "auto"):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BackendUnavailable(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                                 f"`ray start --head` (docs/scaleout.md) or pass its address with --ray-address") from None


def require_ray():
    """The ``ray`` module, or BackendUnavailable saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(f"--backend ray needs the ray package, which is not installed ({exc}); "
                                 f"install it with `{INSTALL_HINT}`") from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """How each actor builds its engine: the core engine over ``models_dir`` (the same path on every node, or a
    shared folder), or ``factory`` ``"MODULE:FUNCTION"`` (tests) called with a namespace of ``models_dir``,
    ``device`` and ``factory_config``."""
    models_dir: Optional[str] = None
    factory: Optional[str] = None
    factory_config: dict = field(default_factory=dict)
    threads: int = 1  # torch threads per actor (and CPUs it asks Ray for on a CPU-only cluster)
    max_sessions: int = 4  # live sessions an actor keeps in memory (LRU); others reload from the server's storage


def build_engine(spec: WorkerSpec, device: str):
    if spec.factory:
        module, _, name = spec.factory.partition(":")
        config = SimpleNamespace(models_dir=spec.models_dir, device=device, **spec.factory_config)
        return getattr(importlib.import_module(module), name)(config)
    from server.engine import Engine
    return Engine.from_core(Path(spec.models_dir) if spec.models_dir else None, device)


def read_tree(directory: Path) -> dict:
    """``{relative path: bytes}`` of every file below ``directory`` (a saved session)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_tree(directory: Path, files: dict) -> None:
    """Write :func:`read_tree`'s mapping below ``directory``; refuses names that would leave it."""
    root = Path(directory).resolve()
    for name, data in files.items():
        path = (root / name).resolve()
        if root not in path.parents:
            raise ValueError(f"session file name {name!r} leaves its folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# the actor (runs on a Ray worker)
# ------------------------------------------------------------------------------------------------

class _Run:
    def __init__(self):
        self.events: collections.deque = collections.deque(maxlen=EVENTS_KEPT)
        self.cancel = threading.Event()


class SessionWorker:
    """Actor body: runs inversions (one at a time, the pool sees to it) and holds live sessions by key."""

    def __init__(self, spec: WorkerSpec, device: str):
        self.spec, self.device = spec, device
        self.engine = build_engine(spec, device)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, spec.threads))
        self._sessions: "collections.OrderedDict[str, object]" = collections.OrderedDict()
        self._runs: "collections.OrderedDict[str, _Run]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def ready(self) -> dict:
        import ray
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "device": self.device}

    def warm_up(self, model: Optional[str]) -> str:
        self.engine.warm_up(model)
        return self.engine.backbone()

    def _run(self, key: str) -> _Run:
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                run = self._runs[key] = _Run()
                while len(self._runs) > 4 * ACTOR_CONCURRENCY:  # cancels that arrived after their run ended
                    self._runs.popitem(last=False)
            return run

    def _keep(self, key: str, session) -> None:
        with self._lock:
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            while len(self._sessions) > max(1, self.spec.max_sessions):
                self._sessions.popitem(last=False)

    def invert(self, key: str, model: str, image: np.ndarray, selection, options: dict) -> dict:
        """Run ``engine.create``; progress events wait in a buffer for :meth:`events`.  Returns the saved files."""
        run = self._run(key)

        def progress(*args, **kwargs):
            if run.cancel.is_set():
                raise Cancelled("cancelled by the user")
            run.events.append((args, kwargs))

        session = self.engine.create(model, image, selection, options, progress, run.cancel)
        tmp = Path(tempfile.mkdtemp(prefix="latent-edit-session-"))
        try:
            session.save(tmp)
            files = read_tree(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._keep(key, session)
        return {"files": files}

    def events(self, key: str, final: bool = False) -> list:
        """The progress events buffered since the last call (``final``: and forget the run)."""
        with self._lock:
            run = self._runs.pop(key, None) if final else self._runs.get(key)
        if run is None:
            return []
        out = []
        while run.events:
            out.append(run.events.popleft())
        return out

    def cancel(self, key: str) -> None:
        self._run(key).cancel.set()

    def load(self, key: str, model: str, files: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="latent-edit-session-"))
        try:
            write_tree(tmp, files)
            session = self.engine.load(tmp, model)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._keep(key, session)

    def _session(self, key: str):
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
        if session is None:
            raise SessionNotLoaded(key)
        return session

    def describe(self, key: str, name: str) -> tuple:
        """What attribute ``name`` of the session is: ``("missing", None)``, ``("method", [(parameter name,
        kind, has default), ...])`` or ``("value", value)``."""
        session = self._session(key)
        if not hasattr(session, name):
            return "missing", None
        value = getattr(session, name)
        if not callable(value):
            return "value", value
        try:
            params = [(q.name, int(q.kind), q.default is not q.empty) for q in inspect.signature(value).parameters.values()]
        except (TypeError, ValueError):
            params = None
        return "method", params

    def call(self, key: str, spec: tuple):
        """``session.NAME(*args, **kwargs)`` for ``spec = (NAME, args, kwargs)`` (renders: one generator forward)."""
        name, args, kwargs = spec
        return getattr(self._session(key), name)(*args, **kwargs)

    def drop(self, key: str) -> None:
        with self._lock:
            self._sessions.pop(key, None)


# ------------------------------------------------------------------------------------------------
# server side
# ------------------------------------------------------------------------------------------------

def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside the actor for a Ray task error, else ``exc``."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


@dataclass(eq=False)
class Worker:
    actor: object
    ready_ref: object
    info: Optional[dict] = None  # node_id, pid, device once the actor is up
    alive: bool = True
    busy: bool = False
    sessions: int = 0  # sessions placed on it by this server (for choosing where to load one)

    @property
    def node_id(self) -> Optional[str]:
        return None if self.info is None else self.info["node_id"]


class WorkerPool:
    """The actors of one server; thread-safe."""

    def __init__(self, ray, spec: WorkerSpec, count: int, gpu: bool, wait_s: float = DEFAULT_WAIT_S):
        self.ray, self.spec, self.count, self.gpu, self.wait_s = ray, spec, max(1, count), gpu, wait_s
        self.device = "cuda" if gpu else "cpu"
        self.workers: list = []
        self.errors: list = []  # why actors failed to start
        self.lost_count = 0
        self._cv = threading.Condition()
        self._started = False
        self._closed = False
        resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": max(1, spec.threads)}
        self._actor_class = ray.remote(SessionWorker).options(  # max_restarts=0: this pool replaces lost actors
            max_restarts=0, max_concurrency=ACTOR_CONCURRENCY, scheduling_strategy="SPREAD", **resources)

    def _spawn(self) -> Worker:
        actor = self._actor_class.remote(self.spec, self.device)
        w = Worker(actor, actor.ready.remote())
        self.workers.append(w)
        return w

    def start(self) -> None:
        with self._cv:
            if not self._started:
                self._started = True
                for _ in range(self.count):
                    self._spawn()

    def _pending(self) -> list:
        return [w for w in self.workers if w.alive and w.info is None]

    def _refresh(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for pending actors to come up (or fail); call without the lock."""
        with self._cv:
            pending = self._pending()
        if not pending:
            return
        done, _ = self.ray.wait([w.ready_ref for w in pending], num_returns=len(pending), timeout=timeout)
        done = set(done)
        with self._cv:
            for w in pending:
                if w.ready_ref not in done or not w.alive:
                    continue
                try:
                    w.info = self.ray.get(w.ready_ref)
                    log.info("ray worker up on node %s (pid %s, %s)", w.info["node_id"][:12], w.info["pid"], w.info["device"])
                except Exception as exc:  # the actor could not start: say why, do not respawn it
                    w.alive = False
                    why = str(_cause(exc)).strip().splitlines()[-1:] or [exc.__class__.__name__]
                    self.errors.append(why[0][:300])
                    log.error("ray worker failed to start: %s", why[0][:300])
            self._cv.notify_all()

    def wait_ready(self, timeout: float) -> int:
        """Start the actors and wait up to ``timeout`` s for all of them to be up (or failed); the number up."""
        self.start()
        self._refresh(timeout)
        with self._cv:
            return len(self._usable())

    def _usable(self) -> list:
        return [w for w in self.workers if w.alive and w.info is not None]

    def _wait_for(self, pick, cancel) -> Worker:
        """Block until ``pick()`` (called under the lock) returns a worker; raise WorkerLost when none can come."""
        deadline = time.monotonic() + self.wait_s
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled by the user")
            with self._cv:
                if self._closed:
                    raise WorkerLost("the Ray backend is shutting down")
                w = pick()
                if w is not None:
                    return w
                usable, pending = self._usable(), self._pending()
                if usable:  # all busy: one will be released
                    deadline = time.monotonic() + self.wait_s
                    self._cv.wait(POLL_S)
                    continue
                if not pending:
                    why = f" ({'; '.join(self.errors[-3:])})" if self.errors else ""
                    raise WorkerLost("no Ray worker is left to run this" + why)
                if time.monotonic() > deadline:
                    raise WorkerLost(f"no Ray worker came up within {self.wait_s:g} s (are the cluster's nodes up "
                                     "and is a CPU/GPU free for one?)")
            self._refresh(POLL_S)

    def acquire(self, cancel=None) -> Worker:
        """An idle worker, marked busy (one inversion per actor at a time)."""
        self.start()
        self._refresh(0)

        def pick():
            idle = [w for w in self._usable() if not w.busy]
            if idle:
                idle[0].busy = True
                return idle[0]
            return None
        return self._wait_for(pick, cancel)

    def for_session(self, avoid: Optional[Worker] = None) -> Worker:
        """The worker that should hold a session being loaded: idle first, then fewest sessions."""
        self.start()
        self._refresh(0)

        def pick():
            ok = [w for w in self._usable() if w is not avoid] or self._usable()
            return min(ok, key=lambda w: (w.busy, w.sessions)) if ok else None
        w = self._wait_for(pick, None)
        with self._cv:
            w.sessions += 1
        return w

    def release(self, w: Worker) -> None:
        with self._cv:
            w.busy = False
            self._cv.notify_all()

    def lost(self, w: Worker, why: str = "") -> None:
        """Forget a dead worker and ask Ray for a replacement (placed wherever resources allow)."""
        with self._cv:
            if not w.alive:
                return
            w.alive, w.busy = False, False
            self.lost_count += 1
            log.warning("ray worker on node %s lost%s; starting a replacement", (w.node_id or "?")[:12],
                        f": {why}" if why else "")
            try:
                self.ray.kill(w.actor, no_restart=True)
            except Exception:
                pass
            if not self._closed:
                self._spawn()
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            workers, self.workers = self.workers, []
            self._cv.notify_all()
        for w in workers:
            try:
                self.ray.kill(w.actor, no_restart=True)
            except Exception:
                pass


class RemoteMethod:
    """A method of a session on an actor; ``inspect.signature`` sees the real method's parameters."""

    def __init__(self, session: "RemoteSession", name: str, params):
        self._session, self._name = session, name
        if params is not None:
            self.__signature__ = inspect.Signature([
                inspect.Parameter(n, inspect._ParameterKind(k), default=None if d else inspect.Parameter.empty)
                for n, k, d in params])

    def __call__(self, *args, **kwargs):
        return self._session._call("call", (self._name, args, kwargs))


class RemoteSession:
    """A finished session held by an actor, with the session contract: ``render(...)`` and every other public
    attribute (``segment_masks``, ``segment_info()``...) are looked up on the actor holding it (values fetched
    once, methods called there); ``save`` writes its files on the server."""

    def __init__(self, engine: "RayEngine", model: str, worker: Optional[Worker], key: str,
                 files: Optional[dict] = None, directory: Optional[Path] = None):
        self.engine, self.model, self.worker, self.key = engine, model, worker, key
        self._files, self.directory = files, directory
        self._lock = threading.Lock()

    @property
    def node_id(self) -> Optional[str]:
        """The Ray node holding the session now (None until placed)."""
        w = self.worker
        return w.node_id if w is not None and w.alive else None

    def save(self, directory) -> None:
        """Write the session's files (they came back with the job's result) into ``directory``."""
        with self._lock:
            write_tree(Path(directory), self._files or {})
            self.directory, self._files = Path(directory), None

    def _files_now(self) -> dict:
        if self._files is not None:
            return self._files
        if self.directory is None or not self.directory.is_dir():
            raise FileNotFoundError(self.directory)
        return read_tree(self.directory)

    def place(self, avoid: Optional[Worker] = None) -> Worker:
        """Load the session onto a live worker (from its saved files) and return it."""
        ray, pool = self.engine.ray, self.engine.pool
        files = self._files_now()
        for _ in range(self.engine.retries + 1):
            w = pool.for_session(avoid)
            key = new_id()
            try:
                ray.get(w.actor.load.remote(key, self.model, files), timeout=RPC_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                pool.lost(w, exc.__class__.__name__)
                continue
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            self.worker, self.key = w, key
            return w
        raise WorkerLost("the Ray workers kept failing while loading this session")

    def __del__(self):
        """Forgotten by the server (evicted, deleted): the actor drops its copy of the photo's session too."""
        try:
            if self.worker is not None and self.worker.alive and self.key:
                self.worker.actor.drop.remote(self.key)
        except Exception:  # interpreter or Ray shutting down
            pass

    def __getattr__(self, name: str):
        if name.startswith("_") or "engine" not in self.__dict__:
            raise AttributeError(name)
        kind, payload = self._call("describe", name)
        if kind == "missing":
            raise AttributeError(name)
        value = RemoteMethod(self, name, payload) if kind == "method" else payload
        self.__dict__[name] = value  # a session's attributes do not change: ask once
        return value

    def _call(self, method: str, arg):
        ray = self.engine.ray
        with self._lock:
            for _ in range(self.engine.retries + 2):
                w = self.worker
                if w is None or not w.alive:
                    w = self.place(avoid=w)
                try:
                    return ray.get(getattr(w.actor, method).remote(self.key, arg), timeout=RPC_TIMEOUT_S)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                    self.engine.pool.lost(w, exc.__class__.__name__)  # the next pass loads it elsewhere
                except ray.exceptions.RayTaskError as exc:
                    cause = _cause(exc)
                    if not isinstance(cause, SessionNotLoaded):
                        raise cause from None
                    self.worker = None  # evicted from the actor's LRU: load it again
            raise WorkerLost("the Ray workers kept failing while rendering this session")


class RayEngine:
    """The engine contract over a Ray cluster.  ``local`` is a server-side engine that describes the models
    (listing, directions, method checks: every attribute not defined here is ``local``'s); inversions and
    renders run on ``workers`` actors."""

    def __init__(self, local, spec: WorkerSpec, address: Optional[str], workers: Optional[int] = None,
                 retries: int = DEFAULT_RETRIES, wait_s: float = DEFAULT_WAIT_S, gpu: Optional[bool] = None):
        ray = require_ray()
        if not ray.is_initialized():
            check_reachable(address)
            try:
                ray.init(address=address, namespace="latent-edit", configure_logging=False, log_to_driver=False)
            except Exception as exc:  # ConnectionError, bad address...
                raise BackendUnavailable(f"cannot connect to the Ray cluster at {address or 'auto'}: {exc}") from None
        self.ray, self.local, self.retries = ray, local, max(0, retries)
        resources = ray.cluster_resources()
        if gpu is None:
            gpu = resources.get("GPU", 0) >= 1
        if workers is None:  # one per GPU, else one per `threads` CPUs
            workers = int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1) // max(1, spec.threads))
        self.parallel_jobs = max(1, workers)  # server.jobs.JobManager runs this many jobs at once
        self.pool = WorkerPool(ray, spec, self.parallel_jobs, gpu, wait_s)
        self.device = self.pool.device
        self.retried_jobs = 0  # jobs re-run after their worker was lost (observability and tests)
        self._backbone: Optional[str] = None
        log.info("ray backend: %d worker(s) on %s, cluster resources %s", self.parallel_jobs, self.device,
                 {k: v for k, v in resources.items() if k in ("CPU", "GPU")})

    # --- description: the server-side engine ---------------------------------------------------
    def __getattr__(self, name: str):  # models(), default_model(), direction_names(), method_refusal()...
        if name.startswith("_") or "local" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.local, name)

    def backbone(self) -> str:
        """The perceptual backbone the workers report (``"loading"`` until one has warmed up)."""
        return self._backbone or "loading"

    def warm_up(self, model: Optional[str]) -> None:
        """Start the actors and load ``model`` and the perceptual backbone on each (worker thread)."""
        self.pool.wait_ready(self.pool.wait_s)
        with self.pool._cv:
            usable = self.pool._usable()
        refs = [w.actor.warm_up.remote(model) for w in usable]
        for w, ref in zip(usable, refs):
            try:
                self._backbone = self._backbone or str(self.ray.get(ref, timeout=self.pool.wait_s))
            except Exception as exc:
                log.warning("warm-up on ray worker %s failed: %s", (w.node_id or "?")[:12], _cause(exc))

    # --- work ----------------------------------------------------------------------------------
    def create(self, model: str, image, selection, options: dict, progress, cancel) -> RemoteSession:
        """Run one inversion on a free worker (re-run elsewhere when it is lost); the contract of Engine.create."""
        for attempt in range(self.retries + 1):
            w = self.pool.acquire(cancel)
            try:
                return self._invert_on(w, model, image, selection, options, progress, cancel)
            except WorkerLost as exc:
                self.pool.lost(w, str(exc))
                if cancel is not None and cancel.is_set():  # cancelled or shutting down: not a worker failure
                    raise Cancelled("cancelled while its Ray worker was lost") from None
                if attempt == self.retries:
                    raise WorkerLost(f"the Ray worker running this job was lost {attempt + 1} time(s); "
                                     "POST /v1/jobs/{id}/retry to run it again") from None
                self.retried_jobs += 1
                progress("waiting", None, "a Ray worker was lost; running the job again on another", None)
            finally:
                self.pool.release(w)
        raise AssertionError("unreachable")

    def _invert_on(self, w: Worker, model, image, selection, options, progress, cancel) -> RemoteSession:
        ray, key = self.ray, new_id()
        ref = w.actor.invert.remote(key, model, image, selection, dict(options))
        cancel_sent = False

        def send_cancel():
            nonlocal cancel_sent
            if not cancel_sent:
                cancel_sent = True
                w.actor.cancel.remote(key)

        def relay(final: bool) -> None:
            try:
                events = ray.get(w.actor.events.remote(key, final), timeout=RPC_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                raise WorkerLost(f"{exc.__class__.__name__} while polling progress") from None
            for args, kwargs in events:
                try:
                    progress(*args, **kwargs)
                except Cancelled:
                    send_cancel()

        while True:
            timeout = POLL_S
            if cancel is not None and not cancel_sent:  # a cancel goes out at once, not at the next poll
                if cancel.wait(POLL_S):
                    send_cancel()
                timeout = 0
            done, _ = ray.wait([ref], timeout=timeout)
            if done:
                break
            relay(final=False)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(exc.__class__.__name__) from None
        except ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        try:
            relay(final=True)
        except WorkerLost:  # the result is already here: the session reloads elsewhere when rendered
            pass
        with self.pool._cv:
            w.sessions += 1
        return RemoteSession(self, model, w, key, files=result["files"])

    def load(self, directory, model: str) -> RemoteSession:
        """A saved session (server storage) loaded onto a worker; errors in its files surface here."""
        s = RemoteSession(self, model, None, "", directory=Path(directory))
        s.place()
        return s

    def close(self) -> None:
        self.pool.close()
