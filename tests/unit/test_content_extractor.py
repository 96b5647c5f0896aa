"""The learned content extractor (core.expanded, Yin et al. §3.2's learned form of "Keep photo detail")."""
import numpy as np
import pytest
import torch

from core.common import InvalidInput
from core.expanded import (FusedRender, FusionOptions, content_extractor_loss, extract_content, fused_synthesis,
                           load_content_extractor, new_content_extractor, save_content_extractor,
                           train_content_extractor)
from tests.conftest import make_tiny_generator


def _pairs(G, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = G.mapping(torch.randn(n, G.z_dim, generator=g)).detach()
    target = (G.synthesis(ws, noise_mode="const").clamp(-1, 1) + 0.3 * torch.randn(n, 3, 32, 32, generator=g)).clamp(-1, 1)
    return ws, target.detach()


def _layer_and_box(seed: int, lo: int, hi: int):
    """A random opaque 32 px RGBA layer and a square selection [lo, hi)²."""
    rng = np.random.default_rng(seed)
    img = np.concatenate([rng.random((32, 32, 3)), np.ones((32, 32, 1))], -1).astype(np.float32)
    sel = np.zeros((32, 32), np.float32)
    sel[lo:hi, lo:hi] = 1
    return img, sel


def test_untrained_extractor_keeps_the_generators_features(G):
    """Zero-initialised heads: the extracted content is the generator's own, the fused render the plain one."""
    net = new_content_extractor(G)
    assert sorted(net.blocks) == list(range(1, len(G.block_resolutions())))
    ws, target = _pairs(G)
    content = extract_content(G, ws, target, net)
    assert all(float(v.abs().max()) == 0.0 for v in content.content.values())
    with torch.no_grad():
        plain = G.synthesis(ws, noise_mode="const")
        assert torch.allclose(fused_synthesis(G, ws, content), plain, atol=1e-5)


def test_training_lowers_the_content_pipelines_error_and_beats_no_content(G):
    net = new_content_extractor(G, width=8)
    pairs = [_pairs(G, 4, seed=s) for s in range(3)]
    before = [float(content_extractor_loss(G, net, ws, t, 0.0)) for ws, t in pairs]
    history = train_content_extractor(G, net, lambda gen: pairs[int(torch.randint(0, 3, (1,), generator=gen))],
                                      steps=60, lr=3e-3)
    after = [float(content_extractor_loss(G, net, ws, t, 0.0)) for ws, t in pairs]
    assert len(history) == 60 and np.mean(after) < 0.7 * np.mean(before)
    assert all(not p.requires_grad for p in G.parameters())  # G is never trained
    ws, target = pairs[0]
    content = extract_content(G, ws, target, net)
    assert np.mean(content.report["mse_after"]) < np.mean(content.report["mse_before"])


def test_extractor_file_round_trip_and_refusals(G, tmp_path):
    from core.stylegan2.formats import fingerprint

    net = new_content_extractor(G, width=8)
    torch.nn.init.normal_(net.heads["1"].weight, std=0.01)
    path = tmp_path / "g.content.pt"
    save_content_extractor(path, net, {"generator_sha256": fingerprint(G)})
    back = load_content_extractor(path, G)
    ws, target = _pairs(G)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(target, target).values(), back(target, target).values()))
    with pytest.raises(InvalidInput, match="trained for another generator"):
        load_content_extractor(path, make_tiny_generator(seed=5))
    torch.save({"format": "other"}, path)
    with pytest.raises(InvalidInput, match="not a latent-edit-content-extractor"):
        load_content_extractor(path)
    path.write_bytes(b"junk")
    with pytest.raises(InvalidInput, match="cannot read the content extractor g.content.pt"):
        load_content_extractor(path)


def test_sessions_use_the_extractor_for_keep_photo_detail(G):
    """A session whose assets carry an extractor makes its fused render from it (no fit), and pixels outside
    the selection stay the layer's."""
    from core.session import MethodAssets, SessionOptions, create_session

    net = new_content_extractor(G, width=8)
    torch.nn.init.normal_(net.heads["2"].weight, std=0.01)
    img, sel = _layer_and_box(0, 4, 28)
    sess = create_session(G, img, sel, SessionOptions(method="w", align="none", project_steps=2),
                          assets=MethodAssets(content=net))
    assert sess.content_extractor is net
    out = sess.render([], fusion="relevance")
    assert sess.fused_inversion().content.report.get("extractor") is True
    assert np.array_equal(out[sel == 0][:, :3], img[sel == 0][:, :3]) and np.all(out[sel == 0][:, 3] == 0)
    plain = create_session(G, img, sel, SessionOptions(method="w", align="none", project_steps=2))
    plain.render([], fusion="relevance")
    assert "extractor" not in plain.fused_inversion().content.report  # no extractor: fitted


def test_fused_render_fits_without_an_extractor_and_extracts_with_one(G):
    from core.session import SessionOptions, create_session

    img, _ = _layer_and_box(1, 0, 0)
    sess = create_session(G, img, None, SessionOptions(method="w", align="none", project_steps=2))
    fitted = FusedRender(sess.inversion)
    net = new_content_extractor(G, width=4)
    started = FusedRender(sess.inversion, extractor=net)  # the fit starts from the extractor's content
    alone = FusedRender(sess.inversion, FusionOptions(fit_steps=0), extractor=net)  # one forward, no fit
    assert fitted.content.report["steps"] > 0 and "extractor" not in fitted.content.report
    assert started.content.report["extractor"] is True and started.content.report["steps"] > 0
    assert alone.content.report["extractor"] is True and "steps" not in alone.content.report


def test_a_hole_filled_session_keeps_the_extractor(G):
    from core.session import MethodAssets, SessionOptions, create_session

    net = new_content_extractor(G, width=4)
    img, sel = _layer_and_box(2, 4, 20)
    sess = create_session(G, img, sel, SessionOptions(method="chunks", align="none", project_steps=2),
                          assets=MethodAssets(content=net))
    corr = np.zeros((32, 32), np.float32)
    corr[8:24, 8:24] = 1
    refined = sess.refine(corr, [], steps=1)
    assert refined.content_extractor is net
