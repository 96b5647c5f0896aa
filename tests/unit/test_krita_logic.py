"""Krita plugin logic against tests/fake_krita.py: pixel layouts, selection handling, layer naming,
group/mask insertion, the Apply flow (single, batch, re-edit, cancel, errors), settings, installer."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for fake_krita
import fake_krita as fk  # noqa: E402

from plugins import install_plugins  # noqa: E402
from plugins.common import client as cl  # noqa: E402
from plugins.common import flow  # noqa: E402
from plugins.common import pixels as px  # noqa: E402
from plugins.krita.latent_edit import document, layers, model, settings  # noqa: E402

W, H = 24, 16


def bgra_image(depth="U8", seed=0):
    rng = np.random.default_rng(seed)
    if depth == "U8":
        return rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    if depth == "U16":
        return rng.integers(0, 65536, (H, W, 4), dtype=np.uint16).astype("<u2")
    if depth == "F16":
        return rng.random((H, W, 4)).astype("<f2")
    return rng.random((H, W, 4)).astype("<f4")


def make_doc(depth="U8", profile="sRGB-elle-V2-srgbtrc.icc", model_name="RGBA"):
    doc = fk.Document(W, H, model_name, depth, profile)
    return doc


def ellipse(w=W, h=H):
    yy, xx = np.mgrid[:h, :w]
    return ((((xx - 12) / 7.0) ** 2 + ((yy - 8) / 5.0) ** 2) <= 1).astype(np.uint8) * 255


# --- pixel layouts ---

@pytest.mark.parametrize("depth", ["U8", "U16", "F16", "F32"])
def test_read_layer_converts_krita_layout_to_wire_rgba(depth):
    doc = make_doc(depth)
    img = bgra_image(depth)
    node = fk.paint_layer(doc, "face", img.tobytes())
    item = document.read_layer(doc, node)
    fmt, _, order = document.DEPTHS[depth]
    assert item.layer["format"] == fmt and (item.layer["width"], item.layer["height"]) == (W, H)
    wire = np.frombuffer(item.layer["data"], {"rgba8": np.uint8, "rgba16": "<u2", "rgbaf32": "<f4"}[fmt]).reshape(H, W, 4)
    expect = img[..., [2, 1, 0, 3]] if order == "BGRA" else img.astype(np.float32)
    assert (wire == expect).all()
    assert item.selection is None and item.name == "face"


def test_deferred_conversion_matches_the_immediate_one():
    doc = make_doc("U16", "sRGB-elle-V2-g10.icc")
    node = fk.paint_layer(doc, "face", bgra_image("U16").tobytes(), bounds=(2, 1, 20, 12))
    lazy = document.read_layer(doc, node, convert=False)
    assert lazy.layer is None and len(lazy.raw) == 20 * 12 * 8
    eager = document.read_layer(doc, node)
    assert document.prepare(lazy).layer == eager.layer and lazy.raw is None


@pytest.mark.parametrize("depth", ["U8", "U16", "F16", "F32"])
def test_wire_round_trip_back_to_krita_layout(depth):
    space = document.ColorSpace("RGBA", depth, "sRGB-elle-V2-srgbtrc.icc")
    img = bgra_image(depth, seed=1)
    wire = px.pack_layer(document.krita_to_wire(img.tobytes(), space), W, H, space.wire_format)
    back = document.wire_to_krita(wire, space, document.Rect(0, 0, W, H))
    assert back == img.tobytes()


def test_result_in_another_format_is_converted_to_the_document_depth():
    space = document.ColorSpace("RGBA", "U16", "sRGB-elle-V2-srgbtrc.icc")
    rgba8 = np.array([[[10, 20, 30, 255]]], np.uint8).repeat(W, 1).repeat(H, 0)
    back = np.frombuffer(document.wire_to_krita(px.pack_layer(rgba8.tobytes(), W, H, "rgba8"), space,
                                                document.Rect(0, 0, W, H)), "<u2").reshape(H, W, 4)
    assert back[0, 0].tolist() == [30 * 257, 20 * 257, 10 * 257, 65535]  # BGRA, v*257
    with pytest.raises(document.DocumentError, match="returned a 24x16 layer for a 8x8"):
        document.wire_to_krita(px.pack_layer(rgba8.tobytes(), W, H, "rgba8"), space, document.Rect(0, 0, 8, 8))


def test_linear_profiles_are_sent_srgb_encoded_and_decoded_back():
    space = document.ColorSpace("RGBA", "F32", "sRGB-elle-V2-g10.icc")
    assert space.linear
    lin = np.full((H, W, 4), 0.2, "<f4")
    lin[..., 3] = 0.5
    wire = np.frombuffer(document.krita_to_wire(lin.tobytes(), space), "<f4").reshape(H, W, 4)
    assert abs(wire[0, 0, 0] - (1.055 * 0.2 ** (1 / 2.4) - 0.055)) < 1e-6 and wire[0, 0, 3] == 0.5
    back = np.frombuffer(document.wire_to_krita(px.pack_layer(wire.tobytes(), W, H, "rgbaf32"), space,
                                                document.Rect(0, 0, W, H)), "<f4").reshape(H, W, 4)
    assert np.allclose(back, lin, atol=1e-6)
    assert not document.ColorSpace("RGBA", "U16", "sRGB-elle-V2-srgbtrc.icc").linear


# --- selection and bounds ---

def test_selection_is_cropped_to_the_layer_rect_with_offsets():
    doc = make_doc()
    node = fk.paint_layer(doc, "face", bgra_image().tobytes(), bounds=(4, 2, 16, 12))
    sel = fk.Selection()
    sel.setPixelData(ellipse().tobytes(), 0, 0, W, H)
    doc.setSelection(sel)
    item = document.read_layer(doc, node)
    assert (item.rect.x, item.rect.y, item.rect.width, item.rect.height) == (4, 2, 16, 12)
    assert (item.layer["x"], item.layer["y"]) == (4, 2) and (item.selection["x"], item.selection["y"]) == (4, 2)
    assert item.selection_bytes == ellipse()[2:14, 4:20].tobytes()
    assert item.selection["format"] == "gray8"
    assert item.layer["data"] == px.swap_red_blue(bgra_image()[2:14, 4:20].tobytes(), 1)


def test_layer_bounds_are_clipped_to_the_canvas():
    doc = make_doc()
    node = fk.paint_layer(doc, "face", bgra_image().tobytes(), bounds=(-5, -3, 40, 40))
    assert document.layer_rect(doc, node) == document.Rect(0, 0, W, H)


def test_selection_ignored_when_asked_and_empty_overlap_is_an_error():
    doc = make_doc()
    node = fk.paint_layer(doc, "face", bgra_image().tobytes())
    sel = fk.Selection()
    m = np.zeros((H, W), np.uint8)
    m[0, 0] = 255
    sel.setPixelData(m.tobytes(), 0, 0, W, H)
    doc.setSelection(sel)
    assert document.read_layer(doc, node, use_selection=False).selection is None
    node2 = fk.paint_layer(doc, "small", bgra_image().tobytes(), bounds=(10, 5, 10, 10))
    with pytest.raises(document.DocumentError, match="does not overlap"):
        document.read_layer(doc, node2)


@pytest.mark.parametrize("model_name", ["CMYKA", "GRAYA", "LABA"])
def test_unsupported_colour_models_are_refused_with_advice(model_name):
    doc = make_doc(model_name=model_name)
    node = fk.paint_layer(doc, "face", bytes(len(bgra_image().tobytes())))
    with pytest.raises(document.UnsupportedColorModel, match="Convert Image Color Space"):
        document.read_layer(doc, node)


def test_non_paint_layers_tiny_layers_and_no_layer_are_refused():
    doc = make_doc()
    group = doc.createGroupLayer("g")
    doc.rootNode().addChildNode(group, None)
    with pytest.raises(document.DocumentError, match="group layer"):
        document.read_layer(doc, group)
    tiny = fk.paint_layer(doc, "tiny", bgra_image().tobytes(), bounds=(0, 0, 5, 5))
    with pytest.raises(document.DocumentError, match="at least 8x8"):
        document.read_layer(doc, tiny)
    with pytest.raises(document.DocumentError, match="No active layer"):
        document.read_layer(doc, None)


# --- naming ---

@pytest.mark.parametrize("s,text", [(1.5, "+1.5"), (-2, "-2"), (0.126, "+0.13"), (0, "+0"), (-0.001, "+0"), (3.10, "+3.1")])
def test_format_strength(s, text):
    assert flow.format_strength(s) == text


def test_group_and_layer_names():
    assert layers.group_name([("smile", 1.5)]) == "Latent Edit · smile +1.5"
    assert layers.group_name([("smile", 1.5), ("age", -2)]) == "Latent Edit · smile +1.5, age -2"
    assert layers.group_name([]) == "Latent Edit · reconstruction"
    assert layers.result_layer_name("Face", [("smile", 1)]) == "Face (smile +1)"
    doc = make_doc()
    for name in ("a", "a 2"):
        fk.paint_layer(doc, name, bytes(W * H * 4))
    assert layers.unique_name(doc.rootNode(), "a") == "a 3"
    assert layers.unique_name(doc.rootNode(), "b") == "b"


# --- insertion ---

def run_steps(gen):
    return model.drive_blocking(gen, sleep=lambda s: None)


def setup_doc_with_selection():
    doc = make_doc()
    app = fk.Krita(doc)
    bottom = fk.paint_layer(doc, "bottom", bytes(W * H * 4))
    source = fk.paint_layer(doc, "face", bgra_image().tobytes())
    top = fk.paint_layer(doc, "top", bytes(W * H * 4))
    sel = fk.Selection()
    sel.setPixelData(ellipse().tobytes(), 0, 0, W, H)
    doc.setSelection(sel)
    return doc, app, bottom, source, top, sel


def test_insert_result_adds_group_layer_and_mask_above_source_and_restores_selection():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    before = source.pixelData(0, 0, W, H)
    rect = document.Rect(0, 0, W, H)
    result = bytes(range(256)) * (W * H * 4 // 256)
    group, layer, mask = run_steps(layers.insert_result(app, fk, doc, source, rect, result, ellipse().tobytes(), [("smile", 1.5)]))
    names = [n.name() for n in doc.topLevelNodes()]
    assert names == ["bottom", "face", "Latent Edit · smile +1.5", "top"]
    assert [c.name() for c in group.childNodes()] == ["face (smile +1.5)"]
    assert layer.pixelData(0, 0, W, H) == result
    assert mask.type() == "transparencymask" and mask.name() == "Selection"
    assert mask.pixelData(0, 0, W, H) == ellipse().tobytes()
    assert doc.selection() is sel  # the mask action consumed it; it was given back
    assert source.pixelData(0, 0, W, H) == before and source._s.writes == 0
    assert "add_new_transparency_mask" in app.triggered


def test_second_result_goes_on_top_of_earlier_results():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    rect = document.Rect(0, 0, W, H)
    data = bytes(W * H * 4)
    run_steps(layers.insert_result(app, fk, doc, source, rect, data, None, [("smile", 1.5)]))
    run_steps(layers.insert_result(app, fk, doc, source, rect, data, None, [("smile", 1.5)]))
    run_steps(layers.insert_result(app, fk, doc, source, rect, data, None, [("age", -1)]))
    assert [n.name() for n in doc.topLevelNodes()] == [
        "bottom", "face", "Latent Edit · smile +1.5", "Latent Edit · smile +1.5 2", "Latent Edit · age -1", "top"]


def test_whole_layer_mask_when_there_is_no_selection():
    doc = make_doc()
    app = fk.Krita(doc)
    source = fk.paint_layer(doc, "face", bgra_image().tobytes())
    _g, _l, mask = run_steps(layers.insert_result(app, fk, doc, source, document.Rect(0, 0, W, H), bytes(W * H * 4),
                                                  None, [("smile", 1)]))
    assert mask.pixelData(0, 0, W, H) == b"\xff" * (W * H)
    assert doc.selection() is None


def test_source_inside_a_group_gets_its_result_in_the_same_group():
    doc = make_doc()
    app = fk.Krita(doc)
    outer = doc.createGroupLayer("people")
    doc.rootNode().addChildNode(outer, None)
    source = fk.paint_layer(doc, "face", bgra_image().tobytes(), parent=outer)
    run_steps(layers.insert_result(app, fk, doc, source, document.Rect(0, 0, W, H), bytes(W * H * 4), None, [("age", 2)]))
    assert [n.name() for n in outer.childNodes()] == ["face", "Latent Edit · age +2"]


# --- the Apply flow with an in-process server double ---

class FakeServer:
    """Honours the protocol's contract in-process: render = input + 40 on R inside the selection, alpha = selection."""

    url = "http://fake"

    def __init__(self, fail_code=None, job_steps=3):
        self.sessions, self.calls = {}, []
        self.fail_code, self.job_steps = fail_code, job_steps
        self.cancelled = threading.Event()
        self.polls = 0

    def request(self, method, path):  # GET /v1/models: what run_edit checks the edit names against
        return {"models": [{"name": "fake", "directions": ["smile", "age"]}], "default_model": "fake"}

    def create_session(self, layer, selection=None, model=None, method="pti", align="auto", options=None):
        self.calls.append(("create", method, align, options))
        sid = "s%d" % len(self.sessions)
        self.sessions[sid] = (layer, selection)
        return {"session_id": sid, "job_id": "j" + sid}

    def batch(self, items, model=None, method="pti", align="auto", options=None):
        self.calls.append(("batch", len(items)))
        ids = []
        for it in items:
            sid = "s%d" % len(self.sessions)
            self.sessions[sid] = (it["layer"], it.get("selection"))
            ids.append(sid)
        return {"session_ids": ids, "job_id": "jb"}

    def wait_job(self, job_id, on_progress=None, should_cancel=None, poll_interval=0.0):
        for i in range(self.job_steps):
            if should_cancel and should_cancel():
                self.cancelled.set()
                raise cl.JobCancelled("cancelled")
            self.polls += 1
            if on_progress:
                on_progress({"state": "running", "progress": (i + 1) / self.job_steps, "stage": "project", "message": "step"})
        if self.fail_code:
            cl.check_job({"state": "failed", "error": {"error": self.fail_code, "message": "no face detected"}})
        return {"state": "done"}

    def render(self, session_id, edits, feather=None, blend=None, format=None):
        self.calls.append(("render", session_id, tuple(edits), feather, format))
        layer, sel = self.sessions[session_id]
        data, w, h, fmt, x, y = px.unpack_layer(layer)
        assert fmt == format == "rgba8"
        a = np.frombuffer(data, np.uint8).reshape(h, w, 4).copy()
        m = np.full((h, w), 255, np.uint8) if sel is None else np.frombuffer(sel["data"], np.uint8).reshape(h, w)
        a[..., 0] = np.where(m > 0, np.minimum(a[..., 0].astype(int) + 40, 255), a[..., 0])
        a[..., 3] = m
        return {"session_id": session_id, "layer": px.pack_layer(a.tobytes(), w, h, "rgba8", x, y)}


