"""core.chunks Eq. 2 pieces: the plain dispersion regulariser, S-space segment codes and masks produced by a
segment generator optimised jointly with the codes (S = G^S(X^S))."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import fast_chunks_options
from core.chunks import ChunksOptions, SegmentSession, dispersion, invert_segments
from core.common import InvalidInput
from core.losses import masked_mse

FAST = fast_chunks_options()  # L2 only: seconds on 2 cores


@pytest.fixture(scope="module")
def photo():
    import skimage.data
    import torch.nn.functional as F

    img = torch.from_numpy(skimage.data.astronaut()[:256, 96:352].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(img, size=(32, 32), mode="area")


def halves() -> torch.Tensor:
    m = torch.zeros(2, 32, 32)
    m[0, 4:28, 4:16] = 1
    m[1, 4:28, 16:28] = 1
    return m


def test_dispersion_is_the_plain_sum_of_squares():
    codes = torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]]])  # mean (2, 4): deviations ±(1, 2)
    assert float(dispersion(codes)) == pytest.approx(2 * (1 + 4))
    assert float(dispersion(codes, normalise=0.5)) == pytest.approx(2 * (1 + 4) / 2 / 0.5)
    assert float(dispersion(codes[:1])) == 0.0


def test_reg_is_paper_scale_in_w_and_wplus(G, photo):
    """λ_reg = 1 on the plain sum pulls the segment codes together much harder than the per-element form."""
    spread = {}
    for normalise in (False, True):
        opts = ChunksOptions(lpips_weight=0.0, l2_weight=1.0, w_avg_samples=200, reg_normalise=normalise)
        s = invert_segments(G, photo, halves(), steps=30, reg=1.0, options=opts)
        spread[normalise] = float(dispersion(s.ws))
    free = float(dispersion(invert_segments(G, photo, halves(), steps=30, reg=0.0, options=FAST).ws))
    assert spread[False] < spread[True] < free, (spread, free)


def test_s_space_codes(G, photo, tmp_path):
    masks = halves()
    sess = invert_segments(G, photo, masks, steps=30, space="s", options=FAST)
    inv = sess.inversion
    assert inv.styles is not None and len(inv.styles) == len(G.style_layers())
    assert all(v.shape[0] == 2 for v in inv.styles.values())
    assert torch.equal(inv.ws[0], inv.ws[1])  # the codes are the style offsets, around one starting W+ code
    sel = masks.sum(0)
    start = invert_segments(G, photo, masks, steps=0, space="s", options=FAST)
    assert float(masked_mse(sess.generated(), photo, sel)) < 0.9 * float(masked_mse(start.generated(), photo, sel))
    # the render uses each segment's own styles; outside the selection the input is kept bit for bit
    outside = (sel == 0).expand(1, 3, 32, 32)
    d = torch.randn(32, generator=torch.Generator().manual_seed(1))
    out = sess.render([(d, 2.0)], segments=[1])
    assert torch.equal(out[outside], photo[outside])
    assert torch.equal(out[:, :, :, :14], sess.render()[:, :, :, :14])  # segment 0 (and its feather) unchanged
    again = SegmentSession.from_state(G, {k: v.clone() for k, v in sess.state_dict().items()}, FAST)
    assert torch.equal(again.render([(d, 1.0)]), sess.render([(d, 1.0)]))
    with pytest.raises(InvalidInput, match="W / W\\+ codes"):
        invert_segments(G, photo, masks, steps=1, space="s", tune_steps=1, options=FAST)


def test_masks_from_a_segment_code_are_optimised_jointly(G, photo):
    """A toy segment generator: two parts whose boundary column follows the code's first entry."""
    cols = torch.arange(32).float()

    def mask_fn(xs):
        edge = 16 + 8 * torch.tanh(xs[0, 0, 0])
        left = torch.sigmoid((edge - cols) * 0.7).expand(32, 32)
        return torch.stack([left, 1 - left])[:, None]

    support = torch.zeros(1, 32, 32)
    support[0, 4:28, 4:28] = 1
    xs = torch.zeros(1, G.num_ws, G.w_dim)
    start = mask_fn(xs)
    sess = invert_segments(G, photo, support, steps=40, reg=0.0, options=FAST, mask_generator=(mask_fn, xs))
    m = sess.masks
    assert m.shape == (2, 1, 32, 32)
    assert torch.all(m[:, :, support[0] == 0] == 0)  # within the selection
    total = m.sum(0)[0]
    assert torch.allclose(total[support[0] > 0], torch.ones(int(support.sum())), atol=1e-5)
    code = sess.info["mask_code"]
    assert float(code[0, 0, 0]) != 0.0 and not torch.allclose(m, start * support[None])  # X^S moved
    # the joint fit is at least as good as the same codes on the starting masks
    fixed = invert_segments(G, photo, (start * support[None])[:, 0], steps=40, reg=0.0, options=FAST)
    assert float(masked_mse(sess.generated(), photo, support)) <= 1.05 * float(
        masked_mse(fixed.generated(), photo, support))


def test_a_global_edit_moves_masks_from_a_segment_code(G, photo):
    """ChunkyGAN §4.2: the same edit on X^S redraws the masks (the toy generator's boundary follows w[0]); an edit
    narrowed to one segment, or no edit, keeps the optimised masks; the selection's outside stays the input."""
    cols = torch.arange(32).float()

    def mask_fn(xs):
        left = torch.sigmoid((16 + 8 * torch.tanh(xs[0, 0, 0]) - cols) * 0.7).expand(32, 32)
        return torch.stack([left, 1 - left])[:, None]

    support = torch.zeros(1, 32, 32)
    support[0, 4:28, 4:28] = 1
    sess = invert_segments(G, photo, support, steps=4, reg=0.0, options=FAST,
                           mask_generator=(mask_fn, torch.zeros(1, G.num_ws, G.w_dim)))
    inv = sess.inversion
    d = torch.zeros(G.w_dim)
    d[0] = 1.0
    moved = inv.edited_masks([(d, 2.0)])
    assert not torch.allclose(moved, inv.masks, atol=1e-3)  # the boundary moved with the code
    assert torch.all(moved[:, :, support[0] == 0] == 0)
    assert torch.allclose(moved.sum(0)[0][support[0] > 0], torch.ones(int(support.sum())), atol=1e-5)
    assert torch.equal(inv.edited_masks([{"direction": d, "strength": 2.0, "segments": [0]}]), inv.masks)
    assert torch.equal(inv.edited_masks([]), inv.masks)
    out = inv.generated([(d, 2.0)])
    static = torch.where(inv.support, (inv.synthesize(inv.edited_codes([(d, 2.0)])) * inv.masks).sum(0, keepdim=True),
                         inv.image)
    assert not torch.allclose(out, static)  # the render composites with the moved masks
    outside = (support == 0).expand(1, 3, 32, 32)
    assert torch.equal(out[outside], photo[outside])
