"""Real GIMP 3 (gimp-console-3.0 in a Debian trixie chroot) running our plug-in non-interactively against our
real server on loopback.  Run with ``pytest tests/hosts -k gimp``.

The chroot is built by ``.ci/setup-gimp3-root.sh`` (cached under ~/.cache/latent-edit/gimp3-root); when it
cannot be built (not root, Debian mirror unreachable) the tests skip with the reason — except under CI=true,
where that is a failure, so a skip is never counted as a pass there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plugins.common import flow


pytestmark = pytest.mark.hosts

ROOT = Path(__file__).resolve().parents[2]

GIMP_ROOT = Path(os.environ.get("GIMP3_ROOT", Path.home() / ".cache" / "latent-edit" / "gimp3-root"))
HARNESS = Path(__file__).parent / "gimp_harness" / "batch.py"
PROFILE = "/job/gimpdir"  # inside the chroot; reused so GIMP's plug-in query cache stays warm


def face_rgba8(size: int, seed: int) -> bytes:
    """An opaque face of the embedded default domain, ``size``×``size`` RGBA8 (nearest-upscaled from 64 px)."""
    from core import demo

    rgb = np.asarray(demo.render(demo.sample_params(1, seed)[0]), dtype=np.uint8)
    reps = size // rgb.shape[0]
    rgb = rgb.repeat(reps, axis=0).repeat(reps, axis=1)
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2).tobytes()


@pytest.fixture(scope="module")
def gimp_root(host_unavailable) -> Path:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        host_unavailable("GIMP 3 host tests need root (chroot)")
    if shutil.which("debootstrap") is None and not (GIMP_ROOT / ".latent-edit-ready").exists():
        host_unavailable("debootstrap is not installed (apt-get install debootstrap) and no GIMP 3 chroot is cached")
    proc = subprocess.run(["sh", str(ROOT / ".ci" / "setup-gimp3-root.sh"), str(GIMP_ROOT)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        host_unavailable("could not build the GIMP 3 chroot (Debian mirror unreachable?):\n" + proc.stderr[-2000:])
    return GIMP_ROOT


@pytest.fixture(scope="module")
def gimp_plugin(gimp_root: Path) -> Path:
    """Install the plug-in into the chroot's profile exactly as install.py does."""
    sys.path.insert(0, str(ROOT))
    from plugins import install_plugins

    plugins_dir = gimp_root / PROFILE.lstrip("/") / "plug-ins"
    install_plugins.install_gimp(plugins_dir)
    return plugins_dir / "latent-edit"


def run_gimp(gimp_root: Path, server, case: dict, name: str, tmp_path: Path, token: str | None = None) -> dict:
    """Write the case into the chroot, run GIMP on it, return info.json plus the dumped arrays' folder."""
    job = gimp_root / "job" / name
    if job.exists():
        shutil.rmtree(job)
    job.mkdir(parents=True)
    inner = "/job/" + name
    if token is None:
        shutil.copy(server.token_file, job / "token")
    else:
        (job / "token").write_text(token)
    for i, spec in enumerate(case["layers"]):
        (job / f"layer{i}.rgba8").write_bytes(spec.pop("pixels"))
        spec["rgba8"] = f"{inner}/layer{i}.rgba8"
    case["out"] = f"{inner}/out"
    names = server.directions()
    case["args"]["edit-1"] = "smile" if "smile" in names else names[0]  # the embedded model has "smile"
    case["args"]["server-url"] = server.url
    case["args"]["token-file"] = f"{inner}/token"
    (job / "case.json").write_text(json.dumps(case))
    shutil.copy(HARNESS, job / "batch.py")
    cmd = ["timeout", "600", "chroot", str(gimp_root), "env", "-i", "HOME=/root", f"GIMP3_DIRECTORY={PROFILE}",
           "PATH=/usr/bin:/bin", "LANG=C.UTF-8", f"LE_CASE={inner}/case.json",
           "gimp-console-3.0", "-i", "-d", "--batch-interpreter=python-fu-eval",
           "-b", f"exec(open('{inner}/batch.py').read())", "--quit"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=700)
    (tmp_path / f"gimp-{name}.log").write_text(proc.stdout + proc.stderr)
    out = job / "out"
    assert proc.returncode == 0 and (out / "info.json").exists(), (
        f"GIMP exited {proc.returncode}; log tail:\n{(proc.stdout + proc.stderr)[-4000:]}")
    info = json.loads((out / "info.json").read_text())
    info["dir"] = out
    return info


