"""core.lpips_nets + core.losses: torchvision-compatible backbones, honest fallback, masks, noise and locality terms."""
from __future__ import annotations

import pytest
import torch

from core.common import InvalidInput
from core.lpips_nets import HUB_FILES, LPIPS, AlexNetFeatures, VGG16Features, find_backbone_file, lpips_heads_file
from core.losses import (ImageLoss, locality_codes, mask_bbox, masked_mse,
                         noise_regularization, normalize_noise_, perceptual_loss)

# torchvision.models.vgg16 / alexnet conv positions inside ``features`` (what the hub files contain)
VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
ALEX_CONVS = [0, 3, 6, 8, 10]


def _imgs(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("arch,convs", [(VGG16Features, VGG_CONVS), (AlexNetFeatures, ALEX_CONVS)])
def test_backbone_keys_match_torchvision_layout(arch, convs):
    keys = set(arch().state_dict())
    assert keys == {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")}


def _fake_hub_file(net, folder):
    """A file shaped like torchvision's (features + classifier keys) with recognisable values."""
    feats = (VGG16Features if net == "vgg" else AlexNetFeatures)().state_dict()
    state = {k: torch.full_like(v, 0.01 * (i + 1)) for i, (k, v) in enumerate(feats.items())}
    state["classifier.1.weight"] = torch.zeros(4, 4)
    path = folder / HUB_FILES[net]
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_imagenet_file_loads_from_explicit_dir_and_torch_home(net, tmp_path, monkeypatch):
    path, state = _fake_hub_file(net, tmp_path)
    m = LPIPS(net, weights_dir=tmp_path)
    assert m.pretrained and "imagenet" in m.backbone_name and "random" not in m.backbone_name
    for k, v in m.features.state_dict().items():
        assert torch.equal(v, state[k])
    # calibrated heads come from the lpips package's files when present
    heads_file = lpips_heads_file(net)
    assert heads_file is not None
    lin = torch.load(heads_file, map_location="cpu", weights_only=True)
    assert torch.equal(m.heads[0].data, lin["lin0.model.1.weight"])
    hub = tmp_path / "home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    path.rename(hub / path.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    assert find_backbone_file(net) == hub / path.name


def test_a_broken_backbone_file_is_an_error_not_a_silent_fallback(tmp_path):
    from core.common import LatentEditError

    (tmp_path / HUB_FILES["alex"]).write_bytes(b"not a checkpoint")
    with pytest.raises(LatentEditError, match="alexnet-owt"):
        LPIPS("alex", weights_dir=tmp_path)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / HUB_FILES["alex"])
    with pytest.raises(LatentEditError):
        LPIPS("alex", weights_dir=tmp_path)


def test_fallback_is_named_deterministic_and_metric_like(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty: no ImageNet weights anywhere we look
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    a, b = LPIPS("vgg"), LPIPS("vgg")
    assert not a.pretrained
    assert "random-backbone" in a.backbone_name and "fallback" in a.backbone_name
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    x, y = _imgs()
    d = a(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(a(x, x), torch.zeros(2))
    near = a(x, x + 0.05 * torch.randn_like(x))
    assert (near < d).all()
    torch.manual_seed(123)
    r1 = torch.rand(1)
    torch.manual_seed(123)
    LPIPS("alex")
    assert torch.equal(torch.rand(1), r1), "the fallback init must not consume the global RNG"


def test_perceptual_loss_is_cached_and_frozen():
    a = perceptual_loss("alex")
    assert a is perceptual_loss("alex", device="cpu")
    assert a.backbone == a.backbone_name
    assert not any(p.requires_grad for p in a.parameters())
    with pytest.raises(InvalidInput):
        perceptual_loss("squeeze")


def test_small_inputs_are_upsampled_not_rejected():
    x, y = _imgs(size=12)
    assert perceptual_loss("alex")(x, y).shape == (2,)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_pixels_outside_the_mask_do_not_influence_the_losses(net):
    loss = perceptual_loss(net)
    x, y = _imgs(1, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 10:24] = 1.0
    mask[..., 20:22, 10:24] = 0.5  # soft edge
    x2, y2 = x.clone(), y.clone()
    outside = (mask == 0).expand_as(x)
    x2[outside] = torch.rand(int(outside.sum())) * 2 - 1
    y2[outside] = -1.0
    assert torch.allclose(loss(x, y, mask), loss(x2, y2, mask), atol=1e-6)
    assert torch.allclose(masked_mse(x, y, mask), masked_mse(x2, y2, mask), atol=1e-7)
    full_a, _, _ = ImageLoss(y, mask, loss, 1.0, 1.0, crop=True)(x)
    full_b, _, _ = ImageLoss(y2, mask, loss, 1.0, 1.0, crop=True)(x2)
    assert torch.allclose(full_a, full_b, atol=1e-6)
    # ... while pixels inside do: matching the target inside the mask (only) gives a zero distance
    x3 = torch.where(mask > 0, y, x)
    assert loss(x, y, mask) > 0.01 and float(loss(x3, y, mask)) < 1e-6
    assert float(masked_mse(x3, y, mask)) == 0.0
    x3[..., 12, 12] += 1.0
    assert loss(x3, y, mask) > 1e-4 and masked_mse(x3, y, mask) > 0


def test_gradient_vanishes_outside_the_mask():
    x, y = _imgs(1, 32)
    x.requires_grad_(True)
    mask = torch.zeros(32, 32)
    mask[4:16, 4:16] = 1
    total, _, _ = ImageLoss(y, mask, perceptual_loss("alex"), 1.0, 1.0, crop=True)(x)
    total.sum().backward()
    assert x.grad[..., 20:, :].abs().max() == 0 and x.grad[..., 4:16, 4:16].abs().max() > 0


def test_masked_mse_values():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.ones(2, 3, 4, 4)
    y[:, :, :2] = 3.0
    assert torch.allclose(masked_mse(x, y), torch.full((2,), 5.0))
    m = torch.zeros(4, 4)
    m[2:] = 1
    assert torch.allclose(masked_mse(x, y, m), torch.ones(2))
    m_soft = torch.zeros(4, 4)
    m_soft[:2] = 0.5
    assert torch.allclose(masked_mse(x, y, m_soft), torch.full((2,), 9.0))
    with pytest.raises(InvalidInput):
        masked_mse(x, y, torch.zeros(4, 4))
    with pytest.raises(InvalidInput):
        masked_mse(x, y, torch.ones(3, 3))
    with pytest.raises(InvalidInput):
        masked_mse(x, y, torch.full((4, 4), 2.0))


def test_mask_bbox_and_crop():
    m = torch.zeros(1, 1, 20, 30)
    m[..., 5:9, 10:12] = 0.3
    assert mask_bbox(m) == (5, 9, 10, 12)
    assert mask_bbox(m, pad=3) == (2, 12, 7, 15)
    assert mask_bbox(m, pad=6) == (0, 15, 4, 18)
    y0, y1, x0, x1 = mask_bbox(m, pad=1, multiple=8)
    assert (y1 - y0) % 8 == 0 and (x1 - x0) % 8 == 0 and y0 <= 4 and y1 >= 10 and x0 <= 9 and x1 >= 13
    x, y = _imgs(2, 20)
    x, y = x[..., :20, :20].repeat(1, 1, 1, 2)[..., :30], y.repeat(1, 1, 1, 2)[..., :30]
    # ImageLoss's crop to the padded box: the same masked MSE as on the whole image
    cropped = ImageLoss(y, m, None, lpips_weight=0.0, l2_weight=1.0, crop=True, crop_pad=2)
    assert cropped.box == (3, 11, 8, 14) and cropped.target.shape[-2:] == (8, 6)
    assert torch.allclose(cropped(x)[2], masked_mse(x, y, m))


def test_noise_regularisation_prefers_white_noise_and_renormalises():
    g = torch.Generator().manual_seed(0)
    white = [torch.randn(1, 1, 32, 32, generator=g)]
    smooth = [torch.nn.functional.interpolate(torch.randn(1, 1, 4, 4, generator=g), size=(32, 32), mode="bilinear")]
    assert noise_regularization(white) * 50 < noise_regularization(smooth)
    n = [torch.randn(2, 1, 16, 16) * 3 + 2]
    normalize_noise_(n)
    assert torch.allclose(n[0].mean((1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(n[0].std((1, 2, 3)), torch.ones(2), atol=1e-5)


def test_locality_codes_lie_at_distance_alpha(tiny_generator):
    G = tiny_generator
    pivot = G.mapping(torch.randn(1, G.z_dim))
    codes = locality_codes(G, pivot, 5, alpha=7.5, generator=torch.Generator().manual_seed(1))
    assert codes.shape == (5, G.num_ws, G.w_dim)
    assert torch.allclose((codes - pivot).flatten(1).norm(dim=1), torch.full((5,), 7.5), atol=1e-4)


def test_image_loss_keeps_gradients_to_both_inputs_and_matches_the_prepared_path():
    x, y = _imgs(1, 32)
    x.requires_grad_(True)
    y.requires_grad_(True)
    lp = perceptual_loss("alex")
    total, a, m = ImageLoss(y, None, lp, 1.0, 1.0)(x)
    total.sum().backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    ref = lp.prepare(y.detach())
    assert torch.allclose(lp.compare(x.detach(), ref), a.detach(), atol=1e-6)
    assert torch.allclose(lp(x.detach(), y.detach()), a.detach(), atol=1e-6)
