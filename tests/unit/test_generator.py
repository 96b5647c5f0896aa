"""core.stylegan2.network: parity with the reference fixtures and the Generator contract."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from core.common import InvalidInput
from core.stylegan2.formats import load_generator
from core.stylegan2.network import Generator, GeneratorConfig
from tests.conftest import FIXTURES, make_tiny_generator

FIXTURE_NAMES = ["ros64", "nv64"]


def max_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    """Max abs difference, relative to the reference's largest magnitude where that exceeds 1 (issue 2)."""
    diff = np.abs(ours.detach().numpy().astype(np.float64) - ref.astype(np.float64)).max()
    return float(diff / max(1.0, np.abs(ref).max()))


def _fixture(name):
    index = json.loads((FIXTURES / f"{name}.json").read_text())
    G = load_generator(FIXTURES / index["checkpoint"])
    z = torch.from_numpy(np.load(FIXTURES / index["z"]))
    cases = [(psi, np.load(FIXTURES / ws), np.load(FIXTURES / img)) for psi, ws, img in index["cases"]]
    return index, G, z, cases


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request):
    return _fixture(request.param)


def test_fixture_format_detected(fixture):
    index, G, _, _ = fixture
    assert G.checkpoint_info["format"] == index["format"]
    assert (G.num_ws, G.resolution, G.z_dim, G.w_dim) == (10, 64, 64, 64)


def test_parity_mapping_and_truncation(fixture):
    _, G, z, cases = fixture
    assert {psi for psi, _, _ in cases} == {1.0, 0.7}
    for psi, ref_ws, _ in cases:
        with torch.no_grad():
            ws = G.mapping(z, truncation_psi=psi)
        assert ws.shape == ref_ws.shape
        assert max_err(ws, ref_ws) <= 1e-4, (psi, max_err(ws, ref_ws))


def test_parity_synthesis_from_given_wplus(fixture):
    _, G, _, cases = fixture
    for psi, ref_ws, ref_img in cases:
        ws = torch.from_numpy(ref_ws)
        with torch.no_grad():
            batch = G.synthesis(ws, noise_mode="const")
            single = torch.cat([G.synthesis(ws[i : i + 1]) for i in range(ws.shape[0])])  # batch-1 (fused) path
        assert max_err(batch, ref_img) <= 1e-4, (psi, max_err(batch, ref_img))
        assert max_err(single, ref_img) <= 1e-4, (psi, max_err(single, ref_img))


def test_parity_full_image(fixture):
    _, G, z, cases = fixture
    for psi, _, ref_img in cases:
        with torch.no_grad():
            img = G(z, truncation_psi=psi, noise_mode="const")
        assert max_err(img, ref_img) <= 1e-4, (psi, max_err(img, ref_img))


def test_parity_with_grad_enabled_path(fixture):
    # With frozen weights and grad on ws the layers scale activations instead of weights (another code path).
    _, G, _, cases = fixture
    psi, ref_ws, ref_img = cases[0]
    ws = torch.from_numpy(ref_ws[:1]).requires_grad_(True)
    img = G.synthesis(ws)
    assert max_err(img, ref_img[:1]) <= 1e-4


def test_fused_and_unfused_gradients_agree():
    G = make_tiny_generator(32).double()
    ws = G.mapping(torch.randn(1, G.z_dim, dtype=torch.float64)).detach()
    target = torch.randn(1, 3, 32, 32, dtype=torch.float64)

    def grad_ws(weights_trainable: bool):
        G.requires_grad_(weights_trainable)
        w = ws.clone().requires_grad_(True)
        ((G.synthesis(w) - target) ** 2).mean().backward()
        return w.grad

    g_frozen, g_trainable = grad_ws(False), grad_ws(True)
    assert g_frozen.abs().sum() > 0
    torch.testing.assert_close(g_frozen, g_trainable, rtol=1e-9, atol=1e-12)
    assert G.convs[3].weight.grad is not None and G.convs[3].weight.grad.abs().sum() > 0