def test_apply_single_then_reedit_only_renders():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    server, cache = FakeServer(), model.SessionCache()
    before = source.pixelData(0, 0, W, H)
    statuses = []
    opts = model.EditOptions(edits=[("smile", 1.5)], method="w", align="none", project_steps=10)
    added = run_steps(model.apply_steps(app, fk, doc, [source], opts, server, cache, on_status=statuses.append))
    assert len(added) == 1
    group, layer, mask = added[0]
    assert group.name() == "Latent Edit · smile +1.5"
    assert [c[0] for c in server.calls] == ["create", "render"]
    assert server.calls[0][1:] == ("w", "none", {"project_steps": 10})
    assert server.calls[1][2:] == ((("smile", 1.5),), None, "rgba8")  # None: the server's feather default
    res = np.frombuffer(layer.pixelData(0, 0, W, H), np.uint8).reshape(H, W, 4)
    src = np.frombuffer(before, np.uint8).reshape(H, W, 4)
    inside = ellipse() > 0
    assert (res[..., 2][inside] == np.minimum(src[..., 2][inside].astype(int) + 40, 255)).all()  # R is byte 2 (BGRA)
    assert (res[..., 3] == ellipse()).all() and (res[..., :3][inside] == src[..., :3][inside])[..., :2].all()
    assert statuses[-1].state == "done" and statuses[-1].progress == 1.0
    assert source.pixelData(0, 0, W, H) == before
    # re-edit: same pixels and inversion options -> render only
    opts2 = model.EditOptions(edits=[("smile", -1.0)], method="w", align="none", project_steps=10, feather=3)
    run_steps(model.apply_steps(app, fk, doc, [source], opts2, server, cache))
    assert [c[0] for c in server.calls] == ["create", "render", "render"]
    assert server.calls[-1][1] == "s0" and server.calls[-1][3] == 3
    # a different inversion option -> a new session
    opts3 = model.EditOptions(edits=[("smile", 1.0)], method="pti")
    run_steps(model.apply_steps(app, fk, doc, [source], opts3, server, cache))
    assert [c[0] for c in server.calls][-2:] == ["create", "render"]
    assert [n.name() for n in doc.topLevelNodes()][1:5] == ["face", "Latent Edit · smile +1.5", "Latent Edit · smile -1",
                                                            "Latent Edit · smile +1"]


