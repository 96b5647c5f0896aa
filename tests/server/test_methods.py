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
    from core.demo import render, sample_params

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
    assert "magec" in _names(emb) and set(_pivots(emb)) >= {"w", "magec"}
    assert _pivots(emb)[0] == ("encoder" if default_encoder_path().is_file() else "w")
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


def _three_bands(h: int, w: int) -> np.ndarray:
    """(h,w) int32 label map: three vertical bands 0 | 1 | 2."""
    return np.minimum(np.arange(w) * 3 // w, 2).astype(np.int32)[None, :].repeat(h, 0)


def test_models_say_which_have_a_segmenter_and_auto_is_refused_without_one(real):
    tiny = real.models["tiny32"]
    assert tiny["segmenter"] is False and "tiny32" in tiny["unavailable"]["segmenter"]
    emb = real.embedded
    assert emb["segmenter"] is ("segmenter" not in emb.get("unavailable", {}))
    body = {"layer": layer(np.zeros((32, 32, 4), np.uint8) + 128), "model": "tiny32", "method": "chunks",
            "align": "none", "options": {"segments": "auto", "project_steps": 2}}
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 422 and r.body["error"] == "segmenter_unavailable" and r.body["field"] == "options.segments"
    assert "tiny32" in r.body["message"], r.body


def test_label_map_session_renders_segments_metadata_and_segment_edits(real):
    """A 3-colour label map -> a 3-segment chunks session; the render's metadata has each segment's area; an
    edit on one segment leaves the others' pixels as the reconstruction has them; an index past the session's
    segments is a 422 naming the edit."""
    model = real.models["tiny32"]
    res = model["resolution"]
    img, labels = _face(res, 3), _three_bands(res, res)
    sel = np.zeros((res, res), np.uint8)
    sel[res // 8: -res // 8, res // 16: -res // 16] = 255  # covers part of every band
    lab = {"width": res, "height": res, "format": "label8", "data": labels.astype(np.uint8).tobytes()}
    body = {"layer": layer(img), "selection": layer(sel[..., None], "gray8"), "model": "tiny32", "method": "chunks",
            "align": "none", "options": {"project_steps": 4, "segments": lab}}
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 202, r.body
    assert wait_job(real, r.body["job_id"], timeout=300)["state"] == "done"
    url = f"/v1/sessions/{r.body['session_id']}/render"
    rec = real.request("POST", url, {"edits": []})
    assert rec.status == 200, rec.body
    segs = rec.body["segments"]
    assert [s["index"] for s in segs] == [0, 1, 2] and [s.get("label") for s in segs] == [0, 1, 2]
    for s in segs:  # each band's share of the selection (soft masks sum to the selected pixels)
        expect = int(((labels == s["label"]) & (sel > 0)).sum())
        assert abs(s["area"] - expect) <= 0.05 * expect + 2, (s, expect)
    smile = {"direction": model["directions"][0]["name"], "strength": 8.0}
    one = real.request("POST", url, {"edits": [dict(smile, segments=[1])]})
    assert one.status == 200, one.body
    base = np.frombuffer(rec.body["layer"]["data"], np.uint8).reshape(img.shape).astype(int)
    out = np.frombuffer(one.body["layer"]["data"], np.uint8).reshape(img.shape).astype(int)
    outside = sel == 0
    assert np.array_equal(out[outside][:, :3], img[outside][:, :3])  # outside the selection: the input's pixels
    changed = np.abs(out[..., :3] - base[..., :3]).max(-1) > 0
    assert changed[(labels == 1) & (sel > 0)].any(), "the edit on segment 1 changed nothing in it"
    cols = np.flatnonzero(labels[0] == 1)
    x = np.arange(res)[None, :].repeat(res, 0)
    far = (sel > 0) & ((x < cols[0] - 2) | (x > cols[-1] + 2))  # segments 0 and 2, 3 px away from segment 1
    assert far.sum() >= 2 * res, far.sum()
    assert not changed[far].any(), "an edit on segment 1 changed pixels of segments 0/2"
    bad = real.request("POST", url, {"edits": [dict(smile, segments=[3])]})
    assert bad.status == 422 and bad.body["field"] == "edits[0].segments" and "3 segments" in bad.body["message"]


def test_render_fusion_keeps_pixels_outside_the_selection(real):
    model = real.models["tiny32"]
    img, sel, body = _body(model, "w", {"project_steps": 3})
    r = real.request("POST", "/v1/sessions", body)
    assert r.status == 202 and wait_job(real, r.body["job_id"], timeout=300)["state"] == "done", r.body
    url = f"/v1/sessions/{r.body['session_id']}/render"
    edit = [{"direction": model["directions"][0]["name"], "strength": 3.0}]
    plain = real.request("POST", url, {"edits": edit, "fusion": "none"})
    kept = real.request("POST", url, {"edits": edit, "fusion": "relevance"})
    assert plain.status == 200 and kept.status == 200, (plain.body, kept.body)
    a = np.frombuffer(plain.body["layer"]["data"], np.uint8).reshape(img.shape)
    b = np.frombuffer(kept.body["layer"]["data"], np.uint8).reshape(img.shape)
    outside = sel == 0
    assert np.array_equal(a[outside], b[outside])
    default = real.request("POST", url, {"edits": edit})
    assert np.array_equal(np.frombuffer(default.body["layer"]["data"], np.uint8).reshape(img.shape), a)


@pytest.mark.parametrize("sidecar", ["tiny32.segmenter.pt", "tiny32.faceparsing.pth"])
def test_automatic_segments_end_to_end_with_a_segmenter_beside_the_checkpoint(tmp_path, sidecar):
    """``options.segments: "auto"`` through the server: a segmenter file beside a checkpoint (an untrained
    ``<stem>.segmenter.pt`` U-Net, or a BiSeNet ``<stem>.faceparsing.pth`` with seeded weights: this checks the
    path, not the parts) makes the model list ``segmenter: true``; the session's segments come from it and the
    render's metadata lists them, their areas adding up to the selected pixels."""
    import torch

    from core.demo import PARTS
    from core.segmenter import PartUNet, save_segmenter

    models = tiny_models_dir(tmp_path)
    torch.manual_seed(0)
    if sidecar.endswith(".segmenter.pt"):
        save_segmenter(models / sidecar, unet=PartUNet(PARTS, width=4))
    else:
        from tests.unit.test_faceparsing import save_parser_file

        save_parser_file(models / sidecar)
    srv = LiveServer(tmp_path / "data", Engine.from_core(models, "cpu"))
    try:
        model = next(m for m in srv.request("GET", "/v1/models").body["models"] if m["name"] == "tiny32")
        assert model["segmenter"] is True and "segmenter" not in model.get("unavailable", {}), model
        img, sel, body = _body(model, "chunks", {"project_steps": 3, "segments": "auto"}, seed=4)
        r = srv.request("POST", "/v1/sessions", body)
        assert r.status == 202, r.body
        job = wait_job(srv, r.body["job_id"], timeout=300)
        assert job["state"] == "done", job
        rr = srv.request("POST", f"/v1/sessions/{r.body['session_id']}/render", {"edits": []})
        assert rr.status == 200 and len(rr.body["segments"]) >= 1, rr.body
        total, selected = sum(s["area"] for s in rr.body["segments"]), int((sel > 0).sum())
        assert abs(total - selected) <= 0.05 * selected + 2, (total, selected)
    finally:
        srv.stop()


def test_a_content_extractor_beside_the_checkpoint_keeps_photo_detail_without_a_fit(tmp_path):
    """``<stem>.content.pt`` beside a checkpoint: it is not listed as a model, sessions made or reloaded by the
    engine carry it, and their "Keep photo detail" renders take their content from it."""
    import core
    from core.expanded import new_content_extractor, save_content_extractor
    from core.stylegan2.formats import fingerprint

    models = tiny_models_dir(tmp_path)
    G = core.load_generator(models / "tiny32.pt")
    save_content_extractor(models / "tiny32.content.pt", new_content_extractor(G, width=4),
                           {"generator_sha256": fingerprint(G)})
    engine = Engine.from_core(models, "cpu")
    names = [m["name"] for m in engine.registry.list()]
    assert "tiny32" in names and not any("content" in n for n in names), names
    rng = np.random.default_rng(3)
    img = np.concatenate([rng.random((32, 32, 3)), np.ones((32, 32, 1))], -1).astype(np.float32)
    sess = engine.create("tiny32", img, None, {"method": "w", "align": "none", "project_steps": 2},
                         progress=lambda e: None, cancel=None)
    assert sess.content_extractor is not None
    sess.render([], fusion="relevance")
    assert sess.fused_inversion().content.report.get("extractor") is True
    sess.save(tmp_path / "saved")
    back = engine.load(tmp_path / "saved", "tiny32")
    assert back.content_extractor is not None


def test_pti_without_a_pivot_starts_from_the_encoder_where_the_model_has_one(real):
    """The server fills in the model's default pivot (core.session.default_pivot) before queueing: the embedded
    model has an encoder, so a plain PTI request starts from its code; tiny32 has none and keeps PTI's W."""
    from core.demo import default_encoder_path
    from server.app import JOBS

    want = {"embedded": "encoder" if default_encoder_path().is_file() else "w", "tiny32": "w"}
    for model, opts in ((real.embedded, {"tune_steps": 2}), (real.models["tiny32"], {"project_steps": 3, "tune_steps": 2})):
        _, _, body = _body(model, "pti", opts, seed=2)
        r = real.request("POST", "/v1/sessions", body)
        assert r.status == 202, r.body
        assert wait_job(real, r.body["job_id"], timeout=300)["state"] == "done"
        pivot = real.app[JOBS].get(r.body["job_id"]).params["options"]["pivot"]
        assert pivot == want["tiny32" if model is real.models["tiny32"] else "embedded"], (model["name"], pivot)
    _, _, body = _body(real.embedded, "pti", {"pivot": "w", "project_steps": 3, "tune_steps": 2}, seed=2)
    r = real.request("POST", "/v1/sessions", body)  # an explicit pivot is kept
    assert r.status == 202 and real.app[JOBS].get(r.body["job_id"]).params["options"]["pivot"] == "w"
    assert wait_job(real, r.body["job_id"], timeout=300)["state"] == "done"
