"""ModelRegistry: listing the default and a models folder, lazy cached loading, directions with SeFa fallback."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from core.common import InvalidInput
from core.edits import Direction, apply_edits, s_direction, save_manifest
from core.models import ModelRegistry, UnknownModel
from tests.conftest import make_tiny_generator


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from core.stylegan2.formats import save_generator

    root = tmp_path_factory.mktemp("models")
    a = make_tiny_generator(resolution=32, w_dim=32, seed=1)
    b = make_tiny_generator(resolution=16, w_dim=16, seed=2)
    save_generator(a, root / "alpha.pt")
    save_generator(b, root / "beta.pt")
    save_manifest({"smile": Direction("smile", torch.linspace(-1, 1, 32), layers=(0, 3), default_strength=1.5,
                                      range=(-4, 4), description="Smile"),
                   "gaze": s_direction("gaze", [(1, 2, 0.5)], description="Gaze")},
                  root / "alpha.directions.json")
    torch.save(torch.ones(1, 32), root / "loose_direction.pt")  # a direction file, not a model
    (root / "broken.pt").write_bytes(b"this is not a checkpoint")
    default_dir = tmp_path_factory.mktemp("default")
    save_generator(make_tiny_generator(resolution=16, w_dim=16, seed=3), default_dir / "face64.pt")
    return root, default_dir / "face64.pt", {"alpha": a, "beta": b}


def test_lists_default_and_folder_models(models_dir):
    root, default, gens = models_dir
    reg = ModelRegistry(root, include_default=True, default_path=default)
    assert reg.names() == ["face64", "alpha", "beta", "broken"]
    listing = reg.list()
    json.dumps(listing)  # plain JSON-able types
    by_name = {m["name"]: m for m in listing}
    assert list(by_name) == ["face64", "alpha", "beta"]  # the broken file is left out...
    assert reg.errors["broken"]  # ...with a reason
    assert by_name["face64"]["default"] is True and by_name["alpha"]["default"] is False
    assert (by_name["alpha"]["resolution"], by_name["alpha"]["num_ws"], by_name["alpha"]["w_dim"]) == (32, 8, 32)
    assert (by_name["beta"]["resolution"], by_name["beta"]["num_ws"], by_name["beta"]["w_dim"]) == (16, 6, 16)
    assert by_name["alpha"]["spaces"] == ["w", "w+", "s"]
    from core.session import method_catalog

    # one source for methods and their defaults; no descriptor or encoder beside these files: neither method
    assert all(m["methods"] == method_catalog(()) for m in listing)
    assert {"magec", "encoder"} <= set(by_name["alpha"]["unavailable"])
    assert [m["name"] for m in by_name["alpha"]["methods"]][0] == "pti"
    alpha_dirs = {d["name"]: d for d in by_name["alpha"]["directions"]}
    assert list(alpha_dirs)[:2] == ["smile", "gaze"]  # files first, then SeFa
    assert alpha_dirs["smile"] == {"name": "smile", "space": "w", "layers": [0, 3], "default_strength": 1.5,
                                   "range": [-4.0, 4.0], "description": "Smile",
                                   "source": alpha_dirs["smile"]["source"]}
    assert alpha_dirs["gaze"]["space"] == "s"
    beta_dirs = [d["name"] for d in by_name["beta"]["directions"]]
    assert beta_dirs == [f"sefa_{i}" for i in range(5)]  # no files: SeFa still offers edits


def test_get_loads_once_and_matches_saved_weights(models_dir):
    root, default, gens = models_dir
    reg = ModelRegistry(root, include_default=False)
    m = reg.get("alpha")
    assert reg.get("alpha") is m
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = gens["alpha"].synthesis(gens["alpha"].mapping(z))
        out = m.generator.synthesis(m.generator.mapping(z))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # the registry's directions drive an edit on the loaded model
    ws = m.generator.mapping(z)
    edited = apply_edits(ws, [("smile", 2.0), ("sefa_0", 1.0)], m.directions)
    expected = ws.clone()
    expected[:, 0:4] += 2.0 * torch.linspace(-1, 1, 32)
    expected += m.directions["sefa_0"].scale * m.directions["sefa_0"].vector
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-5)


def test_concurrent_get_loads_once(models_dir, monkeypatch):
    root, _, _ = models_dir
    import core.stylegan2.formats as formats

    calls = []
    real = formats.load_generator

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(formats, "load_generator", counting)
    reg = ModelRegistry(root, include_default=False)
    got = []
    threads = [threading.Thread(target=lambda: got.append(reg.get("beta"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(g is got[0] for g in got)


def test_unknown_and_default_names(models_dir):
    root, default, _ = models_dir
    reg = ModelRegistry(root, include_default=True, default_path=default)
    with pytest.raises(UnknownModel, match=r"unknown model 'ffhq'; known models: face64, alpha, beta, broken"):
        reg.get("ffhq")
    assert isinstance(UnknownModel("x"), InvalidInput)
    assert reg.get(None).name == "face64"
    with pytest.raises(InvalidInput, match="models folder not found"):
        ModelRegistry(root / "nope", include_default=False)
    with pytest.raises(UnknownModel, match="no models available"):
        ModelRegistry(None, include_default=False).get()


def test_bad_manifest_keeps_model_with_error(tmp_path):
    from core.stylegan2.formats import save_generator

    save_generator(make_tiny_generator(resolution=16, w_dim=16), tmp_path / "m.pt")
    # a 32-dim direction for a 16-dim W
    save_manifest({"smile": Direction("smile", torch.ones(32))}, tmp_path / "m.directions.json")
    reg = ModelRegistry(tmp_path, include_default=False, sefa_k=2)
    info = reg.list()[0]
    assert "32-dimensional but the model's W is 16-dimensional" in info["directions_error"]
    assert [d["name"] for d in info["directions"]] == ["sefa_0", "sefa_1"]


# --- methods beyond a generator: MAGEC (a descriptor) and the encoder ---------------------------------------

def _names(info):
    return [m["name"] for m in info["methods"]]


def _pivots(info):
    return [p["name"] for m in info["methods"] if m["name"] == "pti" for p in m["pivots"]]


def test_capabilities_follow_the_files_beside_the_checkpoint(tmp_path):
    from core.encoder import Encoder, save_encoder, small_config
    from core.stylegan2.formats import save_generator

    G = make_tiny_generator(resolution=32, w_dim=32, seed=1)
    save_generator(G, tmp_path / "plain.pt")
    save_generator(G, tmp_path / "rich.pt")
    cfg = small_config(G.w_dim, G.num_ws, input_size=32, depths=(8, 12, 16, 20), units=(1, 1, 1, 1), stem=8,
                       fpn=20, style_channels=8)
    save_encoder(Encoder(cfg), tmp_path / "rich.encoder.pt")
    net = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                               torch.nn.Sigmoid()))
    net.save(str(tmp_path / "rich.attributes.pt"))
    (tmp_path / "rich.attributes.json").write_text(json.dumps({"names": ["red", "green", "blue"]}))
    reg = ModelRegistry(tmp_path, include_default=False)
    by = {m["name"]: m for m in reg.list()}
    assert _names(by["plain"]) == ["pti", "chunks", "w", "wplus"] and _pivots(by["plain"]) == ["w"]
    assert _names(by["rich"]) == ["pti", "chunks", "w", "wplus", "magec", "encoder"]
    assert _pivots(by["rich"]) == ["encoder", "w", "magec"]  # the encoder's code first: the default pivot
    assert "plain.attributes.pt" in by["plain"]["unavailable"]["magec"]
    assert "plain.encoder.pt" in by["plain"]["unavailable"]["encoder"]
    labels = {m["name"]: m["label"] for m in by["rich"]["methods"]}
    assert labels["encoder"] == "Fast (encoder)" and labels["magec"] == "Editability-aware (MAGEC)"
    # the assets load once and fit this generator; the plain model's reasons travel with its (empty) assets
    rich = reg.get("rich")
    E = rich.method_assets(("encoder",)).encoder
    assert E is rich.method_assets(("encoder",)).encoder and (E.num_ws, E.w_dim) == (G.num_ws, G.w_dim)
    plain = reg.get("plain").method_assets()
    assert plain.encoder is None and plain.linknet is None and set(plain.missing) == {"magec", "encoder"}


def test_linknet_cache_goes_beside_the_checkpoint_or_to_the_cache_dir(tmp_path, monkeypatch):
    import core.models as cm

    ckpt = tmp_path / "g.pt"
    ckpt.write_bytes(b"x")
    assert cm.linknet_cache_path(ckpt) == tmp_path / "g.linknet.pt"
    monkeypatch.setattr(cm.os, "access", lambda path, mode: False)  # an installed, read-only models folder
    assert cm.linknet_cache_path(ckpt) is None  # no cache folder given: the fit stays in memory
    assert cm.linknet_cache_path(ckpt, tmp_path / "cache") == tmp_path / "cache" / "g.linknet.pt"
    (tmp_path / "g.linknet.pt").write_bytes(b"shipped")  # a read-only shipped fit is still read
    assert cm.linknet_cache_path(ckpt) == tmp_path / "g.linknet.pt"


def test_embedded_model_offers_magec_with_the_shipped_scorer():
    from core.demo import default_encoder_path

    reg = ModelRegistry()
    info = reg.list()[0]
    assert info["default"] and "magec" in _names(info) and "magec" in _pivots(info)
    assert ("encoder" in _names(info)) == default_encoder_path().is_file()
