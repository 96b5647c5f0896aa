"""Malformed requests: every one gets a 4xx with ``{error, message}``, nothing is queued, the server stays healthy."""
from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_helpers import LiveServer, box_selection, layer, make_image, wait_job
from fake_engine import make_engine
from server.protocol import Limits

MP = "application/msgpack"
JS = "application/json"
IMG = make_image(16, 16)
GOOD = layer(IMG)
SEL = layer(box_selection(16, 16)[..., None], "gray8")
LIMITS = Limits(max_body_bytes=1 << 20, max_json_bytes=4096, max_side=2048, max_pixels=512 * 512, max_batch=4,
                max_edits=8)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("fuzz"), make_engine(step_s=0.0), limits=LIMITS)
    r = srv.request("POST", "/v1/sessions", {"layer": GOOD, "options": {"project_steps": 1}})
    srv.ready_session = r.body["session_id"]
    wait_job(srv, r.body["job_id"])
    yield srv
    srv.stop()


def with_layer(**changes):
    d = dict(GOOD)
    for k, v in changes.items():
        if v is DROP:
            d.pop(k)
        else:
            d[k] = v
    return {"layer": d}


DROP = object()
NAN32 = np.full((16, 16, 4), 0.5, np.float32)
NAN32[3, 4, 1] = np.nan
INF32 = np.full((16, 16, 4), 0.5, np.float32)
INF32[0, 0, 0] = np.inf

# (id, method, path, body, content type, token: True = right, None = missing, str = that, expected status)
CASES = []


def case(name, body, status, method="POST", path="/v1/sessions", ctype=MP, token=True):
    CASES.append(pytest.param(method, path, body, ctype, token, status, id=name))


# --- authentication (every route but health) ------------------------------------------------------
ROUTES = [("GET", "/v1/models"), ("POST", "/v1/sessions"), ("POST", "/v1/batch"), ("GET", "/v1/jobs"),
          ("GET", "/v1/jobs/abc"), ("DELETE", "/v1/jobs/abc"), ("POST", "/v1/jobs/abc/retry"),
          ("GET", "/v1/jobs/abc/events"), ("GET", "/v1/sessions/abc"), ("DELETE", "/v1/sessions/abc"),
          ("POST", "/v1/sessions/abc/render"), ("GET", "/v1/nothing-here")]
for m, p in ROUTES:
    case(f"no-token {m} {p}", {"edits": []} if m == "POST" else None, 401, m, p, token=None)
    case(f"wrong-token {m} {p}", {"edits": []} if m == "POST" else None, 401, m, p, token="wrong-token-0123456789")
for t in ("", "Basic dXNlcjpwdw==", "Bearer", "Bearer  ", "Token abc"):
    CASES.append(pytest.param("GET", "/v1/models", None, None, {"Authorization": t}, 401, id=f"auth-header {t!r}"))

# --- body encodings -------------------------------------------------------------------------------
case("garbage bytes", b"\xc1\xff\x00garbage", 400)
case("truncated msgpack", msgpack.packb({"layer": GOOD})[:-10], 400)
case("trailing bytes", msgpack.packb({"layer": GOOD}) + b"\x00", 400)
case("empty body", b"", 400)
case("top-level array", msgpack.packb([1, 2, 3]), 400)
case("top-level int", msgpack.packb(7), 400)
case("top-level nil", msgpack.packb(None), 400)
case("ext type", msgpack.packb({"layer": msgpack.ExtType(5, b"xx")}), 400)
case("timestamp ext as model", msgpack.packb({"layer": GOOD, "model": msgpack.Timestamp(1, 0)}), 422)
case("invalid utf-8 str", b"\x81\xa5layer\xa2\xff\xfe", 400)
case("int map key", msgpack.packb({1: 2}), 400)
case("deep nesting", b"\x91" * 5000 + b"\xc0", 400)
case("bad json", b"{layer:", 400, ctype=JS)
case("json NaN constant", b'{"layer": NaN}', 400, ctype=JS)
case("json top-level list", b"[1]", 400, ctype=JS)
case("json too large", b'{"model": "' + b"x" * 5000 + b'"}', 413, ctype=JS)
case("json layer without bytes", {"layer": dict(GOOD, data="AAAA")}, 422, ctype=JS)
case("text/plain", b"hello", 415, ctype="text/plain")
case("no content type", msgpack.packb({"layer": GOOD}), 415, ctype=None)
case("form content type", b"a=b", 415, ctype="application/x-www-form-urlencoded")
case("body over limit", b"\x00" * ((1 << 20) + 10), 413)

