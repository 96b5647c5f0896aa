"""The aiohttp application: thin routes over protocol (validation), jobs (worker), storage and the engine.

``create_app(config, engine=None)`` builds it; ``engine`` defaults to the real one
(:meth:`server.engine.Engine.from_core`), tests inject a fake that honours the same contract.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiohttp import WSMsgType, web

from core.common import Cancelled, InvalidInput, LatentEditError
from server import __version__, protocol
from server.auth import COOKIE, bearer, token_matches
from server.jobs import TERMINAL, JobConflict, JobManager, LiveSessions, QueueFull, Renderer
from server.protocol import ProtocolError
from server.status import status_page, unauthorized_page
from server.storage import Storage

log = logging.getLogger("server.app")


@dataclass
class ServerConfig:
    data_dir: Path
    token: str
    models_dir: Optional[Path] = None
    device: str = "cpu"
    limits: protocol.Limits = field(default_factory=protocol.Limits)
    max_queue: int = 16  # queued (not running) jobs; one more answers 429
    job_timeout_s: float = 3600.0  # default per-job limit; a request may ask for another in options.timeout_s
    render_timeout_s: float = 120.0
    cache_max_bytes: int = 4 << 30  # sessions + kept inputs on disk; LRU eviction above it
    live_sessions: int = 4  # loaded sessions kept in memory


STORAGE = web.AppKey("storage", Storage)
JOBS = web.AppKey("jobs", JobManager)
RENDERER = web.AppKey("renderer", Renderer)
CONFIG = web.AppKey("config", ServerConfig)
ENGINE = web.AppKey("engine", object)
IO_POOL = web.AppKey("io_pool", ThreadPoolExecutor)
STARTED = web.AppKey("started", float)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
              409: "conflict", 410: "gone", 411: "length_required", 413: "payload_too_large",
              415: "unsupported_media_type", 429: "too_many_requests"}


def respond(request: web.Request, obj, status: int = 200) -> web.Response:
    as_msgpack = protocol.wants_msgpack(request.headers.get("Accept"), request.headers.get("Content-Type"))
    body, ctype = protocol.encode_body(obj, as_msgpack)
    return web.Response(body=body, status=status, content_type=ctype)


def error_response(request: web.Request, status: int, body: dict) -> web.Response:
    resp = respond(request, body, status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="latent-edit"'
    return resp


# ---------------------------------------------------------------------------------------------
# middlewares
# ---------------------------------------------------------------------------------------------

@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure becomes ``{error, message, field}``; nothing internal leaks to the client."""
    try:
        return await handler(request)
    except ProtocolError as exc:
        return error_response(request, exc.status, exc.body())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        if exc.status == 413:
            limit = request.app[CONFIG].limits.max_body_bytes
            message = f"the body is larger than the server's limit of {limit} bytes (start the server with a larger --max-body-mb)"
        elif exc.status == 404:
            message = f"no such route: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        else:
            message = exc.reason or code
        return error_response(request, exc.status, protocol.error_body(code, message))
    except (InvalidInput, Cancelled, LatentEditError) as exc:
        return error_response(request, 422, protocol.error_body(getattr(exc, "code", "error"), str(exc)))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(request, 500, protocol.error_body("internal", "internal server error; see the server log"))


