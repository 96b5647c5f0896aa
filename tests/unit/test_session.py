"""core.session: every method and blend keeps unselected pixels bit-identical, input validation,
progress/cancel, save/load round trips, one-forward re-edits, named edits and face alignment."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from tests.conftest import layer as shared_layer, make_tiny_generator
from core.common import Cancelled, InvalidInput, NoFace
from core.edits import Direction
from core.session import METHOD_STEPS, METHODS, EditSession, SessionOptions, create_session, method_catalog

FAST = dict(align="none", project_steps=3, tune_steps=2)


def layer(size: int, seed: int = 0) -> np.ndarray:
    """The shared test layer with some partial transparency (its first 4 rows at alpha 0.5)."""
    return shared_layer(size, seed, soft_rows=4)


def random_selection(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sel = np.zeros((size, size), np.float32)
    for _ in range(2):
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 6, size // 2, 2)
        sel[y0:y0 + h, x0:x0 + w] = rng.uniform(0.4, 1.0)
    return sel


@pytest.mark.parametrize("method", ["w", "wplus", "pti", "chunks"])
@pytest.mark.parametrize("size", [32, 64])  # identity and 2× geometry
def test_outside_selection_bit_identical(G, method, size):
    img = layer(size, seed=size)
    sel = random_selection(size, seed=hash((method, size)) % 1000)
    sess = create_session(G, img, sel, SessionOptions(method=method, **FAST))
    d = torch.randn(32, generator=torch.Generator().manual_seed(1))
    outside = sel == 0
    for blend in ("alpha", "poisson"):
        for edits in ([], [(d, 2.0)]):
            out = sess.render(edits, blend=blend)
            assert out.shape == img.shape and out.dtype == np.float32
            assert np.array_equal(out[outside][:, :3], img[outside][:, :3]), (blend, edits)
            assert np.all(out[outside][:, 3] == 0)
            inside = out[sel > 0]
            assert np.all(inside[:, 3] <= img[sel > 0][:, 3] + 1e-6)
            assert 0 <= out.min() and out.max() <= 1
    edited = sess.render([(d, 2.0)], feather=0)
    plain = sess.render([], feather=0)
    assert np.abs(edited[sel > 0][:, :3] - plain[sel > 0][:, :3]).max() > 1e-3


def test_alpha_is_feathered_selection_times_input_alpha(G):
    img = layer(32)
    sel = np.zeros((32, 32), np.float32)
    sel[2:30, 4:28] = 1
    sess = create_session(G, img, sel, SessionOptions(method="w", **FAST))
    out = sess.render([], feather=0)
    assert np.array_equal(out[..., 3], sel * img[..., 3])
    soft = sess.render([], feather=4)
    assert np.all(soft[..., 3] <= out[..., 3]) and soft[16, 16, 3] == 1 and 0 < soft[15, 4, 3] < 0.5


def test_scale_geometry_keeps_detail_without_edits(G):
    img = layer(64, seed=3)
    sel = np.zeros((64, 64), np.float32)
    sel[8:56, 8:56] = 1
    sess = create_session(G, img, sel, SessionOptions(method="chunks", **FAST))
    out = sess.render([], feather=0)
    inside = sel > 0
    # no edit -> zero delta: the layer's own full-resolution pixels come back
    assert np.allclose(out[inside][:, :3], img[inside][:, :3], atol=1e-6)


def test_all_selected_and_no_selection(G):
    img = layer(32)
    img[..., 3] = 1
    a = create_session(G, img, None, SessionOptions(method="wplus", **FAST))
    b = create_session(G, img, np.ones((32, 32), np.float32), SessionOptions(method="wplus", **FAST))
    ra, rb = a.render([], feather=8), b.render([], feather=8)
    assert np.array_equal(ra, rb)
    assert np.all(ra[..., 3] == 1)  # the whole layer is re-synthesised; the border is not a selection edge


@pytest.mark.parametrize("make,msg", [
    (lambda img: (img, np.zeros((32, 32), np.float32)), "empty"),
    (lambda img: (img, np.ones((16, 32), np.float32)), "selection is 32×16 but the layer is 32×32"),
    (lambda img: (img, np.full((32, 32), np.nan, np.float32)), "NaN"),
    (lambda img: (img, np.full((32, 32), 255, np.uint8)), "dtype uint8"),
    (lambda img: (img, np.full((32, 32), 2.0, np.float32)), "[0,1]"),
    (lambda img: ((img * 255).astype(np.uint8), None), "dtype uint8"),
    (lambda img: (np.where(np.arange(32)[:, None, None] == 3, np.nan, img).astype(np.float32), None), "NaN"),
    (lambda img: (img[..., :2], None), "(H,W,4)"),
    (lambda img: (img[:30], None), "square"),
    (lambda img: (torch.zeros(32, 32, 4), None), "numpy"),
])
def test_bad_input(G, make, msg):
    img, sel = make(layer(32))
    with pytest.raises(InvalidInput) as err:
        create_session(G, img, sel, SessionOptions(method="w", **FAST))
    assert msg in str(err.value)


def test_bad_options_and_render_args(G):
    img = layer(32)
    for bad in (dict(method="gan"), dict(align="maybe"), dict(blend="soft"), dict(feather=-1.0),
                dict(project_steps=-3), dict(method="w", project_steps=0)):
        with pytest.raises(InvalidInput):
            create_session(G, img, None, dataclasses.replace(SessionOptions(**FAST), **bad))
    sess = create_session(G, img, None, SessionOptions(method="w", **FAST))
    with pytest.raises(InvalidInput):
        sess.render([], blend="nope")
    with pytest.raises(InvalidInput):
        sess.render([], feather=float("inf"))
    with pytest.raises(InvalidInput, match="unknown direction"):
        sess.render([("smile", 1.0)])


def test_edits_by_name_direction_and_tensor(G):
    v = torch.randn(32)
    img, sel = layer(32), random_selection(32, 4)
    sess = create_session(G, img, sel, SessionOptions(method="chunks", **FAST),
                          directions={"smile": Direction(name="smile", vector=v)})
    a = sess.render([("smile", 1.5)])
    b = sess.render([(Direction(name="other", vector=v), 1.5)])
    c = sess.render([(v, 1.5)])
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, sess.render([]))


def test_reedit_costs_one_forward(G):
    img, sel = layer(64), random_selection(64, 7)
    sess = create_session(G, img, sel, SessionOptions(method="pti", **FAST))
    Gs = sess.inversion.G
    calls = []
    orig = Gs.synthesis

    def counted(ws, *a, **k):
        calls.append(ws.shape[0])
        return orig(ws, *a, **k)

    Gs.synthesis = counted
    try:
        sess.render([(torch.randn(32), 1.0)])
        sess.render([(torch.randn(32), -1.0)], blend="poisson")
        sess.render([])
    finally:
        del Gs.synthesis
    assert calls == [1, 1]


def test_progress_stages_and_cancel(G):
    img = layer(32)
    events = []
    create_session(G, img, None, SessionOptions(method="pti", **FAST), progress=events.append)
    stages = [e.stage for e in events]
    fracs = [e.fraction for e in events]
    assert stages[0] == "project" and "tune" in stages and stages[-1] == "render"
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and 0 < fracs[0] < 1
    assert all(isinstance(e.message, str) and e.message for e in events)
    previews = [e.preview for e in events if e.preview is not None]
    assert previews and previews[0].shape == (32, 32, 3) and previews[0].dtype == np.uint8
    # user words: "Projecting 1/2", "Tuning the generator 2/2"; never a doubled word or a raw long float
    assert events[0].message == f"Projecting 1/{events[0].total}"
    assert any(e.message == f"Tuning the generator {e.step}/{e.total}" for e in events if e.stage == "tune")
    for e in events:
        words = e.message.lower().split()
        assert all(a != b for a, b in zip(words, words[1:])) and not re.search(r"\d\.\d{5,}", e.message), e.message
    before = {k: v.clone() for k, v in G.state_dict().items()}
    n = []
    with pytest.raises(Cancelled):
        create_session(G, img, None, SessionOptions(method="pti", align="none", project_steps=3, tune_steps=5),
                       progress=n.append, cancel=lambda: len(n) >= 4)
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())


@pytest.mark.parametrize("method", ["w", "chunks", "pti"])
def test_save_load_round_trip(G, tmp_path, method):
    img, sel = layer(64, 2), random_selection(64, 2)
    sess = create_session(G, img, sel, SessionOptions(method=method, blend="poisson", **FAST))
    sess.save(tmp_path / method)
    again = EditSession.load(tmp_path / method, G)
    assert again.tuned == (method in ("pti", "chunks"))  # FAST tunes 2 steps for both
    edits = [(torch.randn(32, generator=torch.Generator().manual_seed(0)), 1.0)]
    assert np.array_equal(again.render(edits), sess.render(edits))
    assert np.array_equal(again.render([]), sess.render([]))
    # only plain tensors and JSON: loadable with weights_only=True
    torch.load(tmp_path / method / "tensors.pt", weights_only=True)
    with pytest.raises(InvalidInput):
        EditSession.load(tmp_path / "missing", G)
    with pytest.raises(InvalidInput, match="different model"):
        EditSession.load(tmp_path / method, make_tiny_generator(seed=1))


# ----------------------------------------------------------------------------------------------------- faces

@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    a = skimage.data.astronaut()[:256, 96:352].astype(np.float32) / 255  # the face is near (224, 117)
    return np.concatenate([a, np.ones(a.shape[:2] + (1,), np.float32)], -1)


def test_align_auto_face(G, astronaut):
    sel = np.zeros(astronaut.shape[:2], np.float32)
    sel[60:180, 70:190] = 1  # around the face
    events = []
    sess = create_session(G, astronaut, sel, SessionOptions(method="w", align="auto", project_steps=3),
                          progress=lambda e: events.append(e.stage))
    assert events[0] == "align" and sess.geometry.kind == "aligned"
    d = torch.randn(32, generator=torch.Generator().manual_seed(2))
    for blend in ("alpha", "poisson"):
        out = sess.render([(d, 3.0)], blend=blend)
        outside = sel == 0
        assert np.array_equal(out[outside][:, :3], astronaut[outside][:, :3])
        assert np.all(out[outside][:, 3] == 0)
        changed = np.abs(out[..., :3] - astronaut[..., :3]).max(-1) > 1e-3
        assert changed.any() and not changed[outside].any()


def test_align_auto_errors(G, astronaut):
    flat = np.full((128, 128, 4), 0.5, np.float32)
    with pytest.raises(InvalidInput, match="no face"):
        create_session(G, flat, None, SessionOptions(method="w", align="auto", project_steps=2))
    sel = np.zeros(astronaut.shape[:2], np.float32)
    sel[220:250, 0:30] = 1  # far from the face
    with pytest.raises(NoFace, match="face"):
        create_session(G, astronaut, sel, SessionOptions(method="w", align="auto", project_steps=2))
    with pytest.raises(InvalidInput, match="too small"):
        create_session(G, astronaut, None, SessionOptions(method="w", align="auto", project_steps=2, min_face=500))


@pytest.mark.parametrize("size", [32, 64])
def test_hole_filling_refine(G, size, tmp_path):
    img = layer(size, 5)
    sel = np.zeros((size, size), np.float32)
    sel[size // 4:size // 2, size // 4:3 * size // 4] = 1
    corr = np.zeros((size, size), np.float32)
    corr[size // 2 - 2:3 * size // 4, size // 3:size // 2] = 1  # continues below the selection
    sess = create_session(G, img, sel, SessionOptions(method="chunks", **FAST))
    d = torch.randn(32, generator=torch.Generator().manual_seed(4))
    refined = sess.refine(corr, [(d, 2.0)], steps=4)
    union = (sel > 0) | (corr > 0)
    out = refined.render([], feather=0)
    assert np.array_equal(out[~union][:, :3], img[~union][:, :3]) and np.all(out[~union][:, 3] == 0)
    assert np.all(out[corr > 0][:, 3] > 0)  # the correction is now part of the result layer
    # the edit is baked in: the refined session's plain render differs from the original's
    assert np.abs(out[sel > 0][:, :3] - sess.render([], feather=0)[sel > 0][:, :3]).max() > 1e-3
    assert np.array_equal(sess.selection, sel)  # the original session is untouched
    with pytest.raises(InvalidInput):
        sess.refine(np.zeros((size, size), np.float32), [(d, 1.0)], steps=1)
    refined.save(tmp_path / "refined")
    again = EditSession.load(tmp_path / "refined", G)
    assert np.array_equal(again.render([(d, 0.5)]), refined.render([(d, 0.5)]))


def test_locality_option_reaches_the_tuning(G, monkeypatch):
    import core.pti

    calls = []
    real = core.pti.locality_loss
    monkeypatch.setattr(core.pti, "locality_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    img = layer(32)
    off = create_session(G, img, None, SessionOptions(method="pti", **FAST))
    assert calls == [] and off.inversion.info["locality_terms"] == 0
    on = create_session(G, img, None, SessionOptions(method="pti", locality=True, **FAST))
    assert len(calls) == on.inversion.info["locality_terms"] == on.inversion.info["tune_steps_run"] >= 1
    with pytest.raises(InvalidInput, match="locality"):
        SessionOptions(locality="yes").validate()


def test_method_catalog_is_the_one_source():
    cat = method_catalog()
    fields = {f.name for f in dataclasses.fields(SessionOptions)}
    assert [m["name"] for m in cat] == list(METHODS) and cat[0]["name"] == SessionOptions().method
    for m in cat:
        assert (m["project_steps"], m["tune_steps"]) == METHOD_STEPS[m["name"]]
        assert m["label"] and set(m["options"]) <= fields
        p, t = SessionOptions(method=m["name"]).validate().resolved_steps()
        assert (p, t) == (m["project_steps"], m["tune_steps"])
    assert "locality" in {o for m in cat if m["name"] == "pti" for o in m["options"]}


def test_layer_geometry_json_round_trip_and_pre_issue_15_names():
    import json

    from core.common import LatentEditError
    from core.geometry import LayerGeometry

    g = LayerGeometry("upsampled", (64, 64), 32, (3, 4, 40, 50), scale=2)
    assert LayerGeometry.from_json(json.loads(json.dumps(g.to_json())), (1, 1), 1) == g
    assert LayerGeometry.from_json({"kind": "scale", "scale": 2, "window": [3, 4, 40, 50]}, (64, 64), 32) == g
    assert LayerGeometry.from_json({"kind": "identity", "window": [0, 0, 8, 8]}, (32, 32), 32).kind == "direct"
    mask = np.zeros((64, 64), np.float32)
    mask[10:20, 30:40] = 1
    small = g.to_generator(mask)
    assert small.shape == (32, 32) and small[5:10, 15:20].min() == 1 and small.sum() == 25
    assert g.grown_window(8.0) == (0, 0, 50, 60) and g.including(mask > 0).window == (3, 4, 40, 50)
    with pytest.raises(LatentEditError):
        LayerGeometry("sideways", (64, 64), 32, (0, 0, 1, 1))


# --- MAGEC, the encoder and their PTI pivots (issues 19, 22) ---------------------------------------------------

def _tiny_encoder(G):
    from core.encoder import Encoder, small_config

    torch.manual_seed(0)
    cfg = small_config(G.w_dim, G.num_ws, input_size=32, depths=(8, 12, 16, 20), units=(1, 1, 1, 1), stem=8,
                       fpn=20, style_channels=8)
    return Encoder(cfg).eval()


@pytest.fixture(scope="module")
def assets(G):
    """A toy descriptor (3 outputs), directions named like it, a LinkNet fitted for G, a random tiny encoder."""
    from core import magec as M
    from core.session import MethodAssets
    from tests.unit.test_magec import toy_descriptor, toy_directions

    d = toy_descriptor()
    ln = M.fit_linknet(G, d, n=64, options=M.LinkNetOptions(steps=10))
    return MethodAssets(d, ln, _tiny_encoder(G)), toy_directions(G)


def test_magec_session_is_core_magec_inside_the_selection(G, assets):
    from core.magec import MagecOptions, invert_magec

    a, dirs = assets
    img, sel = layer(32), random_selection(32, 1)
    calls = []
    s = create_session(G, img, sel, SessionOptions(method="magec", align="none", project_steps=4), calls.append,
                       directions=dirs, assets=a)
    assert s.info["project_steps"] == 4 and s.info["tune_steps"] == 0 and s.info["magec_edits"] == 6
    assert not s.tuned and s.inversion.method == "magec"
    ref = invert_magec(G, s.inversion.image, a.linknet, a.descriptor, dirs, steps=4, options=MagecOptions(seed=0))
    assert torch.allclose(s.inversion.ws, ref, atol=1e-5)  # the session runs core.magec's inversion, 2 + 2 steps
    assert [c.step for c in calls if c.stage == "project"] == [1, 2, 3, 4] and calls[-1].fraction == 1.0
    out = s.render([("a", 2.0)])
    outside = sel == 0
    assert np.array_equal(out[outside][:, :3], img[outside][:, :3]) and (out[outside][:, 3] == 0).all()
    assert not np.allclose(out[sel > 0], s.render()[sel > 0])  # the edit acts inside


def test_pti_with_a_magec_pivot_tunes_from_the_magec_code(G, assets):
    from core.magec import magec_pivot_report
    from core.projection import ProjectOptions, project

    a, dirs = assets
    o = SessionOptions(method="pti", pivot="magec", align="none", project_steps=4, tune_steps=3)
    assert o.validate().resolved_steps() == (4, 3)
    assert SessionOptions(method="pti", pivot="magec").resolved_steps() == (450, 350)  # PTI's W projection steps
    s = create_session(G, layer(32), None, o, directions=dirs, assets=a)
    img = s.inversion.image
    ref = magec_pivot_report(G, img, a.linknet, a.descriptor, dirs, steps=4, options=ProjectOptions(seed=0)).ws
    assert torch.allclose(s.inversion.ws, ref, atol=1e-5) and s.tuned
    plain = project(G, img, "w", 4, options=ProjectOptions(seed=0))  # PTI's own pivot, same seed
    assert not torch.allclose(ref, plain, atol=1e-6)  # the MAGEC term moved the code
    off = magec_pivot_report(G, img, a.linknet, a.descriptor, dirs, steps=4, weight=0.0,
                             options=ProjectOptions(seed=0)).ws
    assert torch.allclose(off, plain, atol=1e-6)  # without it, the pivot is PTI's projection
    assert s.info["pivot"] == "magec" and s.info["steps_run"] == 3 and s.info["early_stopped"] is False


def test_encoder_session_is_one_forward_and_its_pivot_feeds_pti(G, assets):
    from core.encoder import encoder_pivot

    a, _ = assets
    calls = []
    s = create_session(G, layer(32), None, SessionOptions(method="encoder", align="none"), calls.append, assets=a)
    assert s.info["project_steps"] == 0 and not s.tuned
    assert torch.equal(s.inversion.ws, encoder_pivot(a.encoder, s.inversion.image))
    assert [c.stage for c in calls] == ["encode", "encode", "render", "render"] and calls[-1].fraction == 1.0
    t = create_session(G, layer(32), None, SessionOptions(method="pti", pivot="encoder", align="none", tune_steps=2),
                       assets=a)
    assert t.tuned and t.info["project_steps"] == 0 and t.info["steps_run"] == 2
    assert torch.equal(t.inversion.ws, encoder_pivot(a.encoder, t.inversion.image))
    rec = t.inversion.reconstructions()
    with torch.no_grad():
        untuned = G.synthesis(t.inversion.ws, noise_mode="const")
    assert not torch.allclose(rec, untuned)  # the generator was tuned around the encoder's code


def test_methods_without_their_assets_are_refused_clearly(G):
    from core.session import MethodAssets

    img = layer(32)
    with pytest.raises(InvalidInput, match="MAGEC is not available"):
        create_session(G, img, None, SessionOptions(method="magec", align="none"))
    why = "add g.attributes.pt (TorchScript) and g.attributes.json beside it"
    with pytest.raises(InvalidInput, match="g.attributes.pt"):
        create_session(G, img, None, SessionOptions(method="pti", pivot="magec", align="none"),
                       assets=MethodAssets(missing={"magec": why}))
    with pytest.raises(InvalidInput, match="encoder is not available.*g.encoder.pt"):
        create_session(G, img, None, SessionOptions(method="encoder", align="none"),
                       assets=MethodAssets(missing={"encoder": "add g.encoder.pt"}))
    with pytest.raises(InvalidInput, match="pivot must be one of"):
        SessionOptions(pivot="z").validate()
    with pytest.raises(InvalidInput, match="pivot 'magec' is for method 'pti'"):
        SessionOptions(method="w", pivot="magec").validate()
    with pytest.raises(InvalidInput, match="at least 2 for MAGEC"):
        SessionOptions(method="magec", project_steps=1).validate()


def test_catalog_lists_methods_and_pivots_by_capability():
    names = lambda cat: [m["name"] for m in cat]  # noqa: E731
    pivots = lambda cat: [p["name"] for m in cat if m["name"] == "pti" for p in m["pivots"]]  # noqa: E731
    assert names(method_catalog(())) == ["pti", "chunks", "w", "wplus"] and pivots(method_catalog(())) == ["w"]
    assert method_catalog(())[0]["default_pivot"] == "w"
    assert names(method_catalog(("encoder",)))[-1] == "encoder" and pivots(method_catalog(("encoder",))) == ["encoder", "w"]
    full = method_catalog()
    assert pivots(full) == ["encoder", "w", "magec"] and "pivot" in full[0]["options"]
    assert pivots(method_catalog(("magec",))) == ["w", "magec"] and method_catalog(("magec",))[0]["default_pivot"] == "w"
    for p in full[0]["pivots"]:
        assert SessionOptions(method="pti", pivot=p["name"]).resolved_steps()[0] == p["project_steps"]


def test_default_pivot_is_the_encoder_where_the_model_has_one():
    """A PTI request without a pivot starts from the encoder's code on a model with an encoder (the bench's
    choice, core.session.DEFAULT_PIVOT_WITH_ENCODER); the options type itself keeps PTI's own W pivot."""
    from core.session import default_pivot, method_catalog

    assert default_pivot(("encoder", "magec")) == "encoder" and default_pivot(("magec", "segmenter")) == "w"
    assert default_pivot(()) == "w" and SessionOptions().pivot == "w"
    assert all(e["default_pivot"] == e["pivots"][0]["name"] for caps in ((), ("encoder",), ("magec",))
               for e in method_catalog(caps) if e["name"] == "pti")


def test_encoder_pivot_has_its_own_tuning_budget():
    """The fast path (encoder pivot) defaults to its measured budget; explicit steps still win; PTI's own is 350."""
    from core.pti import ENCODER_PIVOT_TUNE_STEPS
    from core.session import SessionOptions, method_catalog

    assert SessionOptions(method="pti", pivot="encoder").resolved_steps() == (0, ENCODER_PIVOT_TUNE_STEPS)
    assert SessionOptions(method="pti", pivot="encoder", tune_steps=7).resolved_steps() == (0, 7)
    assert SessionOptions(method="pti").resolved_steps() == (450, 350)
    pivots = {p["name"]: p for e in method_catalog() if e["name"] == "pti" for p in e["pivots"]}
    assert pivots["encoder"]["tune_steps"] == ENCODER_PIVOT_TUNE_STEPS and pivots["w"]["tune_steps"] == 350
