"""core.chunks on tiny generators: exactness outside the selection, segment vs global inversion,
the dispersion regulariser, one-forward re-edits, hole filling, mask refinement and bad input."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import fast_chunks_options
from core.chunks import (ChunksOptions, SegmentSession, code_spread, invert_segments, normalize_masks,
                         seam_contrast, seam_energy)
from core.common import Cancelled, InvalidInput
from core.edits import edit_inputs
from core.losses import masked_mse

FAST = fast_chunks_options()  # L2 only: seconds on 2 cores


@pytest.fixture(scope="module")
def photo():
    """skimage's astronaut at 32×32 in [-1,1]: a real photo the random generator cannot reproduce exactly."""
    import skimage.data

    a = torch.from_numpy(skimage.data.astronaut().copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(a, size=32, mode="area")


@pytest.fixture(scope="module")
def two_segments():
    m = torch.zeros(2, 32, 32)
    m[0, 4:18, 4:16] = 1
    m[1, 4:18, 16:28] = 1
    return m


def random_masks(seed: int, n: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size)
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(0, size - 10, (2,), generator=g))
        h, w = (int(v) for v in torch.randint(6, 12, (2,), generator=g))
        masks[i, y0:y0 + h, x0:x0 + w] = torch.rand(1, generator=g).clamp(min=0.3)  # soft selections
    return masks


class CountingSynthesis:
    def __init__(self, G):
        self.G, self.calls, self.images = G, 0, 0
        self._orig = G.synthesis

    def __enter__(self):
        def counted(ws, *a, **k):
            self.calls += 1
            self.images += ws.shape[0]
            return self._orig(ws, *a, **k)

        self.G.synthesis = counted
        return self

    def __exit__(self, *exc):
        del self.G.synthesis  # back to the class method


def test_masks_normalised_to_one_on_selection(two_segments):
    m = two_segments.clone()
    m[1, 10:14, 10:20] = 0.5  # overlap with segment 0
    S, cov = normalize_masks(m[:, None])
    total = S.sum(0)
    selected = m.sum(0) > 0
    assert torch.allclose(total[0][selected], torch.ones(int(selected.sum())))
    assert torch.all(total[0][~selected] == 0)
    assert cov.max() == 1 and cov.min() == 0


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 2), (2, 3)])
def test_pixels_outside_selection_bit_identical(G, photo, seed, n):
    masks = random_masks(seed, n)
    sess = invert_segments(G, photo, masks, steps=5, options=FAST)
    outside = (masks.sum(0) == 0).expand(1, 3, 32, 32)
    d = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    for blend in ("alpha", "poisson"):
        for edits in (None, [(d, 2.0)]):
            for feather in (0.0, 3.0):
                for cm in (False, True):
                    out = sess.render(edits, feather=feather, blend=blend, color_match=cm)
                    assert out.shape == photo.shape
                    assert torch.equal(out[outside], photo[outside]), (blend, edits is None, feather, cm)
                    if edits:
                        assert not torch.equal(out, photo)  # the edit did something inside


def test_segment_inversion_beats_global_wplus_in_region(G, photo):
    region = torch.zeros(1, 32, 32)
    region[0, 4:18, 8:24] = 1
    steps = 40
    local = invert_segments(G, photo, region, steps=steps, options=FAST)
    glob = invert_segments(G, photo, torch.ones(1, 32, 32), steps=steps, options=FAST)
    mse_local = float(masked_mse(local.generated(), photo, region))
    mse_global = float(masked_mse(glob.generated(), photo, region))
    assert mse_local < 0.85 * mse_global, (mse_local, mse_global)


def test_segment_inversion_beats_global_with_lpips_loss(G, photo):
    """The default loss (masked LPIPS + L2; AlexNet LPIPS here for speed) at equal steps."""
    from core.losses import perceptual_loss

    region = torch.zeros(1, 32, 32)
    region[0, 4:18, 8:24] = 1
    opts = ChunksOptions(w_avg_samples=200, net="alex")
    local = invert_segments(G, photo, region, steps=30, options=opts)
    glob = invert_segments(G, photo, torch.ones(1, 32, 32), steps=30, options=opts)
    lp = perceptual_loss("alex")
    with torch.no_grad():
        assert float(lp(local.generated(), photo, region[None])) < float(lp(glob.generated(), photo, region[None]))
    assert float(masked_mse(local.generated(), photo, region)) < float(masked_mse(glob.generated(), photo, region))


def test_reg_shrinks_code_spread_and_seam_energy(G, photo, two_segments):
    d = 2.0 * torch.randn(32, generator=torch.Generator().manual_seed(3))
    results = {}
    for reg in (0.0, 1.0):
        s = invert_segments(G, photo, two_segments, steps=40, reg=reg, options=FAST)
        delta = s.generated([(d, 1.0)]) - s.generated()
        results[reg] = (code_spread(s.ws), seam_energy(delta, s.masks), seam_contrast(delta, s.masks))
    assert results[1.0][0] < 0.5 * results[0.0][0], results
    assert results[1.0][1] < results[0.0][1], results
    assert results[1.0][2] < results[0.0][2], results