def test_batch_over_two_layers_uses_one_batch_job_and_one_group_each():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    second = fk.paint_layer(doc, "face 2", bgra_image(seed=5).tobytes(), above=top)
    server = FakeServer()
    opts = model.EditOptions(edits=[("age", 2)], method="w")
    added = run_steps(model.apply_steps(app, fk, doc, [source, second], opts, server, model.SessionCache()))
    assert [c[0] for c in server.calls] == ["batch", "render", "render"]
    assert server.calls[0][1] == 2
    assert [g.name() for g, _l, _m in added] == ["Latent Edit · age +2", "Latent Edit · age +2 2"]  # unique siblings
    assert [n.name() for n in doc.topLevelNodes()] == ["bottom", "face", "Latent Edit · age +2", "top", "face 2",
                                                       "Latent Edit · age +2 2"]
    assert [l.name() for _g, l, _m in added] == ["face (age +2)", "face 2 (age +2)"]


def test_failed_job_raises_a_clear_message_and_adds_nothing():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    with pytest.raises(cl.JobFailed, match="No face was found"):
        run_steps(model.apply_steps(app, fk, doc, [source], model.EditOptions(edits=[("smile", 1)]),
                                    FakeServer(fail_code="no_face"), model.SessionCache()))
    assert [n.name() for n in doc.topLevelNodes()] == ["bottom", "face", "top"]


