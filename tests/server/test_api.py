"""End to end through HTTP against the real app (fake engine): sessions, long polls, renders, batch, status page."""
from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from server_helpers import box_selection, collect_events, http_request, layer, make_image, wait_job
from server_helpers import server, step_log  # noqa: F401  (pytest fixtures)


def decode_layer(d: dict) -> np.ndarray:
    dtype = {"rgba8": "u1", "rgba16": "<u2", "rgbaf32": "<f4"}[d["format"]]
    rows = np.frombuffer(d["data"], np.uint8).reshape(d["height"], d["stride"])
    item = np.dtype(dtype).itemsize
    return rows[:, : d["width"] * 4 * item].copy().view(dtype).reshape(d["height"], d["width"], 4)


def test_health_needs_no_token_and_reports(server):
    r = server.request("GET", "/v1/health", token=None)
    assert r.status == 200
    b = r.body
    assert b["status"] == "ok" and b["protocol"] == 1 and b["models"] == ["fake32", "other"]
    assert b["default_model"] == "fake32" and b["device"] == "cpu"
    assert b["queue"] == {"queued": 0, "running": 0, "max_queued": 4}
    assert "perceptual_backbone" in b


def test_session_with_selection_progress_and_two_renders(server):
    h, w = 24, 32
    img = make_image(h, w)
    img[..., 3] = np.linspace(40, 255, w).astype(np.uint8)[None, :]
    sel = box_selection(h, w)
    r = server.request("POST", "/v1/sessions", {
        "layer": layer(img, x=5, y=7, name="face"), "selection": layer(sel[..., None], "gray8"),
        "model": "fake32", "method": "pti", "align": "none", "options": {"project_steps": 6, "tune_steps": 4}})
    assert r.status == 202, r.body
    sid, jid = r.body["session_id"], r.body["job_id"]
    events = asyncio.run(collect_events(server.port, server.token, jid, previews=True))
    assert events[-1]["type"] == "end" and events[-1]["state"] == "done" and events[-1]["progress"] == 1.0
    fractions = [e["progress"] for e in events]
    assert fractions == sorted(fractions)
    assert any(e["type"] == "progress" and 0 < e["progress"] < 1 for e in events)
    assert any(e.get("preview_png", b"")[:8] == b"\x89PNG\r\n\x1a\n" for e in events)  # GET /v1/jobs/{id}/preview
    assert server.engine.step_log.calls[-1]["options"].project_steps == 6
    assert server.engine.step_log.calls[-1]["options"].align == "none"

    outs = []
    for edits in ([{"direction": "smile", "strength": 1.5}], [{"direction": "age", "strength": -1.0, "layers": [0, 3]},
                                                               {"direction": "light", "strength": 0.5}]):
        r = server.request("POST", f"/v1/sessions/{sid}/render", {"edits": edits})
        assert r.status == 200, r.body
        lay = r.body["layer"]
        assert (lay["width"], lay["height"], lay["x"], lay["y"], lay["format"], lay["name"]) == (w, h, 5, 7, "rgba8", "face")
        outs.append(decode_layer(lay))
    inside = sel > 0
    for out in outs:
        assert np.array_equal(out[~inside][:, :3], img[~inside][:, :3])  # outside: untouched RGB ...
        assert (out[~inside][:, 3] == 0).all()  # ... and fully transparent
        assert np.array_equal(out[inside][:, 3], img[inside][:, 3])  # alpha = mask x input alpha
        assert not np.array_equal(out[inside][:, :3], img[inside][:, :3])  # inside changed
    assert not np.array_equal(outs[0], outs[1])

    r = server.request("GET", f"/v1/sessions/{sid}")
    assert r.status == 200 and r.body["state"] == "ready" and r.body["size_bytes"] > 0


