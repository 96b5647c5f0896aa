"""Issue 18: bounded memory on hostile bodies, private data on disk, damaged state handled, hostile browsers
kept out, connection exhaustion, leftovers and retention.  Each test failed against the server before the fix
(commit 8becfc5), except test_loopback_hosts_allowed, which keeps the Host allow-list from refusing too much."""
from __future__ import annotations

import gzip
import os
import resource
import socket
import stat
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fake_engine import make_engine
from server_helpers import (MSGPACK, LiveServer, ServerProcess, box_selection, http_request, layer, make_image,
                            wait_job)
from server_helpers import server, step_log  # noqa: F401  (pytest fixtures)

FAKE = ["--engine", "fake_engine:make_engine", "--device", "cpu"]
SMALL = {"layer": layer(make_image(16, 16)), "options": {"project_steps": 1}}


def done_session(srv, body=SMALL) -> dict:
    r = srv.request("POST", "/v1/sessions", body)
    assert r.status == 202, r.body
    assert wait_job(srv, r.body["job_id"])["state"] == "done"
    return r.body


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class HealthProbe:
    """GET /v1/health every 50 ms on a thread; ``worst`` is the slowest answer (a failed one counts as 99 s)."""

    def __init__(self, port: int):
        self.port, self.latencies, self._stop = port, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                ok = http_request(self.port, "GET", "/v1/health", ctype=None, timeout=5).status == 200
            except OSError:
                ok = False
            self.latencies.append(time.monotonic() - t0 if ok else 99.0)
            self._stop.wait(0.05)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join(10)
        return max(self.latencies)


def send_raw(port: int, head: bytes, body: bytes, timeout: float = 60) -> tuple:
    """Send a request whose body the server may refuse half-way; returns (status or None, seconds)."""
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    status = None
    try:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was read: the answer may still be waiting
        try:
            data = s.recv(65536)
            if data.startswith(b"HTTP/1.1 "):
                status = int(data[9:12])
        except (ConnectionResetError, socket.timeout):
            pass
    finally:
        s.close()
    return status, time.monotonic() - t0


