"""The pure scoring functions of bench/editability.py (the ground-truth editability benchmark)."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
import editability as ed  # noqa: E402


def _face(seed=0, shape=(8, 8, 3)):
    return np.random.default_rng(seed).uniform(-1, 1, shape)


def test_delta_score_is_one_for_the_true_delta_zero_for_none_negative_for_a_wrong_one():
    true = _face(1)
    assert ed.delta_score(true, true) == pytest.approx(1.0)
    assert ed.delta_score(np.zeros_like(true), true) == pytest.approx(0.0)
    assert ed.delta_score(-true, true) == pytest.approx(-3.0)          # the opposite change: 1 − 4
    assert ed.delta_score(0.5 * true, true) == pytest.approx(0.75)     # half the change
    assert ed.delta_score(_face(2), true) < 0                          # an unrelated change of the same size
    assert np.isnan(ed.delta_score(true, np.zeros_like(true)))


def test_edited_params_clamp_and_saturation():
    p = np.array([0.5, 0.9, 0.05], np.float32)
    q, move = ed.edited_params(p, 0, 2.0, 1 / 6)
    assert q[0] == pytest.approx(0.5 + 1 / 3) and move == pytest.approx(1 / 3) and np.array_equal(q[1:], p[1:])
    q, move = ed.edited_params(p, 1, 3.0, 1 / 6)
    assert q[1] == 1.0 and move == pytest.approx(0.1, abs=1e-6)
    assert ed.saturated(move, 3.0, 1 / 6)                               # 0.1 of a requested 0.5
    assert not ed.saturated(1 / 3, 2.0, 1 / 6)
    q, move = ed.edited_params(p, 2, -1.0, 1 / 6)
    assert q[2] == 0.0 and move == pytest.approx(-0.05) and ed.saturated(move, -1.0, 1 / 6)
    assert not ed.saturated(-0.1, -1.0, 1 / 6)                          # 0.6 of the request counts
    assert p[0] == np.float32(0.5)                                      # the input is not modified


def test_target_hit_and_leak():
    changes = np.array([0.30, -0.05, 0.12])
    assert ed.target_hit(changes, 0, 1 / 3) == pytest.approx(0.9)
    assert ed.target_hit(-changes, 0, 1 / 3) == pytest.approx(-0.9)    # moved the wrong way
    assert ed.leak(changes, 0) == pytest.approx(0.4)
    assert ed.leak(changes, 2) == pytest.approx(2.5)
    assert ed.leak(np.array([0.0, 0.1]), 0) == float("inf")
    assert ed.leak(np.array([0.0, 0.0]), 0) == 0.0


def test_region_split_sums_to_the_whole_image_mean():
    err = np.random.default_rng(3).random((16, 16))
    region = np.zeros((16, 16), bool)
    region[4:9, 2:12] = True
    inside, outside = ed.region_split(err, region)
    frac = region.mean()
    assert inside * frac + outside * (1 - frac) == pytest.approx(err.mean())
    assert inside == pytest.approx(err[4:9, 2:12].mean())
    inside, outside = ed.region_split(err, np.ones((16, 16), bool))
    assert inside == pytest.approx(err.mean()) and np.isnan(outside)


def test_energy_inside_and_occlusion():
    delta = np.zeros((8, 8, 3))
    delta[2:4, 2:4] = 1.0
    delta[6, 6] = 2.0                                                   # 12 of the 4·3 + 12 = 24 units
    region = np.zeros((8, 8), bool)
    region[2:4, 2:4] = True
    assert ed.energy_inside(delta, region) == pytest.approx(0.5)
    assert np.isnan(ed.energy_inside(np.zeros((8, 8, 3)), region))
    cover = np.zeros((8, 8), bool)
    cover[2, 2:4] = True
    assert ed.occluded_fraction(region, cover) == pytest.approx(0.5)
    assert ed.occluded_fraction(np.zeros((8, 8), bool), cover) == 0.0


def test_touched_pools_fine_labels_with_any():
    fine = np.zeros((16, 16), np.uint8)
    fine[5, 9] = 3                                                      # one drawing pixel of label 3
    fine[12:16, 0:4] = 2
    t = ed.touched(fine, [3], factor=4)
    assert t.shape == (4, 4) and t.sum() == 1 and t[1, 2]
    assert ed.touched(fine, [2, 3], factor=4).sum() == 2


def test_summarise_takes_medians_per_group_and_ignores_nan():
    recs = [{"method": "W", "group": "small", "score": 0.1, "ecs_mse": float("nan")},
            {"method": "W", "group": "small", "score": 0.5, "ecs_mse": 2.0},
            {"method": "W", "group": "small", "score": 0.2, "ecs_mse": float("nan")},
            {"method": "PTI", "group": "large", "score": 0.9, "ecs_mse": 1.0}]
    rows = ed.summarise(recs, ("method", "group"), ("score", "ecs_mse"))
    assert rows == [{"method": "W", "group": "small", "n": 3, "score": 0.2, "ecs_mse": 2.0},
                    {"method": "PTI", "group": "large", "n": 1, "score": 0.9, "ecs_mse": 1.0}]
    assert ed.group_of("smile") == "small" and ed.group_of("hair_color") == "large"


def test_every_method_row_builds_valid_session_options_or_is_left_out():
    from core.session import METHODS as SESSION_METHODS

    for name, fields in ed.METHODS.items():
        opts = ed.session_options(fields, {"w": (3, 0)})
        if opts is None:
            assert name == "PTI+locality"                               # until SessionOptions has `locality`
            continue
        assert opts.align == "none" and opts.method in SESSION_METHODS
        assert all(getattr(opts, k) == v for k, v in fields.items())
    assert ed.session_options({"method": "w"}, {"w": (3, 0)}).project_steps == 3
