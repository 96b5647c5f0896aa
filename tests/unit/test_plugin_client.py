"""plugins/common: the stdlib HTTP client against a scripted loopback HTTP server, and the pixel helpers.

The scripted server here is a test double for transport behaviour (auth header, error bodies, timeouts,
job polling); the real server is exercised by tests/server and tests/hosts.
"""
from __future__ import annotations

import http.server
import socket
import struct
import threading

import msgpack
import numpy as np
import pytest

from plugins.common import client as C
from plugins.common import pixels as P

TOKEN = "s3cret-token"


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    log: list = []

    def log_message(self, *a):
        pass

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        body = msgpack.unpackb(raw, raw=False) if raw else None
        self.log.append((self.command, self.path, self.headers.get("Authorization"), self.headers.get("Content-Type"), body))
        fn = self.routes.get((self.command, self.path))
        if fn is None:
            status, out = 404, {"error": "not_found", "message": "no route " + self.path, "field": None}
        else:
            status, out = fn(self, body)
        if self.path != "/v1/health" and self.headers.get("Authorization") != "Bearer " + TOKEN:
            status, out = 401, {"error": "unauthorized", "message": "bad or missing token", "field": None}
        data = msgpack.packb(out, use_bin_type=True)
        self.send_response(status)
        self.send_header("Content-Type", "application/msgpack")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _handle


@pytest.fixture
def server(tmp_path):
    Handler.routes, Handler.log = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    yield httpd, "http://127.0.0.1:%d" % httpd.server_address[1], token_file
    httpd.shutdown()
    httpd.server_close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_health_needs_no_token_and_models_sends_bearer(server, monkeypatch):
    _, url, token_file = server
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")  # a proxy must never be used for loopback
    Handler.routes[("GET", "/v1/health")] = lambda h, b: (200, {"version": "1", "models": ["face64"]})
    Handler.routes[("GET", "/v1/models")] = lambda h, b: (200, {"models": [{"name": "face64", "directions": []}]})
    c = C.Client(url, token_file=str(token_file))
    assert c.health()["models"] == ["face64"]
    assert Handler.log[-1][2] is None
    assert c.models() == [{"name": "face64", "directions": []}]
    assert Handler.log[-1][2] == "Bearer " + TOKEN


def test_wrong_or_missing_token(server, tmp_path):
    _, url, _ = server
    Handler.routes[("GET", "/v1/models")] = lambda h, b: (200, {"models": []})
    bad = tmp_path / "bad"
    bad.write_text("nope")
    with pytest.raises(C.Unauthorized, match="rejected the token"):
        C.Client(url, token_file=str(bad)).models()
    with pytest.raises(C.Unauthorized, match="does not exist"):
        C.Client(url, token_file=str(tmp_path / "missing")).models()
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(C.Unauthorized, match="empty"):
        C.Client(url, token_file=str(empty)).models()


def test_server_not_running():
    c = C.Client("http://127.0.0.1:%d" % free_port(), token="x", timeout=2)
    with pytest.raises(C.ServerNotRunning, match="not running at http://127.0.0.1"):
        c.health()


def test_bad_url_is_refused():
    with pytest.raises(C.ClientError, match="not an http"):
        C.Client("ftp://x")


def test_timeout_is_reported():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)  # accepts the connection, never answers
    try:
        c = C.Client("http://127.0.0.1:%d" % s.getsockname()[1], token="x", timeout=0.5)
        with pytest.raises(C.ServerTimeout, match="did not answer"):
            c.health()
    finally:
        s.close()


def test_error_body_becomes_server_error(server):
    _, url, token_file = server
    Handler.routes[("POST", "/v1/sessions")] = lambda h, b: (422, {"error": "invalid_field", "message": "method: must be one of pti",
                                                                   "field": "method"})
    c = C.Client(url, token_file=str(token_file))
    with pytest.raises(C.ServerError) as ei:
        c.create_session(P.pack_layer(bytes(8 * 8 * 4), 8, 8, "rgba8"), method="bogus")
    assert (ei.value.status, ei.value.code, ei.value.field) == (422, "invalid_field", "method")
    assert "must be one of" in str(ei.value)


