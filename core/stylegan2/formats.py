"""Generator checkpoints: load rosinality ``.pt``, NVIDIA stylegan2-ada-pytorch ``.pkl`` and our own ``.pt``; save ours.

Nothing here executes code from a checkpoint:

* zip / legacy ``torch.save`` files load with ``torch.load(weights_only=True)`` (plus ``argparse.Namespace``, which
  rosinality's train.py stores as ``args``); zip files are memory-mapped, so only the weights we use are read.
* NVIDIA pickles go through :class:`RestrictedUnpickler`: every global the pickle names is looked up in a short
  allow-list of *our own* replacement functions (never the real ``torch_utils``/``dnnlib`` code, never an import);
  embedded module source is ignored; tensors are rebuilt by parsing the legacy ``torch.save`` storage blobs here.
  Anything else is refused with a :class:`CheckpointError` naming the global.

Memory: weights are moved (not copied) into a generator built with uninitialised storage. Zip files are
memory-mapped; pickles are unpickled with their large storage blobs left in the file and read only for the
tensors of the network we use (never ``D`` or the non-EMA ``G``). Loading holds at most two copies of the weights.

Why one module of ~780 lines: every reader shares the restricted unpickler, the key-renaming tables and the
config inference, and split files would have to import each other's privates; the readers are short sections.

Our format (``save_generator``): ``torch.save`` of ``{"format": "latent-edit-generator", "version": 1,
"config": JSON, "meta": JSON, "tensors": {name: tensor}}``, loadable with ``weights_only=True``. With ``base``,
``tensors`` holds only the entries that differ from the base, as float differences (or bitwise XOR where a float
difference would not round-trip exactly), plus ``base_sha256`` (see :func:`fingerprint`).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import struct
import zipfile
from typing import Optional

import numpy as np
import torch

from core.common import LatentEditError
from core.stylegan2.network import Generator, GeneratorConfig, fir_kernel

FORMAT_TAG = "latent-edit-generator"
FORMAT_VERSION = 1
W_AVG_SAMPLES = 4096  # rosinality mean_latent(4096): used when a checkpoint has no stored average W


class CheckpointError(LatentEditError):
    """A checkpoint file cannot be used; the message names the file and the problem."""

    code = "checkpoint_error"


# ================================================================================================= public API


def load_generator(path, device="cpu", base: Optional[Generator] = None) -> Generator:
    """Load a generator from any supported file (format detected from the content, not the name).

    Returns an eval-mode :class:`Generator` on ``device`` with ``.checkpoint_info = {"format", "path", "notes"}``.
    ``base`` is required for (and only used by) delta files written by ``save_generator(G, path, base=...)``.
    """
    path = pathlib.Path(path)
    kind = detect_format(path)
    notes: list = []
    if kind == "torch-zip" or kind == "torch-legacy":
        obj = _torch_load(path, mmap=kind == "torch-zip")
        fmt, G = _from_torch_object(obj, path, base, notes)
    else:  # "pickle"
        fmt, G = "nvidia", _load_nvidia(path, notes)
    G.checkpoint_info = {"format": fmt, "path": str(path), "notes": notes}
    return G.to(device).eval()


def save_generator(G: Generator, path, base: Optional[Generator] = None, meta: Optional[dict] = None) -> None:
    """Write ``G`` in our safe format; with ``base``, only what differs from ``base`` (exactly reversible)."""
    path = pathlib.Path(path)
    state = _own_state(G)
    record = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "config": json.dumps(G.config.to_dict()),
        "meta": json.dumps(meta or {}),
    }
    if base is None:
        record["tensors"] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    else:
        if base.config.to_dict() != G.config.to_dict():
            raise CheckpointError("save_generator: base has a different architecture than the generator")
        base_state = _own_state(base)
        tensors, kinds = {}, {}
        for name, value in state.items():
            ref = base_state[name].detach().cpu()
            value = value.detach().cpu()
            if value.dtype != ref.dtype or value.shape != ref.shape:
                raise CheckpointError(f"save_generator: {name} differs from the base in shape or dtype")
            if torch.equal(value, ref):
                continue
            diff, kind = _encode_difference(value, ref)
            tensors[name], kinds[name] = diff, kind
        record.update(tensors=tensors, delta_kinds=json.dumps(kinds), base_sha256=fingerprint(base))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    os.replace(tmp, path)


def fingerprint(G: Generator) -> str:
    """sha256 over the architecture and every persistent tensor (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(G.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(_own_state(G).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def detect_format(path) -> str:
    """'torch-zip', 'torch-legacy' or 'pickle' from the file's first bytes; CheckpointError otherwise."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"checkpoint is empty: {path}")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        # legacy torch.save starts with a protocol-2 pickle of the magic number 0x1950a86a20f9469cfc6c
        if head.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"):
            return "torch-legacy"
        return "pickle"
    raise CheckpointError(
        f"unknown checkpoint format: {path} (expected a rosinality/latent-edit .pt or an NVIDIA .pkl; "
        f"file starts with {head[:8]!r})"
    )


# ================================================================================================= torch.save files


def _torch_load(path: pathlib.Path, mmap: bool):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found:
            raise CheckpointError(f"refusing to load {path}: the file references {found.group(1)}, which is not on "
                                  f"the allow-list (it could run code)") from None
        detail = next((ln for ln in msg.splitlines() if ln.strip() and not ln.startswith("Weights only")), msg)
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {_first_line(detail)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {_first_line(str(e))}") from None


def _from_torch_object(obj, path, base, notes):
    if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        return "latent-edit", _from_own(obj, path, base, notes)
    if isinstance(obj, dict) and "g_ema" in obj and isinstance(obj["g_ema"], dict):
        latent_avg = obj.get("latent_avg")
        if "args" in obj:
            notes.append("rosinality train.py checkpoint: using g_ema")
        return "rosinality", _from_rosinality(obj["g_ema"], latent_avg, path, notes)
    if isinstance(obj, dict) and "style.1.weight" in obj:
        return "rosinality", _from_rosinality(obj, None, path, notes)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and \
            any(str(k).startswith("decoder.") for k in obj["state_dict"]):
        return "e4e/psp", _from_encoder_file(obj, path, notes)
    keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"unknown checkpoint content in {path}: not a StyleGAN2 generator (found {keys})")


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else "unreadable"


# ================================================================================================= building


def check_tensors_match(path, state: dict, expected: dict, prefix: str = "") -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``expected``'s names and shapes."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: tensor names do not match the inferred architecture "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: shape mismatch for {prefix}{name}: file has {tuple(state[name].shape)}, "
                                  f"architecture needs {tuple(ref.shape)}")


def _build(config: GeneratorConfig, state: dict, path, w_avg_missing: bool = False) -> Generator:
    """Move ``state`` (our names) into a new generator (the tensors are assigned, not copied)."""
    G = Generator(config, init=False)  # uninitialised (untouched) memory, replaced below without a copy
    expected = G.state_dict()
    check_tensors_match(path, state, expected)
    for name, ref in expected.items():
        if not state[name].is_floating_point():
            raise CheckpointError(f"{path}: {name} is not a floating-point tensor ({state[name].dtype})")
    G.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if w_avg_missing:
        G.reset_w_avg(W_AVG_SAMPLES)
    return G.requires_grad_(False)


def _own_state(G: Generator) -> dict:
    return {k: v for k, v in G.state_dict().items()}


def _take(sd: dict, key: str, path) -> torch.Tensor:
    try:
        t = sd.pop(key)
    except KeyError:
        raise CheckpointError(f"{path}: missing tensor {key!r}") from None
    if not isinstance(t, (torch.Tensor, LazyTensor)):
        raise CheckpointError(f"{path}: {key!r} is not a tensor")
    return t


def _own(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor owning its memory (mmap-backed and strided views are copied once)."""
    return t.to(torch.float32).clone(memory_format=torch.contiguous_format)


def _check_fir(t: torch.Tensor, gain: float, what: str, path) -> None:
    t = _materialise(t)
    if tuple(t.shape) != (4, 4) or not torch.allclose(t.float(), fir_kernel() * gain, atol=1e-6):
        raise CheckpointError(f"{path}: {what} is not the standard [1,3,3,1] filter; unsupported architecture")


# ================================================================================================= rosinality


def rosinality_config(sd: dict, path="checkpoint") -> GeneratorConfig:
    """Infer the architecture from a rosinality ``g_ema`` state dict (fixtures README §4.1)."""
    try:
        n_mlp = 0
        while f"style.{n_mlp + 1}.weight" in sd:
            n_mlp += 1
        if n_mlp == 0:
            raise CheckpointError(f"{path}: no mapping layers (style.1.weight) found")
        w_dim, z_dim = sd["style.1.weight"].shape
        n_rgb = 0
        while f"to_rgbs.{n_rgb}.conv.weight" in sd:
            n_rgb += 1
        channels = {4: int(sd["input.input"].shape[1])}
        for i in range(n_rgb):
            channels[2 ** (i + 3)] = int(sd[f"convs.{2 * i}.conv.weight"].shape[1])
        last_w = sd[f"style.{n_mlp}.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e.args[0]!r} (not a rosinality generator?)") from None
    if last_w != w_dim:
        raise CheckpointError(f"{path}: mapping layers of unequal width are not supported")
    return GeneratorConfig(resolution=4 * 2 ** n_rgb, z_dim=int(z_dim), w_dim=int(w_dim), mapping_layers=n_mlp,
                           channels=channels)


def _from_rosinality(sd: dict, latent_avg, path, notes) -> Generator:
    sd = dict(sd)  # we pop from it; the caller's dict is left alone
    cfg = rosinality_config(sd, path)
    out = {}
    for i in range(cfg.mapping_layers):
        out[f"mapping_fcs.{i}.weight"] = _own(_take(sd, f"style.{i + 1}.weight", path))
        out[f"mapping_fcs.{i}.bias"] = _own(_take(sd, f"style.{i + 1}.bias", path))
    out["const"] = _own(_take(sd, "input.input", path)[0])

    def conv(dst, src, noise_idx):
        w = _take(sd, f"{src}.conv.weight", path)
        if w.ndim != 5 or w.shape[0] != 1:
            raise CheckpointError(f"{path}: {src}.conv.weight has shape {tuple(w.shape)}, expected [1,out,in,3,3]")
        out[f"{dst}.weight"] = _own(w[0])
        out[f"{dst}.affine.weight"] = _own(_take(sd, f"{src}.conv.modulation.weight", path))
        out[f"{dst}.affine.bias"] = _own(_take(sd, f"{src}.conv.modulation.bias", path))
        out[f"{dst}.noise_strength"] = _own(_take(sd, f"{src}.noise.weight", path).reshape(()))
        out[f"{dst}.bias"] = _own(_take(sd, f"{src}.activate.bias", path))
        noise = _take(sd, f"noises.noise_{noise_idx}", path)
        out[f"{dst}.noise_const"] = _own(noise.reshape(noise.shape[-2:]))
        if f"{src}.conv.blur.kernel" in sd:
            _check_fir(sd.pop(f"{src}.conv.blur.kernel"), 4.0, f"{src}.conv.blur.kernel", path)

    def rgb(dst, src):
        w = _take(sd, f"{src}.conv.weight", path)
        out[f"{dst}.weight"] = _own(w[0])
        out[f"{dst}.affine.weight"] = _own(_take(sd, f"{src}.conv.modulation.weight", path))
        out[f"{dst}.affine.bias"] = _own(_take(sd, f"{src}.conv.modulation.bias", path))
        out[f"{dst}.bias"] = _own(_take(sd, f"{src}.bias", path).reshape(-1))
        if f"{src}.upsample.kernel" in sd:
            _check_fir(sd.pop(f"{src}.upsample.kernel"), 4.0, f"{src}.upsample.kernel", path)

    conv("convs.0", "conv1", 0)
    rgb("torgbs.0", "to_rgb1")
    for i in range(len(cfg.resolutions) - 1):
        conv(f"convs.{2 * i + 1}", f"convs.{2 * i}", 2 * i + 1)
        conv(f"convs.{2 * i + 2}", f"convs.{2 * i + 1}", 2 * i + 2)
        rgb(f"torgbs.{i + 1}", f"to_rgbs.{i}")
    leftovers = [k for k in sd if not k.startswith("noises.")]
    if leftovers:
        notes.append(f"ignored {len(leftovers)} unused tensors (e.g. {leftovers[0]})")
    if latent_avg is None:
        notes.append(f"no latent_avg stored: w_avg estimated from {W_AVG_SAMPLES} samples")
        out["w_avg"] = torch.zeros(cfg.w_dim)
    else:
        out["w_avg"] = _own(latent_avg.reshape(-1))
    return _build(cfg, out, path, w_avg_missing=latent_avg is None)


# ================================================================================================= e4e / pSp files


def _from_encoder_file(obj: dict, path, notes) -> Generator:
    """The ``decoder.*`` of an e4e/pSp checkpoint (its vendored rosinality generator) with the prefix stripped.

    ``latent_avg`` becomes ``w_avg`` when it is one W (a vector, or a W+ code with equal rows); otherwise ``w_avg``
    is estimated from samples.  Files without the decoder's ``noises.*`` buffers get zero noise maps (noted).
    """
    sd = {str(k)[len("decoder."):]: v for k, v in obj["state_dict"].items() if str(k).startswith("decoder.")}
    opts = obj.get("opts")
    kind = (vars(opts) if isinstance(opts, argparse.Namespace) else opts or {}).get("encoder_type", "encoder")
    notes.append(f"e4e/pSp checkpoint ({kind}): using its decoder")
    latent = obj.get("latent_avg")
    if torch.is_tensor(latent) and latent.is_floating_point():
        rows = latent.detach().float().reshape(-1, latent.shape[-1])
        latent = rows[0] if bool((rows == rows[0]).all()) else None
        if latent is None:
            notes.append("latent_avg has unequal rows (not one W)")
    else:
        latent = None
    missing_noise = [k for k in _noise_names(sd) if k not in sd]
    if missing_noise:
        cfg = rosinality_config(sd, path)
        for idx, name in enumerate(_noise_names(sd)):
            if name not in sd:
                res = 2 ** ((idx + 5) // 2)
                sd[name] = torch.zeros(1, 1, res, res)
        notes.append(f"no stored noise maps ({len(missing_noise)} missing): zero noise at {cfg.resolution} px")
    return _from_rosinality(sd, latent, path, notes)


def _noise_names(sd: dict) -> list:
    n_conv = 1
    while f"convs.{n_conv - 1}.conv.weight" in sd:
        n_conv += 1
    return [f"noises.noise_{i}" for i in range(n_conv)]


# ================================================================================================= our format


def _from_own(obj: dict, path, base, notes) -> Generator:
    if obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported latent-edit format version {obj.get('version')!r}")
    try:
        cfg = GeneratorConfig.from_dict(json.loads(obj["config"]))
        tensors = obj["tensors"]
    except (KeyError, ValueError, TypeError, LatentEditError) as e:
        raise CheckpointError(f"{path}: damaged latent-edit header ({e})") from None
    meta = json.loads(obj.get("meta") or "{}")
    if meta:
        notes.append(f"meta: {json.dumps(meta)[:200]}")
    if "base_sha256" not in obj:
        return _build(cfg, {k: _own(v) for k, v in tensors.items()}, path)
    want = obj["base_sha256"]
    if base is None:
        raise CheckpointError(f"{path} stores only the changes to a base generator (sha256 {want[:12]}…); "
                              f"load it with load_generator(path, base=<that generator>)")
    if base.config.to_dict() != cfg.to_dict():
        raise CheckpointError(f"{path}: the base generator has a different architecture than this delta")
    got = fingerprint(base)
    if got != want:
        raise CheckpointError(f"{path}: the base generator does not match (delta expects sha256 {want[:12]}…, "
                              f"base has {got[:12]}…)")
    kinds = json.loads(obj.get("delta_kinds") or "{}")
    state = {k: v.detach().cpu().clone() for k, v in _own_state(base).items()}
    for name, diff in tensors.items():
        if name not in state:
            raise CheckpointError(f"{path}: delta names an unknown tensor {name!r}")
        if tuple(diff.shape) != tuple(state[name].shape):
            raise CheckpointError(f"{path}: shape mismatch for {name}: delta {tuple(diff.shape)}, "
                                  f"base {tuple(state[name].shape)}")
        state[name] = _decode_difference(state[name], diff, kinds.get(name, "add"))
    notes.append(f"delta against base {want[:12]}… ({len(tensors)} tensors changed)")
    return _build(cfg, state, path)


def _encode_difference(value: torch.Tensor, ref: torch.Tensor):
    diff = value - ref
    if torch.equal(ref + diff, value):
        return diff.contiguous(), "add"
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}[value.dtype]
    return (value.contiguous().view(ints) ^ ref.contiguous().view(ints)).contiguous(), "xor"


def _decode_difference(ref: torch.Tensor, diff: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "add":
        return ref + diff.to(ref.dtype)
    if kind == "xor":
        return (ref.contiguous().view(diff.dtype) ^ diff).view(ref.dtype)
    raise CheckpointError(f"unknown delta kind {kind!r}")


# ================================================================================================= NVIDIA pickles


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a plain dict subclass; no code from the pickle)."""


class PersistentObject:
    """What ``torch_utils.persistence`` objects unpickle to here: the class name and the raw ``__dict__``."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def child(self, name):
        mods = self.state.get("_modules") or {}
        if name not in mods:
            raise KeyError(name)
        return mods[name]

    def tensors(self, prefix=""):
        """Flat ``{dotted name: tensor}`` of parameters and buffers (like ``state_dict``)."""
        out = {}
        for group in ("_parameters", "_buffers"):
            for k, v in (self.state.get(group) or {}).items():
                if v is not None:
                    out[prefix + k] = v
        for k, m in (self.state.get("_modules") or {}).items():
            if isinstance(m, PersistentObject):
                out.update(m.tensors(prefix + k + "."))
        return out


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_BLOB_HEADER_BYTES = 4096  # enough for the header pickles of a legacy storage blob


class _BlobUnpickler(pickle.Unpickler):
    """Reads the small header pickles inside a legacy storage blob; only ``torch.<X>Storage`` names resolve."""

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"disallowed global {module}.{name} (inside a storage blob)")

    def persistent_load(self, pid):
        return ("pid", pid)


def _parse_blob_header(head: bytes):
    """Header of a legacy ``torch.save(storage)`` blob (fixtures README §5.3) → (dtype, numel, data offset)."""
    f = io.BytesIO(head)
    up = _BlobUnpickler(f)
    if up.load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("storage blob has a wrong magic number")
    if up.load() != 1001:
        raise pickle.UnpicklingError("storage blob has an unsupported protocol version")
    info = up.load()
    if not isinstance(info, dict) or not info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian storage blobs are not supported")
    root = up.load()
    pid = root[1] if isinstance(root, tuple) and root[:1] == ("pid",) else None
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
        raise pickle.UnpicklingError("storage blob does not hold a storage")
    keys = up.load()
    if not isinstance(keys, list) or len(keys) != 1:
        raise pickle.UnpicklingError("storage blob must hold exactly one storage")
    pos = f.tell()
    (count,) = struct.unpack_from("<q", head, pos)
    if count != int(pid[4]) or count < 0:
        raise pickle.UnpicklingError("storage blob has an inconsistent size")
    return pid[1], count, pos + 8


class LazyBlob:
    """A large byte string of the pickle, left in the file: ``length`` bytes at ``offset``."""

    def __init__(self, file, offset: int, length: int):
        self.file, self.offset, self.length = file, offset, length

    def read(self, start: int, n: int) -> bytearray:
        if start < 0 or n < 0 or start + n > self.length:
            raise pickle.UnpicklingError("storage blob is truncated")
        buf = bytearray(n)
        view, pos = memoryview(buf), self.offset + start
        while view:  # positional reads: the unpickler's position in the file is not disturbed
            got = os.preadv(self.file.fileno(), [view], pos)
            if got <= 0:
                raise pickle.UnpicklingError("storage blob is truncated")
            view, pos = view[got:], pos + got
        return buf


class LazyStorage:
    """A flat storage whose data is read from the file only when a tensor of it is materialised."""

    def __init__(self, blob: LazyBlob, data_offset: int, dtype: torch.dtype, numel: int):
        self.blob, self.data_offset, self.dtype, self.numel = blob, data_offset, dtype, numel

    def load(self) -> torch.Tensor:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        buf = self.blob.read(self.data_offset, self.numel * itemsize)
        return torch.frombuffer(buf, dtype=self.dtype) if self.numel else torch.empty(0, dtype=self.dtype)


class LazyTensor:
    """``_rebuild_tensor_v2`` arguments over a :class:`LazyStorage`; :meth:`load` reads it."""

    def __init__(self, storage: LazyStorage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.shape = torch.Size(size)

    def load(self) -> torch.Tensor:
        return _view(self.storage.load(), self.offset, self.size, self.stride)


def _view(flat: torch.Tensor, offset, size, stride) -> torch.Tensor:
    need = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(n > 0 for n in size) else 0
    if offset < 0 or need > flat.numel():
        raise pickle.UnpicklingError("tensor extends beyond its storage")
    t = torch.as_strided(flat, tuple(size), tuple(stride), int(offset))
    if t.is_contiguous() and int(offset) == 0 and t.numel() == flat.numel():
        return t
    return t.clone()


def parse_storage_blob(blob):
    """The allowed ``torch.storage._load_from_bytes``: a legacy storage blob → flat tensor or :class:`LazyStorage`."""
    if isinstance(blob, LazyBlob):
        head = bytes(blob.read(0, min(blob.length, _BLOB_HEADER_BYTES)))
        dtype, numel, pos = _parse_blob_header(head)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if pos + numel * itemsize > blob.length:
            raise pickle.UnpicklingError("storage blob is truncated")
        return LazyStorage(blob, pos, dtype, numel)
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage blob is not a byte string")
    if bytes(blob[:2]) == b"PK":  # newer zip-format blob: torch's own safe loader
        obj = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
        if not isinstance(obj, (torch.TypedStorage, torch.UntypedStorage)):
            raise pickle.UnpicklingError("storage blob does not hold a storage")
        dtype = obj.dtype if isinstance(obj, torch.TypedStorage) else torch.uint8
        return torch.tensor([], dtype=dtype).set_(obj.untyped_storage() if isinstance(obj, torch.TypedStorage)
                                                  else obj)
    dtype, numel, pos = _parse_blob_header(bytes(blob[:_BLOB_HEADER_BYTES]))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if pos + numel * itemsize > len(blob):
        raise pickle.UnpicklingError("storage blob is truncated")
    return torch.frombuffer(bytearray(blob[pos : pos + numel * itemsize]), dtype=dtype) if numel else \
        torch.empty(0, dtype=dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if isinstance(storage, LazyStorage):
        return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor without a storage")
    return _view(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, (torch.Tensor, LazyTensor)):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("unsupported numpy scalar")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden
    """Unpickler for stylegan2-ada-pytorch network pickles that never runs code from the file.

    Every global resolves to one of our own functions/classes (``allowed``); anything else raises
    ``UnpicklingError`` naming it.  ``torch_utils.persistence`` objects become :class:`PersistentObject`.
    BINBYTES payloads (the storage blobs) are skipped in the file and read only for the tensors we use, so
    ``D`` and the non-EMA ``G`` of a training snapshot never occupy memory.
    """

    def __init__(self, file):
        super().__init__(file)
        self._file = file
        self._size = os.fstat(file.fileno()).st_size
        self._frame_offset = 0
        self.allowed = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
            ("dnnlib.util", "EasyDict"): EasyDict,
            ("dnnlib", "EasyDict"): EasyDict,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): parse_storage_blob,
            ("numpy.core.multiarray", "scalar"): _numpy_scalar,
            ("numpy._core.multiarray", "scalar"): _numpy_scalar,
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module, name):
        fn = self.allowed.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"disallowed global {module}.{name}")
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("unexpected persistent id in a network pickle")

    def _bytes(self, n: int) -> LazyBlob:
        """Skip a BINBYTES payload, remembering where it lies in the file (inside a frame or not)."""
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getbuffer()):
            offset = self._frame_offset + frame.tell()
            if frame.tell() + n > len(frame.getbuffer()):
                raise pickle.UnpicklingError("byte string crosses a frame boundary")
            frame.seek(n, os.SEEK_CUR)
        else:
            offset = self._file.tell()
            if offset + n > self._size:
                raise EOFError("pickle data was truncated")
            self._file.seek(n, os.SEEK_CUR)
        return LazyBlob(self._file, offset, n)

    def load_frame(self):
        pickle._Unpickler.load_frame(self)
        self._frame_offset = self._file.tell() - len(self._unframer.current_frame.getbuffer())

    def load_binbytes(self):
        (n,) = struct.unpack("<I", self.read(4))
        self.append(self._bytes(n))

    def load_binbytes8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(self._bytes(n))

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.FRAME[0]] = load_frame