def test_cancel_stops_the_job_and_adds_nothing():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    server = FakeServer(job_steps=10**6)
    runs = []
    gen = model.apply_steps(app, fk, doc, [source], model.EditOptions(edits=[("smile", 1)]), server,
                            model.SessionCache(), on_run=runs.append)
    next(gen)
    runs[0].cancel()
    with pytest.raises(cl.JobCancelled):
        run_steps(gen)
    assert server.cancelled.is_set() and runs[0].status().state == "cancelled"
    assert [n.name() for n in doc.topLevelNodes()] == ["bottom", "face", "top"]


def test_server_not_running_surfaces_from_the_worker():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    client = cl.Client("http://127.0.0.1:9", token="x", timeout=2)  # port 9 (discard): nothing listens
    with pytest.raises(cl.ServerNotRunning, match="not running"):
        run_steps(model.apply_steps(app, fk, doc, [source], model.EditOptions(), client, model.SessionCache()))


def test_no_nodes_is_an_error():
    doc, app, *_ = setup_doc_with_selection()
    with pytest.raises(document.DocumentError, match="No layer is selected"):
        run_steps(model.apply_steps(app, fk, doc, [], model.EditOptions(), FakeServer(), model.SessionCache()))


def test_session_cache_is_bounded_lru():
    c = model.SessionCache(max_items=2)
    c.put("a", "1")
    c.put("b", "2")
    c.put("a", "1b")
    c.put("c", "3")
    assert (c.get("a"), c.get("b"), c.get("c")) == ("1b", None, "3")


