"""The embedded default (core.demo): renderer, scorer, shipped generator and directions.

No training here: the shipped files in core/demo/weights are what is tested.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import core
from core.common import InvalidInput
from core.demo import renderer
from core.demo.data import params_from_z
from core.demo.renderer import ATTRIBUTES, EXTRAS, NUM_ATTRIBUTES, render, sample_params
from core.demo.train import generate

K = NUM_ATTRIBUTES


@pytest.fixture(scope="module")
def G():
    return core.load_generator(core.default_model_path()).eval()


@pytest.fixture(scope="module")
def scorer():
    from core.demo.scorer import load_scorer

    return load_scorer()


@pytest.fixture(scope="module")
def directions(G):
    return core.load_directions(core.default_model_path(), G=G)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- renderer


def test_sample_params_shape_range_and_seed():
    p = sample_params(100, seed=3)
    assert p.shape == (100, K) and p.dtype == np.float32
    assert p.min() >= 0 and p.max() <= 1
    assert np.array_equal(p, sample_params(100, seed=3))
    assert not np.array_equal(p, sample_params(100, seed=4))
    assert len(ATTRIBUTES) == K >= 10 and len(set(ATTRIBUTES)) == K


def test_render_is_deterministic_and_batched():
    p = sample_params(3, seed=0)
    a = render(p)
    assert a.shape == (3, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(p))
    assert np.array_equal(a[1], render(p[1]))
    assert not np.array_equal(a[0], a[1])


def test_render_is_antialiased_by_supersampling():
    p = sample_params(1, seed=5)[0]
    aa = render(p).astype(np.float64)
    big = render(p, size=256, supersample=1).astype(np.float64)        # the same drawing at 4x, no filtering
    boxed = big.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(aa - boxed).max() <= 1.0                               # output = 4x4 box filter of the 4x drawing
    aliased = render(p, supersample=1)
    n_aa = len(np.unique(aa.reshape(-1, 3), axis=0))
    n_aliased = len(np.unique(aliased.reshape(-1, 3), axis=0))
    assert n_aa > 2 * n_aliased                                          # edges carry intermediate colours


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_every_attribute_changes_the_image(name):
    base = np.full(K, 0.5, np.float32)
    lo, hi = base.copy(), base.copy()
    lo[ATTRIBUTES.index(name)], hi[ATTRIBUTES.index(name)] = 0.0, 1.0
    diff = np.abs(render(lo).astype(int) - render(hi).astype(int))
    assert (diff.max(axis=2) > 20).sum() >= 8, f"{name} barely changes the face"


def test_extras_draw_and_bad_input_raises():
    p = sample_params(1, seed=2)[0]
    plain = render(p)
    for e in EXTRAS:
        assert (np.abs(render(p, extras=[e]).astype(int) - plain).max(axis=2) > 30).sum() >= 3, e
    with pytest.raises(InvalidInput):
        render(p, extras=["moustache_wax"])
    with pytest.raises(InvalidInput):
        render(np.zeros(K - 1))
    with pytest.raises(InvalidInput):
        render(np.full(K, np.nan))


def test_lazy_package_exports():
    import core.demo as demo

    assert demo.ATTRIBUTES == ATTRIBUTES
    assert demo.render is render and demo.sample_params is sample_params
    assert callable(demo.score)
    assert core.default_model_path().name == "face64.pt" and core.default_model_path().is_file()


# ----------------------------------------------------------------------------------------------- part maps


def _fine_region(p, parts, size=64, extras=None):
    """Output pixels any drawing pixel of ``parts`` touches (the 4x drawing without filtering, block-pooled)."""
    ids = [renderer.PARTS.index(x) for x in parts]
    fine = renderer.render_parts(p, extras=extras, size=4 * size, supersample=1)
    return np.isin(fine, ids).reshape(size, 4, size, 4).any(axis=(1, 3))


def test_part_maps_shape_names_and_determinism():
    from core.demo import PARTS, render_parts

    assert {"background", "skin", "hair", "eyes", "brows", "mouth", "glasses", "beard", "shirt", "extra"} <= set(PARTS)
    p = sample_params(3, seed=8)
    m = render_parts(p)
    assert m.shape == (3, 64, 64) and m.dtype == np.uint8 and int(m.max()) < len(PARTS)
    assert np.array_equal(m, render_parts(p)) and np.array_equal(m[1], render_parts(p[1]))
    assert render_parts(p[0], size=128).shape == (128, 128)
    full = renderer.params_from_dict({"glasses": 1.0, "beard": 1.0, "mouth_open": 0.8, "hair_length": 0.2})
    assert {PARTS[i] for i in np.unique(render_parts(full, extras=["sticker"]))} == set(PARTS)
    assert "extra" not in {PARTS[i] for i in np.unique(render_parts(sample_params(8, seed=1)))}
    with pytest.raises(InvalidInput):
        render_parts(p[0], extras=["moustache_wax"])
    assert set(renderer.ATTRIBUTE_PARTS) == set(ATTRIBUTES)
    assert all(set(v) <= set(PARTS) for v in renderer.ATTRIBUTE_PARTS.values())


def test_part_maps_leave_render_unchanged():
    p = sample_params(2, seed=21)
    before = render(p, extras=["mask"])
    renderer.render_parts(p, extras=["mask"])
    assert np.array_equal(before, render(p, extras=["mask"]))


def test_each_part_has_its_own_colours_in_the_unfiltered_render():
    from core.demo.renderer import (_BROW_DARK, _FRAME, _HAIR, _IRIS, _LID, _LIP, _MOUTH_IN, _MOUTH_LINE, _PUPIL,
                                    _SHIRT, _SKIN, _TEETH, _lerp_palette, _shade)

    p = renderer.params_from_dict({"glasses": 0.0, "beard": 0.0, "mouth_open": 0.8, "hair_color": 0.3,
                                   "skin_tone": 0.2, "hair_length": 0.5})
    img = render(p, supersample=1)                                       # no filtering: every pixel is one shape's
    parts = renderer.render_parts(p, supersample=1)
    with_glasses = renderer.params_from_dict({"glasses": 1.0}, base=p)   # solid frames, no lens tint
    glasses = renderer.render_parts(with_glasses, supersample=1) == renderer.PARTS.index("glasses")
    frames = render(with_glasses, supersample=1)[glasses]
    assert len(frames) >= 100 and np.all(frames == _FRAME)
    hair, skin = _lerp_palette(_HAIR, 0.3), _lerp_palette(_SKIN, 0.2)
    brow = tuple(int(round(0.45 * h + 0.55 * c)) for h, c in zip(_shade(hair, 0.7), _BROW_DARK))
    expect = {"shirt": {_SHIRT}, "hair": {hair}, "brows": {brow},
              "skin": {skin, _shade(skin, 0.86), _shade(skin, 0.92), _shade(skin, 0.7)},
              "eyes": {(252, 252, 252), _IRIS, _PUPIL, _LID},
              "mouth": {_MOUTH_LINE, _MOUTH_IN, _LIP, _TEETH}}
    for name, colours in expect.items():
        got = {tuple(int(v) for v in c) for c in img[parts == renderer.PARTS.index(name)]}
        assert got and got <= colours, (name, got - colours)
    bg = img[parts == 0]
    assert np.all(bg[:, 1] > 100) and len(bg) > 1000                     # the hue-0.5 backdrop, never a face colour


def test_part_map_is_the_dominant_label_of_the_fine_drawing():
    for p in sample_params(3, seed=3):
        fine = renderer.render_parts(p, size=256, supersample=1).reshape(64, 4, 64, 4)
        counts = np.stack([(fine == i).sum(axis=(1, 3)) for i in range(len(renderer.PARTS))])
        assert np.array_equal(counts.argmax(0), renderer.render_parts(p))


@pytest.mark.parametrize("name", [a for a in ATTRIBUTES if a not in ("head_x", "face_scale")])
def test_an_attribute_changes_the_render_only_inside_its_parts(name):
    k = ATTRIBUTES.index(name)
    for p in sample_params(2, seed=12):
        p[ATTRIBUTES.index("glasses")] = 0.0                             # no translucent frames over other parts
        a, b = p.copy(), p.copy()
        a[k], b[k] = (0.3, 1.0) if name == "glasses" else (0.1, 0.9)
        diff = np.abs(render(a).astype(int) - render(b).astype(int)).max(axis=2)
        region = _fine_region(a, renderer.ATTRIBUTE_PARTS[name]) | _fine_region(b, renderer.ATTRIBUTE_PARTS[name])
        # the lens tint (at most 1/6 opacity) lies outside the glasses' region and changes by less than 255/6
        tolerance = 255 // 6 if name == "glasses" else 0
        assert diff[~region].max() <= tolerance, name
        assert (diff[region] > 20).sum() >= 5, name


@pytest.mark.parametrize("extra", EXTRAS)
def test_extras_are_labelled_extra_where_they_are_drawn(extra):
    p = sample_params(1, seed=6)[0]
    plain = renderer.render_parts(p, size=256, supersample=1)
    with_extra = renderer.render_parts(p, extras=[extra], size=256, supersample=1)
    changed = (render(p, extras=[extra], size=256, supersample=1) != render(p, size=256, supersample=1)).any(axis=2)
    labelled = with_extra == renderer.PARTS.index("extra")
    assert labelled.sum() >= 16 and np.array_equal(labelled, changed)
    assert np.array_equal(with_extra[~labelled], plain[~labelled])


# ----------------------------------------------------------------------------------------------- scorer

# Held-out mean absolute error bounds (0..1 scale; predicting 0.5 always gives 0.25). Measured on these 200 renders
# (v2 scorer): gaze 0.040, beard 0.030, eyebrow 0.026, smile/glasses/hair_length 0.025, eye_openness 0.020,
# mouth 0.013, rest <= 0.011 (the v1 scorer: smile 0.061 ... mouth 0.027, hence the v1 bound 0.08 on fine features).
_FINE = ("smile", "mouth_open", "eye_openness", "gaze", "eyebrow_height", "glasses", "beard")
SCORER_MAE_BOUND = {a: (0.06 if a in _FINE else 0.03) for a in ATTRIBUTES}


def test_scorer_recovers_parameters_of_held_out_renders():
    from core.demo import score

    p = sample_params(200, seed=4242)                                    # training renders come from z, not from here
    imgs = render(p)
    pred = score(imgs)
    assert set(pred) == set(ATTRIBUTES)
    for k, name in enumerate(ATTRIBUTES):
        assert pred[name].shape == (200,)
        mae = float(np.abs(pred[name] - p[:, k]).mean())
        assert mae < SCORER_MAE_BOUND[name], f"{name}: held-out MAE {mae:.3f}"
    # float (N,3,H,W) in [-1,1] gives the same answer as uint8
    pred_t = score(_to_tensor(imgs[:16]))
    for name in ATTRIBUTES:
        np.testing.assert_allclose(pred_t[name], pred[name][:16], atol=1e-5)
    with pytest.raises(InvalidInput):
        score(np.zeros((2, 64, 64, 3), np.float32))


# ----------------------------------------------------------------------------------------------- generator


def test_shipped_files_are_small_and_load_fast():
    from core.demo import WEIGHTS_DIR

    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= 30 * 2 ** 20
    t0 = time.perf_counter()
    G = core.load_generator(core.default_model_path())
    assert time.perf_counter() - t0 < 2.0
    assert G.resolution == 64 and G.num_ws == 10


def test_forward_under_50ms(G):
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        G.synthesis(G.mapping(z))
        for _ in range(7):
            t0 = time.perf_counter()
            img = G.synthesis(G.mapping(z))
            times.append(time.perf_counter() - t0)
    assert img.shape == (1, 3, 64, 64)
    assert sorted(times)[len(times) // 2] < 0.050


@torch.no_grad()
def test_samples_cover_every_attribute_and_follow_z(G, scorer):
    z = torch.randn(256, G.z_dim, generator=torch.Generator().manual_seed(11))
    pred = scorer(generate(G, z)).numpy()
    lo, hi = np.percentile(pred, 5, axis=0), np.percentile(pred, 95, axis=0)
    mae = np.abs(pred - params_from_z(z.numpy())).mean(0)  # the face z asks for (data.params_from_z) vs drawn
    # Measured (5th..95th percentile, z-MAE), v2 model: every attribute spans at least .11..90; z-MAE .035-.05 for
    # the small features and beard, <= .033 for the rest (v1: .13..86, .07-.11 and <= .04).  Chance z-MAE is 0.33.
    for k, name in enumerate(ATTRIBUTES):
        assert lo[k] < 0.15 and hi[k] > 0.85, f"{name}: samples span only {lo[k]:.2f}..{hi[k]:.2f}"
        assert mae[k] < (0.08 if name in _FINE else 0.05), f"{name}: z-MAE {mae[k]:.3f}"


def test_directions_move_their_own_attribute_only(G, scorer, directions):
    from core.demo.directions import edit_matrix

    assert {n for n in directions if not n.endswith("_sparse")} == set(ATTRIBUTES)  # + sparse ones (issue 20)
    M = edit_matrix(G, scorer, directions, n=64, strengths=(-3.0, 3.0))
    # Measured, v2 model: own change 0.63 (glasses) .. 0.81 (mouth_open); largest other ÷ own 0.05 (eyebrow_height)
    # .. 0.14 (hair_color, into beard).  v1 measured 0.64 .. 0.79 and up to 0.21; the bound is 1/4.
    failures = []
    for i, name in enumerate(ATTRIBUTES):
        own = M[i, i]
        others = np.delete(M[i], i)
        worst = ATTRIBUTES[int(np.argmax(np.where(np.arange(K) == i, -1, M[i])))]
        if own < 0.55:
            failures.append(f"{name}: moves its own attribute by {own:.3f} across -3..3")
        if others.max() > 0.2 * own:
            failures.append(f"{name}: also moves {worst} by {others.max():.3f} (own {own:.3f})")
    assert not failures, failures


def test_embedded_sparse_fit_is_aligned_to_the_renderer(G, scorer):
    import dataclasses

    from core.demo.directions import SPARSE_OPTIONS, fit_sparse_directions

    o = dataclasses.replace(SPARSE_OPTIONS, steps=2, batch=2, lpips=0.0, calibrate_n=0)
    dirs, report = fit_sparse_directions(G, scorer, names=["smile"], options=o)
    assert list(dirs) == ["smile_sparse"] and dirs["smile_sparse"].vector.shape == (G.num_ws, G.w_dim)
    assert report["aligned_to_ground_truth"] is True and "align" in report["attributes"]["smile"]
    assert "aligned to the renderer" in dirs["smile_sparse"].source


def test_is_default_model_names_only_the_shipped_generator(tmp_path, monkeypatch):
    import shutil

    from core.demo import default_model_path, is_default_model

    copy = tmp_path / "face64.pt"
    shutil.copyfile(default_model_path(), copy)
    monkeypatch.chdir(default_model_path().parent)
    assert is_default_model(default_model_path()) and is_default_model("face64.pt")  # any spelling of the path
    assert not is_default_model(copy) and not is_default_model(tmp_path / "missing.pt")
    assert not is_default_model(None)


def test_direction_sign_and_manifest(G, scorer, directions):
    import json

    from core.demo import default_directions_path

    manifest = json.loads(default_directions_path().read_text())
    assert manifest["format"] == "latent-edit-directions" and manifest["w_dim"] == G.w_dim
    assert manifest["num_ws"] == G.num_ws
    assert [d["name"] for d in manifest["directions"] if d["kind"] == "w"] == list(ATTRIBUTES)
    sparse = [d for d in manifest["directions"] if d["name"].endswith("_sparse")]  # Yin et al. (issue 20)
    assert [d["name"] for d in sparse] == [f"{a}_sparse" for a in ATTRIBUTES]
    assert {d["kind"] for d in sparse} == {"wplus"}
    ws = G.mapping(torch.randn(16, G.z_dim, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        s0 = scorer(G.synthesis(core.apply_edits(ws, [("smile", -2.0)], registry=directions)).clamp(-1, 1))
        s1 = scorer(G.synthesis(core.apply_edits(ws, [("smile", 2.0)], registry=directions)).clamp(-1, 1))
    k = ATTRIBUTES.index("smile")
    assert float((s1[:, k] - s0[:, k]).mean()) > 0.3                    # positive strength = more of the attribute


def test_refinement_takes_a_leak_out_of_a_direction(G, scorer, directions):
    """Gaze with eye openness mixed in; refining it through G and the scorer removes most of the leak."""
    from core.demo.directions import DirectionRefineOptions, edit_matrix, refine_directions
    from core.edits import Direction

    g, e = directions["gaze"], directions["eye_openness"]
    v = g.vector * g.scale + 0.5 * e.vector * e.scale
    leaky = dict(directions, gaze=Direction("gaze", v / v.norm(), scale=float(v.norm())))
    refined = refine_directions(G, scorer, leaky, DirectionRefineOptions(steps=25, batch=12), names=["gaze"])
    assert refined["eye_openness"] is directions["eye_openness"] and refined["gaze"] is not leaky["gaze"]
    k, j = ATTRIBUTES.index("gaze"), ATTRIBUTES.index("eye_openness")
    before = edit_matrix(G, scorer, leaky, n=32, names=["gaze"])[k]          # held-out: seed 7, not the refit's
    after = edit_matrix(G, scorer, refined, n=32, names=["gaze"])[k]
    assert after[j] < 0.5 * before[j], (before[j], after[j])
    assert after[k] >= 0.5, after[k]


# Mean PSNR (dB) of a 150-step pixel-loss W+ projection of 4 held-out renders; measured 26.9 (25.0..28.8) on the v2
# model (v1: 26.1, 22.3..28.7, bound 24).
PROJECTION_PSNR_BOUND = 25.0


def test_wplus_projection_reconstructs_held_out_renders(G):
    from core.projection import ProjectOptions, project

    p = sample_params(4, seed=777)
    target = _to_tensor(render(p))
    opts = ProjectOptions(lpips_weight=0.0, l2_weight=1.0, optimize_noise=False)  # pixel loss: PSNR is the metric
    ws = project(G, target, space="w+", steps=150, options=opts)
    with torch.no_grad():
        rec = G.synthesis(ws).clamp(-1, 1)
    mse = (rec - target).square().flatten(1).mean(1)
    psnr = 10 * torch.log10(4.0 / mse)
    assert float(psnr.mean()) >= PROJECTION_PSNR_BOUND, psnr.tolist()