def _is_status_path(path: str) -> bool:
    return path == "/" or path.startswith("/status/")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Bearer token on every route but health; the status page also takes ``?token=`` (then a cookie)."""
    path = request.path
    if path == "/v1/health":
        return await handler(request)
    expected = request.app[CONFIG].token
    presented = bearer(request.headers.get("Authorization"))
    if presented is None and (_is_status_path(path) or path.endswith("/events")):
        presented = request.query.get("token") or (request.cookies.get(COOKIE) if _is_status_path(path) else None)
    if not token_matches(presented, expected):
        if _is_status_path(path) and request.method == "GET":
            return web.Response(text=unauthorized_page(), status=401, content_type="text/html")
        what = "missing" if presented is None else "wrong"
        raise ProtocolError(401, "unauthorized", f"{what} token: send 'Authorization: Bearer <token>' with the "
                                                 "contents of the server's token file (DATA_DIR/token)")
    return await handler(request)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

async def read_body(request: web.Request) -> bytes:
    limit = request.app[CONFIG].limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    return await request.read()


async def run_io(request: web.Request, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(request.app[IO_POOL], fn, *args)


def resolve_model(engine, name: Optional[str]) -> str:
    names = engine.model_names()
    if name is None:
        default = engine.default_model()
        if default is None:
            raise ProtocolError(422, "no_models", "the server has no generator loaded; check --models-dir", "model")
        return default
    if name not in names:
        raise protocol.invalid("model", f"unknown model {name[:80]!r} (available: {', '.join(names) or 'none'})",
                               code="unknown_model")
    return name


def job_or_404(request: web.Request):
    job_id = request.match_info["job_id"]
    job = request.app[JOBS].get(job_id)
    if job is None:
        raise ProtocolError(404, "unknown_job", f"no job with id {job_id[:64]!r}", "job_id")
    return job


SESSION_STATE_ERRORS = {
    "pending": (409, "session_not_ready", "is still being computed (job {job}); wait for the job to finish"),
    "failed": (409, "session_failed", "failed to compute (see job {job})"),
    "cancelled": (409, "session_cancelled", "was cancelled (job {job}); POST /v1/jobs/{job}/retry to run it again"),
    "interrupted": (409, "session_interrupted",
                    "was interrupted by a server restart (job {job}); POST /v1/jobs/{job}/retry to run it again"),
    "evicted": (410, "session_evicted", "was evicted from the cache to bound disk use; create it again"),
}


def session_or_404(request: web.Request) -> dict:
    sid = request.match_info["session_id"]
    row = request.app[STORAGE].get_session(sid)
    if row is None or row["state"] == "deleted":
        raise ProtocolError(404, "unknown_session", f"no session with id {sid[:64]!r}", "session_id")
    return row


def session_public(row: dict) -> dict:
    return {"session_id": row["id"], "job_id": row["job_id"], "state": row["state"], "model": row["model"],
            "method": row["method"], "width": row["width"], "height": row["height"], "x": row["x"], "y": row["y"],
            "format": row["format"], "name": row["name"], "created": row["created"], "last_used": row["last_used"],
            "size_bytes": row["size_bytes"]}


# ---------------------------------------------------------------------------------------------
# routes
# ---------------------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/v1/health")
async def health(request: web.Request):
    engine = request.app[ENGINE]
    return respond(request, {
        "status": "ok", "version": __version__, "protocol": protocol.PROTOCOL_VERSION, "device": engine.device,
        "models": engine.model_names(), "default_model": engine.default_model(),
        "perceptual_backbone": engine.backbone(), "queue": request.app[JOBS].counts(),
        "uptime_s": round(time.time() - request.app[STARTED], 1),
    })


@routes.get("/v1/models")
async def models(request: web.Request):
    engine = request.app[ENGINE]
    return respond(request, {"models": engine.models(), "default_model": engine.default_model(),
                             "errors": engine.model_errors()})


async def _submit(request: web.Request, kind: str, parse):
    raw = await read_body(request)
    cfg = request.app[CONFIG]
    req = await run_io(request, lambda: parse(protocol.decode_body(raw, request.content_type, cfg.limits), cfg.limits))
    model = resolve_model(request.app[ENGINE], req.model)
    jobs = request.app[JOBS]
    try:
        jobs.reserve()
    except QueueFull as exc:
        raise ProtocolError(429, "queue_full", str(exc)) from None
    job = await run_io(request, jobs.submit, kind, model, req)
    return job


@routes.post("/v1/sessions")
async def create_session(request: web.Request):
    job = await _submit(request, "session", protocol.parse_session_request)
    pub = request.app[JOBS].public(job)
    return respond(request, {"session_id": job.session_ids[0], "job_id": job.id, "state": pub["state"],
                             "queue_position": pub["queue_position"]}, status=202)


@routes.post("/v1/batch")
async def create_batch(request: web.Request):
    job = await _submit(request, "batch", protocol.parse_batch_request)
    pub = request.app[JOBS].public(job)
    return respond(request, {"session_ids": list(job.session_ids), "job_id": job.id, "state": pub["state"],
                             "queue_position": pub["queue_position"]}, status=202)


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request):
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise ProtocolError(422, "invalid_field", "limit: must be an integer", "limit") from None
    if not 1 <= limit <= 10000:
        raise ProtocolError(422, "invalid_field", "limit: must be in [1, 10000]", "limit")
    return respond(request, {"jobs": request.app[JOBS].list_public(limit)})


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request):
    return respond(request, request.app[JOBS].public(job_or_404(request)))


@routes.get("/v1/jobs/{job_id}/preview")
async def get_job_preview(request: web.Request):
    job = job_or_404(request)
    if not job.preview_png:
        raise ProtocolError(404, "no_preview", f"job {job.id} has no preview (yet)")
    return web.Response(body=job.preview_png, content_type="image/png")


@routes.delete("/v1/jobs/{job_id}")
async def cancel_job(request: web.Request):
    job = job_or_404(request)
    job = request.app[JOBS].cancel(job.id)
    return respond(request, request.app[JOBS].public(job), status=202 if job.state == "running" else 200)


@routes.post("/v1/jobs/{job_id}/retry")
async def retry_job(request: web.Request):
    job = job_or_404(request)
    try:
        job = request.app[JOBS].retry(job.id)
    except QueueFull as exc:
        raise ProtocolError(429, "queue_full", str(exc)) from None
    except JobConflict as exc:
        raise ProtocolError(exc.status, exc.code, exc.message, "job_id") from None
    return respond(request, request.app[JOBS].public(job), status=202)


@routes.get("/v1/jobs/{job_id}/events")
async def job_events(request: web.Request):
    """WebSocket: a ``snapshot``, then ``progress`` events, then ``end``; ``?previews=1`` adds PNG previews."""
    job = job_or_404(request)
    jobs = request.app[JOBS]
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "msgpack"):
        raise ProtocolError(422, "invalid_field", "format: must be json or msgpack", "format")
    previews = request.query.get("previews", "0") in ("1", "true", "yes")
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    queue = jobs.subscribe(job.id)
    last_seq = 0

    async def send(event: dict, kind: str) -> None:
        nonlocal last_seq
        event = dict(event, type=kind)
        current = jobs.get(job.id)
        if previews and current is not None and current.preview_png and current.preview_seq != last_seq:
            event["preview_png"] = current.preview_png
            last_seq = current.preview_seq
        if fmt == "msgpack":
            await ws.send_bytes(protocol.encode_body(event, True)[0])
        else:
            await ws.send_str(protocol.encode_body(event, False)[0].decode())

    async def reader() -> None:  # ends when the client goes away
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    read_task = asyncio.ensure_future(reader())
    try:
        snap = jobs.public(jobs.get(job.id))
        await send(snap, "end" if snap["state"] in TERMINAL else "snapshot")
        state = snap["state"]
        while state not in TERMINAL and not ws.closed:
            get_task = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get_task, read_task}, return_when=asyncio.FIRST_COMPLETED)
            if get_task not in done:
                get_task.cancel()
                break
            event = get_task.result()
            state = event["state"]
            await send(event, "end" if state in TERMINAL else "progress")
    except (ConnectionResetError, RuntimeError):
        pass
    finally:
        jobs.unsubscribe(job.id, queue)
        read_task.cancel()
        if not ws.closed:
            await ws.close()
    return ws


@routes.get("/v1/sessions/{session_id}")
async def get_session(request: web.Request):
    return respond(request, session_public(session_or_404(request)))


@routes.delete("/v1/sessions/{session_id}")
async def delete_session(request: web.Request):
    row = session_or_404(request)
    if row["state"] == "pending":
        raise ProtocolError(409, "session_busy", f"session {row['id']} is still being computed; "
                                                 f"cancel job {row['job_id']} first", "session_id")
    request.app[RENDERER].live.drop(row["id"])
    await run_io(request, request.app[STORAGE].delete_session, row["id"])
    return respond(request, {"session_id": row["id"], "state": "deleted"})


@routes.post("/v1/sessions/{session_id}/render")
async def render(request: web.Request):
    row = session_or_404(request)
    if row["state"] != "ready":
        status, code, text = SESSION_STATE_ERRORS.get(row["state"], (409, "session_not_ready", "is {state}"))
        raise ProtocolError(status, code, f"session {row['id']} " + text.format(job=row["job_id"], state=row["state"]),
                            "session_id")
    cfg = request.app[CONFIG]
    raw = await read_body(request)
    body = protocol.decode_body(raw, request.content_type, cfg.limits)
    engine = request.app[ENGINE]
    req = protocol.parse_render_request(body, cfg.limits, engine.direction_names(row["model"]), engine.num_ws(row["model"]))
    renderer = request.app[RENDERER]
    loop = asyncio.get_running_loop()
    try:
        result = await asyncio.wait_for(loop.run_in_executor(renderer.pool, renderer.render, row, req),
                                        cfg.render_timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(503, "render_timeout", f"the render took longer than {cfg.render_timeout_s:g} s") from None
    except FileNotFoundError:
        request.app[STORAGE].update_session(row["id"], state="evicted", size_bytes=0)
        raise ProtocolError(410, "session_evicted", f"the files of session {row['id']} are gone; create it again",
                            "session_id") from None
    return respond(request, result)


@routes.get("/")
async def status(request: web.Request):
    token = request.query.get("token")
    if token is not None:  # first visit with ?token=: keep it in a cookie and drop it from the address bar
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
        raise resp
    return web.Response(text=status_page(request.app[JOBS].list_public(50), request.app[JOBS].counts()),
                        content_type="text/html")


@routes.get("/status/jobs/{job_id}/{which}.png")
async def status_image(request: web.Request):
    job = job_or_404(request)
    which = request.match_info["which"]
    if which == "preview" and job.preview_png:
        return web.Response(body=job.preview_png, content_type="image/png")
    if which in ("thumb", "preview"):
        path = request.app[STORAGE].job_dir(job.id) / "thumb.png"
        if path.exists():
            return web.Response(body=await run_io(request, path.read_bytes), content_type="image/png")
    raise ProtocolError(404, "no_image", "no such image")


# ---------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------

def create_app(config: ServerConfig, engine=None) -> web.Application:
    """The application; ``engine`` defaults to the real core engine over ``config.models_dir``."""
    if engine is None:
        from server.engine import Engine
        engine = Engine.from_core(config.models_dir, config.device)
    engine.models()  # load the registry's models now, not on the event loop during a request
    storage = Storage(config.data_dir)
    live = LiveSessions(config.live_sessions)
    jobs = JobManager(storage, engine, live, max_queue=config.max_queue, default_timeout_s=config.job_timeout_s,
                      cache_max_bytes=config.cache_max_bytes)
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=config.limits.max_body_bytes)
    app[CONFIG], app[ENGINE], app[STORAGE], app[JOBS] = config, engine, storage, jobs
    app[RENDERER] = Renderer(storage, engine, live)
    app[IO_POOL] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="latent-edit-io")
    app[STARTED] = time.time()
    app.add_routes(routes)

    async def on_startup(app_):
        app_[JOBS].start(asyncio.get_running_loop(), warm_model=engine.default_model())

    async def on_cleanup(app_):
        app_[JOBS].stop()
        app_[RENDERER].stop()
        app_[IO_POOL].shutdown(wait=False)
        app_[STORAGE].close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
