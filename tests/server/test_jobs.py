"""Jobs: cancel (running within one step, queued), queue limit, timeout, retry, renders beside a running job, LRU."""
from __future__ import annotations

import asyncio
import time

import pytest

from server_helpers import LiveServer, collect_events, layer, make_image, wait_job, wait_running
from server_helpers import server, step_log  # noqa: F401  (pytest fixtures)
from fake_engine import StepLog, make_engine

SLOW = {"project_steps": 400}  # 400 x 50 ms: far longer than any test waits


@pytest.fixture
def slow_server(tmp_path):
    log = StepLog()
    srv = LiveServer(tmp_path / "data", make_engine(step_s=0.05, log=log), max_queue=3)
    yield srv
    srv.stop()


def submit(srv, options=None, size=16, seed=0):
    r = srv.request("POST", "/v1/sessions", {"layer": layer(make_image(size, size, seed)), "options": options or {}})
    assert r.status == 202, r.body
    return r.body


def test_cancel_running_job_within_one_step(slow_server):
    srv, log = slow_server, slow_server.engine.step_log
    job = submit(srv, SLOW)
    marks = {}

    async def on_event(ev):
        if ev["type"] == "progress" and "t" not in marks and ev["progress"] > 0:
            marks["t"] = time.monotonic()
            r = srv.request("DELETE", f"/v1/jobs/{job['job_id']}")
            assert r.status == 202 and r.body["cancel_requested"] is True

    events = asyncio.run(collect_events(srv.port, srv.token, job["job_id"], on_event=on_event))
    assert events[-1]["state"] == "cancelled"
    assert log.after(marks["t"]) <= 1  # at most the step already under way when the request arrived
    assert time.monotonic() - marks["t"] < 5
    final = srv.request("GET", f"/v1/jobs/{job['job_id']}").body
    assert final["state"] == "cancelled" and final["progress"] < 0.5
    assert srv.request("GET", f"/v1/sessions/{job['session_id']}").body["state"] == "cancelled"
    r = srv.request("POST", f"/v1/sessions/{job['session_id']}/render", {"edits": []})
    assert r.status == 409 and r.body["error"] == "session_cancelled"


def test_cancel_queued_job_never_runs_and_queue_limit(slow_server):
    srv, log = slow_server, slow_server.engine.step_log
    running = submit(srv, SLOW)
    wait_running(srv, running["job_id"])
    queued = [submit(srv, SLOW, seed=i) for i in range(3)]
    r = srv.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16))})
    assert r.status == 429 and r.body["error"] == "queue_full" and r.body["message"]
    assert srv.request("GET", "/v1/health", token=None).body["queue"] == {"queued": 3, "running": 1, "max_queued": 3}
    first = srv.request("GET", f"/v1/jobs/{queued[0]['job_id']}").body
    assert first["state"] == "queued" and first["queue_position"] == 0
    for q in queued:
        r = srv.request("DELETE", f"/v1/jobs/{q['job_id']}")
        assert r.status == 200 and r.body["state"] == "cancelled"
    assert srv.request("DELETE", f"/v1/jobs/{queued[0]['job_id']}").body["state"] == "cancelled"  # idempotent
    srv.request("DELETE", f"/v1/jobs/{running['job_id']}")
    assert wait_job(srv, running["job_id"])["state"] == "cancelled"
    assert len(log.calls) == 1  # the cancelled queued jobs never reached the engine
    for q in queued:
        assert wait_job(srv, q["job_id"])["state"] == "cancelled"


def test_timeout_fails_job(slow_server):
    job = submit(slow_server, dict(SLOW, timeout_s=1))
    final = wait_job(slow_server, job["job_id"])
    assert final["state"] == "failed" and final["error"]["error"] == "timeout"


def test_retry_cancelled_job_same_id(server):
    job = submit(server, {"project_steps": 100})
    server.request("DELETE", f"/v1/jobs/{job['job_id']}")
    cancelled = wait_job(server, job["job_id"])
    assert cancelled["state"] == "cancelled"  # attempts is 0 if the cancel caught it queued, else 1
    r = server.request("POST", f"/v1/jobs/{job['job_id']}/retry")
    assert r.status == 202 and r.body["job_id"] == job["job_id"]
    final = wait_job(server, job["job_id"])
    assert final["state"] == "done" and final["attempts"] == cancelled["attempts"] + 1
    assert server.request("POST", f"/v1/sessions/{job['session_id']}/render", {"edits": []}).status == 200
    r = server.request("POST", f"/v1/jobs/{job['job_id']}/retry")
    assert r.status == 409 and r.body["error"] == "not_retryable"


def test_render_and_health_do_not_wait_for_running_job(slow_server):
    srv = slow_server
    quick = submit(srv, {"project_steps": 1})
    assert wait_job(srv, quick["job_id"])["state"] == "done"
    long = submit(srv, SLOW)
    wait_running(srv, long["job_id"])
    t0 = time.monotonic()
    r = srv.request("POST", f"/v1/sessions/{quick['session_id']}/render", {"edits": [{"direction": "age", "strength": 2}]})
    h = srv.request("GET", "/v1/health", token=None)
    elapsed = time.monotonic() - t0
    assert r.status == 200 and h.status == 200 and elapsed < 2.0
    assert srv.request("GET", f"/v1/jobs/{long['job_id']}").body["state"] == "running"
    srv.request("DELETE", f"/v1/jobs/{long['job_id']}")
    assert wait_job(srv, long["job_id"])["state"] == "cancelled"


def test_lru_eviction_keeps_recent_sessions(tmp_path):
    srv = LiveServer(tmp_path / "data", make_engine(step_s=0.0), cache_max_bytes=10_000)  # ~2 sessions of 16x16
    try:
        a = submit(srv, {"project_steps": 1}, seed=1)
        wait_job(srv, a["job_id"])
        b = submit(srv, {"project_steps": 1}, seed=2)
        wait_job(srv, b["job_id"])
        assert srv.request("POST", f"/v1/sessions/{a['session_id']}/render", {"edits": []}).status == 200  # a is recent
        c = submit(srv, {"project_steps": 1}, seed=3)
        wait_job(srv, c["job_id"])
        states = {k: srv.request("GET", f"/v1/sessions/{s['session_id']}").body["state"]
                  for k, s in (("a", a), ("b", b), ("c", c))}
        assert states == {"a": "ready", "b": "evicted", "c": "ready"}
        r = srv.request("POST", f"/v1/sessions/{b['session_id']}/render", {"edits": []})
        assert r.status == 410 and r.body["error"] == "session_evicted"
        assert not (srv.config.data_dir / "sessions" / b["session_id"]).exists()
    finally:
        srv.stop()


def test_session_files_gone_answers_410(server):
    import shutil

    from server.app import RENDERER

    job = submit(server, {"project_steps": 1})
    wait_job(server, job["job_id"])
    server.app[RENDERER].live.drop(job["session_id"])  # not in memory: the render must read the disk
    shutil.rmtree(server.config.data_dir / "sessions" / job["session_id"])
    r = server.request("POST", f"/v1/sessions/{job['session_id']}/render", {"edits": []})
    assert r.status == 410 and r.body["error"] == "session_evicted"
    assert server.request("GET", f"/v1/sessions/{job['session_id']}").body["state"] == "evicted"