# --- settings ---

def test_settings_round_trip_through_krita_settings(tmp_path):
    app = fk.Krita()
    s = settings.load(app)
    assert s.server_url == cl.DEFAULT_URL and s.resolved_token_file().endswith("latent-edit/token")
    s.server_url, s.token_file, s.feather, s.project_steps = "http://127.0.0.1:9999", str(tmp_path / "t"), 3.5, 40
    settings.save(app, s)
    assert app.settings[("latent_edit", "feather")] == "3.5"
    again = settings.load(app)
    assert (again.server_url, again.token_file, again.feather, again.project_steps) == ("http://127.0.0.1:9999", str(tmp_path / "t"), 3.5, 40)
    app.settings[("latent_edit", "feather")] = "garbage"
    assert settings.load(app).feather < 0  # a corrupt entry falls back to "the server's default"
    s.align, s.live_preview = False, False  # "Detect and align" is remembered like the steps
    settings.save(app, s)
    assert (settings.load(app).align, settings.load(app).live_preview) == (False, False)
    app.settings[("latent_edit", "align")] = "maybe"
    assert settings.load(app).align is True
    assert again.client().token_file == str(tmp_path / "t")


# --- installer ---

def test_install_and_uninstall_krita(tmp_path):
    kritarc = tmp_path / "kritarc"
    kritarc.write_text("[General]\nfoo=Bar\n\n[python]\nenable_other=true\nenable_latent_edit=false\n\n[MainWindow]\nx=1\n")
    pkg = install_plugins.install_krita(tmp_path / "pykrita", kritarc)
    assert (tmp_path / "pykrita" / "latent_edit.desktop").read_text().count("X-KDE-Library=latent_edit") == 1
    for f in ("__init__.py", "extension.py", "common/client.py", "common/msgpack_codec.py", "common/pixels.py"):
        assert (pkg / f).is_file(), f
    text = kritarc.read_text()
    assert "enable_latent_edit=true" in text and "enable_latent_edit=false" not in text
    assert "foo=Bar" in text and "enable_other=true" in text and "[MainWindow]\nx=1" in text
    install_plugins.install_krita(tmp_path / "pykrita", kritarc)  # idempotent
    assert kritarc.read_text().count("enable_latent_edit") == 1
    install_plugins.uninstall_krita(tmp_path / "pykrita", kritarc)
    assert not (tmp_path / "pykrita" / "latent_edit").exists()
    assert not (tmp_path / "pykrita" / "latent_edit.desktop").exists()
    assert "enable_latent_edit" not in kritarc.read_text() and "enable_other=true" in kritarc.read_text()


