"""Helpers and fixtures for server tests: a real aiohttp server on a loopback port (in a thread, or a subprocess).

Not a conftest.py on purpose: a second ``conftest`` module would shadow tests/conftest.py for tests that do
``from conftest import make_tiny_generator``.  Test modules import the fixtures they use from here.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import msgpack
import numpy as np
import pytest
from aiohttp import ClientSession

from fake_engine import StepLog, make_engine
from server.app import ServerConfig, create_app
from server.launch import port_of, wait_for_ready
from server.net import start_site

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
        """``config``: ServerConfig fields (limits, max_queue, max_connections, header_timeout_s, ...)."""
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
            self.site = self.loop.run_until_complete(start_site(
                self.app, "127.0.0.1", 0, access_log=False, max_connections=self.config.max_connections,
                header_timeout_s=self.config.header_timeout_s, keepalive_timeout_s=self.config.keepalive_timeout_s))
            self.port = self.site.port
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
        asyncio.run_coroutine_threadsafe(self.site.stop(), self.loop).result(30)
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
        try:
            conn.request(method, path, body=data, headers=h)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused the body half-way and closed; its answer is already waiting
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
    """Follow a job by long-polling ``GET /v1/jobs/{id}?after=VERSION&wait=S`` (as the plugins do) until it ends
    (or ``until(event)``): every change seen, typed ``snapshot`` (the first), ``progress`` or ``end``.
    ``previews``: attach the job's preview PNG (``GET /v1/jobs/{id}/preview``) whenever ``preview_seq`` moved.
    ``on_event`` may be a coroutine function."""
    events, version, seq = [], -1, 0
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    base = f"http://127.0.0.1:{port}/v1/jobs/{job_id}"
    async with ClientSession(headers=headers) as s:
        async with asyncio.timeout(timeout):
            while True:
                async with s.get(f"{base}?after={version}&wait=10") as r:
                    assert r.status == 200, (r.status, await r.text())
                    ev = await r.json()
                if ev["version"] == version and ev["state"] not in TERMINAL_STATES:
                    continue  # the wait ran out without a change
                version = ev["version"]
                ev["type"] = "end" if ev["state"] in TERMINAL_STATES else ("progress" if events else "snapshot")
                if previews and ev["preview_seq"] != seq:
                    seq = ev["preview_seq"]
                    async with s.get(f"{base}/preview") as pr:
                        if pr.status == 200:
                            ev["preview_png"] = await pr.read()
                events.append(ev)
                if on_event is not None:
                    r = on_event(ev)
                    if asyncio.iscoroutine(r):
                        await r
                if ev["type"] == "end" or (until is not None and until(ev)):
                    break
    return events


TERMINAL_STATES = {"done", "failed", "cancelled", "interrupted"}


def wait_job(server, job_id: str, timeout: float = 60) -> dict:
    """Block until the job ends (long polls) and return its final state from GET /v1/jobs/{id}."""
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


ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m server`` on a free loopback port; waits for its ready line."""

    def __init__(self, data_dir: Path, extra=(), env=None, timeout: float = 120, preexec_fn=None):
        self.data_dir = data_dir
        self.log = open(data_dir.parent / f"server-{os.getpid()}-{id(self)}.log", "w")
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
               "--log-level", "info", *extra]
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "server")]),
                        OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True, env=full_env,
                                     preexec_fn=preexec_fn)
        url = wait_for_ready(self.proc, timeout)
        assert url, f"no ready line; log:\n{Path(self.log.name).read_text()[-3000:]}"
        self.port = port_of(url)
        token_file = Path(extra[extra.index("--token-file") + 1]) if "--token-file" in extra else data_dir / "token"
        self.token = token_file.read_text().strip()

    def request(self, method, path, body=None, **kw):
        kw.setdefault("token", self.token)
        return http_request(self.port, method, path, body, **kw)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def step_log():
    return StepLog()


@pytest.fixture
def server(tmp_path, step_log):
    srv = LiveServer(tmp_path / "data", make_engine(step_s=0.01, log=step_log), max_queue=4)
    yield srv
    srv.stop()


def tiny_models_dir(root: Path) -> Path:
    """A models folder holding one random 32 px StyleGAN2 (``tiny32.pt``) written by core's own saver."""
    import torch

    from core.stylegan2.formats import save_generator
    from core.stylegan2.network import Generator, GeneratorConfig

    torch.manual_seed(0)
    cfg = GeneratorConfig(resolution=32, z_dim=32, w_dim=32, mapping_layers=2, channels={4: 32, 8: 32, 16: 32, 32: 16})
    d = root / "models"
    d.mkdir(parents=True, exist_ok=True)
    save_generator(Generator(cfg).eval(), d / "tiny32.pt")
    return d


def pick_real_model(models: list) -> dict:
    """The embedded default model when the registry has it, else the tiny test generator."""
    for m in models:
        if m.get("default") and m["name"] != "tiny32":
            return m
    return next(m for m in models if m["name"] == "tiny32")