def test_seam_energy_measures_jumps_between_segments():
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, :, :4] = 1
    masks[1, :, :, 4:] = 1
    smooth = torch.zeros(1, 3, 8, 8)
    step = smooth.clone()
    step[..., 4:] = 1.0
    assert seam_energy(smooth, masks) == 0
    assert seam_energy(step, masks) == pytest.approx(3.0)  # a jump of 1 in each of 3 channels
    ramp = (torch.arange(8.0)[:, None] + torch.arange(8.0)[None]).expand(1, 3, 8, 8).clone()  # no seam
    assert seam_contrast(ramp, masks) == pytest.approx(1.0)
    assert seam_contrast(step + 0.01 * ramp, masks) > 100


def test_reedit_is_one_forward_and_plain_render_none(G, photo, two_segments):
    sess = invert_segments(G, photo, two_segments, steps=3, options=FAST)
    sess.render()  # fills the cache
    d = torch.randn(32)
    with CountingSynthesis(G) as c:
        sess.render()
        assert c.calls == 0
        sess.render([(d, 1.0)], blend="poisson")
        assert c.calls == 1 and c.images == 2
        sess.render([(d, 1.0)], segments=[1])
        assert c.calls == 2 and c.images == 3  # only the edited segment is synthesised


def test_edit_restricted_to_one_segment(G, photo, two_segments):
    sess = invert_segments(G, photo, two_segments, steps=3, options=FAST)
    base = sess.render(feather=0)
    out = sess.render([(torch.randn(32), 3.0)], feather=0, segments=[0])
    only1 = (two_segments[1] > 0) & (two_segments[0] == 0)
    only0 = (two_segments[0] > 0) & (two_segments[1] == 0)
    assert torch.equal(out[..., only1], base[..., only1])
    assert not torch.equal(out[..., only0], base[..., only0])
    with pytest.raises(InvalidInput):
        sess.render([(torch.randn(32), 1.0)], segments=[5])


def test_named_and_direction_edits(G, photo):
    from core.edits import Direction

    region = torch.zeros(32, 32)
    region[8:24, 8:24] = 1
    v = torch.randn(32)
    sess = invert_segments(G, photo, region, steps=3, options=FAST,
                           directions={"smile": Direction(name="smile", vector=v)})
    a = sess.render([("smile", 1.5)])
    b = sess.render([(Direction(name="x", vector=v), 1.5)])
    c = sess.render([(v, 1.5)])
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(InvalidInput):
        sess.render([("frown", 1.0)])
    ws, deltas = edit_inputs(sess.ws, [(v, 1.0)], G)
    assert deltas is None and torch.allclose(ws - sess.ws, v.expand_as(ws))
    # StyleSpace edits become synthesis inputs (by name or object), not code changes
    s_dir = Direction(name="chan", space="s", s_edits=[(2, 3, 4.0)])
    sess.directions["chan"] = s_dir
    ws, deltas = edit_inputs(sess.ws, [("chan", 1.0)], G, sess.directions)
    assert torch.equal(ws, sess.ws) and set(deltas) == {2} and deltas[2][3] == 4.0
    out = sess.render([("chan", 1.0)])
    outside = (region == 0).expand(1, 3, 32, 32)
    assert torch.equal(out[outside], photo[outside]) and not torch.equal(out, sess.render())
    with pytest.raises(InvalidInput, match="StyleSpace"):
        sess.refine(region, edits=[(s_dir, 1.0)], steps=1)


def test_all_selected_is_global_inversion(G, photo):
    sess = invert_segments(G, photo, torch.ones(32, 32), steps=3, options=FAST)
    out, alpha = sess.layers(feather=4.0)
    assert torch.all(alpha == 1)  # the image border is not a selection edge
    assert torch.equal(sess.render(feather=4.0), sess.generated())