def test_render_formats_json_and_reconstruction(server):
    img16 = (make_image(16, 16).astype(np.uint16) * 257)
    r = server.request("POST", "/v1/sessions", {"layer": layer(img16, "rgba16"), "options": {"project_steps": 1}})
    assert r.status == 202
    assert wait_job(server, r.body["job_id"])["state"] == "done"
    sid = r.body["session_id"]
    r = server.request("POST", f"/v1/sessions/{sid}/render", {"edits": []})
    assert r.status == 200 and r.body["layer"]["format"] == "rgba16"
    assert np.array_equal(decode_layer(r.body["layer"]), img16)  # no edit, no selection: identity
    r = server.request("POST", f"/v1/sessions/{sid}/render", {"edits": [], "format": "rgbaf32"})
    out = decode_layer(r.body["layer"])
    assert out.dtype == np.float32 and np.allclose(out, img16 / 65535.0, atol=1e-6)
    # JSON control request -> JSON answer with base64 bytes
    r = server.request("POST", f"/v1/sessions/{sid}/render", {"edits": [{"direction": "smile", "strength": 1}]},
                       ctype="application/json")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    assert isinstance(r.body["layer"]["data"], str)


def test_float_layer_with_stride_padding(server):
    img = make_image(12, 10).astype(np.float32) / 255.0
    padded = np.zeros((12, 10 * 4 * 4 + 16), np.uint8)
    padded[:, : 10 * 16] = np.frombuffer(img.astype("<f4").tobytes(), np.uint8).reshape(12, 160)
    wire = {"width": 10, "height": 12, "format": "rgbaf32", "stride": 176, "data": padded.tobytes()}
    r = server.request("POST", "/v1/sessions", {"layer": wire, "options": {"project_steps": 1}})
    assert r.status == 202, r.body
    assert wait_job(server, r.body["job_id"])["state"] == "done"
    r = server.request("POST", f"/v1/sessions/{r.body['session_id']}/render", {"edits": []})
    assert np.allclose(decode_layer(r.body["layer"]), img, atol=1e-6)


def test_batch_one_job_several_sessions(server):
    items = [{"layer": layer(make_image(16, 20, seed=i), x=i)} for i in range(3)]
    items[1]["selection"] = layer(box_selection(16, 20)[..., None], "gray8")
    r = server.request("POST", "/v1/batch", {"items": items, "options": {"project_steps": 2}})
    assert r.status == 202, r.body
    assert len(set(r.body["session_ids"])) == 3
    job = wait_job(server, r.body["job_id"])
    assert job["state"] == "done" and job["kind"] == "batch" and job["session_ids"] == r.body["session_ids"]
    for i, sid in enumerate(r.body["session_ids"]):
        rr = server.request("POST", f"/v1/sessions/{sid}/render", {"edits": [{"direction": "age", "strength": 1}]})
        assert rr.status == 200 and rr.body["layer"]["x"] == i


def test_delete_session_then_unknown(server):
    r = server.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "options": {"project_steps": 1}})
    sid = r.body["session_id"]
    wait_job(server, r.body["job_id"])
    assert server.request("DELETE", f"/v1/sessions/{sid}").status == 200
    assert not (server.config.data_dir / "sessions" / sid).exists()
    for method, path in (("GET", f"/v1/sessions/{sid}"), ("POST", f"/v1/sessions/{sid}/render")):
        r = server.request(method, path, {"edits": []} if method == "POST" else None)
        assert r.status == 404 and r.body["error"] == "unknown_session"


def test_status_page_token_query_sets_cookie(server):
    assert server.request("GET", "/", token=None, ctype=None).status == 401
    r = server.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "options": {"project_steps": 1}})
    wait_job(server, r.body["job_id"])
    assert http_request(server.port, "GET", "/?token=wrong-token-0123456789", ctype=None).status == 401
    r = http_request(server.port, "GET", f"/?token={server.token}", ctype=None)
    assert r.status == 303 and "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Strict" in r.headers["Set-Cookie"]
    cookie = r.headers["Set-Cookie"].split(";")[0]
    name, value = cookie.split("=", 1)
    assert name == f"latent_edit_status_{server.port}"  # port-scoped: two servers on one host never mix
    assert server.token not in r.headers["Set-Cookie"] and len(value) >= 24  # a separate credential, not the token
    page = http_request(server.port, "GET", "/", ctype=None, headers={"Cookie": cookie})
    assert page.status == 200
    assert b"done" in page.raw and b"/status/jobs/" in page.raw
    missing = http_request(server.port, "GET", "/status/jobs/nope/thumb.png", ctype=None, headers={"Cookie": cookie})
    assert missing.status == 404
    jid = server.request("GET", "/v1/jobs").body["jobs"][0]["job_id"]
    png = http_request(server.port, "GET", f"/status/jobs/{jid}/thumb.png", ctype=None, headers={"Cookie": cookie})
    assert png.status == 200 and png.raw[:8] == b"\x89PNG\r\n\x1a\n"
    # a cookie never authenticates the API
    assert http_request(server.port, "GET", "/v1/jobs", ctype=None, headers={"Cookie": cookie}).status == 401


