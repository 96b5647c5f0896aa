"""MAGEC, the encoder and PTI's pivots through the real server (core.session + core.models over HTTP):
which methods each model lists, a MAGEC session end to end, PTI from a MAGEC pivot, refusals before queueing."""
from __future__ import annotations

import numpy as np
import pytest

from server_helpers import LiveServer, box_selection, layer, tiny_models_dir, wait_job
from server.engine import Engine


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    srv = LiveServer(root / "data", Engine.from_core(tiny_models_dir(root), "cpu"))
    models = {m["name"]: m for m in srv.request("GET", "/v1/models").body["models"]}
    if not any(m.get("default") for m in models.values()):
        srv.stop()
        pytest.skip("the embedded model (the one with a shipped MAGEC descriptor) is not installed")
    srv.models = models
    srv.embedded = next(m for m in models.values() if m.get("default"))
    yield srv
    srv.stop()


def _names(model):
    return [m["name"] for m in model["methods"]]


def _pivots(model):
    return [p["name"] for m in model["methods"] if m["name"] == "pti" for p in m["pivots"]]


def _face(res: int, seed: int = 0) -> np.ndarray:
    from core.demo.renderer import render, sample_params

    rgb = render(sample_params(1, seed=seed)[0], size=res)
    return np.concatenate([rgb, np.full((res, res, 1), 255, np.uint8)], axis=2)


def _body(model, method, options, seed=0):
    res = model["resolution"]
    img, sel = _face(res, seed), box_selection(res, res)
    return img, sel, {"layer": layer(img), "selection": layer(sel[..., None], "gray8"), "model": model["name"],
                      "method": method, "align": "none", "options": options}


def test_models_list_methods_by_what_each_model_has(real):
    from core.demo import default_encoder_path

    emb, tiny = real.embedded, real.models["tiny32"]
    assert "magec" in _names(emb) and _pivots(emb)[:2] == ["w", "magec"]
    assert ("encoder" in _names(emb)) == default_encoder_path().is_file()
    labels = {m["name"]: m["label"] for m in emb["methods"]}
    assert labels["magec"] == "Editability-aware (MAGEC)"
    assert _names(tiny) == ["pti", "chunks", "w", "wplus"] and _pivots(tiny) == ["w"]
    assert "tiny32.attributes.pt" in tiny["unavailable"]["magec"] and "tiny32.encoder.pt" in tiny["unavailable"]["encoder"]


def test_magec_session_end_to_end(real):
    model = real.embedded
    img, sel, body = _body(model, "magec", {"project_steps": 6})
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 202, r.body
    job = wait_job(real, r.body["job_id"], timeout=300)
    assert job["state"] == "done", job
    rr = real.request("POST", f"/v1/sessions/{r.body['session_id']}/render",
                      {"edits": [{"direction": "smile", "strength": 3.0}]})
    assert rr.status == 200, rr.body
    out = np.frombuffer(rr.body["layer"]["data"], np.uint8).reshape(img.shape)
    outside, inside = sel == 0, sel > 0
    assert np.array_equal(out[outside][:, :3], img[outside][:, :3]) and (out[outside][:, 3] == 0).all()
    assert np.abs(out[inside][:, :3].astype(int) - img[inside][:, :3]).mean() > 1.0, "the smile edit did nothing"


def test_pti_from_a_magec_pivot_end_to_end(real):
    _, _, body = _body(real.embedded, "pti", {"pivot": "magec", "project_steps": 4, "tune_steps": 2}, seed=1)
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 202, r.body
    assert wait_job(real, r.body["job_id"], timeout=300)["state"] == "done"


def test_unavailable_methods_are_refused_before_queueing(real):
    _, _, body = _body(real.models["tiny32"], "magec", {"project_steps": 4})
    body["layer"] = layer(np.zeros((32, 32, 4), np.uint8) + 128)
    body["selection"] = None
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 422 and r.body["error"] == "method_unavailable", r.body
    assert "tiny32.attributes.pt" in r.body["message"]
    body.update(method="pti", options={"pivot": "encoder"})
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 422 and "tiny32.encoder.pt" in r.body["message"], r.body
    body.update(method="w", options={"pivot": "magec"})
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 422 and "pivot" in r.body["message"], r.body