def _directional_check(G, ws, directions=3, eps=1e-6):
    """Autograd gradient · v against a central finite difference along random directions v (float64)."""
    f = lambda w: G.synthesis(w).sin().sum()  # noqa: E731
    w = ws.clone().requires_grad_(True)
    f(w).backward()
    gen = torch.Generator().manual_seed(0)
    for _ in range(directions):
        v = torch.randn(ws.shape, generator=gen, dtype=ws.dtype)
        with torch.no_grad():
            numeric = (f(ws + eps * v) - f(ws - eps * v)) / (2 * eps)
        analytic = (w.grad * v).sum()
        assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("trainable", [False, True])
def test_wplus_gradient_matches_finite_difference(batch, trainable):
    G = make_tiny_generator(16).double().requires_grad_(trainable)
    ws = G.mapping(torch.randn(batch, G.z_dim, dtype=torch.float64)).detach()
    ws = ws + 0.3 * torch.randn_like(ws)  # distinct rows: every layer's style matters
    _directional_check(G, ws)


def test_shapes_and_attributes(tiny_generator):
    G = tiny_generator
    assert G.num_ws == 2 * 5 - 2 and G.resolution == 32 and G.w_avg.shape == (G.w_dim,)
    ws = G.mapping(torch.randn(3, G.z_dim))
    assert ws.shape == (3, G.num_ws, G.w_dim)
    assert torch.equal(ws[:, 0], ws[:, -1])
    img = G.synthesis(ws)
    assert img.shape == (3, 3, 32, 32) and img.dtype == torch.float32 and torch.isfinite(img).all()


def test_random_init_is_sane_and_deterministic():
    a, b = make_tiny_generator(32, seed=3), make_tiny_generator(32, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.convs[0].affine.bias, torch.ones_like(a.convs[0].affine.bias))
    assert a.convs[0].bias.abs().sum() == 0
    # w_avg is the mean mapping output, so truncation pulls samples toward typical images
    w = a.mapping(torch.randn(2000, a.z_dim))[:, 0]
    assert (w.mean(0) - a.w_avg).abs().max() < 0.1 * w.std(0).mean()
    img = a(torch.randn(4, a.z_dim))
    assert 0.05 < img.std() < 20


def test_truncation(tiny_generator):
    G = tiny_generator
    z = torch.randn(2, G.z_dim)
    ws1 = G.mapping(z)
    ws0 = G.mapping(z, truncation_psi=0.0)
    assert torch.allclose(ws0, G.w_avg.expand_as(ws0))
    half = G.mapping(z, truncation_psi=0.5)
    torch.testing.assert_close(half, G.w_avg + 0.5 * (ws1 - G.w_avg))
    cut = G.mapping(z, truncation_psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(cut[:, :3], half[:, :3])
    torch.testing.assert_close(cut[:, 3:], ws1[:, 3:])


def test_noise_modes(tiny_generator):
    G = copy.deepcopy(tiny_generator)
    with torch.no_grad():
        for conv in G.convs:
            conv.noise_strength.fill_(0.5)
    ws = G.mapping(torch.randn(2, G.z_dim))
    with torch.no_grad():
        c1, c2 = G.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const")
        r1, r2 = G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random")
        none = G.synthesis(ws, noise_mode="none")
        zeros = G.synthesis(ws, noise=[torch.zeros(c.resolution, c.resolution) for c in G.convs])
        consts = G.synthesis(ws, noise=[c.noise_const for c in G.convs])
    assert torch.equal(c1, c2)
    assert not torch.allclose(r1, r2) and not torch.allclose(r1, c1)
    assert not torch.allclose(none, c1)
    torch.testing.assert_close(none, zeros)
    torch.testing.assert_close(consts, c1)
    with pytest.raises(InvalidInput):
        G.synthesis(ws, noise_mode="bogus")


def test_style_layers_describe_every_affine(tiny_generator):
    G = tiny_generator
    layers = G.style_layers()
    n_res = len(G.config.resolutions)
    assert len(layers) == 3 * n_res - 1
    assert [l.ws_index for l in layers] == [0, 1] + [i for k in range(3, 6) for i in (2 * k - 5, 2 * k - 4, 2 * k - 3)]
    assert [l.kind for l in layers[:5]] == ["conv", "torgb", "conv", "conv", "torgb"]
    for i, l in enumerate(layers):
        assert l.index == i
        assert l.affine_weight.shape == (l.channels, G.w_dim)
    assert max(l.ws_index for l in layers) == G.num_ws - 1
    assert layers[-1].channels == G.config.channels[32]


@pytest.mark.parametrize("index", [0, 1, 5, 10])
def test_style_deltas_equal_a_shifted_affine_bias(tiny_generator, index):
    G = tiny_generator
    ws = G.mapping(torch.randn(2, G.z_dim))
    layer = G.style_layers()[index]
    delta = torch.randn(layer.channels) * 0.5
    with torch.no_grad():
        base = G.synthesis(ws)
        same = G.synthesis(ws, style_deltas={index: torch.zeros(layer.channels)})
        edited = G.synthesis(ws, style_deltas={index: delta})
        G2 = copy.deepcopy(G)
        G2.style_layers()[index].affine_bias.add_(delta)  # affine output = W w / sqrt(w_dim) + b
        expected = G2.synthesis(ws)
    assert torch.equal(base, same)
    assert not torch.allclose(base, edited)
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInput):
        G.synthesis(ws, style_deltas={99: delta})