def test_msgpack_accept_header_for_get(server):
    r = server.request("GET", "/v1/models", ctype=None, headers={"Accept": "application/msgpack"})
    assert r.status == 200 and r.headers["Content-Type"] == "application/msgpack"
    models = msgpack.unpackb(r.raw)["models"]
    assert [m["name"] for m in models] == ["fake32", "other"]
    assert {d["name"] for d in models[0]["directions"]} == {"smile", "age", "light"}


def test_models_serve_method_catalog_and_defaults(server):
    """Plugins read methods and defaults from here (one source: core.session), never from their own tuples."""
    import dataclasses

    import core.session as cs

    body = server.request("GET", "/v1/models").body
    names = [m["name"] for m in body["methods"]]
    assert names == list(cs.METHODS) and all(m.get("label") for m in body["methods"])
    defaults = {f.name: f.default for f in dataclasses.fields(cs.SessionOptions)}
    assert body["defaults"]["feather"] == defaults["feather"] and body["defaults"]["method"] == defaults["method"]


def test_long_poll_answers_at_the_next_change(server):
    """Plugins poll: ``?after=VERSION&wait=S`` returns as soon as the job changes, at once when it is finished."""
    import time

    r = server.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "options": {"project_steps": 20}})
    jid = r.body["job_id"]
    first = server.request("GET", f"/v1/jobs/{jid}").body
    t0 = time.monotonic()
    nxt = server.request("GET", f"/v1/jobs/{jid}?after={first['version']}&wait=20").body
    assert nxt["version"] > first["version"] and time.monotonic() - t0 < 5  # not the full 20 s
    final = wait_job(server, jid)
    assert final["state"] == "done"
    t0 = time.monotonic()
    again = server.request("GET", f"/v1/jobs/{jid}?after={final['version']}&wait=20").body
    assert again["state"] == "done" and time.monotonic() - t0 < 2  # finished: no wait
    for bad in ("wait=abc", "wait=31", "after=x"):
        e = server.request("GET", f"/v1/jobs/{jid}?{bad}")
        assert e.status == 422 and e.body["field"] == bad.split("=")[0]
    # the job-events WebSocket is gone (plugins poll)
    assert server.request("GET", f"/v1/jobs/{jid}/events").status == 404


def test_locality_reaches_the_engine_from_the_protocol(server):
    """Issue 15: ``options.locality`` is a protocol option; validated by SessionOptions, it reaches the engine."""
    r = server.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "method": "pti",
                                                "options": {"project_steps": 1, "tune_steps": 1, "locality": True}})
    assert r.status == 202, r.body
    assert wait_job(server, r.body["job_id"])["state"] == "done"
    assert server.engine.step_log.calls[-1]["options"].locality is True
    bad = server.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "options": {"locality": 1}})
    assert bad.status == 422 and bad.body["field"] == "options.locality"


def _labels(arr: np.ndarray, fmt: str = "label8", **extra) -> dict:
    """Wire map of an (H,W) integer label map (options.segments)."""
    a = np.ascontiguousarray(arr.astype({"label8": "u1", "label16": "<u2", "label32": "<i4"}.get(fmt, "u1")))
    return dict({"width": a.shape[1], "height": a.shape[0], "format": fmt, "data": a.tobytes()}, **extra)



