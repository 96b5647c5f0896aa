"""Fixtures for server tests: a real aiohttp server on a loopback port (in a thread, or a subprocess)."""
from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import msgpack
import numpy as np
import pytest
from aiohttp import ClientSession, WSMsgType, web

from fake_engine import StepLog, make_engine
from server.app import ServerConfig, create_app

MSGPACK = "application/msgpack"
_DEFAULT = object()


@dataclass
class Reply:
    status: int
    headers: Any
    raw: bytes

    @property
    def body(self):
        ctype = (self.headers.get("Content-Type") or "").split(";")[0]
        if ctype == MSGPACK:
            return msgpack.unpackb(self.raw, raw=False)
        if ctype == "application/json":
            return json.loads(self.raw)
        return self.raw


class LiveServer:
    """The real app on 127.0.0.1:<free port>, served by its own event loop in a background thread."""

    def __init__(self, data_dir: Path, engine, token: Optional[str] = None, **config):
        self.token = token or secrets.token_urlsafe(24)
        self.engine = engine
        self.config = ServerConfig(data_dir=Path(data_dir), token=self.token, **config)
        self.app = create_app(self.config, engine=engine)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self.thread.start()
        assert self._ready.wait(30), "server did not start"
        if self._error:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.runner = web.AppRunner(self.app, access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
        except BaseException as exc:  # surfaced in __init__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def request(self, method: str, path: str, body=None, *, ctype: Optional[str] = MSGPACK, token=_DEFAULT,
                headers: Optional[dict] = None) -> Reply:
        return http_request(self.port, method, path, body, ctype=ctype,
                            token=self.token if token is _DEFAULT else token, headers=headers)


def http_request(port: int, method: str, path: str, body=None, *, ctype: Optional[str] = MSGPACK,
                 token: Optional[str] = None, headers: Optional[dict] = None, timeout: float = 30) -> Reply:
    """One request over http.client; dict bodies are packed per ``ctype``, bytes go as they are."""
    h = dict(headers or {})
    if token is not None:
        h.setdefault("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        elif ctype == "application/json":
            data = json.dumps(body).encode()
        else:
            data = msgpack.packb(body, use_bin_type=True)
        if ctype is not None:
            h.setdefault("Content-Type", ctype)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def layer(arr: np.ndarray, fmt: str = "rgba8", x: int = 0, y: int = 0, **extra) -> dict:
    """Wire map of an (H,W,4) array (uint8 / uint16 / float32 as ``fmt`` says)."""
    dtype = {"rgba8": "u1", "rgba16": "<u2", "rgbaf32": "<f4", "gray8": "u1", "grayf32": "<f4"}[fmt]
    a = np.ascontiguousarray(arr.astype(dtype))
    h, w = a.shape[:2]
    d = {"width": w, "height": h, "format": fmt, "stride": a.strides[0], "data": a.tobytes(), "x": x, "y": y}
    d.update(extra)
    return d


def make_image(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(30, 220, size=(h, w, 4), dtype=np.uint8)
    img[..., 3] = 255
    return img


def box_selection(h: int, w: int) -> np.ndarray:
    sel = np.zeros((h, w), np.uint8)
    sel[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return sel


async def collect_events(port: int, token: str, job_id: str, previews: bool = False, on_event=None,
                         timeout: float = 60, until=None) -> list:
    """Follow WS /v1/jobs/{id}/events until ``end`` (or ``until(event)``); ``on_event`` may be a coroutine function."""
    events = []
    q = "?previews=1" if previews else ""
    async with ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events{q}",
                                headers={"Authorization": f"Bearer {token}"}) as ws:
            async with asyncio.timeout(timeout):
                async for msg in ws:
                    if msg.type != WSMsgType.TEXT:
                        break
                    ev = json.loads(msg.data)
                    events.append(ev)
                    if on_event is not None:
                        r = on_event(ev)
                        if asyncio.iscoroutine(r):
                            await r
                    if ev["type"] == "end" or (until is not None and until(ev)):
                        break
    return events


def wait_job(server, job_id: str, timeout: float = 60) -> dict:
    """Block until the job ends (via its WebSocket) and return its final state from GET /v1/jobs/{id}."""
    events = asyncio.run(collect_events(server.port, server.token, job_id, timeout=timeout))
    assert events and events[-1]["type"] == "end", events
    r = server.request("GET", f"/v1/jobs/{job_id}")
    assert r.status == 200
    return r.body


def wait_running(server, job_id: str, timeout: float = 30) -> None:
    """Block until the job has reported progress from the engine (it is running, past its first step)."""
    events = asyncio.run(collect_events(server.port, server.token, job_id, timeout=timeout,
                                        until=lambda ev: ev["state"] == "running" and ev["progress"] > 0))
    assert events[-1]["state"] == "running", events


@pytest.fixture
def step_log():
    return StepLog()


@pytest.fixture
def server(tmp_path, step_log):
    srv = LiveServer(tmp_path / "data", make_engine(step_s=0.01, log=step_log), max_queue=4)
    yield srv
    srv.stop()
