"""core.segmenter: the part head / U-Net file format, finding a model's segmenter, automatic segments in a
session (masks S = G^S(X^S) optimised jointly, within the selection) and the shipped embedded segmenter's
accuracy on held-out renders (core.demo.segment)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import auto_segments_session, make_tiny_generator
from core.common import InvalidInput
from core.segmenter import (PartHead, PartUNet, Segmenter, default_segmenter_path, find_segmenter, head_logits,
                            load_segmenter, save_segmenter)
from core.session import MethodAssets, SessionOptions, create_session

PARTS = ("background", "left", "right")



def tiny_head(G, seed=0) -> PartHead:
    torch.manual_seed(seed)
    ch = {b: int(G.config.channels[r]) for b, r in enumerate(G.block_resolutions()) if b >= 1}
    head = PartHead(ch, PARTS, int(G.resolution), hidden=8).eval().requires_grad_(False)
    head.mlp[-1].weight.mul_(20)  # decisive logits: the tiny generator's mean face shows all three parts
    return head


def test_file_round_trip_and_errors(G, tmp_path):
    from core.stylegan2.formats import fingerprint

    head, unet = tiny_head(G), PartUNet(PARTS, width=4).eval()
    save_segmenter(tmp_path / "g.segmenter.pt", head=head, unet=unet, meta={"generator_sha256": fingerprint(G)})
    seg = load_segmenter(tmp_path / "g.segmenter.pt")
    ws = G.mapping(torch.randn(2, G.z_dim))
    assert torch.equal(head_logits(G, seg.head, ws)[1], head_logits(G, head, ws)[1])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(seg.segment(x), unet(x).argmax(1)) and seg.parts == PARTS
    seg.check_generator(G)
    with pytest.raises(InvalidInput, match="another generator"):
        seg.check_generator(make_tiny_generator(seed=1))
    torch.save({"format": "something else"}, tmp_path / "bad.segmenter.pt")
    with pytest.raises(InvalidInput, match="not a latent-edit-segmenter"):
        load_segmenter(tmp_path / "bad.segmenter.pt")
    (tmp_path / "junk.segmenter.pt").write_bytes(b"not a torch file")
    with pytest.raises(InvalidInput, match="cannot read the segmenter junk.segmenter.pt"):
        load_segmenter(tmp_path / "junk.segmenter.pt")


def test_find_segmenter_names_the_file_to_add(tmp_path):
    ckpt = tmp_path / "ffhq.pkl"
    path, why = find_segmenter(ckpt)
    assert path is None and "ffhq.segmenter.pt" in why and "label-map" in why
    assert "ffhq.faceparsing.pth" in why and "79999_iter.pth" in why
    (tmp_path / "ffhq.faceparsing.pth").write_bytes(b"x")
    assert find_segmenter(ckpt) == (tmp_path / "ffhq.faceparsing.pth", "")
    (tmp_path / "ffhq.segmenter.pt").write_bytes(b"x")  # this module's own format wins
    assert find_segmenter(ckpt) == (tmp_path / "ffhq.segmenter.pt", "")


def test_auto_segments_session(G):
    """A random head on the tiny generator: the session makes one segment per part it sees, optimises the
    masks through X^S, keeps them within the selection and the outside pixels bit-identical."""
    from core.stylegan2.formats import fingerprint

    seg = Segmenter(tiny_head(G), meta={"generator_sha256": fingerprint(G)})
    sess, img, sel = auto_segments_session(G, seg, steps=4)
    n = sess.inversion.segments
    labels = sess.inversion.info["segment_labels"]
    assert n >= 2 and len(labels) == n and sess.info["segment_source"] == "auto"
    code = sess.inversion.info["mask_code"]
    assert code.shape == (1, G.num_ws, G.w_dim) and not torch.equal(code, G.w_avg.expand_as(code))
    out = sess.render([(torch.randn(G.w_dim), 2.0)])
    assert np.array_equal(out[sel == 0][:, :3], img[sel == 0][:, :3])
    assert [e["label"] for e in sess.segment_info()] == labels
    with pytest.raises(InvalidInput, match="another generator"):
        create_session(make_tiny_generator(seed=2), img, sel, SessionOptions(
            method="chunks", align="none", project_steps=1, segments="auto"), assets=MethodAssets(segmenter=seg))


def test_image_network_segments_are_static(G):
    torch.manual_seed(3)
    seg = Segmenter(unet=PartUNet(PARTS, width=4).eval())
    img = np.random.default_rng(1).random((32, 32, 4)).astype(np.float32)
    img[..., 3] = 1
    sess = create_session(G, img, None, SessionOptions(method="chunks", align="none", project_steps=2,
                                                       segments="auto"), assets=MethodAssets(segmenter=seg))
    x = torch.from_numpy(img[..., :3]).permute(2, 0, 1)[None] * 2 - 1
    labels = seg.segment(x)[0].numpy()
    for i, k in enumerate(sess.inversion.info["segment_labels"]):
        assert np.array_equal(sess.segment_masks[i] > 0, labels == k)


@pytest.mark.skipif(not default_segmenter_path().is_file(), reason="embedded segmenter not installed")
def test_embedded_segmenter_iou_on_held_out_renders():
    """core.demo.segment on held-out renders (a seed range no trainer uses), with and without extras:
    mean IoU over the face parts >= 0.7 (issue 21)."""
    import core.demo as demo
    from core.demo import EXTRAS, render, render_parts, sample_params
    from core.demo.train_segmenter import mean_iou

    p = sample_params(12, seed=8_400_000)
    images, truth = render(p), render_parts(p)
    labels = demo.segment(images)
    assert labels.shape == truth.shape and labels.min() >= 0 and labels.max() < len(demo.PARTS)
    assert mean_iou(labels, truth)[0] >= 0.7
    ex = [(EXTRAS[i % len(EXTRAS)],) for i in range(len(p))]
    images_x = np.stack([render(q, extras=e) for q, e in zip(p, ex)])
    truth_x = np.stack([render_parts(q, extras=e) for q, e in zip(p, ex)])
    assert mean_iou(demo.segment(images_x), truth_x)[0] >= 0.7
    assert demo.segment(images[0]).shape == (64, 64)
    with pytest.raises(InvalidInput, match="uint8"):
        demo.segment(images.astype(np.float32))
