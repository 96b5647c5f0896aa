"""core.session segment sources: label maps as ChunkyGAN segments, segment edits, segment masks and their
metadata, validation of SessionOptions.segments and the "segmenter" capability."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import layer
from core.common import InvalidInput
from core.session import (EditSession, MethodAssets, SessionOptions, create_session, method_catalog,
                          segment_layer_masks)

FAST = dict(method="chunks", align="none", project_steps=4)


def grow(region: np.ndarray, r: int) -> np.ndarray:
    """(H,W) bool dilated by a (2r+1)² square."""
    t = torch.from_numpy(region.astype(np.float32))[None]
    return torch.nn.functional.max_pool2d(t, 2 * r + 1, 1, r)[0].numpy() > 0 if r else region


def three_labels(size: int) -> np.ndarray:
    """Three vertical bands (values 2, 5, 9) and a negative (no segment) corner."""
    lab = np.full((size, size), 2, np.int32)
    lab[:, size // 3:] = 5
    lab[:, 2 * size // 3:] = 9
    lab[: size // 8, : size // 8] = -1
    return lab


def selection(size: int) -> np.ndarray:
    sel = np.zeros((size, size), np.float32)
    sel[size // 8: 7 * size // 8, size // 16: 15 * size // 16] = 1
    return sel


@pytest.fixture(scope="module")
def sessions(G):
    """{32: direct geometry, 64: 2× upsampled}: label-map sessions over three_labels inside selection."""
    return {size: create_session(G, layer(size, size), selection(size),
                                 SessionOptions(segments=three_labels(size), **FAST)) for size in (32, 64)}


@pytest.mark.parametrize("size", [32, 64])  # direct and 2× upsampled geometry
def test_label_map_segments_masks_and_outside_bit_identical(sessions, size):
    img, lab, sel = layer(size, size), three_labels(size), selection(size)
    sess = sessions[size]
    m = sess.segment_masks
    assert m.shape == (3, size, size) and m.dtype == np.float32
    assert m.min() >= 0 and m.max() <= 1 and m.sum(0).max() <= 1 + 1e-5
    assert np.all(m[:, sel == 0] == 0)  # the masks stay within the selection
    reach = 0 if size == 32 else 2  # upsampled: bilinear reach of one generator pixel
    for i, v in enumerate((2, 5, 9)):
        region = (lab == v) & (sel > 0)
        assert np.all(m[i][~grow(~region, reach)] > 0.99)  # the label region (its interior when resampled)
        assert np.all(m[i][~grow(region, reach)] == 0)  # nothing beyond it
    info = sess.segment_info()
    assert [e["index"] for e in info] == [0, 1, 2] and [e["label"] for e in info] == [2, 5, 9]
    if size == 32:  # direct geometry: areas are the label counts inside the selection
        assert [e["area"] for e in info] == [int(((lab == v) & (sel > 0)).sum()) for v in (2, 5, 9)]
    assert sess.inversion.segments == 3 and sess.info["segment_source"] == "labels"
    d = torch.randn(32, generator=torch.Generator().manual_seed(3))
    outside = sel == 0
    for blend in ("alpha", "poisson"):
        for edits in ([], [(d, 2.0)], [{"direction": d, "strength": 2.0, "segments": [1]}]):
            out = sess.render(edits, blend=blend)
            assert np.array_equal(out[outside], np.where(True, img, 0)[outside] * [1, 1, 1, 0])


@pytest.mark.parametrize("size", [32, 64])
def test_edit_on_one_segment_changes_nothing_outside_it(sessions, size):
    sess = sessions[size]
    d = torch.randn(32, generator=torch.Generator().manual_seed(4))
    base = sess.render([], feather=0.0)
    for seg in range(3):
        out = sess.render([{"direction": d, "strength": 3.0, "segments": [seg]}], feather=0.0)
        changed = np.abs(out - base).max(-1) > 0
        assert changed.any()
        # upsampled: the delta is bilinearly upsampled, one generator pixel (2 layer px) of reach
        own = grow(sess.segment_masks[seg] > 0, 0 if size == 32 else 2)
        assert not changed[~own].any(), seg
    # absent segments = every segment: the same as a plain edit; an empty list edits nothing
    assert np.array_equal(sess.render([{"direction": d, "strength": 3.0}]), sess.render([(d, 3.0)]))
    assert np.array_equal(sess.render([{"direction": d, "strength": 3.0, "segments": []}], feather=0.0), base)
    both = sess.render([{"direction": d, "strength": 3.0, "segments": [0, 2]}], feather=0.0)
    assert not np.array_equal(both, base)


def test_fused_render_keeps_a_segment_edit_in_its_segment(G):
    """Keep photo detail (fusion "relevance") honours an edit's own "segments" as the plain render does."""
    from core.expanded import FusedRender, FusionOptions

    sess = create_session(G, layer(32, 32), selection(32), SessionOptions(segments=three_labels(32), **FAST))
    sess._fused = FusedRender(sess.inversion, FusionOptions(fit_steps=4))  # fewer fitting steps than a user gets
    d = torch.randn(32, generator=torch.Generator().manual_seed(4))
    base = sess.render([], feather=0.0, fusion="relevance")
    out = sess.render([{"direction": d, "strength": 3.0, "segments": [1]}], feather=0.0, fusion="relevance")
    changed = np.abs(out - base).max(-1) > 0
    assert changed.any() and not changed[sess.segment_masks[1] == 0].any()


