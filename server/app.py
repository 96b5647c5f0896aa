"""The aiohttp application: thin routes over protocol (validation), jobs (worker), storage and the engine.

``create_app(config, engine=None)`` builds it; ``engine`` defaults to the real one
(:meth:`server.engine.Engine.from_core`), tests inject a fake that honours the same contract.  Serve it with
:func:`server.net.start_site` (connection cap, header-read timeout, no transparent decompression).
About 500 lines on purpose: every route with the middlewares that guard it (errors, Host, auth, headers),
so what a request may reach is read in one place.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiohttp import web

from core.common import Cancelled, InvalidInput, LatentEditError
from server import __version__, protocol
from server.auth import StatusCredentials, bearer, token_matches
from server.jobs import JobManager
from server.job import JobConflict, QueueFull
from server.live import LiveSessions
from server.protocol import ProtocolError
from server.render import Renderer, SessionDamaged
from server.status import status_page, unauthorized_page
from server.storage import Retention, Storage

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
    retention: Retention = field(default_factory=Retention)
    allowed_hosts: tuple = ()  # extra Host names besides the loopback names (the bound address)
    max_connections: int = 256  # open connections at most; above it the oldest idle one is closed
    header_timeout_s: float = 10.0  # a connection must finish sending its request headers within this
    keepalive_timeout_s: float = 15.0  # an idle keep-alive connection is closed after this
    status_ttl_s: float = 12 * 3600.0  # life of a status-page credential (its cookie)


STORAGE = web.AppKey("storage", Storage)
JOBS = web.AppKey("jobs", JobManager)
RENDERER = web.AppKey("renderer", Renderer)
CONFIG = web.AppKey("config", ServerConfig)
ENGINE = web.AppKey("engine", object)
IO_POOL = web.AppKey("io_pool", ThreadPoolExecutor)
STARTED = web.AppKey("started", float)
STATUS_CREDS = web.AppKey("status_creds", StatusCredentials)
PORT = web.AppKey("port", list)  # [bound port], set by server.net.start_site (status cookie name)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
              409: "conflict", 410: "gone", 411: "length_required", 413: "payload_too_large",
              415: "unsupported_media_type", 421: "misdirected_request", 429: "too_many_requests"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
PAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
MAX_WAIT_S = 30.0  # longest long poll (GET /v1/jobs/{id}?wait=S)


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
# middlewares (outermost first: errors, host, auth)
# ---------------------------------------------------------------------------------------------

@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure becomes ``{error, message, field}``; nothing internal leaks to the client, and no message
    shows a path inside the data folder."""
    storage = request.app[STORAGE]
    try:
        return await handler(request)
    except ProtocolError as exc:
        resp = error_response(request, exc.status, exc.body())
        if exc.status in (400, 413, 415):  # the rest of a refused body is not worth reading
            resp.force_close()
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        if exc.status == 413:
            limit = request.app[CONFIG].limits.max_body_bytes
            message = f"the body is larger than the server's limit of {limit} bytes (start the server with a larger --max-body-mb)"
        elif exc.status == 404:
            message = f"no such route: {request.method} {request.path[:200]}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path[:200]}"
        else:
            message = exc.reason or code
        return error_response(request, exc.status, protocol.error_body(code, message))
    except (InvalidInput, Cancelled, LatentEditError) as exc:
        return error_response(request, 422, protocol.error_body(getattr(exc, "code", "error"), storage.relative(str(exc))))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(request, 500, protocol.error_body("internal", "internal server error; see the server log"))


def host_allowed(host_header: Optional[str], allowed: tuple) -> bool:
    """``Host`` must name this machine's loopback or an address the server was bound to (any port): a page
    from another origin that rebinds its DNS name to 127.0.0.1 still sends its own name, and is refused."""
    if host_header is None:
        return True  # HTTP/1.0 clients; browsers always send Host
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[: host.find("]") + 1] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in LOOPBACK_NAMES or name in allowed


@web.middleware
async def host_middleware(request: web.Request, handler):
    if not host_allowed(request.headers.get("Host"), request.app[CONFIG].allowed_hosts):
        raise ProtocolError(421, "misdirected_request", "this server answers only requests addressed to "
                                                        "127.0.0.1, localhost or its bound address (Host header)")
    return await handler(request)


def _is_status_path(path: str) -> bool:
    return path == "/" or path.startswith("/status/")