def test_create_session_body_and_job_polling_with_cancel(server):
    _, url, token_file = server
    polls = []

    def job(h, b):
        polls.append(1)
        if any(entry[0] == "DELETE" for entry in Handler.log):
            return 200, {"state": "cancelled", "progress": 0.5, "stage": "project", "message": "cancelled"}
        return 200, {"state": "running", "progress": 0.1 * len(polls), "stage": "project", "message": ""}

    Handler.routes[("POST", "/v1/sessions")] = lambda h, b: (201, {"session_id": "s1", "job_id": "j1"})
    Handler.routes[("GET", "/v1/jobs/j1")] = job
    Handler.routes[("DELETE", "/v1/jobs/j1")] = lambda h, b: (200, {"state": "cancelling"})
    c = C.Client(url, token_file=str(token_file))
    layer = P.pack_layer(bytes(range(256)) * 1, 8, 8, "rgba8", x=3, y=4)
    sel = P.pack_selection(bytes([255]) * 64, 8, 8, 3, 4)
    out = c.create_session(layer, sel, model="face64", method="w", align="none", options={"project_steps": 10})
    assert out == {"session_id": "s1", "job_id": "j1"}
    method, path, auth, ctype, body = Handler.log[-1]
    assert ctype == "application/msgpack"
    assert body["layer"]["data"] == layer["data"] and body["layer"]["x"] == 3
    assert body["selection"]["format"] == "gray8"
    assert (body["model"], body["method"], body["align"], body["options"]) == ("face64", "w", "none", {"project_steps": 10})
    seen = []
    with pytest.raises(C.JobCancelled):
        c.wait_job("j1", on_progress=seen.append, should_cancel=lambda: len(seen) >= 2, poll_interval=0.01)
    assert [e[0] for e in Handler.log].count("DELETE") == 1
    assert seen[-1]["state"] == "cancelled"


def test_wait_job_long_polls_a_server_that_numbers_job_changes(server):
    _, url, token_file = server
    answers = iter([{"state": "running", "progress": 0.5, "version": 3}, {"state": "done", "progress": 1.0, "version": 4}])
    Handler.routes[("GET", "/v1/jobs/j2")] = lambda h, b: (200, next(answers))
    Handler.routes[("GET", "/v1/jobs/j2?after=3&wait=0.5")] = lambda h, b: (200, next(answers))
    job = C.Client(url, token_file=str(token_file)).wait_job("j2", poll_interval=60)  # no sleep: it would take 60 s
    assert job["state"] == "done"
    assert [e[1] for e in Handler.log] == ["/v1/jobs/j2", "/v1/jobs/j2?after=3&wait=0.5"]


def test_failed_job_carries_code_and_friendly_message():
    with pytest.raises(C.JobFailed) as ei:
        C.check_job({"state": "failed", "error": {"error": "no_face", "message": "no face detected", "field": None}})
    assert ei.value.code == "no_face" and "No face was found" in str(ei.value)
    with pytest.raises(C.JobFailed, match="boom"):
        C.check_job({"state": "failed", "error": "internal", "message": "boom"})
    with pytest.raises(C.JobFailed) as ei:  # what core.align really raises (InvalidInput)
        C.check_job({"state": "failed", "error": {"error": "invalid_input", "message": "no face found in the layer"}})
    assert ei.value.code == "invalid_input" and str(ei.value).startswith("No face was found")
    assert "no face found in the layer" in str(ei.value)
    with pytest.raises(C.JobFailed, match="server stopped while this job ran"):
        C.check_job({"state": "interrupted", "error": None, "message": ""})
    C.check_job({"state": "running"})