def test_bad_inputs_raise_invalid_input(tiny_generator):
    G = tiny_generator
    with pytest.raises(InvalidInput, match="ws must be"):
        G.synthesis(torch.zeros(1, G.num_ws + 1, G.w_dim))
    with pytest.raises(InvalidInput, match="z must be"):
        G.mapping(torch.zeros(1, G.z_dim + 1))
    with pytest.raises(InvalidInput, match="power of two"):
        GeneratorConfig(48, 8, 8, 1, {4: 8})
    with pytest.raises(InvalidInput, match="channels missing"):
        GeneratorConfig(16, 8, 8, 1, {4: 8, 8: 8})


def test_config_json_round_trip():
    cfg = GeneratorConfig(64, 32, 16, 3, {4: 8, 8: 8, 16: 4, 32: 4, 64: 2}, conv_clamp=256)
    back = GeneratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.channels[64] == 2 and back.num_ws == 10


def test_conv_clamp_bounds_layer_outputs():
    torch.manual_seed(0)
    G = Generator(GeneratorConfig(4, 8, 8, 1, {4: 16}, conv_clamp=0.05)).eval()
    img = G(torch.randn(3, 8))
    assert img.abs().max() <= 0.05 + 1e-7
    G.config.conv_clamp = None
    unclamped = Generator(G.config)
    unclamped.load_state_dict(G.state_dict())
    assert unclamped(torch.randn(3, 8)).abs().max() > 0.05


def test_float64_matches_float32(tiny_generator):
    G = tiny_generator
    ws = G.mapping(torch.randn(2, G.z_dim))
    with torch.no_grad():
        a = G.synthesis(ws)
        b = copy.deepcopy(G).double().synthesis(ws.double())
    assert b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generator_runs_forward_and_backward(tiny_generator, dtype):
    # dtype plumbing of a .half() / .bfloat16() generator (on CPU here; the GPU test below covers CUDA)
    G = tiny_generator
    ws = G.mapping(torch.randn(2, G.z_dim)).detach()
    with torch.no_grad():
        ref = G.synthesis(ws)
    H = copy.deepcopy(G).to(dtype).requires_grad_(False)
    tol = 0.02 if dtype == torch.float16 else 0.1
    for n in (1, 2):  # fused and unfused paths
        w = ws[:n].to(dtype).clone().requires_grad_(True)
        out = H.synthesis(w)
        assert out.dtype == dtype
        assert (out.float() - ref[:n]).abs().max() < tol * ref.abs().max()
        out.float().square().mean().backward()
        assert w.grad.dtype == dtype and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert H.mapping(torch.randn(2, G.z_dim, dtype=dtype), 0.7).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_matches_fp32(tiny_generator):
    G = tiny_generator.cuda()
    ws = G.mapping(torch.randn(2, G.z_dim, device="cuda"))
    with torch.no_grad():
        ref = G.synthesis(ws)
        with torch.autocast("cuda", dtype=torch.float16):
            auto = G.synthesis(ws)
        half = copy.deepcopy(G).half().synthesis(ws.half())
    assert auto.dtype == torch.float16 and half.dtype == torch.float16
    assert (auto.float() - ref).abs().max() < 2e-2 * ref.abs().max()
    assert (half.float() - ref).abs().max() < 2e-2 * ref.abs().max()
