"""core.magec (MAGEC inversion, LinkNet, descriptor loading) and core.metrics.ecs on tiny generators."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from core import magec as M
from core.common import Cancelled, InvalidInput
from core.metrics import ecs
from tests.conftest import make_tiny_generator


class ToyDescriptor(nn.Module):
    """(N,3,H,W) in [-1,1] -> (N,3) in [0,1]: a fixed random read of the 4×4 average-pooled image."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3, 3 * 16, generator=g) * 0.5, requires_grad=False)

    def forward(self, x):
        return torch.sigmoid(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.weight.T)


NAMES = ("a", "b", "c")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two intra-op threads on a shared 2-core machine run these small graphs ~40× slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_descriptor(seed: int = 0) -> M.Descriptor:
    return M.Descriptor(ToyDescriptor(seed).eval(), NAMES, "l1", (0.0, 1.0), "toy")


def toy_directions(G, seed: int = 3) -> dict:
    from core.edits import Direction

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in NAMES:
        v = torch.randn(G.w_dim, generator=g)
        out[name] = Direction(name, v / v.norm(), scale=1.0)
    return out


# --- LinkNet ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", ["flat", "mean"])
def test_linknet_fit_recovers_a_known_linear_map(rows):
    g = torch.Generator().manual_seed(0)
    n, L, D, K = 3000, 4, 8, 3
    ws = torch.randn(n, L, D, generator=g)
    feat_dim = L * D if rows == "flat" else D
    A = torch.randn(K, feat_dim, generator=g) * 0.4
    b = torch.tensor([0.3, -0.2, 0.1])

    def truth(w):
        x = (w - ws[:, 0].mean(0)).flatten(1) if rows == "flat" else (w - ws[:, 0].mean(0)).mean(1)
        return torch.sigmoid(x @ A.T + b)

    net = M.train_linknet(ws, truth(ws), "l1", rows=rows, output="sigmoid", steps=100)
    held = torch.randn(500, L, D, generator=g)
    err = (net(held) - truth(held)).abs().mean()
    assert err < 0.01
    cos = torch.nn.functional.cosine_similarity(net.linear.weight.flatten(), A.flatten(), dim=0)
    assert cos > 0.99


def test_flat_linknet_beats_mean_when_rows_matter():
    g = torch.Generator().manual_seed(1)
    n, L, D = 2000, 4, 6
    ws = torch.randn(n, L, D, generator=g)
    d = torch.sigmoid(ws[:, 0, :3] - ws[:, 3, 3:])  # attribute k reads row 0 and row 3 differently
    flat = M.train_linknet(ws, d, rows="flat", steps=50)
    mean = M.train_linknet(ws, d, rows="mean", steps=50)
    held = torch.randn(300, L, D, generator=g)
    dh = torch.sigmoid(held[:, 0, :3] - held[:, 3, 3:])
    assert (flat(held) - dh).abs().mean() < 0.5 * (mean(held) - dh).abs().mean()


def test_fit_linknet_is_cached_beside_the_checkpoint_and_keyed_by_the_generator(tmp_path, monkeypatch):
    G = make_tiny_generator()
    desc = toy_descriptor()
    path = M.linknet_path_for(tmp_path / "tiny.pt")
    assert path.name == "tiny.linknet.pt"
    opts = M.LinkNetOptions(steps=20)
    net = M.fit_linknet(G, desc, n=64, options=opts, cache_path=path)
    assert path.is_file()
    obj = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and data only
    assert obj["format"] == "latent-edit-linknet"

    def no_sampling(*a, **k):
        raise AssertionError("the cached LinkNet should have been used")

    monkeypatch.setattr(M, "linknet_samples", no_sampling)
    again = M.fit_linknet(G, desc, n=64, options=opts, cache_path=path)
    assert torch.equal(again.linear.weight, net.linear.weight)
    with pytest.raises(AssertionError, match="cached"):  # another generator: the cache does not apply
        M.fit_linknet(make_tiny_generator(seed=1), desc, n=64, options=opts, cache_path=path)
    with pytest.raises(AssertionError, match="cached"):  # another descriptor: neither
        M.fit_linknet(G, toy_descriptor(seed=5), n=64, options=opts, cache_path=path)


# --- the MAGEC loss ------------------------------------------------------------------------------------------