def status_cookie_name(request: web.Request) -> str:
    """Cookies are shared by every port of a host, so the name carries the port: two servers never mix."""
    return f"latent_edit_status_{request.app[PORT][0]}"


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Bearer token on every route but health.  The status page takes ``?token=`` once, answered with a
    separate short-lived status credential in a cookie (never the API token); the API never takes a cookie."""
    path = request.path
    if path == "/v1/health":
        return await handler(request)
    presented = bearer(request.headers.get("Authorization"))
    if _is_status_path(path) and not token_matches(presented, request.app[CONFIG].token):
        if request.query.get("token") is not None and path == "/":
            return await handler(request)  # the login redirect checks the token itself
        if request.app[STATUS_CREDS].valid(request.cookies.get(status_cookie_name(request))):
            return await handler(request)
        if request.method == "GET":
            return web.Response(text=unauthorized_page(), status=401, content_type="text/html")
    if not token_matches(presented, request.app[CONFIG].token):
        what = "missing" if presented is None else "wrong"
        raise ProtocolError(401, "unauthorized", f"{what} token: send 'Authorization: Bearer <token>' with the "
                                                 "contents of the server's token file (DATA_DIR/token)")
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response the application sends (``on_response_prepare``)."""
    h = response.headers
    h["Cache-Control"] = "no-store"
    h["X-Frame-Options"] = "DENY"
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h["Content-Security-Policy"] = PAGE_CSP if response.content_type == "text/html" else API_CSP
    h["Cross-Origin-Resource-Policy"] = "same-origin"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

async def read_body(request: web.Request) -> bytes:
    """The request body, bounded: no compressed bodies (415), at most ``max_body_bytes`` (JSON: ``max_json_bytes``)
    counted as the bytes arrive (413), and a msgpack body is refused (400) at the first byte that breaks the
    structural limits, before the rest is read."""
    cfg = request.app[CONFIG]
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ProtocolError(415, "unsupported_encoding", f"Content-Encoding {encoding[:40]!r} is not accepted; "
                                                         "send the body uncompressed (identity)")
    kind = protocol.media_type(request.content_type)
    limit = cfg.limits.max_json_bytes if kind == protocol.JSON_TYPE else cfg.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(kind, cfg.limits, request.content_length)
    scanner = protocol.MsgpackScanner(cfg.limits.decode()) if kind in protocol.MSGPACK_TYPES else None
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise _too_large(kind, cfg.limits, None)
        if scanner is not None:
            scanner.feed(buf)
    return bytes(buf)


def _too_large(kind: str, limits: protocol.Limits, actual: Optional[int]) -> ProtocolError:
    if kind == protocol.JSON_TYPE:
        return ProtocolError(413, "payload_too_large",
                             f"JSON bodies are limited to {limits.max_json_bytes} bytes; send layers as msgpack")
    size = "" if actual is None else f" ({actual} bytes)"
    return ProtocolError(413, "payload_too_large", f"the body{size} is larger than the server's limit of "
                                                   f"{limits.max_body_bytes} bytes (start the server with a larger --max-body-mb)")


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
    "damaged": (409, "session_damaged", "is damaged: its saved files no longer load; delete it "
                                        "(DELETE /v1/sessions/ID) and create it again from the layer"),
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


def _query_number(request: web.Request, name: str, lo: float, hi: float, default: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError(422, "invalid_field", f"{name}: must be a number", name) from None
    if not lo <= value <= hi:
        raise ProtocolError(422, "invalid_field", f"{name}: must be in [{lo:g}, {hi:g}]", name)
    return value


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
    """The models (each with its directions, from the registry its ``methods``, and whether it has a
    ``segmenter``), the default model, load errors (paths relative to the data folder), and ``methods`` +
    ``defaults`` for the session options."""
    engine, storage = request.app[ENGINE], request.app[STORAGE]
    return respond(request, {"models": protocol.model_listing(engine.models()), "default_model": engine.default_model(),
                             "errors": {k: storage.relative(v) for k, v in engine.model_errors().items()},
                             **protocol.session_catalog()})


async def _submit(request: web.Request, kind: str, parse):
    raw = await read_body(request)
    cfg = request.app[CONFIG]
    req = await run_io(request, lambda: parse(protocol.decode_body(raw, request.content_type, cfg.limits), cfg.limits))
    del raw
    model = resolve_model(request.app[ENGINE], req.model)
    pivot_for = getattr(request.app[ENGINE], "default_pivot", None)
    if pivot_for is not None and req.options.get("method", "pti") == "pti" and "pivot" not in req.options:
        req.options["pivot"] = pivot_for(model)  # the model's default start (the encoder's code where it has one)
    refusal = getattr(request.app[ENGINE], "method_refusal", None)
    why = refusal(model, req.options) if refusal is not None else None
    if why:  # e.g. MAGEC without a descriptor beside the checkpoint: say which file to add, before queueing
        raise ProtocolError(422, "method_unavailable", why, "method")
    refusal = getattr(request.app[ENGINE], "segments_refusal", None)
    why = refusal(model, req.options) if refusal is not None else None
    if why:  # segments "auto" for a model without a segmenter: say what to add, before queueing
        raise ProtocolError(422, "segmenter_unavailable", why, "options.segments")
    jobs = request.app[JOBS]
    try:
        jobs.reserve()
    except QueueFull as exc:
        raise ProtocolError(429, "queue_full", str(exc)) from None
    return await run_io(request, jobs.submit, kind, model, req)


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
    return respond(request, {"jobs": await run_io(request, request.app[JOBS].list_public, limit)})


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request):
    """``?after=VERSION&wait=S``: long poll, answered at the job's next change (or when it is finished, or
    after S seconds, at most 30); plugins poll this instead of holding a socket open."""
    job = job_or_404(request)
    wait = _query_number(request, "wait", 0.0, MAX_WAIT_S, 0.0)
    after = _query_number(request, "after", -1, 2**53, -1)
    if wait > 0:
        job = await request.app[JOBS].wait_change(job.id, int(after), wait) or job
    return respond(request, request.app[JOBS].public(job))


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
        job = await run_io(request, request.app[JOBS].retry, job.id)
    except QueueFull as exc:
        raise ProtocolError(429, "queue_full", str(exc)) from None
    except JobConflict as exc:
        raise ProtocolError(exc.status, exc.code, exc.message, "job_id") from None
    return respond(request, request.app[JOBS].public(job), status=202)


