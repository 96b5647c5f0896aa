"""The training code behind the embedded default (core.demo.train), on a generator small enough for seconds.

The shipped weights are tested in test_demo.py; here: the losses, and that both training phases run,
checkpoint, resume, and start phase 2 from phase 1's weights.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from core.demo import train
from core.demo.data import params_from_z
from core.demo import render
from core.demo.scorer import WEIGHTS as SCORER_WEIGHTS


def _faces(n: int, seed: int = 0) -> dict:
    z = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    params = params_from_z(z)
    return {"z": z, "params": params, "images": render(params)}


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_detail_map_is_large_on_features_and_small_on_flat_areas():
    target = _to_tensor(_faces(4)["images"])
    m = train.detail_map(target)
    assert m.shape == (4, 1, 64, 64)
    np.testing.assert_allclose(m.mean((1, 2, 3)).numpy(), 1.0, rtol=1e-5)
    face_core = m[:, :, 24:44, 20:44].mean()       # eyes, nose and mouth of a centred face
    corner = m[:, :, :6, :6].mean()                # flat background
    assert face_core > 2.0 and corner < 0.2, (float(face_core), float(corner))


def test_distill_loss_is_zero_on_target_and_detail_weight_moves_it_to_detail():
    target = _to_tensor(_faces(2)["images"])
    assert float(train.distill_loss(target, target, 1.0, 2.0)) == 0.0
    flat = target.clone()
    flat[:, :, :8, :8] += 0.5                      # an error on flat background
    feat = target.clone()
    feat[:, :, 28:36, 24:32] += 0.5                # the same error over an eye
    for g in (0.0, 1.0):
        plain = (float(train.distill_loss(flat, target, g)), float(train.distill_loss(feat, target, g)))
        weighted = (float(train.distill_loss(flat, target, g, 2.0)), float(train.distill_loss(feat, target, g, 2.0)))
        if g == 0.0:                               # (with g > 0 the block's edges count: 2 at the corner, 4 inside)
            assert plain[0] == pytest.approx(plain[1], rel=1e-6)
        assert weighted[1] / weighted[0] > 1.5 * plain[1] / plain[0]


def _tiny(**kw) -> train.GeneratorTrainOptions:
    base = dict(z_dim=16, w_dim=32, mapping_layers=2, channels={4: 32, 8: 32, 16: 16, 32: 8, 64: 8}, batch=4,
                warmup=2, checkpoint_minutes=1e9, feature_from_step=10 ** 9)
    base.update(kw)
    return train.GeneratorTrainOptions(**base)


def test_phases_train_checkpoint_resume_and_hand_over(tmp_path):
    torch.manual_seed(0)
    data = _faces(8)
    shutil.copy(SCORER_WEIGHTS, tmp_path / "scorer.pt")
    target = _to_tensor(data["images"])

    G0 = train.build_generator(_tiny())
    with torch.no_grad():
        before = float(train.distill_loss(train.generate(G0, torch.from_numpy(data["z"])), target, 1.0))

    G1, log1 = train.train_generator(tmp_path, data, _tiny(steps=50, lr=1e-2))
    ck = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 50 and log1[-1]["step"] == 50
    with torch.no_grad():
        after = float(train.distill_loss(train.generate(G1, torch.from_numpy(data["z"])), target, 1.0))
    assert after < 0.8 * before, (before, after)

    # resume: the same checkpoint continues to a higher step count instead of starting over
    _, log1b = train.train_generator(tmp_path, data, _tiny(steps=75, lr=1e-2))
    assert [e["step"] for e in log1b] == [25, 50, 75]
    assert torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["step"] == 75

    # phase 2 starts from phase 1's EMA weights, with the scorer and detail losses on, in its own checkpoint
    ft = _tiny(steps=3, lr=1e-9, warmup=1, feature_from_step=0, attribute_weight=1.0, detail_weight=2.0)
    G2, log2 = train.train_generator(tmp_path, data, ft, ckpt_name="ckpt_finetune.pt", init_from=tmp_path / "ckpt.pt")
    phase1 = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["G_ema"]
    for k, v in G2.named_parameters():                                   # (buffers: w_avg is re-estimated)
        torch.testing.assert_close(v, phase1[k], atol=1e-5, rtol=1e-4)   # lr ~0: still phase 1's weights
    assert torch.load(tmp_path / "ckpt_finetune.pt", map_location="cpu", weights_only=True)["step"] == 3
    ev = train.evaluate_generator(G2, data, tmp_path / "scorer.pt", n=8)
    assert set(ev) == {"test_psnr_db", "test_detail_psnr_db", "test_attribute_mae"}
    assert ev["test_detail_psnr_db"] < ev["test_psnr_db"]                 # detail is where a small model errs most
    json.dumps(ev)


def test_polish_renders_fresh_faces_from_a_shipped_file_and_lowers_the_error(tmp_path):
    from core.stylegan2.formats import fingerprint

    torch.manual_seed(0)
    shutil.copy(SCORER_WEIGHTS, tmp_path / "scorer.pt")
    held_out = _faces(8, seed=1)
    G0, _ = train.train_generator(tmp_path, _faces(8), _tiny(steps=2))
    train.save_shipped_generator(G0, tmp_path / "start.pt", {})
    drawn = []

    def render_counted(params):
        drawn.append(params.copy())
        return render(params)

    po = train.polish_options(_tiny(), steps=40)
    assert (po.fresh_data, po.mse_weight > 0, po.attribute_weight, po.channels) == (True, True, 1.0, _tiny().channels)
    po.lr, po.warmup, po.ema_half_life, po.attribute_weight, po.detail_weight = 1e-2, 2, 8, 0.0, 0.0
    target = _to_tensor(held_out["images"])
    with torch.no_grad():
        before = float((train.generate(G0, torch.from_numpy(held_out["z"])) - target).square().mean())
    G, log = train.train_generator(tmp_path, None, po, ckpt_name="ckpt_polish.pt", init_from=tmp_path / "start.pt",
                                   held_out=held_out, render=render_counted)
    assert len(drawn) == 40 and all(p.shape == (4, 13) for p in drawn)
    assert len({p.tobytes() for p in drawn}) == 40                       # a new batch of faces every step
    with torch.no_grad():
        after = float((train.generate(G, torch.from_numpy(held_out["z"])) - target).square().mean())
    assert after < 0.9 * before, (before, after)                         # faces never seen, yet closer
    assert fingerprint(G) != fingerprint(G0)
    with pytest.raises(ValueError, match="fresh_data needs render"):
        train.train_generator(tmp_path / "other", None, po, init_from=tmp_path / "start.pt")


# ------------------------------------------------------------------------------------ the renderer by its name


def test_named_cache_scorer_both_phases_and_directions_run(tmp_path):
    from core.common import InvalidInput
    from core.demo import directions as dr
    from core.demo import scorer as sc
    from core.demo.data import build_cache

    torch.manual_seed(0)
    test = build_cache(tmp_path / "test.npz", 8, 16, seed=1, renderer="v2")
    data = build_cache(tmp_path / "train.npz", 16, 16, seed=0, renderer="v2")
    assert np.array_equal(data["images"][3], render(params_from_z(data["z"][3:4]))[0])
    assert np.array_equal(build_cache(tmp_path / "train.npz", 16, 16, seed=0, renderer="v2")["images"], data["images"])
    unnamed = {k: v for k, v in np.load(tmp_path / "train.npz").items() if k != "renderer"}
    np.savez(tmp_path / "old.npz", **unnamed)                           # caches before names: the removed first design
    with pytest.raises(InvalidInput, match="renderer 'v1', not 'v2'"):  # never mixes renderers in one folder
        build_cache(tmp_path / "old.npz", 16, 16, seed=0, renderer="v2")
    with pytest.raises(InvalidInput, match="unknown renderer 'v1'"):
        build_cache(tmp_path / "v1.npz", 16, 16, seed=0, renderer="v1")

    net = sc.train_scorer(data["images"], data["params"], sc.ScorerTrainOptions(steps=3, batch=4))
    sc.save_scorer(net, tmp_path / "scorer.pt")
    train.train_generator(tmp_path, data, _tiny(steps=4), held_out=test)
    ft = train.finetune_options(0.0, _tiny(), steps=2)
    assert (ft.channels, ft.w_dim, ft.attribute_weight, ft.max_minutes) == (_tiny().channels, 32, 1.0, 0.0)
    G, log = train.train_generator(tmp_path, data, ft, ckpt_name="ckpt_finetune.pt", init_from=tmp_path / "ckpt.pt",
                                   held_out=test)
    psnrs = [e["test_psnr_db"] for e in log if "test_psnr_db" in e]
    assert len(psnrs) == 1 and 0 < psnrs[0] < 60

    dirs, report = dr.fit_directions(G, net, dr.DirectionFitOptions(n_samples=64))
    refined = dr.refine_directions(G, net, dirs, dr.DirectionRefineOptions(steps=1, batch=2, validate_n=4),
                                   names=["smile"])
    M = dr.edit_matrix(G, net, refined, n=4)
    assert M.shape == (13, 13) and np.isfinite(M).all() and set(report["linear_r2"]) == set(dirs)


def test_cli_trains_refuses_mismatched_resume_and_install(tmp_path, monkeypatch):
    tiny = ["--out", str(tmp_path), "--renderer", "v2", "--train-size", "16", "--test-size", "8", "--scorer-steps", "2",
            "--steps", "2", "--stages", "cache,scorer,generator"]
    threads = torch.get_num_threads()                                   # main() sets torch's thread count
    try:
        _cli_checks(tmp_path, tiny, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _cli_checks(tmp_path, tiny, monkeypatch):
    from core.demo.data import RENDERERS

    from core.common import InvalidInput

    assert train.main(tiny + ["--channels", "4:16,8:16,16:8,32:8,64:8"]) == 0
    meta = json.loads((tmp_path / "generator_eval.json").read_text())
    assert meta["renderer"] == "v2" and "core.demo.renderer" in meta["domain"] and meta["phases"] == ["ckpt.pt"]
    assert str(np.load(tmp_path / "train.npz")["renderer"]) == "v2"
    with pytest.raises(InvalidInput, match="channels"):                 # resuming with another architecture
        train.main(tiny + ["--resume", "--steps", "3", "--channels", "4:16,8:16,16:8,32:8,64:16"])
    weights = sorted(p.name for p in train.WEIGHTS_DIR.iterdir())
    monkeypatch.setitem(RENDERERS, "v3", "core.demo.renderer_v3")      # a run of a renderer core.demo does not draw
    assert train.main(tiny + ["--renderer", "v3", "--resume", "--stages", "directions", "--install"]) == 2
    assert sorted(p.name for p in train.WEIGHTS_DIR.iterdir()) == weights
    with pytest.raises(SystemExit):
        train.main(tiny + ["--channels", "4:x"])


def test_run_state_carries_between_folders(tmp_path):
    """--carry-to keeps a run's state (files and the directions folder, not the render caches); --carry-from
    restores only what the work folder lacks, so a newer checkpoint there is never overwritten."""
    from core.demo.train import carry, main

    run, keep = tmp_path / "run", tmp_path / "repo" / "training"
    (run / "face64.directions").mkdir(parents=True)
    (run / "face64.directions" / "smile.npy").write_bytes(b"d")
    (run / "ckpt.pt").write_bytes(b"step 10")
    (run / "train.npz").write_bytes(b"cache")
    assert main(["--out", str(run), "--stages", "", "--carry-to", str(keep)]) == 0
    assert sorted(p.name for p in keep.iterdir()) == ["ckpt.pt", "face64.directions"]
    assert (keep / "face64.directions" / "smile.npy").read_bytes() == b"d"
    fresh = tmp_path / "new-machine"
    assert main(["--out", str(fresh), "--stages", "", "--carry-from", str(keep)]) == 0
    assert (fresh / "ckpt.pt").read_bytes() == b"step 10" and not (fresh / "train.npz").exists()
    (fresh / "ckpt.pt").write_bytes(b"step 20")  # the run went on here
    assert carry(keep, fresh, replace=False) == [] and (fresh / "ckpt.pt").read_bytes() == b"step 20"
    assert carry(fresh, keep) == ["ckpt.pt", "face64.directions"] and (keep / "ckpt.pt").read_bytes() == b"step 20"
    assert carry(keep, keep) == [] and (keep / "face64.directions" / "smile.npy").exists()
    from core.common import InvalidInput

    with pytest.raises(InvalidInput, match="no run state to carry"):
        carry(tmp_path / "typo", fresh)


def test_carry_from_restores_a_checkpoint_only_when_it_is_further_on(tmp_path):
    from core.demo.train import carry

    old, new = tmp_path / "stale-machine", tmp_path / "repo"
    old.mkdir(), new.mkdir()
    torch.save({"step": 100}, old / "ckpt.pt")
    torch.save({"step": 900}, new / "ckpt.pt")
    assert carry(new, old, replace=False) == ["ckpt.pt"] and torch.load(old / "ckpt.pt")["step"] == 900
    torch.save({"step": 1000}, old / "ckpt.pt")  # the run went on here: kept
    assert carry(new, old, replace=False) == [] and torch.load(old / "ckpt.pt")["step"] == 1000


def test_carry_drops_the_optimiser_state_of_a_finished_phase_only(tmp_path):
    import json

    from core.demo.train import carry

    run, keep = tmp_path / "run", tmp_path / "keep"
    run.mkdir()
    torch.save({"step": 50, "opt": {"x": torch.ones(3)}, "options": json.dumps({"steps": 50})}, run / "ckpt.pt")
    torch.save({"step": 10, "opt": {"x": torch.ones(3)}, "options": json.dumps({"steps": 50})},
               run / "ckpt_finetune.pt")
    carry(run, keep)
    assert "opt" not in torch.load(keep / "ckpt.pt") and torch.load(keep / "ckpt.pt")["step"] == 50
    assert "opt" in torch.load(keep / "ckpt_finetune.pt")



def _random_directions(G, scale: float):
    from core.demo.renderer import ATTRIBUTES
    from core.edits import Direction

    gen = torch.Generator().manual_seed(3)
    out = {}
    for name in ATTRIBUTES:
        v = torch.randn(int(G.w_dim), generator=gen)
        out[name] = Direction(name, v / v.norm(), layers=None, default_strength=1.0, range=(-3.0, 3.0), scale=scale,
                              description=name, source="test")
    return out


def test_match_renderer_moves_a_direction_towards_the_renderers_own_change():
    from core.demo import render
    from core.demo.directions import RendererMatchOptions, match_renderer, renderer_match_score
    from core.demo.scorer import load_scorer
    from tests.conftest import make_tiny_generator

    G = make_tiny_generator(resolution=64, w_dim=32)
    given = _random_directions(G, scale=3.0)            # large random moves: far from the renderer's change
    losses = []
    o = RendererMatchOptions(steps=12, batch=8, validate_n=6, leak_tolerance=float("inf"))
    out, report = match_renderer(G, load_scorer(), given, render, o, names=["smile"],
                                 progress=lambda name, step, loss: losses.append(loss))
    rep = report["smile"]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert rep["score_matched"] > rep["score_given"] and rep["kept"] and out["smile"] is not given["smile"]
    assert out["beard"] is given["beard"] and set(report) == {"smile"}
    vec = (out["smile"].vector * out["smile"].scale).float()
    assert renderer_match_score(G, vec, 0, render, 6, o.validate_seed) == pytest.approx(rep["score_matched"], abs=1e-4)
    assert rep["leak_true"] >= 0 and rep["leak_given"] >= 0
    strict = RendererMatchOptions(steps=2, batch=2, validate_n=4, leak_tolerance=0.0)   # no leak allowed: kept never
    out, report = match_renderer(G, load_scorer(), given, render, strict, names=["glasses"])
    assert not report["glasses"]["kept"] and out["glasses"] is given["glasses"]
