"""core.projection (core.project): known-W inversion, W vs W+, masks, progress, cancellation, and the caller's G left untouched."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from core.common import Cancelled, InvalidInput
from core.losses import _cached_lpips
from core.lpips_nets import HUB_FILES, VGG16Features
from core.projection import (FALLBACK_L2_WEIGHT, ProjectOptions, effective_l2_weight, learning_rate, project, project_w,
                          project_wplus, w_statistics)

# the tiny random generator's W spread is ~5 (FFHQ's lr 0.01 is tuned for a trained 512-D W): a larger lr
FAST = ProjectOptions(lpips_net="alex", l2_weight=1.0, initial_learning_rate=0.1, w_avg_samples=200)



@pytest.fixture(scope="module")
def known(G):
    with torch.no_grad():
        ws_true = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(5)))
        target = G.synthesis(ws_true, noise_mode="const")
        start = G.synthesis(G.w_avg.view(1, 1, -1).expand(1, G.num_ws, -1), noise_mode="const")
    return ws_true, target, float((start - target).square().mean())


def _mse(G, ws, target):
    with torch.no_grad():
        return float((G.synthesis(ws, noise_mode="const") - target).square().mean())


def test_known_w_inversion_reaches_small_mse_and_leaves_G_alone(G, known):
    ws_true, target, start_mse = known
    before = {k: v.clone() for k, v in G.state_dict().items()}
    grads_before = [p.grad for p in G.parameters()]
    ws = project_w(G, target, steps=150, options=FAST)
    assert ws.shape == (1, G.num_ws, G.w_dim)
    assert torch.equal(ws, ws[:, :1].expand_as(ws)), "a W code repeats one row"
    err = _mse(G, ws, target)
    assert err < 0.15 and err < start_mse / 10, (err, start_mse)
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), f"projection modified G.{k}"
    assert all(g is None for g in grads_before) and all(p.grad is None for p in G.parameters())
    # W+ has more freedom: it reconstructs at least as well
    ws_plus = project_wplus(G, target, steps=150, options=FAST)
    assert not torch.equal(ws_plus, ws_plus[:, :1].expand_as(ws_plus))
    assert _mse(G, ws_plus, target) < err


@pytest.fixture
def one_thread():
    """Bit-exact comparisons on one CPU thread: with two, a loaded machine rounds some reductions differently
    from call to call (seen: 2.4e-7 apart on the shared 2 cores while a training job ran)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_projection_is_deterministic(G, known, one_thread):
    _, target, _ = known
    o = ProjectOptions(lpips_net="alex", w_avg_samples=50)
    assert torch.equal(project(G, target, steps=5, options=o), project(G, target, steps=5, options=o))


def test_masked_projection_ignores_pixels_outside_the_mask(G, known, one_thread):
    _, target, _ = known
    mask = torch.zeros(1, 1, G.resolution, G.resolution)
    mask[..., 4:20, 6:26] = 1.0
    garbage = target.clone()
    garbage[(mask == 0).expand_as(target)] = 0.7
    o = ProjectOptions(lpips_net="alex", l2_weight=1.0, initial_learning_rate=0.1, w_avg_samples=50)
    for crop in (True, False):
        o.crop_to_mask = crop
        a = project(G, target, steps=8, mask=mask, options=o)
        b = project(G, garbage, steps=8, mask=mask, options=o)
        assert torch.equal(a, b)
    assert not torch.equal(project(G, target, steps=8, options=o), project(G, garbage, steps=8, options=o))


def test_a_latent_loss_steers_the_code(G, known, one_thread):
    """``latent_loss(ws) -> (N,)`` joins every step's loss: a pull towards a far code moves the result there."""
    _, target, _ = known
    plain = project(G, target, "w", 30, options=FAST)
    goal = G.w_avg.view(1, 1, -1) + 3.0
    seen = []

    def pull(ws):
        seen.append(tuple(ws.shape))
        return 10.0 * (ws - goal).square().mean(dim=(1, 2))

    pulled = project(G, target, "w", 30, options=FAST, latent_loss=pull)
    assert seen and all(s == (1, G.num_ws, G.w_dim) for s in seen)
    dist = lambda ws: float((ws - goal).square().mean())
    assert dist(pulled) < 0.5 * dist(plain), (dist(pulled), dist(plain))
    zero = project(G, target, "w", 30, options=FAST, latent_loss=lambda ws: ws.sum(dim=(1, 2)) * 0.0)
    assert torch.equal(zero, plain)  # a zero term changes nothing