def test_render_request_and_result_layers(server):
    _, url, token_file = server
    res = P.pack_layer(bytes(16 * 4), 4, 4, "rgba8")
    Handler.routes[("POST", "/v1/sessions/s1/render")] = lambda h, b: (200, {"layer": res})
    c = C.Client(url, token_file=str(token_file))
    out = c.render("s1", [("smile", 1.5)], feather=4, format="rgba16")
    assert Handler.log[-1][4] == {"edits": [{"direction": "smile", "strength": 1.5}], "feather": 4.0, "format": "rgba16"}
    assert C.result_layers(out) == [res]
    assert C.result_layers({"layers": [res, res]}) == [res, res]
    with pytest.raises(C.ServerError, match="no layer"):
        C.result_layers({"foo": 1})


# --- pixels ---

def test_swap_red_blue_8_16_bit():
    rng = np.random.default_rng(0)
    bgra8 = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba = np.frombuffer(P.swap_red_blue(bgra8.tobytes(), 1), np.uint8).reshape(5, 7, 4)
    assert (rgba == bgra8[..., [2, 1, 0, 3]]).all()
    bgra16 = rng.integers(0, 65536, (5, 7, 4), dtype=np.uint16).astype("<u2")
    rgba16 = np.frombuffer(P.swap_red_blue(bgra16.tobytes(), 2), "<u2").reshape(5, 7, 4)
    assert (rgba16 == bgra16[..., [2, 1, 0, 3]]).all()
    assert P.swap_red_blue(P.swap_red_blue(bgra16.tobytes(), 2), 2) == bgra16.tobytes()
    with pytest.raises(P.PixelError):
        P.swap_red_blue(b"abc", 1)


def test_depth_conversions_are_exact_where_they_can_be():
    v8 = np.arange(256, dtype=np.uint8)
    v16 = np.frombuffer(P.convert_samples(v8.tobytes(), "rgba8", "rgba16"), "<u2")
    assert (v16 == v8.astype(np.uint32) * 257).all()
    assert P.convert_samples(v16.tobytes(), "rgba16", "rgba8") == v8.tobytes()
    any16 = np.arange(0, 65536, 7, dtype="<u2")
    back8 = np.frombuffer(P.convert_samples(any16.tobytes(), "rgba16", "rgba8"), np.uint8)
    assert (back8 == np.rint(any16 / 257.0)).all()
    f = np.frombuffer(P.convert_samples(v8.tobytes(), "rgba8", "rgbaf32"), "<f4")
    assert np.allclose(f, v8 / 255.0)
    assert P.convert_samples(f.tobytes(), "rgbaf32", "rgba8") == v8.tobytes()
    odd = np.array([-1.0, 2.0, np.nan, 0.5], "<f4")
    assert list(P.convert_samples(odd.tobytes(), "rgbaf32", "rgba8")) == [0, 255, 0, 128]
    assert list(np.frombuffer(P.convert_samples(odd.tobytes(), "rgbaf32", "rgba16"), "<u2")) == [0, 65535, 0, 32768]


def test_half_float_round_trip():
    vals = np.array([0.0, 0.25, 1.0, -2.0, 0.1], np.float16)
    f32 = np.frombuffer(P.half_to_float32(vals.astype("<f2").tobytes()), "<f4")
    assert (f32 == vals.astype(np.float32)).all()
    assert P.float32_to_half(f32.tobytes()) == vals.astype("<f2").tobytes()


