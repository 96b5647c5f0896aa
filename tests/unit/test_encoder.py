"""core.encoder: e4e / pSp parity with the official code, safe loading, shape inference at 1024, our trainer."""
from __future__ import annotations

import ast
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import core
from core.common import InvalidInput
from core.encoder import (Encoder, encode, encoder_config, encoder_matches, encoder_pivot, load_encoder,
                          parameter_count, save_encoder, small_config, check_compatible)
from core.stylegan2.formats import CheckpointError, rosinality_config
from tests.conftest import FIXTURES, make_tiny_generator

E4E = FIXTURES / "e4e"
KINDS = ["e4e", "psp"]


def _inputs():
    return torch.from_numpy(np.load(E4E / "inputs.npy"))


def _ref(name):
    return torch.from_numpy(np.load(E4E / name))


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("kind", KINDS)
def test_codes_and_ws_match_the_official_encoder(kind):
    E = load_encoder(E4E / f"{kind}_tiny.pt")
    assert E.config.kind == kind and (E.num_ws, E.w_dim, E.input_size) == (10, 32, 256)
    assert E.config.taps == (6, 20, 23) and (E.config.coarse, E.config.middle) == (3, 7)
    with torch.no_grad():
        codes = E(_inputs())
        ws = encode(E, _inputs())
    assert (codes - _ref(f"{kind}_codes_raw.npy")).abs().max() <= 1e-4
    assert (ws - _ref(f"{kind}_ws.npy")).abs().max() <= 1e-4
    assert (ws - codes).abs().max() > 0.1  # the latent average was really added


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_loads_as_a_generator_and_matches(kind):
    G = core.load_generator(E4E / f"{kind}_tiny.pt")
    assert G.checkpoint_info["format"] == "e4e/psp"
    assert (G.resolution, G.w_dim, G.num_ws) == (64, 32, 10)
    with torch.no_grad():
        img = G.synthesis(_ref(f"{kind}_ws.npy"), noise_mode="const")
    assert (img - _ref(f"{kind}_img.npy")).abs().max() <= 1e-4


def test_e4e_and_psp_differ_on_the_same_weights():
    """The two forwards really are different code paths (same tensors, different outputs)."""
    a, b = _ref("e4e_codes_raw.npy"), _ref("psp_codes_raw.npy")
    assert (a - b).abs().max() > 1e-2
    E = load_encoder(E4E / "e4e_tiny.pt")
    with torch.no_grad():
        codes = E(_inputs())
    assert torch.allclose(E.deltas(codes)[:, 0], codes[:, 1] - codes[:, 0])


def test_encode_resizes_other_sizes_to_256():
    E = load_encoder(E4E / "psp_tiny.pt")
    small = F.interpolate(_inputs(), size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        got = encode(E, small)
        want = encode(E, F.interpolate(small, size=(256, 256), mode="bilinear", align_corners=False,
                                       antialias=True))
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(InvalidInput, match=r"\(N,3,H,W\)"):
        encode(E, torch.zeros(3, 64, 64))
    with pytest.raises(InvalidInput, match="NaN"):
        encode(E, torch.full((1, 3, 256, 256), float("nan")))


def test_encoder_pivot_is_detached_float_and_keeps_mode():
    E = load_encoder(E4E / "e4e_tiny.pt").train()
    ws = encoder_pivot(E, _inputs()[:1])
    assert ws.dtype == torch.float32 and not ws.requires_grad and ws.shape == (1, 10, 32)
    assert E.training  # restored
    with pytest.raises(InvalidInput, match="10×32 codes"):
        check_compatible(E, make_tiny_generator(32, w_dim=32))  # 32 px generator: 8 rows


# ------------------------------------------------------------------------------------------------ refusals


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_file_is_refused(tmp_path, fraction):
    data = (E4E / "e4e_tiny.pt").read_bytes()
    path = tmp_path / "e4e_cut.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated|corrupt") as err:
        load_encoder(path)
    assert "e4e_cut.pt" in str(err.value)
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        core.load_generator(path)