def _read(path: Path, w: int, h: int, dtype) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=dtype).reshape(h, w, 4)


def _check(info: dict, case: dict, dtype, edited: list[int]):
    """The assertions every case shares."""
    assert info["status"] == "success", info["message"]
    assert info["menu"] == ["<Image>/Filters"]
    cw, ch = case["canvas"]
    out = info["dir"]
    # source layers untouched, bit for bit
    for i, spec in enumerate(case["layers"]):
        before = _read(out / f"before_{i}.raw", spec["width"], spec["height"], dtype)
        after = _read(out / f"after_{i}.raw", spec["width"], spec["height"], dtype)
        assert np.array_equal(before, after), f"source layer {spec['name']} was modified"
    # one group per edited layer, directly above its source, holding a masked result layer
    top = [n["name"] for n in info["tree"]]
    for i in edited:
        src = case["layers"][i]["name"]
        pos = top.index(src)
        group = info["tree"][pos - 1]
        title = flow.edit_title([(case["args"]["edit-1"], case["args"]["strength-1"])])
        assert group["group"] and group["name"].startswith(title), top  # GIMP appends " #1" to repeated names
        (child,) = group["children"]
        edits = [(case["args"]["edit-1"], case["args"]["strength-1"])]
        assert child["mask"] and child["name"] == flow.result_layer_name(src, edits)  # the same names as in Krita
        spec = case["layers"][i]
        assert (child["x"], child["y"], child["width"], child["height"]) == (spec["x"], spec["y"], spec["width"], spec["height"])
    # composite: identical outside the selection, changed inside
    sel = np.frombuffer((out / "selection.y8").read_bytes(), np.uint8).reshape(ch, cw)
    before = _read(out / "composite_before.raw", cw, ch, dtype).astype(np.int64)
    after = _read(out / "composite_after_0.raw", cw, ch, dtype).astype(np.int64)
    outside = sel == 0
    assert np.array_equal(before[outside], after[outside]), "pixels outside the selection changed"
    inside = sel == 255
    scale = 65535 if dtype == np.uint16 else 255
    visibly = np.abs(after[..., :3] - before[..., :3]).max(-1) > 8 / 255 * scale
    for i in edited:  # every edited layer changed visibly somewhere in its selected part (a smile is local)
        spec = case["layers"][i]
        region = np.zeros_like(inside)
        region[spec["y"]:spec["y"] + spec["height"], spec["x"]:spec["x"] + spec["width"]] = True
        frac = visibly[region & inside].mean()
        assert frac > 0.02, f"the edit visibly changed only {frac:.1%} of layer {spec['name']}'s selected pixels"


def _case(layers, selection, targets, precision="U8_NON_LINEAR", pixel_format="R'G'B'A u8", batch=False,
          canvas=(128, 128)):
    return {"canvas": list(canvas), "precision": precision, "pixel_format": pixel_format, "layers": layers,
            "selection": list(selection), "targets": targets,
            "args": {"method": "w", "align": "none", "edit-1": "smile", "strength-1": 3.0, "steps": 30,
                     "feather": 2.0, "batch": batch}}


def _layer(name, seed, x=0, y=0, size=128):
    return {"name": name, "width": size, "height": size, "x": x, "y": y, "pixels": face_rgba8(size, seed)}


def test_gimp_edit_8bit(gimp_root, gimp_plugin, latent_server, tmp_path):
    case = _case([_layer("photo", 1)], (24, 56, 80, 56), [0])
    info = run_gimp(gimp_root, latent_server, case, "u8", tmp_path)
    _check(info, case, np.uint8, edited=[0])


