"""Serving the app: a connection cap with idle eviction, a header-read timeout, no transparent decompression,
a raised file-descriptor limit, rate-limited accept errors and control characters escaped in log lines.

aiohttp by itself keeps a connection that never sends a byte open forever and accepts until the process runs
out of file descriptors (then every accept fails and is logged).  :class:`ConnectionGuard` wraps aiohttp's
protocol factory: every connection must complete its request headers within ``header_timeout_s``, and when
``max_connections`` are open a new one closes the oldest connection that has no request in progress, so
idle or slow clients can never lock out ``/v1/health`` or a plugin.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from typing import Optional

from aiohttp import web

log = logging.getLogger("server.net")

HEADER_END = b"\r\n\r\n"
FD_RESERVE = 128  # descriptors kept free for files, SQLite, torch and the listening socket


class GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's RequestHandler and tracks whether the request headers are complete."""

    def __init__(self, guard: "ConnectionGuard", inner: asyncio.Protocol):
        self.guard, self.inner = guard, inner
        self.transport: Optional[asyncio.Transport] = None
        self.awaiting_headers = True  # no complete request head yet (idle, or a slow sender)
        self.busy = False  # a request is being answered
        self._tail = b""
        self._timer: Optional[asyncio.TimerHandle] = None

    # --- asyncio.Protocol ---
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.guard.opened(self)
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.awaiting_headers:
            if self._timer is None:  # the next request on a kept-alive connection has begun
                self._arm()
            seen = self._tail + data
            if HEADER_END in seen:
                self.awaiting_headers, self.busy, self._tail = False, True, b""
                self._disarm()
            else:
                self._tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.guard.closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # --- guard ---
    def response_started(self) -> None:
        """The answer is going out: bytes after it belong to the next request (keep-alive)."""
        self.busy, self.awaiting_headers, self._tail = False, True, b""
        self._disarm()  # aiohttp's keep-alive timeout covers the idle time until the next request starts

    def _arm(self) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(self.guard.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        if self.awaiting_headers and self.transport is not None:
            self.guard.note_dropped("header timeout")
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ConnectionGuard:
    """The protocol factory handed to ``loop.create_server``; ``factory`` is aiohttp's ``web.Server``."""

    def __init__(self, factory, max_connections: int, header_timeout_s: float):
        self.factory, self.max_connections, self.header_timeout_s = factory, max(2, max_connections), header_timeout_s
        self.open: "collections.OrderedDict[int, GuardedProtocol]" = collections.OrderedDict()
        self.by_transport: dict = {}
        self.dropped = collections.Counter()
        self._last_report = 0.0

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self, self.factory())

    def opened(self, conn: GuardedProtocol) -> None:
        if len(self.open) >= self.max_connections:
            victim = next((c for c in self.open.values() if not c.busy), None)
            if victim is not None:
                self.note_dropped("connection cap: closed the oldest idle connection")
                self.closed(victim)
                victim.close()
        self.open[id(conn)] = conn
        self.by_transport[id(conn.transport)] = conn
        if len(self.open) > self.max_connections:  # every other connection is answering a request
            self.note_dropped("connection cap: refused a new connection")
            self.closed(conn)
            conn.close()

    def closed(self, conn: GuardedProtocol) -> None:
        self.open.pop(id(conn), None)
        self.by_transport.pop(id(conn.transport), None)

    def response_started(self, transport) -> None:
        conn = self.by_transport.get(id(transport))
        if conn is not None:
            conn.response_started()

    def note_dropped(self, why: str) -> None:
        """Counted, and logged at most once every 10 s (a flood must not flood the log)."""
        self.dropped[why] += 1
        now = time.monotonic()
        if now - self._last_report >= 10.0:
            self._last_report = now
            log.warning("dropped connections (%s); %d open", ", ".join(f"{n}× {w}" for w, n in self.dropped.items()),
                        len(self.open))
            self.dropped.clear()


def raise_fd_limit(want: int = 65536) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward the hard limit (at most ``want``); returns the soft limit."""
    try:
        import resource
    except ImportError:  # Windows
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    return soft


def connection_cap(requested: int, fd_soft_limit: int) -> int:
    """The connection cap actually used: the requested one, kept below the descriptors the process may open."""
    return max(2, min(requested, fd_soft_limit - FD_RESERVE))


class AcceptErrorFilter:
    """asyncio's exception handler: 'socket.accept() out of system resource' (and other accept errors) are
    logged at most once a minute with a count, everything else goes to the default handler."""

    def __init__(self, interval_s: float = 60.0):
        self.interval_s, self.suppressed, self._last = interval_s, 0, 0.0

    def __call__(self, loop, context: dict) -> None:
        message = str(context.get("message", ""))
        if "accept" not in message:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return
        self._last = now
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        self.suppressed = 0
        log.error("%s: %s%s", message, context.get("exception"), more)


async def start_site(app: web.Application, host: str, port: int, *, access_log_class=None, access_log=True,
                     max_connections: int = 256, header_timeout_s: float = 10.0,
                     keepalive_timeout_s: float = 15.0) -> "Site":
    """Set up ``app`` and listen on ``host:port`` behind a :class:`ConnectionGuard`.

    Request bodies are not decompressed (``auto_decompress=False``): a compressed body is refused by the app
    (415) before any of it is inflated."""
    from server.app import PORT

    # lingering_time 0: a body the app refused half-way is not read to its end (aiohttp would drain it for 10 s,
    # burning the event loop on a hostile 320 MiB body); the connection is closed after the answer instead
    kwargs = {"handle_signals": False, "auto_decompress": False, "keepalive_timeout": keepalive_timeout_s,
              "lingering_time": 0}
    if access_log_class is not None:
        kwargs["access_log_class"] = access_log_class
    if not access_log:
        kwargs["access_log"] = None
    guard = ConnectionGuard(None, connection_cap(max_connections, raise_fd_limit()), header_timeout_s)

    async def on_prepare(request, response):
        guard.response_started(request.transport)

    app.on_response_prepare.append(on_prepare)
    runner = web.AppRunner(app, **kwargs)
    await runner.setup()
    guard.factory = runner.server
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorFilter())
    try:
        server = await loop.create_server(guard, host, port, backlog=128)
    except OSError:
        await runner.cleanup()
        raise
    app[PORT][0] = server.sockets[0].getsockname()[1]
    return Site(runner, server, guard)


class Site:
    """What :func:`start_site` started: ``port``, ``address`` and ``stop()``."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer, guard: ConnectionGuard):
        self.runner, self.server, self.guard = runner, server, guard
        self.address = server.sockets[0].getsockname()[:2]
        self.port = int(self.address[1])

    async def stop(self) -> None:
        self.server.close()
        for conn in list(self.guard.open.values()):
            if not conn.busy:
                conn.close()
        await self.runner.cleanup()


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


def escape_controls(text: str) -> str:
    """Control characters as ``\\xNN`` / ``\\uNNNN``, so no client-chosen text can start a forged log line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        text)


class EscapingFormatter(logging.Formatter):
    """Escapes control characters in the message (a traceback, added after it, keeps its newlines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)