def request_head(token: str, length: int, extra: str = "") -> bytes:
    return (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {MSGPACK}\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


# --- 1. memory bomb ------------------------------------------------------------------------------

def test_hostile_bodies_at_the_size_limit_bound_rss_and_never_stall_health(tmp_path):
    """Acceptance: a hostile compressed or nested body at the size limit raises RSS <= 200 MB and never stalls
    /v1/health beyond 1 s (default server settings; RSS and its peak read from /proc of the server process)."""
    srv = ServerProcess(tmp_path / "data", FAKE)
    try:
        done_session(srv)  # warm: the first submit imports core.session (torch) for SessionOptions
        from server.protocol import Limits

        limit = Limits().max_body_bytes  # the default: 320 MiB + 64 KiB
        nested = b"\x91" * (limit - 1) + b"\xc0"  # arrays in arrays, at the size limit
        wide = b"\xdd" + (limit // 1).to_bytes(4, "big") + b"\x90" * (limit - 5)  # one array of empty arrays
        many = (b"\xdc\x00\x20" + b"\x9f" + b"\x90" * 15) * (limit // 19)  # arrays within every length limit
        bomb = gzip.compress(b"\xdd\xff\xff\xff\xff" + b"\x90" * limit, compresslevel=1)  # ~320 KiB on the wire
        Path(f"/proc/{srv.proc.pid}/clear_refs").write_text("5")  # reset the RSS peak (VmHWM) to now
        base = proc_status(srv.proc.pid, "VmRSS")
        probe = HealthProbe(srv.port)
        results = {}
        for name, head, body in [
                ("gzip", request_head(srv.token, len(bomb), "Content-Encoding: gzip\r\n"), bomb),
                ("deflate", request_head(srv.token, len(bomb), "Content-Encoding: deflate\r\n"), bomb),
                ("nested", request_head(srv.token, len(nested)), nested),
                ("wide", request_head(srv.token, len(wide)), wide),
                ("many", request_head(srv.token, len(many)), many)]:
            results[name] = send_raw(srv.port, head, body)
        worst = probe.stop()
        peak = proc_status(srv.proc.pid, "VmHWM")
        print(f"hostile bodies: RSS peak +{(peak - base) / 2**20:.1f} MiB, slowest health {worst * 1000:.0f} ms, "
              f"answers {results}")
        assert results["gzip"][0] == 415 and results["deflate"][0] == 415, results
        for name in ("nested", "wide", "many"):
            assert results[name][0] == 400, (name, results)
        assert peak - base <= 200 * 1024 * 1024, (peak - base) / 2**20
        assert worst < 1.0, sorted(probe.latencies)[-5:]
        assert srv.request("GET", "/v1/health", token=None).status == 200
    finally:
        srv.stop()


def test_render_body_is_decoded_off_the_event_loop(server, monkeypatch):
    """Render bodies went through msgpack on the event loop; now they are decoded on the I/O pool."""
    from server import protocol

    sid = done_session(server)["session_id"]
    seen = []
    real = protocol.decode_body

    def spy(*a, **k):
        seen.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(protocol, "decode_body", spy)
    assert server.request("POST", f"/v1/sessions/{sid}/render", {"edits": []}).status == 200
    assert seen and all(name.startswith("latent-edit-io") for name in seen), seen


def test_largest_advertised_layer_fits_the_body_limit():
    """A 4096² rgbaf32 layer with its 4096² grayf32 selection (the largest the limits allow) is accepted."""
    from server.protocol import Limits, decode_body, parse_session_request

    lim = Limits()
    side = 4096
    assert side * side == lim.max_pixels
    body = msgpack.packb({"layer": {"width": side, "height": side, "format": "rgbaf32", "data": bytes(side * side * 16),
                                    "name": "n" * 500},
                          "selection": {"width": side, "height": side, "format": "grayf32",
                                        "data": np.ones(side * side, "<f4").tobytes()},
                          "options": {"project_steps": 1}}, use_bin_type=True)
    assert len(body) <= lim.max_body_bytes, len(body) - lim.max_body_bytes
    req = parse_session_request(decode_body(body, MSGPACK, lim), lim)
    assert req.items[0].layer.width == side and req.items[0].selection is not None


# --- 2. private data -----------------------------------------------------------------------------

def modes(root: Path) -> dict:
    out = {}
    for top, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(top) / n
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def test_data_dir_private_after_install_then_start(tmp_path):
    """install.py's token writer on a 0755 data dir, a stray 0644 file, then the server: all 0700/0600,
    also for what the server writes afterwards (SQLite, inputs, thumbnails, sessions)."""
    from server.auth import ensure_token  # exactly what install.py calls

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    ensure_token(data / "token")
    (data / "models").mkdir()
    os.chmod(data / "models", 0o755)
    (data / "models" / "notes.txt").write_text("x")
    os.chmod(data / "models" / "notes.txt", 0o644)
    srv = ServerProcess(data, FAKE)
    try:
        body = done_session(srv, {"layer": layer(make_image(16, 16)), "selection": layer(box_selection(16, 16)[..., None], "gray8"),
                                  "options": {"project_steps": 1}})
        running = srv.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "options": {"project_steps": 1}}).body
        wait_job(srv, running["job_id"])
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        found = modes(data)
        assert any(k.startswith("sessions/") for k in found) and any(k.endswith("thumb.png") for k in found)
        assert any(k.startswith("latent-edit.sqlite3") for k in found), found
        bad = {k: oct(m) for k, m in found.items() if m != (0o700 if (data / k).is_dir() else 0o600)}
        assert not bad, bad
        assert body["session_id"]
    finally:
        srv.stop()


def test_files_written_in_process_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        srv = LiveServer(tmp_path / "data", make_engine(step_s=0.0))
        try:
            done_session(srv)
            found = modes(srv.config.data_dir)
            bad = {k: oct(m) for k, m in found.items()
                   if m != (0o700 if (srv.config.data_dir / k).is_dir() else 0o600)}
            assert not bad and len(found) >= 5, (bad, found)
        finally:
            srv.stop()
    finally:
        os.umask(old)


# --- 3. connection exhaustion --------------------------------------------------------------------

def _raise_own_fd_limit(n: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"the hard open-file limit ({hard}) is below {n}")
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return soft, hard


def test_1100_idle_connections_leave_health_answering(tmp_path):
    """The probe's case: 1100 idle TCP connections against a server started with a 1024 soft fd limit.
    /v1/health answers within 1 s, and accept errors do not flood the log."""
    old = _raise_own_fd_limit(4096)
    conns = []
    srv = None
    try:
        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, old[1]))

        srv = ServerProcess(tmp_path / "data", FAKE, preexec_fn=low_limit)
        for _ in range(1100):
            conns.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        t0 = time.monotonic()
        h = http_request(srv.port, "GET", "/v1/health", ctype=None, timeout=5)
        assert h.status == 200 and time.monotonic() - t0 < 1.0
        r = srv.request("POST", "/v1/sessions", SMALL)  # a real client still gets through
        assert r.status == 202
    finally:
        for c in conns:
            c.close()
        if srv is not None:
            srv.stop()
            log = Path(srv.log.name).read_text()
            assert log.count("Too many open files") <= 2 and log.count("out of system resource") <= 2
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_accept_errors_are_logged_at_most_once_a_minute(caplog):
    """The probe's 5,609 'Too many open files' lines: asyncio reports every failed accept; the filter keeps one."""
    import asyncio

    from server.net import AcceptErrorFilter

    loop = asyncio.new_event_loop()
    try:
        filt = AcceptErrorFilter(interval_s=60.0)
        with caplog.at_level("ERROR", logger="server.net"):
            for _ in range(5000):
                filt(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")})
        assert len([r for r in caplog.records if "accept" in r.getMessage()]) == 1 and filt.suppressed == 4999
    finally:
        loop.close()


def test_connection_cap_evicts_idle_connections_and_header_timeout(tmp_path):
    srv = LiveServer(tmp_path / "data", make_engine(step_s=0.0), max_connections=8, header_timeout_s=0.5)
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(20)]
        t0 = time.monotonic()
        assert http_request(srv.port, "GET", "/v1/health", ctype=None, timeout=5).status == 200
        assert time.monotonic() - t0 < 1.0
        assert len(srv.site.guard.open) <= 8
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        slow.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes its headers
        t0 = time.monotonic()
        assert slow.recv(100) == b""  # the server closes it (blocks until then)
        assert 0.3 < time.monotonic() - t0 < 5
        for c in idle:
            c.close()
    finally:
        srv.stop()