def _persistent_object(meta):
    """The allowed ``torch_utils.persistence._reconstruct_persistent_obj``: keeps the state, runs no source."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("unsupported torch_utils.persistence record (only classes are supported)")
    return PersistentObject(str(meta.get("class_name")), meta["state"])


def _materialise(t) -> torch.Tensor:
    return t.load() if isinstance(t, LazyTensor) else t


def _load_nvidia(path: pathlib.Path, notes) -> Generator:
    with open(path, "rb") as f:  # open until the lazily read storages are materialised
        try:
            data = RestrictedUnpickler(f).load()
            G = _pick_generator(data, path, notes)
            return _from_nvidia_obj(G, path, notes)
        except pickle.UnpicklingError as e:
            msg = str(e)
            if msg.startswith("disallowed global"):
                name = msg[len("disallowed global "):]
                raise CheckpointError(f"refusing to load {path}: the pickle references {name}, which is not on the "
                                      f"allow-list (it could run code)") from None
            raise CheckpointError(f"corrupt or unsupported pickle {path}: {msg}") from None
        except (EOFError, struct.error) as e:
            raise CheckpointError(f"truncated pickle {path} ({type(e).__name__}: {e})") from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, MemoryError) as e:
            raise CheckpointError(f"corrupt pickle {path}: {type(e).__name__}: {_first_line(str(e))}") from None


def _pick_generator(data, path, notes) -> PersistentObject:
    if isinstance(data, PersistentObject):
        G = data
    elif isinstance(data, dict):
        G = next((data[k] for k in ("G_ema", "G") if isinstance(data.get(k), PersistentObject)), None)
        if G is None:
            raise CheckpointError(f"{path}: pickle has no 'G_ema' or 'G' network (keys {sorted(map(str, data))})")
        notes.append("using G_ema" if data.get("G_ema") is G else "no G_ema: using G")
    else:
        raise CheckpointError(f"{path}: pickle holds a {type(data).__name__}, not a network snapshot")
    if G.class_name != "Generator":
        raise CheckpointError(f"{path}: expected a Generator, found {G.class_name}")
    return G


def _from_nvidia_obj(G: PersistentObject, path, notes) -> Generator:
    attrs = G.state
    if attrs.get("c_dim", 0):
        raise CheckpointError(f"{path}: conditional generators (c_dim={attrs['c_dim']}) are not supported")
    if attrs.get("img_channels", 3) != 3:
        raise CheckpointError(f"{path}: only 3-channel generators are supported")
    try:
        syn = G.child("synthesis")
        G.child("mapping")
    except KeyError as e:
        raise CheckpointError(f"{path}: Generator has no {e.args[0]} network") from None
    sd = G.tensors()
    for blk in (syn.state.get("_modules") or {}).values():
        arch = blk.state.get("architecture", "skip") if isinstance(blk, PersistentObject) else "skip"
        if arch != "skip":
            raise CheckpointError(f"{path}: synthesis architecture {arch!r} is not supported (only 'skip')")
    clamps = {sub.state.get("conv_clamp") for blk in (syn.state.get("_modules") or {}).values()
              if isinstance(blk, PersistentObject) for sub in (blk.state.get("_modules") or {}).values()
              if isinstance(sub, PersistentObject) and "conv_clamp" in sub.state}
    if len(clamps) > 1:
        raise CheckpointError(f"{path}: layers use different conv_clamp values {sorted(map(str, clamps))}")
    clamp = clamps.pop() if clamps else None
    if clamp is not None and not isinstance(clamp, (int, float)):
        raise CheckpointError(f"{path}: conv_clamp has an unexpected value {clamp!r}")
    cfg = nvidia_config(sd, path)
    if clamp is not None:
        cfg.conv_clamp = float(clamp)
        notes.append(f"conv_clamp={clamp:g}")
    out = {}
    for i in range(cfg.mapping_layers):
        out[f"mapping_fcs.{i}.weight"] = _take(sd, f"mapping.fc{i}.weight", path)
        out[f"mapping_fcs.{i}.bias"] = _take(sd, f"mapping.fc{i}.bias", path)
    out["w_avg"] = _take(sd, "mapping.w_avg", path)
    out["const"] = _take(sd, "synthesis.b4.const", path)
    for r in cfg.resolutions:
        _check_fir(_take(sd, f"synthesis.b{r}.resample_filter", path), 1.0, f"synthesis.b{r}.resample_filter", path)

    def conv(dst, src):
        for a, b in (("weight", "weight"), ("noise_strength", "noise_strength"), ("bias", "bias"),
                     ("noise_const", "noise_const"), ("affine.weight", "affine.weight"),
                     ("affine.bias", "affine.bias")):
            out[f"{dst}.{a}"] = _take(sd, f"{src}.{b}", path)
        _check_fir(_take(sd, f"{src}.resample_filter", path), 1.0, f"{src}.resample_filter", path)

    def rgb(dst, src):
        for a in ("weight", "bias", "affine.weight", "affine.bias"):
            out[f"{dst}.{a}"] = _take(sd, f"{src}.{a}", path)

    conv("convs.0", "synthesis.b4.conv1")
    rgb("torgbs.0", "synthesis.b4.torgb")
    for i, r in enumerate(cfg.resolutions[1:]):
        conv(f"convs.{2 * i + 1}", f"synthesis.b{r}.conv0")
        conv(f"convs.{2 * i + 2}", f"synthesis.b{r}.conv1")
        rgb(f"torgbs.{i + 1}", f"synthesis.b{r}.torgb")
    if sd:
        notes.append(f"ignored {len(sd)} unused tensors (e.g. {next(iter(sd))})")
    return _build(cfg, {k: _materialise(v) for k, v in out.items()}, path)


def nvidia_config(sd: dict, path="checkpoint") -> GeneratorConfig:
    """Infer the architecture from a flat ``G_ema`` state dict (NVIDIA names, fixtures README §5.4)."""
    try:
        n = 0
        while f"mapping.fc{n}.weight" in sd:
            n += 1
        if n == 0:
            raise CheckpointError(f"{path}: no mapping layers (mapping.fc0.weight) found")
        z_dim = sd["mapping.fc0.weight"].shape[1]
        w_dim = sd[f"mapping.fc{n - 1}.weight"].shape[0]
        widths = {sd[f"mapping.fc{i}.weight"].shape[0] for i in range(n)}
        channels = {4: int(sd["synthesis.b4.const"].shape[0])}
        r = 8
        while f"synthesis.b{r}.conv0.weight" in sd:
            channels[r] = int(sd[f"synthesis.b{r}.conv0.weight"].shape[0])
            r *= 2
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e.args[0]!r} (not a stylegan2-ada generator?)") from None
    if widths != {w_dim}:
        raise CheckpointError(f"{path}: mapping layers of unequal width are not supported")
    return GeneratorConfig(resolution=r // 2, z_dim=int(z_dim), w_dim=int(w_dim), mapping_layers=n,
                           channels=channels)
