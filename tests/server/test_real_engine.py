"""End to end through HTTP against the REAL engine (core.session + core.models): the embedded default model
when it is installed, otherwise a tiny random generator saved into a models folder."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server_helpers import (LiveServer, ServerProcess, box_selection, collect_events, layer, make_image, pick_real_model,
                      tiny_models_dir, wait_job, wait_running)
from server.engine import Engine


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    models_dir = tiny_models_dir(root)
    engine = Engine.from_core(models_dir, "cpu")
    calls = []  # monotonic time of every progress call the engine makes
    create = engine.create

    def recording_create(model, image, selection, options, progress, cancel):
        def recorded(*args, **kw):
            calls.append(time.monotonic())
            return progress(*args, **kw)
        return create(model, image, selection, options, recorded, cancel)

    engine.create = recording_create
    srv = LiveServer(root / "data", engine)
    srv.calls = calls
    srv.models_dir = models_dir
    srv.model = pick_real_model(srv.request("GET", "/v1/models").body["models"])
    yield srv
    srv.stop()


def input_image(model: dict, seed: int = 0) -> np.ndarray:
    """A face of the embedded domain (core.demo's renderer) for the embedded model, else random pixels."""
    res = model["resolution"]
    if model["name"] != "tiny32":
        from core.demo import render, sample_params

        rgb = render(sample_params(1, seed=seed)[0], size=res)
        return np.concatenate([rgb, np.full((res, res, 1), 255, np.uint8)], axis=2)
    return make_image(res, res, seed)


def session_body(model: dict, steps: dict, seed: int = 0):
    res = model["resolution"]
    img, sel = input_image(model, seed), box_selection(res, res)
    return img, sel, {"layer": layer(img, x=3, y=4), "selection": layer(sel[..., None], "gray8"),
                      "model": model["name"], "method": "pti", "align": "none", "options": steps}


def test_real_session_progress_and_two_renders(real):
    model = real.model
    img, sel, body = session_body(model, {"pivot": "w", "project_steps": 12, "tune_steps": 6})
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 202, r.body
    events = asyncio.run(collect_events(real.port, real.token, r.body["job_id"], previews=True, timeout=300))
    assert events[-1]["state"] == "done", events[-1]
    stages = {e["stage"] for e in events}
    assert {"project", "render"} <= stages, stages
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0 and any(0 < p < 1 for p in progress)
    health = real.request("GET", "/v1/health", token=None).body
    assert health["perceptual_backbone"] not in ("loading", "none") and model["name"] in health["models"]

    sid = r.body["session_id"]
    names = [d["name"] for d in model["directions"]]
    first, second = ("smile", "hair_color") if {"smile", "hair_color"} <= set(names) else (names[0], names[1])
    outs = []
    for edit in ({"direction": first, "strength": 3.0}, {"direction": second, "strength": -3.0}):
        rr = real.request("POST", f"/v1/sessions/{sid}/render", {"edits": [edit]})
        assert rr.status == 200, rr.body
        lay = rr.body["layer"]
        assert (lay["width"], lay["height"], lay["x"], lay["y"]) == (img.shape[1], img.shape[0], 3, 4)
        outs.append(np.frombuffer(lay["data"], np.uint8).reshape(img.shape))
    outside, inside = sel == 0, sel > 0
    for out in outs:
        assert np.array_equal(out[outside][:, :3], img[outside][:, :3]), "pixels outside the selection changed"
        assert (out[outside][:, 3] == 0).all()
        assert np.abs(out[inside][:, :3].astype(int) - img[inside][:, :3]).mean() > 1.0, "inside did not change"
        assert out[inside][:, 3].max() == 255
    assert np.abs(outs[0].astype(int) - outs[1]).mean() > 0.5, "two different edits gave the same layer"


def test_real_cancel_running_within_one_step(real):
    _, _, body = session_body(real.model, {"pivot": "w", "project_steps": 20000, "tune_steps": 0})
    job_id = real.request("POST", "/v1/sessions", body).body["job_id"]
    marks = {}

    async def on_event(ev):
        if ev["type"] == "progress" and ev["stage"] == "project" and "t" not in marks and len(real.calls) > 5:
            marks["t"] = time.monotonic()
            assert real.request("DELETE", f"/v1/jobs/{job_id}").status == 202

    events = asyncio.run(collect_events(real.port, real.token, job_id, on_event=on_event, timeout=300))
    t_end = time.monotonic()
    assert events[-1]["state"] == "cancelled" and events[-1]["progress"] < 0.5
    steps = [t for t in real.calls if t < marks["t"]]
    step_s = max(b - a for a, b in zip(steps[-6:], steps[-5:]))
    assert sum(t > marks["t"] for t in real.calls) <= 1  # the engine reported at most one more step
    assert t_end - marks["t"] < 0.5 + 2 * step_s, (t_end - marks["t"], step_s)


def test_real_corrupt_session_tensors_409_and_marked_damaged(real):
    """A corrupt tensors file (torch refuses it) is a 409 naming the problem, not a 500, and the session is
    marked damaged until it is deleted."""
    from server.app import RENDERER

    _, _, body = session_body(real.model, {"project_steps": 2})
    r = real.request("POST", "/v1/sessions", dict(body, method="w"))
    assert wait_job(real, r.body["job_id"], timeout=300)["state"] == "done"
    sid = r.body["session_id"]
    real.app[RENDERER].live.drop(sid)
    files = sorted((real.config.data_dir / "sessions" / sid).glob("*.pt"))
    assert files, list((real.config.data_dir / "sessions" / sid).iterdir())
    for f in files:
        f.write_bytes(b"PK\x03\x04 this is not a torch file")
    rr = real.request("POST", f"/v1/sessions/{sid}/render", {"edits": []})
    assert rr.status == 409 and rr.body["error"] == "session_damaged", rr.body
    assert "damaged" in rr.body["message"] and str(real.config.data_dir) not in rr.body["message"]
    assert real.request("GET", f"/v1/sessions/{sid}").body["state"] == "damaged"
    assert real.request("DELETE", f"/v1/sessions/{sid}").status == 200


@pytest.mark.slow
def test_real_sigkill_mid_job_then_restart(real, tmp_path):
    data = tmp_path / "data"
    args = ["--models-dir", str(real.models_dir), "--device", "cpu"]
    img, sel, body = session_body(real.model, {"pivot": "w", "project_steps": 8, "tune_steps": 4})
    names = [d["name"] for d in real.model["directions"]]
    srv = ServerProcess(data, args)
    try:
        done = srv.request("POST", "/v1/sessions", body).body
        assert wait_job(srv, done["job_id"], timeout=300)["state"] == "done"
        edit = {"edits": [{"direction": names[0], "strength": 2.0}]}
        before = srv.request("POST", f"/v1/sessions/{done['session_id']}/render", edit)
        assert before.status == 200
        running = srv.request("POST", "/v1/sessions", dict(body, options={"project_steps": 20000})).body
        wait_running(srv, running["job_id"], timeout=300)
        srv.kill()
    finally:
        srv.stop()
    srv = ServerProcess(data, args)
    try:
        r = srv.request("GET", f"/v1/jobs/{running['job_id']}")
        assert r.body["state"] == "interrupted"
        after = srv.request("POST", f"/v1/sessions/{done['session_id']}/render", edit)
        assert after.status == 200
        assert after.body["layer"]["data"] == before.body["layer"]["data"]  # reloaded from disk, same pixels
    finally:
        assert srv.stop() == 0


def test_broken_checkpoint_is_reported_not_fatal(tmp_path):
    models_dir = tiny_models_dir(tmp_path)
    (models_dir / "broken.pt").write_bytes(b"not a checkpoint")
    srv = LiveServer(tmp_path / "data", Engine.from_core(models_dir, "cpu"), models_dir=models_dir)
    try:
        body = srv.request("GET", "/v1/models").body
        assert "tiny32" in [m["name"] for m in body["models"]]
        assert "broken" in body["errors"] and body["errors"]["broken"]
        assert str(tmp_path) not in str(body["errors"])  # paths shown relative to named folders
        r = srv.request("POST", "/v1/sessions", {"layer": layer(make_image(32, 32)), "model": "broken"})
        assert r.status == 422 and r.body["error"] == "unknown_model"
    finally:
        srv.stop()