def test_edited_descriptors_move_one_output_and_clamp():
    edits = [M.MagecEdit("a", 0, 0.5, torch.zeros(2, 4)), M.MagecEdit("b", 1, -0.5, torch.zeros(2, 4))]
    d = torch.tensor([[0.2, 0.3, 0.9], [0.8, 0.7, 0.1]])
    out = M.edited_descriptors(d, edits)
    assert out.shape == (2, 2, 3)
    assert torch.allclose(out[0, 0], torch.tensor([0.7, 0.3, 0.9]))
    assert torch.allclose(out[1, 0], torch.tensor([1.0, 0.7, 0.1]))  # clamped at the top of [0,1]
    assert torch.allclose(out[0, 1], torch.tensor([0.2, 0.0, 0.9]))  # and at the bottom


def test_magec_loss_gradients_reach_the_latent():
    G = make_tiny_generator()
    desc = toy_descriptor()
    net = M.fit_linknet(G, desc, n=128, options=M.LinkNetOptions(steps=10))
    edits = M.magec_edits(toy_directions(G), NAMES, G.num_ws, G.w_dim, strength=2.0, unit=0.1)
    assert len(edits) == 2 * len(NAMES)
    ws = G.mapping(torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(4))).detach().requires_grad_(True)
    d = torch.tensor([[0.1, 0.5, 0.9], [0.6, 0.4, 0.2]])
    loss = M.magec_loss(net, ws, d, edits)
    assert loss.shape == (2,)
    loss.sum().backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all() and ws.grad.abs().sum() > 0
    # the loss is Eq. 2: the plain term plus the mean over the edits
    with torch.no_grad():
        plain = M.descriptor_loss(net(ws), d)
        per_edit = torch.stack([M.descriptor_loss(net(ws + e.offset), M.edited_descriptors(d, [e])[:, 0])
                                for e in edits], 1)
        assert torch.allclose(loss, plain + per_edit.mean(1), atol=1e-6)


def test_magec_edits_refuses_when_no_direction_matches_the_descriptor():
    G = make_tiny_generator()
    with pytest.raises(InvalidInput, match="named like the descriptor"):
        M.magec_edits({"other": toy_directions(G)["a"]}, NAMES, G.num_ws, G.w_dim)


# --- the inversion -------------------------------------------------------------------------------------------

def _target(G, seed=7):
    with torch.no_grad():
        return G.synthesis(G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed))),
                           noise_mode="const").clamp(-1, 1)


def test_invert_magec_reduces_reconstruction_loss_and_reports_progress():
    G = make_tiny_generator()
    desc = toy_descriptor()
    net = M.fit_linknet(G, desc, n=128, options=M.LinkNetOptions(steps=10))
    target = _target(G)
    opts = M.MagecOptions(w_avg_samples=500, preview_every=5)
    start = M.MagecOptions(w_avg_samples=500)
    events = []
    res = M.invert_magec_report(G, target, net, desc, toy_directions(G), steps=30, options=opts, progress=events.append)
    ws = res.ws
    assert ws.shape == (1, G.num_ws, G.w_dim)
    from core.projection import w_statistics

    w_avg, _ = w_statistics(G, start.w_avg_samples, start.seed)
    with torch.no_grad():
        before = (G.synthesis(w_avg.repeat(1, G.num_ws, 1), noise_mode="const") - target).square().mean()
        after = (G.synthesis(ws, noise_mode="const") - target).square().mean()
    assert after < 0.5 * before
    assert res.steps == 30 and res.meta["phase_steps"] == [15, 15]
    assert res.edits == 2 * len(NAMES) and res.final_magec is not None
    assert "off" in res.id_term
    assert [e.step for e in events] == list(range(1, 31))
    assert events[-1].fraction == 1.0 and events[-1].total == 30
    assert events[0].preview is not None and events[0].preview.shape == (G.resolution, G.resolution, 3)
    assert "30/30" in events[-1].message


def test_magec_in_w_optimises_one_code_shared_by_every_row():
    """MagecOptions(space="w"): PTI's pivot space — every W+ row is the same code, and it still reconstructs."""
    G = make_tiny_generator()
    desc = toy_descriptor()
    net = M.fit_linknet(G, desc, n=128, options=M.LinkNetOptions(steps=10))
    target = _target(G, seed=5)
    o = M.MagecOptions(w_avg_samples=300, space="w")
    res = M.invert_magec_report(G, target, net, desc, toy_directions(G), steps=20, options=o)
    assert res.ws.shape == (1, G.num_ws, G.w_dim) and res.meta["space"] == "w"
    assert torch.equal(res.ws, res.ws[:, :1].expand_as(res.ws))
    plus = M.invert_magec_report(G, target, net, desc, toy_directions(G), steps=20,
                                 options=M.MagecOptions(w_avg_samples=300))
    assert not torch.equal(plus.ws, plus.ws[:, :1].expand_as(plus.ws))
    from core.projection import w_statistics

    w_avg, _ = w_statistics(G, o.w_avg_samples, o.seed)
    with torch.no_grad():
        start = (G.synthesis(w_avg.repeat(1, G.num_ws, 1), noise_mode="const") - target).square().mean()
        after = (G.synthesis(res.ws, noise_mode="const") - target).square().mean()
    assert after < 0.7 * start
    with pytest.raises(InvalidInput, match="space must be 'w' or 'w\\+'"):
        M.invert_magec(G, target, net, desc, toy_directions(G), steps=4, options=M.MagecOptions(space="z"))


