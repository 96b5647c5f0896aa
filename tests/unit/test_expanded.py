"""Yin et al. (core.expanded): generator feature hooks, L1-sparse direction fitting, content fusion at render."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_generator
from core.common import InvalidInput


@pytest.fixture(scope="module")
def G():
    return make_tiny_generator(resolution=32, w_dim=32, seed=3)


def _ws(G, n=2, seed=0):
    with torch.no_grad():
        return G.mapping(torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------------------------------------- feature hooks

@pytest.mark.parametrize("n", [1, 3])
def test_replacing_features_with_their_own_is_the_identity(G, n):
    ws = _ws(G, n)
    with torch.no_grad():
        plain = G.synthesis(ws)
        _, feats = G.block_features(ws)
        own = G.synthesis(ws, block_hook=lambda i, x, img: (feats[i][0].clone(), feats[i][1].clone()))
        kept = G.synthesis(ws, block_hook=lambda i, x, img: None)
    assert torch.equal(plain, own) and torch.equal(plain, kept)


def test_block_features_shapes_and_a_replacement_changes_the_image(G):
    ws = _ws(G, 2)
    with torch.no_grad():
        img, feats = G.block_features(ws)
        assert torch.equal(img, G.synthesis(ws))
        assert sorted(feats) == list(range(len(G.block_resolutions())))
        for i, res in enumerate(G.block_resolutions()):
            x, rgb = feats[i]
            assert x.shape == (2, G.config.channels[res], res, res) and rgb.shape == (2, 3, res, res)
        _, only = G.block_features(ws, blocks=[1])
        assert list(only) == [1]
        zeroed = G.synthesis(ws, block_hook=lambda i, x, img: (torch.zeros_like(x), img) if i == 2 else None)
    assert (zeroed - img).abs().max() > 1e-3
    with pytest.raises(InvalidInput):
        G.block_features(ws, blocks=[99])


# ---------------------------------------------------------------------------------------------- sparse directions

def _linear_classifier(G):
    """A fixed classifier of the image's mean colour, centred on G's samples: sigmoid(4·(mean red − its mean)),
    the same for blue."""
    with torch.no_grad():
        centre = G.synthesis(_ws(G, 64, seed=1)).clamp(-1, 1).mean(dim=(0, 2, 3))

    def clf(x):
        m = x.mean(dim=(2, 3)) - centre
        return torch.sigmoid(4 * m[:, [0, 2]] / m.new_tensor(0.1))
    return clf


def test_l1_fitting_moves_the_attribute_and_sparsity_shrinks_the_direction(G):
    from core.expanded import SparseOptions, fit_sparse_direction

    clf = _linear_classifier(G)
    gen = torch.Generator().manual_seed(1)
    init = 0.3 * torch.randn(G.w_dim, generator=gen)
    base = SparseOptions(steps=20, batch=2, lpips=0.0, lr=0.2, seed=5, calibrate_n=0)  # the L1 fit alone
    dense, rep_dense = fit_sparse_direction(G, clf, 0, init, dataclasses.replace(base, sparsity=0.0))
    sparse, rep_sparse = fit_sparse_direction(G, clf, 0, init, dataclasses.replace(base, sparsity=1e4))
    assert dense.shape == (G.num_ws, G.w_dim)
    assert sparse.abs().mean() < 0.7 * dense.abs().mean()          # L1 shrinks the direction
    assert rep_sparse["active"] <= rep_dense["active"]
    ws = _ws(G, 8, seed=9)
    with torch.no_grad():
        c0 = clf(G.synthesis(ws).clamp(-1, 1))[:, 0]
        c1 = clf(G.synthesis(ws + 2.0 * dense).clamp(-1, 1))[:, 0]
    assert float((c1 - c0).mean()) > 0.1                          # the classifier term moves the attribute up
    assert all(p.grad is None for p in G.parameters())            # G is never given gradients


def test_alignment_to_a_ground_truth_pulls_the_direction_toward_the_true_change(G):
    from core.expanded import SparseOptions, fit_sparse_direction

    clf = _linear_classifier(G)
    gen = torch.Generator().manual_seed(2)
    target = 0.3 * torch.randn(G.num_ws, G.w_dim, generator=gen)  # the "true" edit: this W+ offset per unit
    init = 0.3 * torch.randn(G.w_dim, generator=gen)

    def true_delta(z, k, strength):
        with torch.no_grad():
            ws = G.mapping(z)
            return (G.synthesis(ws + strength.view(-1, 1, 1) * target, noise_mode="const").clamp(-1, 1)
                    - G.synthesis(ws, noise_mode="const").clamp(-1, 1))

    base = SparseOptions(steps=60, batch=4, lpips=0.0, lr=0.2, seed=5, calibrate_n=0, sparsity=0.0, cls=0.0, l2=0.0)
    off, rep_off = fit_sparse_direction(G, clf, 0, init, dataclasses.replace(base, align=0.0), true_delta=true_delta)
    unused, _ = fit_sparse_direction(G, clf, 0, init, dataclasses.replace(base, align=10.0))
    on, rep_on = fit_sparse_direction(G, clf, 0, init, dataclasses.replace(base, align=10.0), true_delta=true_delta)
    assert torch.equal(off, unused)                                # no ground truth, or weight 0: Eq. 10 alone
    assert "align" in rep_on and "align" not in rep_off
    ws = _ws(G, 8, seed=9)
    with torch.no_grad():
        s = torch.full((8,), 2.0)
        want = true_delta(torch.randn(8, G.z_dim, generator=torch.Generator().manual_seed(9)), 0, s)
        err = {name: float((G.synthesis(ws + 2.0 * d, noise_mode="const").clamp(-1, 1)
                            - G.synthesis(ws, noise_mode="const").clamp(-1, 1) - want).square().mean())
               for name, d in (("off", off), ("on", on))}
    assert err["on"] < 0.4 * err["off"]                            # the aligned fit reproduces the true change


def test_fit_sparse_directions_names_shapes_and_refusals(G):
    from core.expanded import SparseOptions, fit_sparse_directions

    clf = _linear_classifier(G)
    o = SparseOptions(steps=3, batch=2, lpips=0.0)
    dirs, report = fit_sparse_directions(G, clf, ["red", "blue"], {"red": torch.ones(G.w_dim) * 0.1},
                                         attributes=["red"], options=o)
    assert list(dirs) == ["red_sparse"] and dirs["red_sparse"].vector.shape == (G.num_ws, G.w_dim)
    assert abs(float(dirs["red_sparse"].vector.norm()) - 1) < 1e-5 and "red" in report["attributes"]
    with pytest.raises(InvalidInput, match="no output"):
        fit_sparse_directions(G, clf, ["red", "blue"], {}, attributes=["green"], options=o)
    with pytest.raises(InvalidInput, match="starting direction"):
        fit_sparse_directions(G, clf, ["red", "blue"], {}, attributes=["blue"], options=o)


# ---------------------------------------------------------------------------------------------- content fusion

def test_fitted_content_reproduces_the_target_and_an_edit_changes_only_where_features_change(G):
    from core.expanded import FusionOptions, fit_content, fused_synthesis

    ws = _ws(G, 1, seed=4)
    with torch.no_grad():
        target = G.synthesis(_ws(G, 1, seed=5)).clamp(-1, 1)  # another face: far from ws's own render
        own = G.synthesis(ws)
    o = FusionOptions(fit_steps=12)
    content = fit_content(G, ws, target, None, o)
    assert content.report["mse_after"][0] < 0.5 * content.report["mse_before"][0]
    maps: dict = {}
    with torch.no_grad():
        rec = fused_synthesis(G, ws, content, o, maps=maps)
        assert all(torch.equal(m, torch.ones_like(m)) for m in maps.values())  # unedited: m = 1 everywhere
        assert float((rec - target).square().mean()) < float((own - target).square().mean())
        d = torch.zeros_like(ws)
        d[:, -2:] = 0.8 * torch.randn(G.w_dim, generator=torch.Generator().manual_seed(2))  # last rows only
        edited = fused_synthesis(G, ws + d, content, o, maps=maps)
    assert (edited - rec).abs().max() > 1e-3
    first = min(content.blocks)
    assert torch.equal(maps[first], torch.ones_like(maps[first]))  # rows feeding later blocks only: early m = 1


def _session(G, fusion_check=True):
    from core.session import SessionOptions, create_session

    with torch.no_grad():
        img = G.synthesis(_ws(G, 1, seed=7)).clamp(-1, 1)[0].permute(1, 2, 0).numpy()
    rgb = ((img + 1) / 2).astype(np.float32)
    rgb[8:14, 8:20] = [0.9, 0.1, 0.1]  # a detail the generator does not have (an "extra")
    layer = np.concatenate([rgb, np.ones(rgb.shape[:2] + (1,), np.float32)], 2)
    return create_session(G, layer, None, SessionOptions(method="wplus", align="none", project_steps=6)), layer


def test_session_render_fusion(G):
    from core.edits import Direction
    from core.expanded import FusedRender, FusionOptions

    session, layer = _session(G)
    d = Direction("tint", torch.randn(G.w_dim, generator=torch.Generator().manual_seed(3)), layers=(G.num_ws - 2,
                                                                                                    G.num_ws - 1))
    edits = [(d, 2.0)]
    plain = session.render(edits)
    assert np.array_equal(session.render(edits, fusion="none"), plain)  # "none" is today's output, bit for bit
    assert session._fused is None
    session._fused = FusedRender(session.inversion, FusionOptions(fit_steps=12))  # fewer steps than a user gets
    un = session.render([], fusion="relevance")
    fused = session.fused_inversion()
    assert isinstance(fused, FusedRender) and session.fused_inversion() is fused  # fitted once, cached
    err_none = np.square(session.render([])[..., :3] - layer[..., :3]).mean()
    err_fused = np.square(un[..., :3] - layer[..., :3]).mean()
    assert err_fused < 0.5 * err_none  # the photo's own content (the red patch) is kept
    out = session.render(edits, fusion="relevance")
    assert np.abs(out - un).max() > 1e-3 and session.fused_inversion() is fused
    with pytest.raises(InvalidInput, match="fusion"):
        session.render(edits, fusion="detail")


class _MeanColour(torch.nn.Module):
    """A TorchScript-able classifier: sigmoid of the mean red and blue (N,3,H,W) -> (N,2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return torch.sigmoid(4.0 * torch.stack([m[:, 0], m[:, 2]], 1))


def test_fit_sparse_command_for_a_checkpoint_with_an_attribute_classifier(tmp_path, G):
    import json

    from core.edits import Direction, load_directions, save_manifest
    from core.edits.sparse import fit_sparse_for_checkpoint, main
    from core.stylegan2.formats import save_generator

    ckpt = tmp_path / "tiny.pt"
    save_generator(G, ckpt)
    assert main([str(ckpt), "--steps", "1"]) == 1  # no classifier yet: a clear error naming the file, no traceback
    torch.jit.script(_MeanColour()).save(str(tmp_path / "tiny.attributes.pt"))
    (tmp_path / "tiny.attributes.json").write_text(json.dumps({"names": ["red", "blue"]}))
    save_manifest({"red": Direction("red", torch.ones(G.w_dim) * 0.1, scale=2.0)}, tmp_path / "tiny.directions.json")
    from core.expanded import SparseOptions

    path, report = fit_sparse_for_checkpoint(ckpt, options=SparseOptions(steps=2, batch=2, lpips=0.0))
    dirs = load_directions(ckpt, G=G)
    assert path == tmp_path / "tiny.directions.json"
    assert set(dirs) == {"red", "red_sparse", "blue_sparse"}            # the dense one is kept
    assert dirs["red"].scale == 2.0 and dirs["blue_sparse"].vector.shape == (G.num_ws, G.w_dim)
    assert report["regression_init"] == ["blue"]                        # no dense "blue": started from a fit
    kinds = {e["name"]: e["kind"] for e in json.loads(path.read_text())["directions"]}
    assert kinds == {"red": "w", "red_sparse": "wplus", "blue_sparse": "wplus"}
    assert report["aligned_to_ground_truth"] is False                  # no renderer behind this checkpoint


def test_only_the_embedded_model_is_fitted_against_its_ground_truth(tmp_path):
    from core.demo import default_model_path
    from core.demo.directions import SPARSE_OPTIONS, renderer_true_delta, true_edit_delta
    from core.demo.data import params_from_z
    from core.demo.renderer import render
    from core.edits.sparse import default_options
    from core.expanded import SparseOptions

    assert default_options(default_model_path()) == SPARSE_OPTIONS and SPARSE_OPTIONS.align > 0
    assert default_options(tmp_path / "other.pt") == SparseOptions() and SparseOptions().align == 0  # Eq. 10
    z = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    s = torch.tensor([2.0, -1.0, 0.0])
    got = renderer_true_delta()(z, 1, s)
    assert got.shape == (3, 3, 64, 64)
    assert torch.equal(got, true_edit_delta(render, params_from_z(z.numpy()), 1, s.numpy()))
    assert got[2].abs().max() == 0 and got[0].abs().max() > 0.1      # no move, no change; a move draws one