# --- session fields -------------------------------------------------------------------------------
case("missing layer", {"model": "fake32"}, 422)
case("layer not map", {"layer": [1, 2]}, 422)
case("layer is bytes", {"layer": GOOD["data"]}, 422)
case("unknown top-level field", dict(with_layer(), colour="red"), 422)
case("unknown layer field", {"layer": dict(GOOD, depth=8)}, 422)
for key in ("width", "height", "format", "data"):
    case(f"layer missing {key}", with_layer(**{key: DROP}), 422)
for key, bad in [("width", "16"), ("width", -16), ("width", 0), ("width", True), ("width", 16.5), ("width", None),
                 ("height", [16]), ("height", 3), ("height", 2**63), ("format", "rgb8"), ("format", "RGBA8"),
                 ("format", 8), ("format", ""), ("data", "bytes"), ("data", 123), ("data", [1, 2]),
                 ("data", GOOD["data"][:-1]), ("data", GOOD["data"] + b"\x00"), ("data", b""),
                 ("stride", 63), ("stride", 0), ("stride", -64), ("stride", "64"), ("stride", 10**12),
                 ("x", "0"), ("y", 1.5), ("x", 2**40), ("name", 5), ("name", ""), ("name", "n" * 600)]:
    case(f"layer {key}={bad!r:.30}", with_layer(**{key: bad}), 422)
case("giant dims", with_layer(width=100000, height=100000), 422)
case("too many pixels", with_layer(width=2048, height=2048, data=b"\x00" * 16), 422)
case("giant dims matching nothing", with_layer(width=2000, height=2000), 422)
case("size mismatch wide", with_layer(width=32), 422)
case("rgba16 with rgba8 bytes", with_layer(format="rgba16"), 422)
case("rgbaf32 NaN", {"layer": layer(NAN32, "rgbaf32")}, 422)
case("rgbaf32 Inf", {"layer": layer(INF32, "rgbaf32")}, 422)
case("selection wrong size", {"layer": GOOD, "selection": layer(np.full((8, 16, 1), 255, np.uint8), "gray8")}, 422)
case("selection rgba format", {"layer": GOOD, "selection": dict(GOOD)}, 422)
case("selection empty", {"layer": GOOD, "selection": layer(np.zeros((16, 16, 1), np.uint8), "gray8")}, 422)
case("selection NaN", {"layer": GOOD, "selection": layer(np.full((16, 16, 1), np.nan, np.float32), "grayf32")}, 422)
case("selection not map", {"layer": GOOD, "selection": "all"}, 422)
for key, bad in [("model", "stylegan9"), ("model", 3), ("model", ""), ("method", "gan"), ("method", 1),
                 ("method", ["pti"]), ("align", "yes"), ("align", True), ("options", [1]), ("options", "fast")]:
    case(f"{key}={bad!r}", dict(with_layer(), **{key: bad}), 422)
for key, bad in [("project_steps", -1), ("project_steps", "100"), ("project_steps", 10**9), ("project_steps", 1.5),
                 ("tune_steps", True), ("feather", float("nan")), ("feather", float("inf")), ("feather", -1.0),
                 ("feather", "8"), ("blend", "multiply"), ("seed", -1), ("seed", 1.5), ("seed", 2**40),
                 ("timeout_s", 0), ("timeout_s", float("nan")), ("timeout_s", 1e12), ("speed", 2),
                 ("color_match", 1), ("space", "z"), ("reg", -1.0), ("min_face", 0), ("project_steps", 0),
                 ("reg", float("inf")), ("locality", "yes")]:
    case(f"options.{key}={bad!r}", dict(with_layer(), options={key: bad}), 422)
case("method w with project_steps 0", dict(with_layer(), method="w", options={"project_steps": 0}), 422)

# --- batch ----------------------------------------------------------------------------------------
for name, body in [("items missing", {"model": "fake32"}), ("items empty", {"items": []}),
                   ("items not list", {"items": {"layer": GOOD}}), ("items too many", {"items": [{"layer": GOOD}] * 5}),
                   ("item missing layer", {"items": [{"selection": SEL}]}), ("item unknown key", {"items": [{"layer": GOOD, "mask": SEL}]}),
                   ("item not map", {"items": [GOOD["data"]]}), ("item bad layer", {"items": [{"layer": GOOD}, {"layer": dict(GOOD, width=17)}]}),
                   ("batch with layer key", {"layer": GOOD})]:
    case(f"batch {name}", body, 422, path="/v1/batch")