def test_without_magec_needs_no_linknet_and_differs_from_magec():
    G = make_tiny_generator()
    target = _target(G, seed=8)
    base = M.MagecOptions(w_avg_samples=300)
    plain = M.invert_magec_report(G, target, None, None, None, steps=10, options=base.without_magec())
    assert plain.final_magec is None and plain.edits == 0
    desc = toy_descriptor()
    net = M.fit_linknet(G, desc, n=128, options=M.LinkNetOptions(steps=10))
    strong = M.MagecOptions(w_avg_samples=300)
    strong.phase1.magec = strong.phase2.magec = 10.0
    with_magec = M.invert_magec(G, target, net, desc, toy_directions(G), steps=10, options=strong)
    assert not torch.allclose(with_magec, plain.ws)
    with pytest.raises(InvalidInput, match="LinkNet"):
        M.invert_magec(G, target, None, None, None, steps=4, options=base)


def test_magec_brings_the_codes_linknet_reading_to_the_targets_descriptor():
    """Eq. 2's first term acts at the paper's λ: the MAGEC code reads (through the LinkNet) closer to F(target)
    than the W+ ablation's code of the same schedule, at a similar reconstruction."""
    G = make_tiny_generator()
    desc = toy_descriptor()
    net = M.fit_linknet(G, desc, n=256, options=M.LinkNetOptions(steps=50))
    target = _target(G, seed=8)
    o = M.MagecOptions(w_avg_samples=300)
    with_magec = M.invert_magec_report(G, target, net, desc, toy_directions(G), steps=40, options=o)
    plain = M.invert_magec_report(G, target, None, None, None, steps=40, options=o.without_magec())
    with torch.no_grad():
        d = desc(target)
        ours, theirs = (float(M.descriptor_loss(net(r.ws), d)) for r in (with_magec, plain))
    assert ours < 0.5 * theirs
    assert with_magec.final_mse < 1.5 * plain.final_mse


def test_invert_magec_cancels_and_checks_its_input():
    G = make_tiny_generator()
    opts = M.MagecOptions(w_avg_samples=100).without_magec()
    with pytest.raises(Cancelled):
        M.invert_magec(G, _target(G), None, None, None, steps=4, options=opts, cancel=lambda: True)
    with pytest.raises(InvalidInput, match="generator makes"):
        M.invert_magec(G, torch.zeros(1, 3, 16, 16), None, None, None, steps=4, options=opts)
    with pytest.raises(InvalidInput, match="identity network"):
        M.invert_magec(G, _target(G), None, None, None, steps=4,
                       options=M.MagecOptions(id_weight=3e-4).without_magec())


def test_steps_split_over_the_two_phases_like_the_paper():
    o = M.MagecOptions()
    assert (o.phase1_steps, o.phase2_steps) == (100, 100)
    assert (o.with_steps(300).phase1_steps, o.with_steps(300).phase2_steps) == (150, 150)
    assert (o.with_steps(51).phase1_steps, o.with_steps(51).phase2_steps) == (26, 25)
    assert M.magec_learning_rate(0, o) == pytest.approx(0.07)
    assert M.magec_learning_rate(25, o) == pytest.approx(0.07 * 0.8)
    assert M.magec_learning_rate(199, o) == pytest.approx(0.07 * 0.8 ** 7)
    with pytest.raises(InvalidInput):
        o.with_steps(1)


# --- the descriptor ------------------------------------------------------------------------------------------

def test_refusal_without_a_descriptor_names_the_file_to_add(tmp_path):
    ckpt = tmp_path / "ffhq.pkl"
    ckpt.write_bytes(b"not used")
    with pytest.raises(InvalidInput, match=r"ffhq\.attributes\.pt") as info:
        M.load_descriptor(ckpt)
    assert "ffhq.attributes.json" in str(info.value)
    torch.jit.script(ToyDescriptor()).save(str(tmp_path / "ffhq.attributes.pt"))
    with pytest.raises(InvalidInput, match=r"ffhq\.attributes\.json"):
        M.load_descriptor(ckpt)
    (tmp_path / "ffhq.attributes.json").write_text(json.dumps({"names": list(NAMES)}))
    desc = M.load_descriptor(ckpt)
    assert desc.names == NAMES and desc.loss == "l1"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(desc(x), ToyDescriptor()(x), atol=1e-6)
    (tmp_path / "ffhq.attributes.json").write_text(json.dumps({"names": list(NAMES), "loss": "hinge"}))
    with pytest.raises(InvalidInput, match="loss"):
        M.load_descriptor(ckpt)
    (tmp_path / "ffhq.attributes.pt").write_bytes(b"garbage")
    (tmp_path / "ffhq.attributes.json").write_text(json.dumps(list(NAMES)))
    with pytest.raises(InvalidInput, match="TorchScript"):
        M.load_descriptor(ckpt)