def test_installed_package_imports_its_own_common_copy(tmp_path):
    import importlib
    import subprocess

    install_plugins.install_krita(tmp_path / "pykrita", tmp_path / "kritarc")
    code = ("import sys; sys.path.insert(0, %r); import latent_edit.model as m, latent_edit._common as c; "
            "print(c.client.__name__)" % str(tmp_path / "pykrita"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "latent_edit.common.client"
    assert importlib.util.find_spec("plugins.krita.latent_edit") is not None


def test_install_gimp_copies_plugin_and_common(tmp_path):
    src = Path(install_plugins.HERE) / "gimp" / "latent-edit"
    if not src.is_dir():
        with pytest.raises(FileNotFoundError, match="GIMP plug-in sources are missing"):
            install_plugins.install_gimp(tmp_path / "plug-ins")
        return
    dst = install_plugins.install_gimp(tmp_path / "plug-ins")
    assert dst == tmp_path / "plug-ins" / "latent-edit"
    assert (dst / "common" / "client.py").is_file()
    for f in src.rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            assert (dst / f.relative_to(src)).is_file()
    install_plugins.uninstall_gimp(tmp_path / "plug-ins")
    assert not dst.exists()


def test_krita_52_transparency_mask_api_is_used_when_present():
    """Krita >= 5.2: Document.createTransparencyMask + TransparencyMask.setSelection, no GUI action."""

    class Doc52(fk.Document):
        def createTransparencyMask(self, name):
            mask = self.createNode(name, "transparencymask")
            mask.setSelection = lambda sel: mask.setPixelData(sel.pixelData(0, 0, W, H), 0, 0, W, H)
            return mask

    doc = Doc52(W, H)
    app = fk.Krita(doc)
    source = fk.paint_layer(doc, "face", bgra_image().tobytes())
    sel = fk.Selection()
    sel.setPixelData(ellipse().tobytes(), 0, 0, W, H)
    doc.setSelection(sel)
    _g, layer, mask = run_steps(layers.insert_result(app, fk, doc, source, document.Rect(0, 0, W, H), bytes(W * H * 4),
                                                     ellipse().tobytes(), [("smile", 1)]))
    assert app.triggered == [] and doc.selection() is sel
    assert [c.name() for c in layer.childNodes()] == ["Selection"]
    assert mask.pixelData(0, 0, W, H) == ellipse().tobytes()


# --- Apply -> Apply, result stacking, live preview layer ---

def test_apply_then_apply_keeps_the_source_active_and_finds_it_from_a_result():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    server, cache = FakeServer(), model.SessionCache()
    doc.setActiveNode(source)
    opts = model.EditOptions(edits=[("smile", 1.5)], method="w")
    (group, layer, mask), = run_steps(model.apply_steps(app, fk, doc, [doc.activeNode()], opts, server, cache))
    assert doc.activeNode() == source  # the mask the 5.1 action made active is not what the next Apply reads
    opts2 = model.EditOptions(edits=[("smile", -1)], method="w")
    run_steps(model.apply_steps(app, fk, doc, [doc.activeNode()], opts2, server, cache))
    assert [c[0] for c in server.calls] == ["create", "render", "render"]  # the second Apply re-rendered
    # a user who clicked a result (its group, its layer, its mask) still edits the source
    for node in (group, layer, mask):
        assert model.resolve_sources(doc, [node]) == [source]
    assert layers.source_of(source) is None and layers.source_of(top) is None


def test_new_results_stack_above_the_preview_and_earlier_results():
    assert flow.stack_top([True, True, False, True]) == 2 and flow.stack_top([]) == 0
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    rect = document.Rect(0, 0, W, H)
    preview = layers.Preview(source, "d")
    preview.show(doc, rect, bytes(W * H * 4), [("smile", 1)], 2.0)
    assert preview.node.locked() and preview.node.name() == flow.PREVIEW_NAME
    run_steps(layers.insert_result(app, fk, doc, source, rect, bytes(W * H * 4), None, [("age", 1)]))
    assert [n.name() for n in doc.topLevelNodes()] == ["bottom", "face", flow.PREVIEW_NAME, "Latent Edit · age +1", "top"]
    assert layers.source_of(preview.node) == source
    run_steps(preview.remove(doc))
    assert [n.name() for n in doc.topLevelNodes()] == ["bottom", "face", "Latent Edit · age +1", "top"]


def test_apply_turns_a_matching_preview_into_the_result_without_a_render():
    doc, app, bottom, source, top, sel = setup_doc_with_selection()
    server, cache = FakeServer(), model.SessionCache()
    opts = model.EditOptions(edits=[("smile", 1.5)], method="w", feather=4.0)
    item = document.read_layer(doc, source, convert=False)
    preview = layers.Preview(source, layers.content_digest(item))
    pixels = bytes([7]) * (W * H * 4)
    preview.show(doc, item.rect, pixels, opts.edits, opts.feather)
    (group, layer, _m), = run_steps(model.apply_steps(app, fk, doc, [source], opts, server, cache, preview=preview))
    assert server.calls == [] and layer.pixelData(0, 0, W, H) == pixels
    assert flow.PREVIEW_NAME not in [n.name() for n in doc.topLevelNodes()]
    # a preview of other edits is not taken: the Apply renders (and still removes the preview)
    preview.show(doc, item.rect, pixels, [("smile", 0.5)], 4.0)
    run_steps(model.apply_steps(app, fk, doc, [source], opts, server, cache, preview=preview))
    assert [c[0] for c in server.calls] == ["create", "render"]
    assert flow.PREVIEW_NAME not in [n.name() for n in doc.topLevelNodes()]