def test_code_carrying_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    good = torch.load(E4E / "e4e_tiny.pt", weights_only=True)
    good["opts"] = _System(marker)
    path = tmp_path / "evil.pt"
    torch.save(good, path)
    with pytest.raises(CheckpointError, match="system") as err:
        load_encoder(path)
    assert "evil.pt" in str(err.value) and not marker.exists()
    with pytest.raises(CheckpointError, match="system"):
        core.load_generator(path)
    assert not marker.exists()
    plain = tmp_path / "evil.pkl"  # a bare pickle: refused before any unpickling
    plain.write_bytes(pickle.dumps({"state_dict": {}, "opts": _System(marker)}))
    with pytest.raises(CheckpointError, match="plain pickle"):
        load_encoder(plain)
    assert not marker.exists()


def test_wrong_content_is_named(tmp_path):
    sd = torch.load(E4E / "psp_tiny.pt", weights_only=True)
    sd["opts"]["encoder_type"] = "BackboneEncoderUsingLastLayerIntoW"
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="BackboneEncoderUsingLastLayerIntoW.*not supported"):
        load_encoder(tmp_path / "other.pt")
    bad = torch.load(E4E / "psp_tiny.pt", weights_only=True)
    bad["state_dict"]["encoder.latlayer2.weight"] = torch.zeros(48, 20, 1, 1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="FPN widths"):
        load_encoder(tmp_path / "bad.pt")
    torch.save({"g_ema": {}}, tmp_path / "gen.pt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_encoder(tmp_path / "gen.pt")


# ------------------------------------------------------------------------------------------------ 1024 shapes


def _ffhq_shapes():
    out = {}
    for line in (E4E / "ffhq1024_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")[:2]
        out[key] = tuple(ast.literal_eval(shape))
    return out


@pytest.mark.parametrize("etype", ["Encoder4Editing", "GradualStyleEncoder"])
def test_shape_inference_matches_the_real_ffhq_architecture(etype):
    shapes = _ffhq_shapes()
    enc = {k[len("encoder."):]: v for k, v in shapes.items() if k.startswith("encoder.")}
    cfg = encoder_config(enc, etype)
    assert (cfg.num_ws, cfg.w_dim, cfg.input_size, cfg.taps) == (18, 512, 256, (6, 20, 23))
    assert [u.depth for u in cfg.units] == [64] * 3 + [128] * 4 + [256] * 14 + [512] * 3
    with torch.device("meta"):  # built without allocating its 267M parameters
        E = Encoder(cfg)
    built = {k: tuple(v.shape) for k, v in E.state_dict().items() if k != "latent_avg"}
    assert built == enc
    assert parameter_count(cfg) == 267_136_704  # fixtures README
    dec = {k[len("decoder."):]: torch.empty(v, device="meta") for k, v in shapes.items() if k.startswith("decoder.")}
    g = rosinality_config(dec)
    assert (g.resolution, g.w_dim, g.mapping_layers, g.num_ws) == (1024, 512, 8, 18)


# ------------------------------------------------------------------------------------------------ ours


def test_save_and_load_round_trip(tmp_path):
    E = Encoder(small_config(32, 8, 32)).eval()
    with torch.no_grad():
        E.latent_avg.normal_()
    save_encoder(E, tmp_path / "ours.pt", meta={"generator_sha256": "abc"})
    E2 = load_encoder(tmp_path / "ours.pt")
    assert E2.config == E.config and E2.input_size == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encode(E, x), encode(E2, x))
    assert E2.opts["latent_edit_meta"]["generator_sha256"] == "abc"


def test_trainer_writes_a_resumable_loadable_encoder(tmp_path):
    from core.demo import train_encoder as T
    from core.stylegan2.formats import save_generator

    G = make_tiny_generator(64, w_dim=32)
    save_generator(G, tmp_path / "g.pt")
    o = T.EncoderTrainOptions(minutes=0.01, batch=2, render_fraction=0.5, eval_every=2, save_every_minutes=0.0,
                              eval_samples=2, final_eval_samples=2)
    out = tmp_path / "run"
    T.train(out, tmp_path / "g.pt", o, resume=False, log=lambda m: None)
    first = T.json.loads((out / "encoder64.eval.json").read_text())
    assert first["steps"] >= 1
    o.minutes = first["minutes"] + 0.01
    T.train(out, tmp_path / "g.pt", o, resume=True, log=lambda m: None)
    second = T.json.loads((out / "encoder64.eval.json").read_text())
    assert second["steps"] > first["steps"]
    E = load_encoder(out / "encoder64.pt")
    G2 = core.load_generator(tmp_path / "g.pt")
    assert encoder_matches(E, G2) and not encoder_matches(E, make_tiny_generator(64, w_dim=32, seed=1))
    assert encoder_pivot(E, torch.zeros(1, 3, 64, 64)).shape == (1, G.num_ws, G.w_dim)