@routes.get("/v1/sessions/{session_id}")
async def get_session(request: web.Request):
    return respond(request, session_public(session_or_404(request)))


@routes.delete("/v1/sessions/{session_id}")
async def delete_session(request: web.Request):
    """Deletes the session and everything derived from its photo (inputs, thumbnail, the job's preview)."""
    row = session_or_404(request)
    if row["state"] == "pending":
        raise ProtocolError(409, "session_busy", f"session {row['id']} is still being computed; "
                                                 f"cancel job {row['job_id']} first", "session_id")
    request.app[RENDERER].live.drop(row["id"])
    request.app[JOBS].drop_preview(row["job_id"])
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
    engine = request.app[ENGINE]
    directions, num_ws = engine.direction_names(row["model"]), engine.num_ws(row["model"])
    req = await run_io(request, lambda: protocol.parse_render_request(
        protocol.decode_body(raw, request.content_type, cfg.limits), cfg.limits, directions, num_ws))
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
    except SessionDamaged as exc:
        raise ProtocolError(409, "session_damaged", exc.message, "session_id") from None
    return respond(request, result)


@routes.get("/")
async def status(request: web.Request):
    token = request.query.get("token")
    if token is not None:  # first visit with ?token=: swap it for a status credential, drop it from the address bar
        if not token_matches(token, request.app[CONFIG].token):
            return web.Response(text=unauthorized_page(), status=401, content_type="text/html")
        resp = web.HTTPSeeOther("/")
        cfg = request.app[CONFIG]
        resp.set_cookie(status_cookie_name(request), request.app[STATUS_CREDS].issue(), httponly=True,
                        samesite="Strict", path="/", max_age=int(cfg.status_ttl_s))
        raise resp
    jobs = await run_io(request, request.app[JOBS].list_public, 50)
    return web.Response(text=status_page(jobs, request.app[JOBS].counts()), content_type="text/html")


@routes.get("/status/jobs/{job_id}/{which}.png")
async def status_image(request: web.Request):
    job = job_or_404(request)
    which = request.match_info["which"]
    if which == "preview" and job.preview_png:
        return web.Response(body=job.preview_png, content_type="image/png")
    if which in ("thumb", "preview"):
        png = await run_io(request, request.app[STORAGE].thumbnail, job.id)
        if png is not None:
            return web.Response(body=png, content_type="image/png")
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
    if config.models_dir is not None:
        storage.name_root(config.models_dir, "MODELS_DIR")
    live = LiveSessions(config.live_sessions)
    jobs = JobManager(storage, engine, live, max_queue=config.max_queue, default_timeout_s=config.job_timeout_s,
                      cache_max_bytes=config.cache_max_bytes, retention=config.retention)
    app = web.Application(middlewares=[error_middleware, host_middleware, auth_middleware],
                          client_max_size=config.limits.max_body_bytes)
    app[CONFIG], app[ENGINE], app[STORAGE], app[JOBS] = config, engine, storage, jobs
    app[RENDERER] = Renderer(storage, engine, live)
    app[IO_POOL] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="latent-edit-io")
    app[STARTED] = time.time()
    app[STATUS_CREDS] = StatusCredentials(config.status_ttl_s)
    app[PORT] = [0]
    app.add_routes(routes)
    app.on_response_prepare.append(security_headers)

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