def test_transfer_curves_match_srgb_formula_and_keep_alpha():
    lin = np.array([[0.0, 0.001, 0.2, 0.7], [1.0, 0.5, 0.05, 0.3]], "<f4")
    enc = np.frombuffer(P.transfer_rgb(lin.tobytes(), "rgbaf32", True), "<f4").reshape(2, 4)
    ref = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.power(lin, 1 / 2.4) - 0.055)
    assert np.allclose(enc[:, :3], ref[:, :3], atol=1e-6) and (enc[:, 3] == lin[:, 3]).all()
    dec = np.frombuffer(P.transfer_rgb(enc.tobytes(), "rgbaf32", False), "<f4").reshape(2, 4)
    assert np.allclose(dec, lin, atol=1e-6)
    v16 = (lin * 65535).round().astype("<u2")
    e16 = np.frombuffer(P.transfer_rgb(v16.tobytes(), "rgba16", True), "<u2").reshape(2, 4)
    assert np.abs(e16[:, :3].astype(float) / 65535 - ref[:, :3]).max() < 2e-4 and (e16[:, 3] == v16[:, 3]).all()


def test_pack_and_unpack_layer_with_stride():
    data = bytes(range(48))
    wire = P.pack_layer(data, 3, 4, "rgba8", 5, 6, "face")
    assert wire == {"width": 3, "height": 4, "format": "rgba8", "stride": 12, "data": data, "x": 5, "y": 6, "name": "face"}
    padded = b"".join(data[r * 12:(r + 1) * 12] + b"\xee" * 4 for r in range(4))
    assert P.unpack_layer({"width": 3, "height": 4, "format": "rgba8", "stride": 16, "data": padded}) == (data, 3, 4, "rgba8", 0, 0)
    with pytest.raises(P.PixelError, match="needs 48 bytes"):
        P.pack_layer(data[:-1], 3, 4, "rgba8")
    with pytest.raises(P.PixelError, match="unknown"):
        P.unpack_layer({"width": 1, "height": 1, "format": "cmyk", "data": b""})
    with pytest.raises(P.PixelError, match="too short"):
        P.unpack_layer({"width": 3, "height": 4, "format": "rgba16", "data": data})


def test_selection_helpers():
    m = np.zeros((6, 9), np.uint8)
    m[2:4, 3:7] = 200
    assert P.pack_selection(m.tobytes(), 9, 6, 1, 2)["stride"] == 9
    with pytest.raises(P.PixelError):
        P.pack_selection(b"\x00", 9, 6)


def test_float_wire_is_little_endian():
    wire = P.pack_layer(struct.pack("<4f", 0.0, 0.5, 1.0, 1.0), 1, 1, "rgbaf32")
    assert np.frombuffer(wire["data"], "<f4").tolist() == [0.0, 0.5, 1.0, 1.0]


# --- contract: the client against the real server app (python -m server) with the server's fake engine ---