def test_progress_and_cancel_within_one_step(G, known):
    _, target, _ = known
    calls = []

    def progress(e):
        calls.append((e.step, e.total, e.loss, e.preview))

    project(G, target, steps=12, progress=progress, options=ProjectOptions(lpips_net="alex", preview_every=5,
                                                                          w_avg_samples=50))
    assert [c[0] for c in calls] == list(range(1, 13)) and all(c[1] == 12 for c in calls)
    assert all(math.isfinite(c[2]) for c in calls)
    with_preview = [c[0] for c in calls if c[3] is not None]
    assert with_preview == [1, 6, 11, 12]
    assert calls[-1][3].shape == (G.resolution, G.resolution, 3) and calls[-1][3].dtype == np.uint8

    event = threading.Event()
    seen = []

    def stop_after_three(e):
        seen.append(e.step)
        if e.step == 3:
            event.set()

    before = {k: v.clone() for k, v in G.state_dict().items()}
    with pytest.raises(Cancelled):
        project(G, target, steps=50, progress=stop_after_three, cancel=event,
                options=ProjectOptions(lpips_net="alex", w_avg_samples=50))
    assert seen == [1, 2, 3], "cancel is honoured before the next step starts"
    assert all(torch.equal(v, before[k]) for k, v in G.state_dict().items())
    with pytest.raises(Cancelled):
        project(G, target, steps=5, cancel=lambda: True)


def test_bad_inputs_are_rejected(G, known):
    _, target, _ = known
    with pytest.raises(InvalidInput, match="generator makes"):
        project(G, target[..., :16, :16])
    with pytest.raises(InvalidInput, match="space"):
        project(G, target, space="s")
    with pytest.raises(InvalidInput, match="NaN"):
        project(G, target * float("nan"))
    with pytest.raises(InvalidInput, match="empty"):
        project(G, target, mask=torch.zeros(G.resolution, G.resolution))


def test_schedule_and_statistics(G):
    o = ProjectOptions()
    total = 450
    lrs = [learning_rate(s, total, o) for s in range(total)]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(0.01)
    peak = [s for s, lr in enumerate(lrs) if lr == pytest.approx(0.01)]
    assert peak[0] == math.ceil(0.05 * total) and peak[-1] <= round(0.75 * total) + 1
    assert lrs[-1] < 0.001
    w_avg, w_std = w_statistics(G, 300)
    assert w_avg.shape == (1, 1, G.w_dim) and w_std > 0
    assert torch.allclose(w_avg.flatten(), G.w_avg, atol=0.3 * w_std)


def test_pixel_term_is_automatic_only_for_the_random_backbone_fallback(tmp_path, monkeypatch, request):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    _cached_lpips.cache_clear()  # modules cached before the environment changed may hold ImageNet weights
    request.addfinalizer(_cached_lpips.cache_clear)
    assert effective_l2_weight(ProjectOptions()) == FALLBACK_L2_WEIGHT > 0
    assert effective_l2_weight(ProjectOptions(l2_weight=0.25)) == 0.25
    assert effective_l2_weight(ProjectOptions(lpips_weight=0.0)) == 1.0
    torch.save(VGG16Features().state_dict(), tmp_path / HUB_FILES["vgg"])  # stands in for the ImageNet file
    assert effective_l2_weight(ProjectOptions(weights_dir=str(tmp_path))) == 0.0  # Karras et al.: LPIPS only


def test_public_project_stays_the_function_after_its_module_is_imported():
    """``core.project`` is the function even once every engine module has been imported."""
    import core
    import core.chunks  # noqa: F401
    import core.projection  # noqa: F401
    import core.session  # noqa: F401

    assert callable(core.project) and core.project.__module__ == "core.projection"