def test_segments_option_wire_types_and_validation_name_the_field(server):
    """Issue 21: ``options.segments`` is "selection" | "auto" | a label map at the layer's size; each bad input
    is a 422 naming the field, before anything is queued."""
    h, w = 16, 16
    img = layer(make_image(h, w))
    three = np.repeat(np.array([0, 1, 2, 2], np.int32), 4)[None, :].repeat(h, 0)  # (16,16): 3 vertical bands

    def submit(segments, method="chunks", route="/v1/sessions"):
        body = {"layer": img, "method": method, "options": {"project_steps": 2, "segments": segments}}
        if route == "/v1/batch":
            body = {"items": [{"layer": img}], "method": method, "options": body["options"]}
        return server.request("POST", route, body)

    cases = [
        (5, "options.segments", "must be"),
        ("bogus", "options.segments", "segments"),
        (_labels(three, "label64"), "options.segments.format", "label8"),
        (_labels(three[:8, :8]), "options.segments", "layer is 16x16"),
        (_labels(three, data=b"\0" * 10), "options.segments.data", "holds 10 bytes"),
        (_labels(np.full((h, w), -1), "label32"), "options.segments", "no segment"),
        (_labels(np.arange(h * w).reshape(h, w), "label16"), "options.segments", "at most"),
    ]
    jobs_before = len(server.request("GET", "/v1/jobs").body["jobs"])
    for segments, field, words in cases:
        r = submit(segments)
        assert r.status == 422 and r.body["field"] == field and words in r.body["message"], (segments, r.body)
    r = submit(_labels(three), method="pti")  # label maps are ChunkyGAN segments: method "chunks"
    assert r.status == 422 and r.body["field"] == "options.segments" and "chunks" in r.body["message"], r.body
    r = submit(_labels(three), route="/v1/batch")  # a label map belongs to one layer
    assert r.status == 422 and r.body["field"] == "options.segments" and "one layer" in r.body["message"], r.body
    assert len(server.request("GET", "/v1/jobs").body["jobs"]) == jobs_before  # nothing was queued
    # a good label map reaches the engine as an (H,W) integer array, the label32 "no segment" value kept
    good = three.copy()
    good[0, 0] = -1
    r = submit(_labels(good, "label32"))
    assert r.status == 202, r.body
    assert wait_job(server, r.body["job_id"])["state"] == "done"
    got = server.engine.step_log.calls[-1]["options"].segments
    assert isinstance(got, np.ndarray) and got.shape == (h, w) and np.array_equal(got, good)
    r = submit("auto")
    assert r.status == 202 and wait_job(server, r.body["job_id"])["state"] == "done", r.body
    assert server.engine.step_log.calls[-1]["options"].segments == "auto"


def test_render_fusion_and_edit_segments_wire_types(server):
    """Issue 20/21: a render's ``fusion`` and an edit's ``segments`` are checked, naming the field; an engine
    whose sessions have neither answers 422 instead of ignoring them."""
    r = server.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "options": {"project_steps": 1}})
    assert wait_job(server, r.body["job_id"])["state"] == "done"
    url = f"/v1/sessions/{r.body['session_id']}/render"
    smile = {"direction": "smile", "strength": 1.0}
    cases = [
        ({"edits": [], "fusion": "bogus"}, "fusion"),
        ({"edits": [], "fusion": 1}, "fusion"),
        ({"edits": [dict(smile, segments="0")]}, "edits[0].segments"),
        ({"edits": [dict(smile, segments=[])]}, "edits[0].segments"),
        ({"edits": [dict(smile, segments=[0, 0])]}, "edits[0].segments"),
        ({"edits": [dict(smile, segments=[-1])]}, "edits[0].segments[0]"),
        ({"edits": [dict(smile, segments=[0, None])]}, "edits[0].segments"),
        ({"edits": [smile, dict(smile, segments=[99])]}, "edits[1].segments[0]"),
        ({"edits": [dict(smile, segments=[0])]}, "edits[0].segments"),  # the fake session has no segments
        ({"edits": [], "fusion": "relevance"}, "fusion"),  # ... and no fusion
    ]
    for body, field in cases:
        rr = server.request("POST", url, body)
        assert 400 <= rr.status < 500 and rr.body["field"] == field, (body, rr.status, rr.body)
    ok = server.request("POST", url, {"edits": [smile], "fusion": "none"})  # "none" is every engine's render
    assert ok.status == 200 and "segments" not in ok.body, ok.body


def test_models_say_which_have_a_segmenter(server):
    models = server.request("GET", "/v1/models").body["models"]
    assert all(isinstance(m["segmenter"], bool) for m in models)