@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """``python -m server --port 0`` with tests/server/fake_engine.py (fast, deterministic renders)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tmp_path_factory.mktemp("srv")
    env = dict(os.environ, PYTHONPATH=str(root / "tests" / "server"), FAKE_STEP_S="0.05", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data),
                             "--engine", "fake_engine:make_engine", "--log-level", "warning"], cwd=str(root), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = None
    for line in proc.stdout:  # the ready line carries the port
        if line.startswith("latent-edit server ready at "):
            url = line.split(" at ", 1)[1].strip().rstrip("/")
            break
    assert url, "the server did not start"
    yield C.Client(url, token_file=str(data / "token"), timeout=20), data
    proc.terminate()
    proc.wait(20)


def _face_layer(w=16, h=16, fmt="rgba8"):
    rgba = np.random.default_rng(1).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    return rgba, P.pack_layer(rgba.tobytes(), w, h, fmt, x=5, y=7, name="face")


def test_contract_session_render_formats_and_placement(real_server):
    c, _ = real_server
    assert c.health()["status"] == "ok"
    models = c.models()
    assert models[0]["name"] == "fake32" and models[0]["directions"][0]["name"] == "smile"
    rgba, layer = _face_layer()
    sel = np.zeros((16, 16), np.uint8)
    sel[4:12, 4:12] = 255
    out = c.create_session(layer, P.pack_selection(sel.tobytes(), 16, 16, 5, 7), model="fake32", method="w", align="none",
                           options={"project_steps": 3})
    job = c.wait_job(out["job_id"], poll_interval=0.05)
    assert job["state"] == "done" and out["session_id"] in job["session_ids"]
    for fmt, dtype, scale in (("rgba8", np.uint8, 1), ("rgba16", "<u2", 257), ("rgbaf32", "<f4", 1 / 255)):
        res = C.result_layers(c.render(out["session_id"], [("smile", 1.0)], feather=0, format=fmt))[0]
        data, w, h, got_fmt, x, y = P.unpack_layer(res)
        assert (w, h, got_fmt, x, y, res.get("name")) == (16, 16, fmt, 5, 7, "face")
        arr = np.frombuffer(data, dtype).reshape(16, 16, 4).astype(np.float64)
        src = rgba.astype(np.float64)
        assert np.allclose(arr[..., 3], sel.astype(np.float64) * scale, atol=1e-4 * scale)
        assert np.allclose(arr[..., :3][sel == 0], src[..., :3][sel == 0] * scale, atol=1e-4 * scale)
        assert (arr[..., 0][sel == 255] >= src[..., 0][sel == 255] * scale - 1e-3).all()


def test_contract_errors_map_to_client_exceptions(real_server):
    c, data = real_server
    _, layer = _face_layer()
    out = c.create_session(layer, method="w", options={"project_steps": 1})
    c.wait_job(out["job_id"], poll_interval=0.05)
    with pytest.raises(C.ServerError) as ei:
        c.render(out["session_id"], [("no_such_direction", 1.0)])
    assert (ei.value.status, ei.value.code, ei.value.field) == (422, "invalid_field", "edits[0].direction")
    with pytest.raises(C.ServerError) as ei:
        c.render("nope", [])
    assert ei.value.status == 404
    with pytest.raises(C.ServerError) as ei:
        c.create_session(layer, method="bogus")
    assert ei.value.field == "method"
    with pytest.raises(C.Unauthorized):
        C.Client(c.url, token="wrong").models()


def test_contract_batch_and_cancel(real_server):
    c, _ = real_server
    _, a = _face_layer()
    _, b = _face_layer(24, 16)
    out = c.batch([{"layer": a}, {"layer": b}], method="w", options={"project_steps": 2})
    assert len(out["session_ids"]) == 2
    c.wait_job(out["job_id"], poll_interval=0.05)
    sizes = [P.unpack_layer(C.result_layers(c.render(s, [("age", 1)]))[0])[1:3] for s in out["session_ids"]]
    assert sizes == [(16, 16), (24, 16)]
    long = c.create_session(a, method="w", options={"project_steps": 2000})
    seen = []
    with pytest.raises(C.JobCancelled):
        c.wait_job(long["job_id"], on_progress=seen.append, should_cancel=lambda: any(j["progress"] > 0 for j in seen),
                   poll_interval=0.05)
    assert c.job(long["job_id"])["state"] == "cancelled"


# --- the shared host flow (plugins/common/flow.py) ---

from plugins.common import flow as F  # noqa: E402


def test_catalog_takes_methods_and_defaults_from_the_server_and_falls_back_only_without_them():
    body = {"models": [{"name": "m", "directions": [{"name": "smile", "default_strength": 1.5, "range": [-3, 3]}],
                        "methods": [{"name": "w", "label": "W (fast)", "project_steps": 300}]}],
            "default_model": "m", "defaults": {"feather": 5.0}}
    cat = F.read_catalog(body)
    assert [(m.name, m.label, m.project_steps) for m in cat.methods_for()] == [("w", "W (fast)", 300)]
    assert cat.feather == 5.0 and cat.model()["name"] == "m"
    old = F.read_catalog({"models": [{"name": "m", "directions": ["smile"]}]})  # a server without the fields
    assert [m.name for m in old.methods_for("m")] == ["pti", "chunks", "w", "wplus"] and old.feather == 8.0
    with pytest.raises(F.FlowError, match="no model \"x\". It offers: m"):
        cat.model("x")


def test_pti_pivots_become_method_choices_and_travel_as_options_pivot():
    pti = {"name": "pti", "label": "Pivotal tuning (closest likeness)", "project_steps": 450, "tune_steps": 350,
           "pivots": [{"name": "w", "label": "The latent code (W)", "project_steps": 450},
                      {"name": "magec", "label": "The editability-aware code (MAGEC)", "project_steps": 200}]}
    cat = F.read_catalog({"models": [{"name": "m", "directions": ["smile"], "methods": [pti, {"name": "w"}]}]})
    got = [(m.name, m.label, m.project_steps, m.tune_steps) for m in cat.methods_for()]
    assert got == [("pti", "Pivotal tuning (closest likeness)", 450, 350),
                   ("pti:magec", "Pivotal tuning, starting from the editability-aware code (MAGEC)", 200, 350),
                   ("w", "w", None, None)]
    o = F.EditOptions(method="pti:magec", project_steps=4)
    assert o.wire_method == "pti" and o.session_options() == {"project_steps": 4, "pivot": "magec"}
    assert F.EditOptions(method="w").session_options() == {} and F.EditOptions(method="w").wire_method == "w"
    F.check_request(cat, F.EditOptions(method="pti:magec", model="m"))
    with pytest.raises(F.FlowError, match="Unknown method \"pti:encoder\""):
        F.check_request(cat, F.EditOptions(method="pti:encoder", model="m"))
    assert {"magec", "encoder", "pti:w", "pti:magec", "pti:encoder"} <= {m["name"] for m in F.STATIC_METHODS}
    F.check_request(cat, F.EditOptions(method="pti:w", model="m"))  # the plain choice's own pivot, named


def test_a_model_whose_pti_starts_from_the_encoder_offers_w_as_the_alternative():
    """The server lists the default pivot first (core.session.default_pivot): the plain "pti" choice is named for
    it and carries its steps; PTI's own W pivot becomes the choice "pti:w"; "pti:encoder" still passes."""
    pti = {"name": "pti", "label": "Pivotal tuning (closest likeness)", "project_steps": 450, "tune_steps": 350,
           "default_pivot": "encoder",
           "pivots": [{"name": "encoder", "label": "The encoder's code (fast)", "project_steps": 0, "tune_steps": 250},
                      {"name": "w", "label": "The latent code (W)", "project_steps": 450, "tune_steps": 350}]}
    cat = F.read_catalog({"models": [{"name": "m", "directions": ["smile"], "methods": [pti]}]})
    got = [(m.name, m.label, m.project_steps, m.tune_steps) for m in cat.methods_for()]
    assert got == [("pti", "Pivotal tuning (closest likeness), starting from the encoder's code (fast)", 0, 250),
                   ("pti:w", "Pivotal tuning, starting from the latent code (W)", 450, 350)]
    assert F.EditOptions(method="pti").session_options() == {}  # the server fills in its default pivot
    assert F.EditOptions(method="pti:w").session_options() == {"pivot": "w"}
    F.check_request(cat, F.EditOptions(method="pti:encoder", model="m"))
    with pytest.raises(F.FlowError, match="Unknown method \"pti:magec\""):
        F.check_request(cat, F.EditOptions(method="pti:magec", model="m"))
    # "Projection steps" means nothing where the server projects nothing: the plain choice (the encoder's code)
    assert [F.uses_projection_steps(cat.method(c)) for c in ("pti", "pti:encoder", "pti:w")] == [False, False, True]
    assert cat.method("pti:magec") is None and F.uses_projection_steps(F.Method("w", "w"))  # unknown steps: used