# --- unknown ids and routes -----------------------------------------------------------------------
for m, p in [("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/retry"),
             ("GET", "/v1/jobs/nope/preview"), ("GET", "/v1/jobs/nope/events"), ("GET", "/v1/sessions/nope"),
             ("DELETE", "/v1/sessions/nope"), ("POST", "/v1/sessions/nope/render"), ("GET", "/v1/nothing"),
             ("GET", "/v1/sessions/" + "x" * 300), ("GET", "/v1/jobs?limit=abc"), ("GET", "/v1/jobs?limit=0")]:
    exp = 422 if "limit" in p else 404
    case(f"unknown {m} {p[:40]}", {"edits": []} if m == "POST" else None, exp, m, p)
for m, p in [("PUT", "/v1/sessions"), ("POST", "/v1/health"), ("PATCH", "/v1/jobs/abc"), ("GET", "/v1/batch")]:
    case(f"method {m} {p}", None, 405, m, p)


@pytest.mark.parametrize("method,path,body,ctype,token,status", CASES)
def test_malformed_request(fuzz_server, method, path, body, ctype, token, status):
    headers = None
    if isinstance(token, dict):
        headers, token = token, None
    elif token is True:
        token = fuzz_server.token
    r = fuzz_server.request(method, path, body, ctype=ctype, token=token, headers=headers)
    assert r.status == status, (r.status, r.raw[:300])
    err = r.body
    assert isinstance(err, dict) and isinstance(err["error"], str) and err["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 5
    assert "Traceback" not in r.raw.decode("utf-8", "replace")
    if status == 422 and err["error"] in ("invalid_field", "unknown_field", "missing_field"):
        assert err["field"], err


RENDER_CASES = [
    ("edits missing", {}), ("edits not list", {"edits": "smile"}), ("edit not map", {"edits": ["smile"]}),
    ("unknown direction", {"edits": [{"direction": "beard", "strength": 1}]}),
    ("direction int", {"edits": [{"direction": 3, "strength": 1}]}),
    ("strength NaN", {"edits": [{"direction": "smile", "strength": float("nan")}]}),
    ("strength inf", {"edits": [{"direction": "smile", "strength": float("-inf")}]}),
    ("strength string", {"edits": [{"direction": "smile", "strength": "1"}]}),
    ("strength huge", {"edits": [{"direction": "smile", "strength": 1e9}]}),
    ("strength bool", {"edits": [{"direction": "smile", "strength": True}]}),
    ("strength missing", {"edits": [{"direction": "smile"}]}),
    ("edit extra key", {"edits": [{"direction": "smile", "strength": 1, "weight": 3}]}),
    ("layers reversed", {"edits": [{"direction": "smile", "strength": 1, "layers": [3, 1]}]}),
    ("layers past num_ws", {"edits": [{"direction": "smile", "strength": 1, "layers": [0, 8]}]}),
    ("layers string", {"edits": [{"direction": "smile", "strength": 1, "layers": "0-3"}]}),
    ("layers one entry", {"edits": [{"direction": "smile", "strength": 1, "layers": [2]}]}),
    ("layers floats", {"edits": [{"direction": "smile", "strength": 1, "layers": [0.5, 2]}]}),
    ("layers first nil", {"edits": [{"direction": "smile", "strength": 1, "layers": [None, 3]}]}),
    ("layers last nil", {"edits": [{"direction": "smile", "strength": 1, "layers": [0, None]}]}),
    ("layers bools", {"edits": [{"direction": "smile", "strength": 1, "layers": [True, 2]}]}),
    ("color_match string", {"edits": [], "color_match": "yes"}),
    ("too many edits", {"edits": [{"direction": "smile", "strength": 0.1}] * 9}),
    ("feather negative", {"edits": [], "feather": -2}), ("feather NaN", {"edits": [], "feather": float("nan")}),
    ("blend unknown", {"edits": [], "blend": "screen"}), ("format unknown", {"edits": [], "format": "png"}),
    ("unknown key", {"edits": [], "variant": 2}),
]


@pytest.mark.parametrize("name,body", RENDER_CASES, ids=[c[0] for c in RENDER_CASES])
def test_malformed_render(fuzz_server, name, body):
    r = fuzz_server.request("POST", f"/v1/sessions/{fuzz_server.ready_session}/render", body)
    assert r.status == 422, (r.status, r.body)
    assert r.body["error"] and r.body["message"] and r.body["field"]


def test_float_edge_bits_in_layer(fuzz_server):
    """A signalling-NaN bit pattern in an otherwise fine rgbaf32 layer is caught as well."""
    arr = np.full((16, 16, 4), 0.25, np.float32)
    raw = bytearray(arr.astype("<f4").tobytes())
    raw[40:44] = struct.pack("<I", 0x7FA00000)
    body = {"layer": {"width": 16, "height": 16, "format": "rgbaf32", "data": bytes(raw)}}
    r = fuzz_server.request("POST", "/v1/sessions", body)
    assert r.status == 422 and r.body["field"] == "layer.data"


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8)
                           | st.binary(max_size=64),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