def test_the_fit_command_refuses_without_a_descriptor_and_caches_the_linknet_with_one(tmp_path, capsys):
    from core.stylegan2.formats import save_generator

    G = make_tiny_generator()
    ckpt = tmp_path / "tiny.pt"
    save_generator(G, ckpt)
    assert M.main([str(ckpt), "--n", "64"]) == 1
    assert "tiny.attributes.pt" in capsys.readouterr().err
    torch.jit.script(ToyDescriptor()).save(str(tmp_path / "tiny.attributes.pt"))
    (tmp_path / "tiny.attributes.json").write_text(json.dumps({"names": list(NAMES)}))
    assert M.main([str(ckpt), "--n", "64"]) == 0
    assert "tiny.linknet.pt" in capsys.readouterr().out
    net = M.fit_linknet(G, M.load_descriptor(ckpt), n=64, cache_path=M.linknet_path_for(ckpt))
    cached = torch.load(M.linknet_path_for(ckpt), weights_only=True)
    assert torch.equal(net.linear.weight, cached["state_dict"]["linear.weight"])


def test_the_embedded_model_gets_the_shipped_scorer():
    from core.demo import default_model_path
    from core.demo.renderer import ATTRIBUTES

    desc = M.load_descriptor(default_model_path())
    assert desc.names == tuple(ATTRIBUTES) and desc.loss == "l1" and desc.output_range == (0.0, 1.0)
    out = desc(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, len(ATTRIBUTES)) and ((out >= 0) & (out <= 1)).all()


def test_a_descriptor_with_the_wrong_output_count_is_refused():
    G = make_tiny_generator()
    bad = M.Descriptor(ToyDescriptor(), ("a", "b"), "l1", (0.0, 1.0), "bad.attributes.pt")
    with pytest.raises(InvalidInput, match=r"expected \(N, 2\)"):
        M.linknet_samples(G, bad, 4)


# --- core.metrics.ecs (Eq. 4) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("distance", ["mse", "lpips"])
def test_ecs_is_zero_for_a_perfect_cycle_and_two_when_the_edit_is_not_undone(distance):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    x_edit = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ecs(x, x_edit, x.clone(), distance), torch.zeros(2), atol=1e-6)
    assert torch.allclose(ecs(x, x_edit, x_edit.clone(), distance), torch.full((2,), 2.0), atol=1e-5)


def test_ecs_formula_on_constructed_images():
    x = torch.zeros(1, 3, 4, 4)
    x_edit = torch.full((1, 3, 4, 4), 0.6)
    x_cyc = torch.full((1, 3, 4, 4), 0.2)
    # MSE distances: d(x, cyc) = 0.04, d(x, edit) = 0.36, d(edit, cyc) = 0.16
    expected = 2 * 0.04 / (0.36 + 0.16)
    assert float(ecs(x, x_edit, x_cyc, "mse")) == pytest.approx(expected, rel=1e-5)
    # halfway back: d(x, cyc) = d(edit, cyc) = 0.09
    assert float(ecs(x, x_edit, torch.full((1, 3, 4, 4), 0.3), "mse")) == pytest.approx(0.18 / 0.45, rel=1e-5)
    assert torch.isnan(ecs(x, x, x, "mse")).all()
    with pytest.raises(InvalidInput, match="distance"):
        ecs(x, x_edit, x_cyc, "l1")


def test_linknet_outputs_stay_in_the_descriptor_range():
    ws = torch.randn(50, 3, 4) * 10
    for output in ("sigmoid", "clamp"):
        net = M.LinkNet(3, 4, 2, output=output, output_range=(0.0, 1.0))
        torch.nn.init.normal_(net.linear.weight)
        y = net(ws)
        assert ((y >= 0) & (y <= 1)).all() and (y.max() - y.min()) > 0.5
    assert M.LinkNet(3, 4, 2, output="clamp", output_range=None).output == "linear"  # unbounded descriptor
    with pytest.raises(InvalidInput, match="output"):
        M.LinkNet(3, 4, 2, output="relu")