def test_check_request_refuses_a_mistyped_edit_or_method_before_any_work():
    cat = F.read_catalog({"models": [{"name": "m", "directions": ["smile", "age"]}], "default_model": "m"})
    assert F.check_request(cat, F.EditOptions(edits=[("smile", 1)], method="w"))["name"] == "m"
    with pytest.raises(F.FlowError, match='no edit named "smlie". Its edits are: smile, age'):
        F.check_request(cat, F.EditOptions(edits=[("smlie", 1)], method="w"))
    with pytest.raises(F.FlowError, match="Unknown method"):
        F.check_request(cat, F.EditOptions(edits=[("smile", 1)], method="fast"))


def test_progress_text_never_doubles_the_stage():
    assert F.progress_text({"stage": "project", "message": "Projecting 44/300"}) == "Projecting 44/300"
    assert F.progress_text({"stage": "tune", "message": ""}) == "Tuning the generator"
    assert F.job_fraction({"fraction": 0.5, "progress": 0.1}) == 0.5 and F.job_fraction({"progress": 2}) == 1.0


class FlowServer:
    """In-process double of the protocol for run_edit: counts inversions and renders; can forget sessions."""

    url = "http://flow"

    def __init__(self):
        self.calls, self.known = [], set()

    def request(self, method, path):
        assert (method, path) == ("GET", "/v1/models")
        return {"models": [{"name": "m", "directions": ["smile"]}], "default_model": "m"}

    def create_session(self, layer, selection=None, model=None, method="pti", align="auto", options=None):
        sid = "s%d" % len(self.calls)
        self.calls.append("create")
        self.known.add(sid)
        return {"session_id": sid, "job_id": "j" + sid}

    def wait_job(self, job_id, on_progress=None, should_cancel=None):
        on_progress({"state": "running", "fraction": 0.5, "stage": "project", "message": "Projecting 1/2"})
        return {"state": "done"}

    def render(self, sid, edits, feather=None, format=None):
        self.calls.append("render")
        if sid not in self.known:
            raise C.ServerError(410, "session_evicted", "evicted")
        return {"layer": {"width": 8, "height": 8, "format": format, "data": b"r"}}