# --- 4. damaged state ----------------------------------------------------------------------------

def test_corrupt_session_file_409_names_problem_and_marks_damaged(server):
    from server.app import RENDERER

    body = done_session(server)
    sid = body["session_id"]
    server.app[RENDERER].live.drop(sid)  # force a load from disk
    (server.config.data_dir / "sessions" / sid / "image.npy").write_bytes(b"\x93NUMPY garbage")
    r = server.request("POST", f"/v1/sessions/{sid}/render", {"edits": []})
    assert r.status == 409 and r.body["error"] == "session_damaged", r.body
    assert "damaged" in r.body["message"] and "ValueError" in r.body["message"] and "DELETE" in r.body["message"]
    assert str(server.config.data_dir) not in r.body["message"]
    assert server.request("GET", f"/v1/sessions/{sid}").body["state"] == "damaged"
    again = server.request("POST", f"/v1/sessions/{sid}/render", {"edits": []})
    assert again.status == 409 and again.body["error"] == "session_damaged"
    assert server.request("DELETE", f"/v1/sessions/{sid}").status == 200
    assert not (server.config.data_dir / "sessions" / sid).exists()


def test_corrupt_database_moved_aside_and_fresh_start(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(data, FAKE)
    try:
        old = done_session(srv)
    finally:
        srv.stop()
    db = data / "latent-edit.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    for extra in ("-wal", "-shm"):
        (data / f"latent-edit.sqlite3{extra}").unlink(missing_ok=True)
    srv = ServerProcess(data, FAKE)
    try:
        assert srv.request("GET", "/v1/health", token=None).status == 200
        log = Path(srv.log.name).read_text()
        assert "is damaged" in log and "started a fresh one" in log and "Traceback" not in log
        moved = list(data.glob("damaged-*"))
        assert len(moved) == 1
        assert (moved[0] / "latent-edit.sqlite3").read_bytes().startswith(b"this is not")
        assert (moved[0] / "sessions" / old["session_id"]).is_dir()  # the finished result's files are kept
        r = srv.request("GET", f"/v1/sessions/{old['session_id']}")
        assert r.status == 404
        assert done_session(srv)["session_id"]  # the fresh database works
    finally:
        srv.stop()


def test_messages_show_paths_relative_to_the_data_dir(tmp_path):
    engine = make_engine(step_s=0.0)
    data = tmp_path / "data"
    engine.registry.errors = {"broken": f"cannot read {data}/models/broken.pt: truncated"}
    srv = LiveServer(data, engine)
    try:
        r = srv.request("GET", "/v1/models")
        assert r.body["errors"] == {"broken": "cannot read DATA_DIR/models/broken.pt: truncated"}
        assert str(data) not in r.raw.decode("utf-8", "replace")
    finally:
        srv.stop()


# --- 5. leftovers and retention ------------------------------------------------------------------

def test_delete_session_deletes_everything_derived_from_its_photo(server):
    body = done_session(server)
    jid, sid = body["job_id"], body["session_id"]
    auth = {"Authorization": f"Bearer {server.token}"}
    assert http_request(server.port, "GET", f"/status/jobs/{jid}/thumb.png", ctype=None, headers=auth).status == 200
    assert server.request("DELETE", f"/v1/sessions/{sid}").status == 200
    assert not (server.config.data_dir / "jobs" / jid).exists()
    assert not (server.config.data_dir / "sessions" / sid).exists()
    for which in ("thumb", "preview"):
        assert http_request(server.port, "GET", f"/status/jobs/{jid}/{which}.png", ctype=None, headers=auth).status == 404
    assert server.request("GET", f"/v1/jobs/{jid}/preview").status == 404


def test_retention_by_age_and_count(tmp_path):
    from server.storage import Retention, Storage

    st = Storage(tmp_path / "data")
    now = 1_000_000.0
    day = 86400.0

    def add(jid, finished, session_state):
        (st.job_dir(jid)).mkdir(parents=True)
        (st.job_dir(jid) / "thumb.png").write_bytes(b"png")
        st.insert_job({"id": jid, "kind": "session", "state": "done", "params": {}, "session_ids": [jid + "s"],
                       "created": finished - 10, "finished": finished},
                      [{"id": jid + "s", "job_id": jid, "item": 0, "state": session_state, "model": "m", "method": "w",
                        "width": 8, "height": 8, "x": 0, "y": 0, "format": "rgba8", "name": None,
                        "created": finished, "last_used": finished}])
        st.session_dir(jid + "s").mkdir(parents=True)

    add("old", now - 40 * day, "deleted")  # beyond the age
    add("oldready", now - 40 * day, "ready")  # idle beyond the age: its session is evicted, then the job goes
    for i in range(4):
        add(f"new{i}", now - i * 60, "evicted" if i else "ready")
    evicted, removed = st.apply_retention(Retention(max_age_days=30, max_jobs=2), now=now)
    assert evicted == ["oldreadys"]
    assert set(removed) == {"old", "oldready", "new2", "new3"}  # new0 (ready) and new1 are the newest two
    left = {j["id"] for j in st.list_jobs(100)}
    assert left == {"new0", "new1"}
    assert not st.job_dir("old").exists() and not st.session_dir("olds").exists() and st.job_dir("new1").exists()
    assert st.get_session("new3s") is None
    st.close()


def test_retention_options_on_the_command_line(tmp_path):
    import subprocess
    import sys

    from server_helpers import ROOT

    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    assert "--keep-days" in out and "--keep-jobs" in out and "--max-connections" in out


# --- 6. browsers ---------------------------------------------------------------------------------

ALL_ROUTES = [("GET", "/v1/health"), ("GET", "/v1/models"), ("POST", "/v1/sessions"), ("GET", "/v1/jobs"),
              ("GET", "/"), ("GET", "/status/jobs/x/thumb.png"), ("POST", "/v1/sessions/x/render")]


@pytest.mark.parametrize("method,path", ALL_ROUTES)
def test_foreign_host_refused_on_every_route(server, method, path):
    r = server.request(method, path, {"edits": []} if method == "POST" else None, headers={"Host": "evil.example"})
    assert r.status == 421 and r.body["error"] == "misdirected_request"
    r = server.request(method, path, {"edits": []} if method == "POST" else None,
                       headers={"Host": f"evil.example:{server.port}"})
    assert r.status == 421


def test_loopback_hosts_allowed(server):
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        assert server.request("GET", "/v1/health", headers={"Host": host}).status == 200, host


def test_security_headers_on_every_response(server):
    replies = [server.request("GET", "/v1/health", token=None), server.request("GET", "/v1/models"),
               server.request("GET", "/v1/models", token=None), server.request("GET", "/nope"),
               server.request("GET", "/", token=None, ctype=None), server.request("POST", "/v1/sessions", b"\xc1")]
    for r in replies:
        h = r.headers
        assert h["Cache-Control"] == "no-store" and h["X-Frame-Options"] == "DENY", r.status
        assert h["X-Content-Type-Options"] == "nosniff" and h["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in h["Content-Security-Policy"]


def test_status_cookie_is_not_the_token_and_never_authenticates_the_api(server):
    r = http_request(server.port, "GET", f"/?token={server.token}", ctype=None)
    cookie = r.headers["Set-Cookie"]
    assert server.token not in cookie and "Max-Age=" in cookie
    pair = cookie.split(";")[0]
    assert http_request(server.port, "GET", "/", ctype=None, headers={"Cookie": pair}).status == 200
    assert http_request(server.port, "GET", "/v1/jobs", ctype=None, headers={"Cookie": pair}).status == 401
    other = pair.replace(f"_{server.port}=", "_1=")  # a cookie set by a server on another port
    assert http_request(server.port, "GET", "/", ctype=None, headers={"Cookie": other}).status == 401


def test_control_characters_in_urls_cannot_forge_log_lines(tmp_path):
    srv = ServerProcess(tmp_path / "data", FAKE)
    try:
        for path in ("/%0Aforged-line%20INFO%20server:%20owned", "/v1/%0D%0Aforged-line2", "/%1B[31mred"):
            http_request(srv.port, "GET", path, ctype=None)
    finally:
        srv.stop()
    lines = Path(srv.log.name).read_text().splitlines()
    assert not [ln for ln in lines if ln.startswith("forged-line") or "\x1b" in ln]
    assert any("\\x0aforged-line" in ln for ln in lines)