def test_gimp_layer_with_offsets_and_batch(gimp_root, gimp_plugin, latent_server, tmp_path):
    case = _case([_layer("left", 2, x=16, y=24), _layer("right", 3, x=176, y=8)], (0, 70, 320, 60), [0, 1],
                 batch=True, canvas=(320, 176))
    info = run_gimp(gimp_root, latent_server, case, "offsets", tmp_path)
    _check(info, case, np.uint8, edited=[0, 1])


def test_gimp_16bit(gimp_root, gimp_plugin, latent_server, tmp_path):
    case = _case([_layer("photo16", 4)], (24, 56, 80, 56), [0], precision="U16_NON_LINEAR",
                 pixel_format="R'G'B'A u16")
    info = run_gimp(gimp_root, latent_server, case, "u16", tmp_path)
    _check(info, case, np.uint16, edited=[0])


def test_gimp_wrong_token_is_a_clear_error_and_adds_nothing(gimp_root, gimp_plugin, latent_server, tmp_path):
    case = _case([_layer("photo", 5)], (24, 56, 80, 56), [0])
    info = run_gimp(gimp_root, latent_server, case, "badtoken", tmp_path, token="not-the-token")
    assert info["status"] == "execution-error"
    assert "token" in info["message"].lower() and "Traceback" not in info["message"]
    assert [n["name"] for n in info["tree"]] == ["photo"]


def _jobs(server) -> list:
    from plugins.common.client import Client

    return Client(server.url, token_file=str(server.token_file)).request("GET", "/v1/jobs?limit=100")["jobs"]


def test_gimp_second_call_on_a_layer_rerenders_stacks_on_top_and_a_typo_costs_no_inversion(
        gimp_root, gimp_plugin, latent_server, tmp_path):
    case = _case([_layer("photo", 6)], (24, 56, 80, 56), [0])
    case["more_calls"] = [{"strength-1": -3.0}, {"edit-1": "smlie"}]
    jobs_before = len(_jobs(latent_server))
    info = run_gimp(gimp_root, latent_server, case, "twice", tmp_path)
    _check(info, case, np.uint8, edited=[0])
    first, second, typo = info["calls"]
    assert (first["status"], second["status"]) == ("success", "success"), (first["message"], second["message"])
    assert json.loads(first["message"])["reused"] == 0
    assert json.loads(second["message"])["reused"] == 1  # the same layer again: a re-render, no inversion
    # one inversion job in all: the second call re-rendered, the typo was refused before any upload
    assert len(_jobs(latent_server)) - jobs_before == 1
    assert typo["status"] == "execution-error" and 'no edit named "smlie"' in typo["message"]
    assert "Traceback" not in typo["message"]
    # the second result sits above the first, both directly above the source
    top = [n["name"] for n in second["tree"]]
    edit = case["args"]["edit-1"]
    assert top[0].startswith(flow.edit_title([(edit, -3.0)])) and top[1].startswith(flow.edit_title([(edit, 3.0)]))
    assert top[2] == "photo"
    assert [n["name"] for n in typo["tree"]] == top  # the refused call added nothing
    # ... and it is visible: the composite after the second call differs from the first call's inside the selection
    cw, ch = case["canvas"]
    out = info["dir"]
    sel = np.frombuffer((out / "selection.y8").read_bytes(), np.uint8).reshape(ch, cw)
    c0 = _read(out / "composite_after_0.raw", cw, ch, np.uint8).astype(int)
    c1 = _read(out / "composite_after_1.raw", cw, ch, np.uint8).astype(int)
    visibly = np.abs(c1[..., :3] - c0[..., :3]).max(-1) > 8
    assert visibly[sel == 255].mean() > 0.02, visibly[sel == 255].mean()
    assert np.array_equal(c0[sel == 0], c1[sel == 0])