def _item(value=1):
    return F.Item(P.pack_layer(bytes([value]) * 256, 8, 8, "rgba8"))


def test_run_edit_reuses_a_cached_session_and_inverts_again_when_the_server_forgot_it(tmp_path):
    server, path = FlowServer(), str(tmp_path / "sessions.json")
    opts = F.EditOptions(edits=[("smile", 1)], method="w")
    seen = []
    out = F.run_edit(server, [_item()], opts, F.SessionCache(path=path), on_progress=seen.append)
    assert out.reused == 0 and server.calls == ["create", "render"] and seen[-1].fraction == 1.0
    assert any(p.message == "Projecting 1/2" for p in seen)
    # a new process (GIMP runs one per call) reads the cache file: same layer -> a re-render only
    out = F.run_edit(server, [_item()], opts, F.SessionCache(path=path))
    assert out.reused == 1 and server.calls == ["create", "render", "render"]
    # other pixels or other inversion options: a new inversion
    F.run_edit(server, [_item(2)], opts, F.SessionCache(path=path))
    F.run_edit(server, [_item()], F.EditOptions(edits=[("smile", 1)], method="pti"), F.SessionCache(path=path))
    assert server.calls.count("create") == 3
    server.known.clear()  # the server restarted with an empty cache: one failed render, then invert again
    out = F.run_edit(server, [_item()], opts, F.SessionCache(path=path))
    assert out.reused == 0 and server.calls[-3:] == ["render", "create", "render"]
    n = len(server.calls)
    with pytest.raises(F.FlowError, match="no edit named"):  # refused before any upload
        F.run_edit(server, [_item(3)], F.EditOptions(edits=[("smlie", 1)], method="w"), F.SessionCache())
    assert len(server.calls) == n


