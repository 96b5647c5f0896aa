"""core.stylegan2.formats: format detection, safe loading, our format and deltas, errors, memory, the info CLI."""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from core.stylegan2.formats import (CheckpointError, detect_format, fingerprint, load_generator, save_generator)
from core.stylegan2.network import Generator, GeneratorConfig
from tests.conftest import FIXTURES, ROOT, make_tiny_generator

# ------------------------------------------------------------------------------------------------ writers for tests


def to_rosinality(G: Generator) -> dict:
    """Our generator as a rosinality ``g_ema`` state dict (fixtures README §4.2, §6)."""
    sd = {k: v.detach().clone() for k, v in G.state_dict().items()}
    out = collections.OrderedDict()
    for i in range(G.config.mapping_layers):
        out[f"style.{i + 1}.weight"] = sd[f"mapping_fcs.{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping_fcs.{i}.bias"]
    out["input.input"] = sd["const"][None]
    kernel = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64 * 4

    def conv(src, dst, noise_idx, up):
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        if up:
            out[f"{dst}.conv.blur.kernel"] = kernel.clone()
        out[f"{dst}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
        out[f"{dst}.activate.bias"] = sd[f"{src}.bias"]
        out[f"noises.noise_{noise_idx}"] = sd[f"{src}.noise_const"][None, None]

    def rgb(src, dst, up):
        if up:
            out[f"{dst}.upsample.kernel"] = kernel.clone()
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        out[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        out[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"].view(1, 3, 1, 1)

    conv("convs.0", "conv1", 0, False)
    rgb("torgbs.0", "to_rgb1", False)
    for i in range(len(G.config.resolutions) - 1):
        conv(f"convs.{2 * i + 1}", f"convs.{2 * i}", 2 * i + 1, True)
        conv(f"convs.{2 * i + 2}", f"convs.{2 * i + 1}", 2 * i + 2, False)
        rgb(f"torgbs.{i + 1}", f"to_rgbs.{i}", True)
    return out


def _fake_module(monkeypatch, name, **attrs):
    parent = name.rpartition(".")[0]
    if parent and parent not in sys.modules:
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        v.__module__ = name
        v.__qualname__ = k
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


@pytest.fixture
def nvidia_writer(monkeypatch):
    """``write(G, path, conv_clamp=None, disc_tensors=1, g_scale=None)``: a stylegan2-ada-style snapshot of ``G``.

    ``G_ema`` holds ``G``'s weights; the snapshot's ``G`` shares its sub-networks (``g_scale=None``) or is a separate
    copy whose first mapping layer is scaled by ``g_scale``.

    Written through stand-ins registered as ``torch_utils.persistence`` / ``dnnlib.util`` (so the pickle names the
    same globals as a real snapshot; plain ``pickle.dump`` of torch tensors produces the ``_load_from_bytes`` blobs).
    """

    def _reconstruct_persistent_obj(meta):  # never called: only its name is pickled
        raise AssertionError("loader executed pickled code")

    _fake_module(monkeypatch, "torch_utils.persistence", _reconstruct_persistent_obj=_reconstruct_persistent_obj)
    easydict = type("EasyDict", (dict,), {})
    _fake_module(monkeypatch, "dnnlib.util", EasyDict=easydict)

    class Obj:
        def __init__(self, class_name, params=None, buffers=None, modules=None, **attrs):
            self.meta = dict(type="class", version=6, module_src="", class_name=class_name, state=dict(
                training=False,
                _parameters=collections.OrderedDict((k, torch.nn.Parameter(v.detach().clone(), requires_grad=False))
                                                    for k, v in (params or {}).items()),
                _buffers=collections.OrderedDict((k, v.detach().clone()) for k, v in (buffers or {}).items()),
                _non_persistent_buffers_set=set(),
                _forward_hooks=collections.OrderedDict(),
                _modules=collections.OrderedDict(modules or {}),
                **attrs))

        def __reduce__(self):
            return (_reconstruct_persistent_obj, (self.meta,))

    def write(G, path, conv_clamp=None, disc_tensors=1, g_scale=None):
        sd = G.state_dict()
        filt = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64
        gain = np.float64(1 / np.sqrt(G.w_dim))

        def affine(p):
            return Obj("FullyConnectedLayer", {"weight": sd[p + ".affine.weight"], "bias": sd[p + ".affine.bias"]},
                       activation="linear", weight_gain=gain, bias_gain=1)

        def layer(p, up):
            return Obj("SynthesisLayer", {k: sd[f"{p}.{k}"] for k in ("weight", "noise_strength", "bias")},
                       {"resample_filter": filt, "noise_const": sd[p + ".noise_const"]}, {"affine": affine(p)},
                       up=2 if up else 1, conv_clamp=conv_clamp, act_gain=np.float64(np.sqrt(2)))

        def torgb(p):
            return Obj("ToRGBLayer", {"weight": sd[p + ".weight"], "bias": sd[p + ".bias"]}, None,
                       {"affine": affine(p)}, conv_clamp=conv_clamp)

        kwargs = {"z_dim": G.z_dim, "w_dim": G.w_dim, "mapping_kwargs": easydict(num_layers=G.config.mapping_layers),
                  "synthesis_kwargs": easydict(channel_base=1024, conv_clamp=conv_clamp), "c_dim": 0}

        def generator(scale, shared=None):
            """A Generator object tree; ``shared`` re-uses another tree's sub-objects; ``scale`` != 1 makes the
            first mapping layer distinguishable (a non-EMA copy)."""
            if shared is not None:  # a distinct Generator object over the very same sub-network objects
                g = Obj("Generator")
                g.meta = {**shared.meta, "state": dict(shared.meta["state"])}
                return g
            blocks = {}
            for i, r in enumerate(G.config.resolutions):
                mods = ({"conv1": layer("convs.0", False)} if i == 0 else
                        {"conv0": layer(f"convs.{2 * i - 1}", True), "conv1": layer(f"convs.{2 * i}", False)})
                mods["torgb"] = torgb(f"torgbs.{i}")
                blocks[f"b{r}"] = Obj("SynthesisBlock", {"const": sd["const"]} if i == 0 else {},
                                      {"resample_filter": filt}, mods, architecture="skip", resolution=r)
            fcs = {f"fc{i}": Obj("FullyConnectedLayer", {"weight": sd[f"mapping_fcs.{i}.weight"] * (scale if i == 0
                                                                                                  else 1.0),
                                                        "bias": sd[f"mapping_fcs.{i}.bias"]},
                                 activation="lrelu", weight_gain=np.float64(0.01 / np.sqrt(G.w_dim)), bias_gain=0.01)
                   for i in range(G.config.mapping_layers)}
            mapping = Obj("MappingNetwork", None, {"w_avg": sd["w_avg"]}, fcs, z_dim=G.z_dim, c_dim=0,
                          num_ws=G.num_ws)
            syn = Obj("SynthesisNetwork", None, None, blocks)
            return Obj("Generator", None, None, {"synthesis": syn, "mapping": mapping}, z_dim=G.z_dim, c_dim=0,
                       w_dim=G.w_dim, img_resolution=G.resolution, img_channels=3, num_ws=G.num_ws, _init_args=(),
                       _init_kwargs=kwargs)

        g_ema = generator(1.0)
        g = generator(g_scale) if g_scale is not None else generator(1.0, shared=g_ema)
        disc = Obj("Discriminator", {f"w{i}": torch.randn(64, 64) for i in range(disc_tensors)})
        snap = {"training_set_kwargs": {"resolution": G.resolution}, "G": g, "D": disc, "G_ema": g_ema,
                "augment_pipe": None}
        with open(path, "wb") as f:
            pickle.dump(snap, f, protocol=4)
        return path

    return write


def images_equal(G1, G2, n=2, seed=0):
    z = torch.randn(n, G1.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return torch.equal(G1(z), G2(z)) and torch.equal(G1.mapping(z, 0.7), G2.mapping(z, 0.7))


# ------------------------------------------------------------------------------------------------ formats


def test_detects_fixture_formats():
    assert detect_format(FIXTURES / "ros64.pt") == "torch-zip"
    assert detect_format(FIXTURES / "nv64.pkl") == "pickle"
    assert load_generator(FIXTURES / "ros64.pt").checkpoint_info["format"] == "rosinality"
    assert load_generator(FIXTURES / "nv64.pkl").checkpoint_info["format"] == "nvidia"


@pytest.mark.parametrize("zip_format", [True, False])
def test_rosinality_round_trip_and_inferred_config(tmp_path, zip_format):
    G = make_tiny_generator(32, seed=1)
    path = tmp_path / "g.pt"
    torch.save({"g_ema": to_rosinality(G), "latent_avg": G.w_avg.clone()}, path,
               _use_new_zipfile_serialization=zip_format)  # old converted checkpoints use the legacy format
    assert detect_format(path) == ("torch-zip" if zip_format else "torch-legacy")
    H = load_generator(path)
    assert H.config == G.config and H.checkpoint_info["format"] == "rosinality"
    assert images_equal(G, H)


def test_rosinality_train_checkpoint_with_namespace_args(tmp_path):
    G = make_tiny_generator(16, seed=2)
    path = tmp_path / "000100.pt"
    sd = to_rosinality(G)
    torch.save({"g": sd, "d": {"w": torch.randn(4)}, "g_ema": sd, "g_optim": {"state": {}}, "d_optim": {},
                "args": argparse.Namespace(size=16, latent=32, n_mlp=2, channel_multiplier=2, lr=0.002),
                "ada_aug_p": 0.0}, path)
    H = load_generator(path)
    ws = G.mapping(torch.randn(2, G.z_dim))
    with torch.no_grad():
        assert torch.equal(G.synthesis(ws), H.synthesis(ws))
    # no latent_avg in train.py checkpoints: w_avg is estimated from the mapping network
    assert (H.w_avg - G.w_avg).abs().max() < 0.2
    assert any("latent_avg" in n for n in H.checkpoint_info["notes"])


def test_nvidia_snapshot_round_trip_uses_g_ema(tmp_path, nvidia_writer):
    G = make_tiny_generator(32, seed=3)
    path = nvidia_writer(G, tmp_path / "network-snapshot-000000.pkl", g_scale=3.0)
    H = load_generator(path)
    assert H.config == G.config and H.checkpoint_info["format"] == "nvidia"
    assert images_equal(G, H)


def test_nvidia_conv_clamp_is_read(tmp_path, nvidia_writer):
    G = make_tiny_generator(16, seed=4)
    H = load_generator(nvidia_writer(G, tmp_path / "s.pkl", conv_clamp=256))
    assert H.config.conv_clamp == 256.0


def test_nvidia_pickle_numpy_scalar_names(tmp_path, nvidia_writer):
    # numpy 1.x pickles name numpy.core.multiarray.scalar (the fixture), numpy 2 names numpy._core.multiarray.scalar
    assert b"numpy.core.multiarray" in (FIXTURES / "nv64.pkl").read_bytes()
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        path = nvidia_writer(make_tiny_generator(16), tmp_path / "np2.pkl")
        assert b"numpy._core.multiarray" in path.read_bytes()
        assert load_generator(path).resolution == 16


def test_own_format_round_trip_is_exact_and_weights_only(tmp_path):
    G = load_generator(FIXTURES / "nv64.pkl")
    path = tmp_path / "own.pt"
    save_generator(G, path, meta={"note": "test"})
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "latent-edit-generator"
    H = load_generator(path)
    assert H.checkpoint_info["format"] == "latent-edit"
    for (k1, v1), (k2, v2) in zip(G.state_dict().items(), H.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert fingerprint(G) == fingerprint(H)
    assert images_equal(G, H)


def test_delta_round_trip_is_exact(tmp_path):
    base = make_tiny_generator(32, seed=5)
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # like a few PTI steps: small changes to the synthesis weights only
        for conv in tuned.convs[3:]:
            conv.weight.add_(torch.randn_like(conv.weight) * 1e-3)
            conv.bias.add_(1e-7)
    full, delta = tmp_path / "full.pt", tmp_path / "delta.pt"
    save_generator(tuned, full)
    save_generator(tuned, delta, base=base)
    assert delta.stat().st_size < 0.8 * full.stat().st_size
    stored = torch.load(delta, weights_only=True)["tensors"]
    assert set(stored) == {f"convs.{i}.{p}" for i in range(3, 7) for p in ("weight", "bias")}
    H = load_generator(delta, base=base)
    for (k, v1), v2 in zip(tuned.state_dict().items(), H.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert images_equal(tuned, H)
    assert fingerprint(H) == fingerprint(tuned)
    # the base is untouched by loading
    assert torch.equal(base.convs[3].weight, make_tiny_generator(32, seed=5).convs[3].weight)


def test_delta_needs_the_matching_base(tmp_path):
    base = make_tiny_generator(16, seed=6)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.const.mul_(1.5)
    path = tmp_path / "delta.pt"
    save_generator(tuned, path, base=base)
    with pytest.raises(CheckpointError, match="base="):
        load_generator(path)
    with pytest.raises(CheckpointError, match="does not match"):
        load_generator(path, base=make_tiny_generator(16, seed=7))
    with pytest.raises(CheckpointError, match="architecture"):
        load_generator(path, base=make_tiny_generator(32, seed=6))


# ------------------------------------------------------------------------------------------------ safety


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _System(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match=r"(posix|os)\.system"):
        load_generator(path)
    assert not marker.exists()
    # sanity check of the test itself: the stock unpickler does run it
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("payload", ["builtins eval", "builtins exec", "subprocess Popen", "torch load",
                                     "torch_utils.persistence persistent_class"])
def test_disallowed_globals_are_named(tmp_path, payload):
    module, name = payload.split()
    raw = b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n)R."
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=f"{module}.{name}.*allow-list"):
        load_generator(path)


def test_malicious_storage_blob_is_refused(tmp_path, nvidia_writer):
    marker = tmp_path / "pwned"
    evil_blob = pickle.dumps(_System(marker), protocol=2)
    raw = (b"\x80\x04ctorch.storage\n_load_from_bytes\nC" + bytes([len(evil_blob)]) + evil_blob + b"\x85R.")
    path = tmp_path / "blob.pkl"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError):
        load_generator(path)
    assert not marker.exists()


def test_malicious_torch_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": _System(marker)}, path)
    with pytest.raises(CheckpointError, match="system"):
        load_generator(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("name", ["ros64.pt", "nv64.pkl"])
@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_files(tmp_path, name, fraction):
    data = (FIXTURES / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_generator(path)


def test_corrupt_pickle_bytes(tmp_path):
    data = bytearray((FIXTURES / "nv64.pkl").read_bytes())
    data[200:400] = b"\xff" * 200
    path = tmp_path / "bad.pkl"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_generator(path)


def test_missing_empty_directory_unknown(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_generator(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_generator(tmp_path / "empty.pt")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_generator(tmp_path / "x.png")
    torch.save({"model": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a StyleGAN2 generator"):
        load_generator(tmp_path / "other.pt")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(CheckpointError, match="not a network snapshot"):
        load_generator(tmp_path / "list.pkl")


def test_shape_mismatch_is_reported(tmp_path):
    G = make_tiny_generator(16, seed=8)
    sd = to_rosinality(G)
    sd["convs.1.conv.modulation.weight"] = torch.zeros(5, G.w_dim)
    torch.save({"g_ema": sd, "latent_avg": G.w_avg}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="shape mismatch.*convs.2.affine.weight"):
        load_generator(tmp_path / "bad.pt")
    sd = to_rosinality(G)
    del sd["convs.0.noise.weight"]
    torch.save({"g_ema": sd, "latent_avg": G.w_avg}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing tensor 'convs.0.noise.weight'"):
        load_generator(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------ memory

_MEASURE = textwrap.dedent("""
    import gc, sys, torch
    from core.stylegan2.formats import load_generator
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    for path in sys.argv[2:4]:  # warm up: lazy imports and first-call allocations are not weights
        load_generator(path)
    for path in sys.argv[4:]:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        before = status("VmRSS:")
        G = load_generator(path)
        print(path, status("VmHWM:") - before)
        del G
""")


def test_loading_holds_at_most_two_copies_of_the_weights(tmp_path, nvidia_writer):
    torch.manual_seed(0)
    cfg = GeneratorConfig(64, 256, 256, 4, {4: 256, 8: 256, 16: 256, 32: 128, 64: 64})
    G = Generator(cfg, init=False)
    with torch.no_grad():
        for t in G.state_dict().values():
            t.normal_()
    nbytes = sum(t.numel() * t.element_size() for t in G.state_dict().values())
    assert nbytes > 15e6
    ros = tmp_path / "ros.pt"
    torch.save({"g_ema": to_rosinality(G), "latent_avg": G.w_avg}, ros)
    own = tmp_path / "own.pt"
    save_generator(G, own)
    nv = nvidia_writer(G, tmp_path / "nv.pkl", disc_tensors=nbytes // (64 * 64 * 4), g_scale=2.0)
    del G
    warm = [str(FIXTURES / "ros64.pt"), str(FIXTURES / "nv64.pkl")]
    out = subprocess.run([sys.executable, "-c", _MEASURE, "-", *warm, str(ros), str(own), str(nv)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    peaks = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines()}
    for path, peak in peaks.items():
        # at most two copies (a memory-mapped file's pages count too), plus a little for Python objects
        assert peak <= 2 * nbytes + 2e6, (path, peak / 1e6, nbytes / 1e6)
    assert peaks[str(nv)] <= 1.3 * nbytes  # a snapshot's D and non-EMA G are never read


# ------------------------------------------------------------------------------------------------ CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_info_cli(tmp_path, capsys):
    from core.__main__ import main

    ok = _cli("info", str(FIXTURES / "nv64.pkl"))
    assert ok.returncode == 0, ok.stderr
    assert "format:         nvidia" in ok.stdout and "64:16" in ok.stdout and "num_ws:         10" in ok.stdout
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04garbage")
    bad = _cli("info", str(tmp_path / "junk.pt"))
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr and "corrupt" in bad.stderr
    capsys.readouterr()
    assert main(["info", str(tmp_path / "missing.pkl")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and err.count("\n") == 1
    assert main(["info", "--json", str(FIXTURES / "ros64.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "rosinality" and info["config"]["channels"]["16"] == 48 and info["num_ws"] == 10