def test_gimp_label_layer_gives_a_three_segment_session(gimp_root, gimp_plugin, latent_server, tmp_path):
    """Issue 21 in GIMP: segments "From layer" with a hidden 3-colour label layer -> a 3-segment ChunkyGAN session
    (the result metadata's segment count), the result a new masked layer in a new group, the photo and every
    pixel outside the selection unchanged."""
    size, lw, lx = 128, 120, 8  # the label layer is narrower than the photo and offset: read over the photo's rect
    colours = np.array([[220, 30, 30, 255], [30, 200, 40, 255], [40, 60, 230, 255]], np.uint8)
    bands = colours[np.minimum(np.arange(lw) * 3 // lw, 2)][None].repeat(size, 0)
    labels = {"name": "labels", "width": lw, "height": size, "x": lx, "y": 0, "pixels": bands.tobytes(),
              "visible": False}
    x = np.arange(size)
    cols = np.where(x < lx, -1, np.minimum((x - lx) * 3 // lw, 2))  # band of each canvas column (-1: no segment)
    case = _case([_layer("photo", 7), labels], (24, 56, 80, 56), [0])
    case["args"].update(method="chunks", segments="layer", steps=10)
    case["args"]["keep-detail"] = True
    # the same session re-rendered without "Keep photo detail"; then "Automatic", which needs a segmenter
    # and an edit of segment 1 only, at +3 and at -3 (both re-renders of the same session)
    case["more_calls"] = [{"keep-detail": False}, {"segments": "auto"},
                          {"keep-detail": False, "edit-segments": "1"},
                          {"keep-detail": False, "edit-segments": "1", "strength-1": -3.0}]
    case["label_layer"] = 1
    info = run_gimp(gimp_root, latent_server, case, "labels", tmp_path)
    _check(info, case, np.uint8, edited=[0])
    second, auto, plus1, minus1 = info["calls"][1:]
    assert second["status"] == "success" and json.loads(second["message"])["reused"] == 1, second["message"]
    if not latent_server.model_info.get("segmenter"):  # refused before any upload, saying what to add
        assert auto["status"] == "execution-error" and "cannot find segments by itself" in auto["message"]
        assert "Traceback" not in auto["message"] and auto["tree"] == second["tree"]
    result = json.loads(info["message"])
    (segments,) = result["segments"]
    assert len(segments) >= 3 and [s.get("label") for s in segments] == [0, 1, 2], segments
    cw, ch = case["canvas"]
    sel = np.frombuffer((info["dir"] / "selection.y8").read_bytes(), np.uint8).reshape(ch, cw)
    inside = [int(((cols[None, :] == k) & (sel > 0)).sum()) for k in range(3)]
    assert all(abs(s["area"] - n) <= 0.15 * n + 20 for s, n in zip(segments, inside)), (segments, inside)
    assert [n["name"] for n in info["tree"]][0] == "labels"  # the label layer stays where it was, untouched
    # "Keep photo detail" reached the render: its result differs from the plain one inside the selection only
    c0 = _read(info["dir"] / "composite_after_0.raw", cw, ch, np.uint8).astype(int)
    c1 = _read(info["dir"] / "composite_after_1.raw", cw, ch, np.uint8).astype(int)
    assert np.array_equal(c0[sel == 0], c1[sel == 0])
    assert (np.abs(c0 - c1)[..., :3].max(-1)[sel == 255] > 0).any(), "keep-detail changed nothing"
    # an edit of segment 1 changes segment 1 and nothing of segments 0 and 2 (3 px away from it), where the
    # top result covers the canvas fully (the selection eroded past its 2 px feather)
    assert plus1["status"] == "success" and minus1["status"] == "success", (plus1["message"], minus1["message"])
    c3 = _read(info["dir"] / "composite_after_3.raw", cw, ch, np.uint8).astype(int)
    c4 = _read(info["dir"] / "composite_after_4.raw", cw, ch, np.uint8).astype(int)
    core = sel == 255
    for _ in range(4):
        core = core & np.roll(core, 1, 0) & np.roll(core, -1, 0) & np.roll(core, 1, 1) & np.roll(core, -1, 1)
    band1 = np.flatnonzero(cols == 1)
    xs = np.arange(cw)[None, :].repeat(ch, 0)
    far = core & ((xs < band1[0] - 3) | (xs > band1[-1] + 3))
    changed = np.abs(c3 - c4)[..., :3].max(-1) > 0
    assert far.sum() > 200 and not changed[far].any(), "an edit of segment 1 changed segments 0 or 2"
    assert changed[core & (cols[None, :] == 1)].mean() > 0.2, "the edit of segment 1 did not change it"