def test_generator_untouched_and_progress_cancel(G, photo, two_segments):
    before = {k: v.clone() for k, v in G.state_dict().items()}
    calls = []
    invert_segments(G, photo, two_segments, steps=4, options=FAST, progress=lambda e: calls.append((e.step, e.total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    assert all(p.grad is None for p in G.parameters())
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        invert_segments(G, photo, two_segments, steps=4, options=FAST, cancel=ev)
    n = []
    with pytest.raises(Cancelled):
        invert_segments(G, photo, two_segments, steps=10, options=FAST,
                        progress=lambda e: n.append(e.step), cancel=lambda: len(n) >= 2)
    assert n == [1, 2]


def test_w_space_codes_identical_rows(G, photo, two_segments):
    sess = invert_segments(G, photo, two_segments, steps=4, space="w", options=FAST)
    assert sess.ws.shape == (2, G.num_ws, G.w_dim)
    assert torch.equal(sess.ws, sess.ws[:, :1].expand_as(sess.ws))


def test_mask_refinement_keeps_partition(G, photo, two_segments):
    opts = ChunksOptions(lpips_weight=0.0, w_avg_samples=200, refine_masks=True, mask_resolution=8)
    sess = invert_segments(G, photo, two_segments, steps=6, options=opts)
    total = sess.masks.sum(0)[0]
    selected = two_segments.sum(0) > 0
    assert torch.allclose(total[selected], torch.ones(int(selected.sum())), atol=1e-5)
    assert torch.all(total[~selected] == 0)
    assert not torch.equal(sess.masks, normalize_masks(two_segments[:, None])[0])  # the masks moved
    outside = (~selected).expand(1, 3, 32, 32)
    assert torch.equal(sess.render([(torch.randn(32), 2.0)])[outside], photo[outside])


def test_hole_filling_refine(G, photo, two_segments):
    sess = invert_segments(G, photo, two_segments, steps=10, options=FAST)
    d = torch.randn(32, generator=torch.Generator().manual_seed(5))
    C = torch.zeros(32, 32)
    C[16:24, 6:14] = 1  # straddles segment 0's lower edge
    C[24, 6:14] = 0.5  # a soft lower edge
    refined = sess.refine(C, edits=[(d, 2.0)], steps=12)
    union_sel = (two_segments.sum(0) > 0) | (C > 0)
    total = refined.masks.sum(0)[0]
    assert torch.allclose(total[union_sel], torch.ones(int(union_sel.sum())), atol=1e-6)
    assert torch.all(total[~union_sel] == 0)
    assert refined is not sess and sess.masks.sum(0)[0][20, 10] == 0  # original untouched
    assert refined.masks[0, 0][C > 0].min() == 1  # the correction joined segment 0
    assert refined.coverage[0, 0, 24, 8] == 0.5
    losses = refined.info["refine_losses"]
    assert losses[-1] < losses[0]
    union = (two_segments.sum(0) > 0) | (C > 0)
    out = refined.render()
    assert torch.equal(out[(~union).expand(1, 3, 32, 32)], photo[(~union).expand(1, 3, 32, 32)])
    # the edit is baked in: the unedited render of the refined session shows it in segment 1
    seg1 = (two_segments[1] > 0).expand(1, 3, 32, 32)
    assert torch.allclose(refined.generated()[seg1], sess.generated([(d, 2.0)])[seg1], atol=1e-5)


@pytest.mark.parametrize("bad,msg", [
    (torch.zeros(1, 32, 32), "empty"),
    (torch.full((1, 32, 32), float("nan")), "NaN"),
    (torch.ones(1, 16, 16), "image"),
    (torch.full((1, 32, 32), 2.0), "[0,1]"),
    (torch.ones(1, 32, 32, dtype=torch.int64), "dtype"),
    (torch.ones(2, 2, 32, 32), "(n,H,W)"),
])
def test_bad_masks(G, photo, bad, msg):
    with pytest.raises(InvalidInput, match=None) as err:
        invert_segments(G, photo, bad, steps=1, options=FAST)
    assert msg in str(err.value)


def test_bad_image_and_options(G, photo):
    m = torch.ones(32, 32)
    with pytest.raises(InvalidInput, match="resolution"):
        invert_segments(G, photo[..., :16, :16], m[:16, :16], steps=1, options=FAST)
    nan = photo.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        invert_segments(G, nan, m, steps=1, options=FAST)
    with pytest.raises(InvalidInput, match="space"):
        invert_segments(G, photo, m, steps=1, space="z", options=FAST)
    sess = invert_segments(G, photo, m, steps=1, options=FAST)
    with pytest.raises(InvalidInput, match="blend"):
        sess.render(blend="multiply")
    with pytest.raises(InvalidInput, match="feather"):
        sess.render(feather=float("nan"))


def test_state_round_trip(G, photo, two_segments):
    sess = invert_segments(G, photo, two_segments, steps=3, options=FAST)
    again = SegmentSession.from_state(G, {k: v.clone() for k, v in sess.state_dict().items()}, FAST)
    d = torch.randn(32)
    assert torch.equal(again.render([(d, 1.0)], blend="poisson"), sess.render([(d, 1.0)], blend="poisson"))


def test_segment_restricted_pti(G, photo, two_segments):
    before = {k: v.clone() for k, v in G.state_dict().items()}
    plain = invert_segments(G, photo, two_segments, steps=10, options=FAST)
    calls = []
    tuned = invert_segments(G, photo, two_segments, steps=10, tune_steps=15, options=FAST,
                            progress=calls.append)
    assert tuned.tuned and tuned.G is not G and tuned.base_G is G
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())  # G untouched
    # 10 projection steps, then 15 tuning iterations of one update per segment: the fraction spans both
    assert [(c.stage, c.step, c.total) for c in (calls[9], calls[-1])] == [("project", 10, 10), ("tune", 15, 15)]
    assert calls[9].fraction == pytest.approx(10 / (10 + 2 * 15)) and calls[-1].fraction == 1.0 and len(calls) == 25
    assert torch.equal(tuned.ws, plain.ws)  # same pivots (deterministic), only the weights moved
    sel = two_segments.sum(0)
    assert float(masked_mse(tuned.generated(), photo, sel)) < 0.9 * float(masked_mse(plain.generated(), photo, sel))
    outside = (sel == 0).expand(1, 3, 32, 32)
    out = tuned.render([(torch.randn(32), 1.0)], blend="poisson")
    assert torch.equal(out[outside], photo[outside])