def test_latest_only_runs_one_at_a_time_and_the_last_request_wins():
    gate, started = threading.Event(), threading.Event()
    ran = []

    def work(req):
        ran.append(req)
        if req == 1:
            started.set()
            gate.wait(5)
        return req * 10

    lo = F.LatestOnly(work)
    lo.submit(1)
    assert started.wait(5)
    for req in (2, 3, 4):  # while 1 is in flight: only the newest waits
        lo.submit(req)
    gate.set()
    got = []
    for _ in range(500):
        done = lo.take()
        if done:
            got.append(done)
        if not lo.busy and got and got[-1][0] == 4:
            break
        threading.Event().wait(0.01)
    assert ran == [1, 4] and got[-1] == (4, 40, None)


def test_selection_regions_are_8_connected_and_largest_first():
    m = np.zeros((10, 12), np.uint8)
    m[1:3, 1:3] = 255  # small square
    m[5:9, 4:10] = 128  # large block
    m[3, 3] = 9  # touches the small square diagonally: the same region
    assert P.selection_regions(m.tobytes(), 12, 10) == [(4, 5, 10, 9), (1, 1, 4, 4)]
    assert P.selection_regions(bytes(120), 12, 10) == []


def test_each_region_is_one_batch_item_and_the_renders_merge_into_one_layer():
    w, h = 40, 20
    rgba = np.random.default_rng(0).integers(0, 256, (h, w, 4), np.uint8)
    sel = np.zeros((h, w), np.uint8)
    sel[4:14, 2:12] = 255  # face 1
    sel[6:16, 26:36] = 255  # face 2
    item = F.Item(P.pack_layer(rgba.tobytes(), w, h, "rgba8", 100, 50, "group"), P.pack_selection(sel.tobytes(), w, h, 100, 50))

    class Batch(FlowServer):
        def batch(self, items, **kw):
            self.calls.append(("batch", [(i["layer"]["x"], i["layer"]["y"], i["layer"]["width"]) for i in items]))
            ids = ["b%d" % k for k in range(len(items))]
            self.known.update(ids)
            self.items.update(zip(ids, items))
            return {"session_ids": ids, "job_id": "jb"}

        def render(self, sid, edits, feather=None, format=None):  # the crop, inverted in colour, alpha = selection
            if sid not in self.items:
                return super().render(sid, edits, feather, format)
            lay, s = self.items[sid]["layer"], self.items[sid]["selection"]
            a = np.frombuffer(lay["data"], np.uint8).reshape(lay["height"], lay["width"], 4).copy()
            a[..., :3] = 255 - a[..., :3]
            a[..., 3] = np.frombuffer(s["data"], np.uint8).reshape(lay["height"], lay["width"])
            return {"layer": P.pack_layer(a.tobytes(), lay["width"], lay["height"], "rgba8", lay["x"], lay["y"])}

    server = Batch()
    server.items = {}
    opts = F.EditOptions(edits=[("smile", 1)], method="pti", each_region=True)
    out = F.run_edit(server, [item], opts, F.SessionCache())
    (kind, crops), = [c for c in server.calls if c[0] == "batch"]
    assert len(crops) == 2 and all(x >= 100 and y >= 50 for x, y, _w in crops)  # crops placed in the document
    (layer,) = out.layers
    data, lw, lh, fmt, x, y = P.unpack_layer(layer)
    assert (lw, lh, x, y) == (w, h, 100, 50)
    res = np.frombuffer(data, np.uint8).reshape(h, w, 4)
    inside = sel == 255
    assert (res[..., :3][inside] == 255 - rgba[..., :3][inside]).all() and (res[..., 3] == sel).all()
    # one selected region: the ordinary single-session path
    sel1 = np.where(np.arange(w)[None, :] < 20, sel, 0).astype(np.uint8)
    one = F.Item(item.layer, P.pack_selection(sel1.tobytes(), w, h, 100, 50))
    F.run_edit(server, [one], opts, F.SessionCache())
    assert server.calls[-2:] == ["create", "render"]