def test_trainer_warm_starts_from_an_encoder_file_with_every_row_on(tmp_path):
    from core.demo import train_encoder as T
    from core.stylegan2.formats import save_generator

    G = make_tiny_generator(64, w_dim=32)
    save_generator(G, tmp_path / "g.pt")
    o = T.EncoderTrainOptions(minutes=0.01, batch=2, render_fraction=0.5, eval_every=10 ** 6, save_every_minutes=0.0,
                              final_eval_samples=2, learning_rate=0.0)        # lr 0: the weights stay the start's
    start = T.build_encoder(G, seed=5)
    with torch.no_grad():
        for block in start.styles[1:]:
            block.linear.weight.normal_(0, 0.02)                               # trained deltas
    save_encoder(start.eval(), tmp_path / "start.pt")
    stages = []
    T.train(tmp_path / "run", tmp_path / "g.pt", o, resume=False, init=tmp_path / "start.pt",
            log=lambda m: stages.append(m.split(" stage ")[1].split()[0]) if " stage " in m else None)
    assert stages and set(stages) == {"None"}                                  # no progressive schedule: all rows on
    E = load_encoder(tmp_path / "run" / "encoder64.pt")
    trained = dict(E.named_parameters())                                      # (batch-norm statistics still move)
    for k, v in start.named_parameters():
        torch.testing.assert_close(trained[k], v)
    assert encoder_matches(E, G)
    cold = []
    T.train(tmp_path / "cold", tmp_path / "g.pt", o, resume=False,
            log=lambda m: cold.append(m.split(" stage ")[1].split()[0]) if " stage " in m else None)
    assert cold[0] == "0"                                                      # a cold start runs the schedule
    with pytest.raises(InvalidInput):                                          # codes of another shape
        T.train(tmp_path / "bad", tmp_path / "g.pt", o, resume=False, init=_other_shape_encoder(tmp_path))


def _other_shape_encoder(tmp_path):
    from core.demo import train_encoder as T

    path = tmp_path / "other.pt"
    save_encoder(T.build_encoder(make_tiny_generator(64, w_dim=16)).eval(), path)
    return path


def test_a_few_steps_reduce_the_training_loss():
    from core.demo import train_encoder as T
    from core.losses import perceptual_loss

    G = make_tiny_generator(32, w_dim=32).requires_grad_(False)
    E = T.build_encoder(G).train()
    assert all(float(b.linear.weight.detach().abs().max()) == 0 for b in E.styles[1:])  # deltas start at 0
    o = T.EncoderTrainOptions()
    lp = perceptual_loss("alex")
    ws = G.mapping(torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        x = G.synthesis(ws)
    opt = torch.optim.Adam(E.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = T._total(T.encoder_losses(E, G, x, ws, lp, o, stage=None), o, True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_progressive_stage_freezes_later_rows():
    E = Encoder(small_config(32, 8, 32)).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        codes = E(x, stage=0)
        assert torch.equal(codes, codes[:, :1].expand_as(codes))
        part = E(x, stage=3)
        assert torch.equal(part[:, 4:], part[:, :1].expand(-1, 4, -1)) and not torch.equal(part[:, 1], part[:, 0])


def test_shipped_encoder_fits_the_shipped_model():
    from core.demo import default_encoder_path, default_model_path

    path = default_encoder_path()
    assert path.exists(), f"{path} missing: python -m core.demo.train_encoder --install"
    assert path.stat().st_size <= 10 * 1024 * 1024
    E = load_encoder(path)
    G = core.load_generator(default_model_path())
    check_compatible(E, G)
    assert encoder_matches(E, G), "the shipped encoder was trained for another face64.pt: retrain it"
