"""core.metrics: MSE / PSNR values, MS-SSIM behaviour (small images too), LPIPS naming, optional identity."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from core import metrics
from core.common import InvalidInput


def _img(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: blurred noise, so SSIM has structure to compare
    x = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_mse_and_psnr_values():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full((2, 3, 8, 8), 0.2)
    assert torch.allclose(metrics.mse(x, y), torch.full((2,), 0.04))
    # [-1,1] range: peak-to-peak 2, so PSNR = 10 log10(4 / 0.04) = 20 dB (same as 0.1 error on [0,1])
    assert torch.allclose(metrics.psnr(x, y), torch.full((2,), 20.0), atol=1e-4)
    with pytest.raises(InvalidInput):
        metrics.mse(x, y[:, :, :4])


@pytest.mark.parametrize("size", [16, 32, 64, 200])
def test_ms_ssim_orders_distortions_and_handles_small_images(size):
    x = _img(2, size)
    g = torch.Generator().manual_seed(1)
    mild = x + 0.05 * torch.randn(x.shape, generator=g)
    strong = x + 0.5 * torch.randn(x.shape, generator=g)
    one = metrics.ms_ssim(x, x)
    assert torch.allclose(one, torch.ones(2), atol=1e-5)
    a, b = metrics.ms_ssim(x, mild), metrics.ms_ssim(x, strong)
    assert ((a < 1) & (b < a) & (b >= 0)).all()
    assert torch.isfinite(metrics.ms_ssim(x, -x)).all()


def test_ms_ssim_levels_standard_for_large_images():
    assert metrics.ms_ssim_levels(256) == (5, 11)
    assert metrics.ms_ssim_levels(176) == (5, 11)
    scales, window = metrics.ms_ssim_levels(32)
    assert scales < 5 and window % 2 == 1 and (32 >> (scales - 1)) >= window


def test_lpips_metric_names_its_backbone():
    x = _img(2, 32)
    d = metrics.lpips(x, x.flip(-1))
    assert d.shape == (2,) and (d > 0).all()
    name = metrics.lpips_backbone("alex")
    assert "alexnet" in name
    assert ("imagenet" in name) != ("random-backbone" in name)
    ev = metrics.evaluate(x, x * 0.9)
    assert ev["lpips_backbone"] == name and ev["ms_ssim"] > 0.9 and ev["mse"] > 0


def test_identity_is_optional_and_says_why():
    x = _img(1, 64)
    ok, note = metrics.identity_available()
    have = importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
    assert ok == have
    scores, note2 = metrics.identity(x, x)
    if have:
        assert scores is not None and scores.shape == (1,) and abs(float(scores[0]) - 1) < 1e-4
    else:
        assert scores is None and "unavailable" in note2 and "dlib" in note2
        assert metrics.evaluate(x, x)["id"] is None