def test_segment_edits_with_feather_stay_in_segment_plus_feather(sessions):
    sess = sessions[32]
    d = torch.randn(32, generator=torch.Generator().manual_seed(5))
    out = sess.render([{"direction": d, "strength": 3.0, "segments": [0]}], feather=3.0)
    changed = np.abs(out - sess.render([], feather=3.0)).max(-1) > 0
    assert changed.any() and not changed[sess.segment_masks[0] == 0].any()


def test_bad_segment_edits(sessions):
    sess = sessions[32]
    d = torch.randn(32)
    for segs, msg in (([3], "out of range"), ([-1], "out of range"), ("0", "list of segment indices"),
                      ([0.5], "list of segment indices")):
        with pytest.raises(InvalidInput, match=msg):
            sess.render([{"direction": d, "strength": 1.0, "segments": segs}])


def test_selection_source_is_one_segment(G):
    sel = selection(32)
    sess = create_session(G, layer(32), sel, SessionOptions(**FAST))
    m = sess.segment_masks
    assert m.shape == (1, 32, 32) and np.array_equal(m[0] > 0, sel > 0)
    assert sess.segment_info() == [{"index": 0, "area": int(sel.sum())}]


def test_segments_option_validation(G):
    img, sel = layer(32), selection(32)
    bad = [(np.zeros((16, 16), np.int32), "label map is 16×16"),
           (np.zeros((32, 32, 3), np.int32), r"\(H,W\) integers"),
           (np.zeros((32, 32), np.float32), "integers"),
           (np.full((32, 32), -1, np.int32), "no segment"),
           (np.arange(32 * 32).reshape(32, 32), "at most 32"),
           ("everything", "'selection', 'auto'")]
    for segments, msg in bad:
        with pytest.raises(InvalidInput, match=msg):
            create_session(G, img, sel, SessionOptions(segments=segments, **FAST))
    with pytest.raises(InvalidInput, match="need method 'chunks'"):
        SessionOptions(method="pti", segments=three_labels(32)).validate()
    lab = np.zeros((32, 32), np.int32)
    lab[:2, :2] = 1  # value 1 lies outside the selection: dropped; value 0 is the only segment
    sess = create_session(G, img, sel, SessionOptions(segments=lab, **FAST))
    assert sess.inversion.segments == 1 and sess.segment_info()[0]["label"] == 0
    with pytest.raises(InvalidInput, match="overlaps the selection"):
        segment_layer_masks(np.where(sel > 0, -1, 3), sel)


def test_auto_segments_need_a_segmenter(G):
    opts = SessionOptions(segments="auto", **FAST)
    assert "segmenter" in opts.needs()
    with pytest.raises(InvalidInput, match="Automatic segments is not available"):
        create_session(G, layer(32), selection(32), opts)
    why = "add g.faceparsing.pth beside it"
    with pytest.raises(InvalidInput, match="g.faceparsing.pth"):
        create_session(G, layer(32), selection(32), opts, assets=MethodAssets(missing={"segmenter": why}))


def test_catalog_lists_segment_sources_by_capability():
    chunks = {m["name"]: m for m in method_catalog(())}["chunks"]
    assert chunks["segments"] == ["selection", "labels"] and "segments" in chunks["options"]
    chunks = {m["name"]: m for m in method_catalog(("segmenter",))}["chunks"]
    assert chunks["segments"] == ["selection", "auto", "labels"]


def test_label_map_session_round_trip(G, sessions, tmp_path):
    lab, sess = three_labels(32), sessions[32]
    sess.save(tmp_path / "s")
    back = EditSession.load(tmp_path / "s", G)
    assert np.array_equal(back.options.segments, lab)
    assert np.array_equal(back.segment_masks, sess.segment_masks)
    assert back.segment_info() == sess.segment_info()
    d = torch.randn(32, generator=torch.Generator().manual_seed(6))
    e = [{"direction": d, "strength": 2.0, "segments": [2]}]
    assert np.array_equal(back.render(e), sess.render(e))


def test_hole_filling_on_label_segments(sessions):
    size = 32
    sel, sess = selection(size), sessions[size]
    corr = np.zeros((size, size), np.float32)
    corr[0:4, 12:20] = 1  # continues segment 1 above the selection
    d = torch.randn(32, generator=torch.Generator().manual_seed(8))
    refined = sess.refine(corr, [(d, 2.0)], steps=3)
    assert refined.inversion.segments == 3
    assert refined.segment_masks[1][corr > 0].min() > 0.99
    assert np.all(refined.segment_masks[:, (sel == 0) & (corr == 0)] == 0)