layer_like = st.fixed_dictionaries({}, optional={"width": json_values, "height": json_values, "format":
                                                 st.sampled_from(["rgba8", "rgba16", "rgbaf32", "x"]) | json_values,
                                                 "data": st.binary(max_size=256), "stride": json_values})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["layer", "selection", "model", "method", "options", "align", "zz"]),
                            layer_like | json_values, max_size=5))
def test_random_bodies_are_rejected_cleanly(fuzz_server, body):
    r = fuzz_server.request("POST", "/v1/sessions", msgpack.packb(body, use_bin_type=True))
    assert 400 <= r.status < 500, (r.status, r.raw[:200])
    assert r.body["error"] and r.body["message"]


def test_server_healthy_after_fuzz(fuzz_server):
    h = fuzz_server.request("GET", "/v1/health", token=None)
    assert h.status == 200 and h.body["status"] == "ok"
    jobs = fuzz_server.request("GET", "/v1/jobs").body["jobs"]
    assert len(jobs) == 1  # only the fixture's own session: nothing malformed was queued
    r = fuzz_server.request("POST", "/v1/sessions", {"layer": GOOD, "selection": SEL, "options": {"project_steps": 1}})
    assert r.status == 202
    assert wait_job(fuzz_server, r.body["job_id"])["state"] == "done"
    r = fuzz_server.request("POST", f"/v1/sessions/{r.body['session_id']}/render",
                            {"edits": [{"direction": "smile", "strength": 1}]})
    assert r.status == 200 and len(r.body["layer"]["data"]) == 16 * 16 * 4


def test_every_route_but_health_refuses_a_missing_token(fuzz_server):
    """Checks the product, not this file: every route the app serves (read from its router, so a route added
    later is covered too) answers 401 without the token, except /v1/health."""
    import re

    seen = 0
    for route in fuzz_server.app.router.routes():
        method, path = route.method, route.resource.canonical
        if method == "HEAD" or path == "/v1/health":
            continue
        concrete = re.sub(r"\{[^}]+\}", "abc", path)
        r = fuzz_server.request(method, concrete, {"edits": []} if method == "POST" else None, token=None)
        assert r.status == 401, (method, path, r.status)
        seen += 1
    assert seen >= 10


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "bogus", "gzip, identity"])
def test_compressed_or_unknown_encodings_refused(fuzz_server, encoding):
    import gzip

    r = fuzz_server.request("POST", "/v1/sessions", gzip.compress(msgpack.packb({"layer": GOOD})),
                            headers={"Content-Encoding": encoding})
    assert r.status == 415 and r.body["error"] == "unsupported_encoding" and encoding[:20] in r.body["message"]


@pytest.mark.parametrize("method,path", ROUTES + [("GET", "/v1/health"), ("GET", "/")])
def test_foreign_host_refused(fuzz_server, method, path):
    r = fuzz_server.request(method, path, {"edits": []} if method == "POST" else None,
                            headers={"Host": "rebound.evil.example"})
    assert r.status == 421 and r.body["error"] == "misdirected_request"


def test_chunked_body_over_limit(fuzz_server):
    """Without a Content-Length the limit is enforced while reading; the server answers 413 and closes the
    connection without reading the rest (the client may see its send fail)."""
    import socket

    part = 900 * 1024  # two bins of 0.9 MiB, each within the limit alone: 1.8 MiB > 1 MiB counted as it arrives
    body = b"\x92" + b"\xc6" + part.to_bytes(4, "big") + b"\x00" * part + b"\xc6" + part.to_bytes(4, "big") + b"\x00" * part
    head = (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {fuzz_server.token}\r\n"
            f"Content-Type: {MP}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=30)
    try:
        try:
            s.sendall(head)
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        while True:  # until the server closes the connection
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            reply += data
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    payload = msgpack.unpackb(reply[reply.find(b"\r\n\r\n") + 4:])
    assert payload["error"] == "payload_too_large" and str(1 << 20) in payload["message"]
