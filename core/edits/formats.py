"""Reading and writing edit directions in every common file format (``core.edits.formats``).

Formats read by :func:`load_directions` (see docs/architecture.md for the manifest):

* InterfaceGAN / PTI / e4e ``.pt`` tensors ``[1,512]`` and ``[1,18,512]``;
* unit-normal InterfaceGAN ``(1,512)`` ``.npy`` boundaries (float64 too) and Chunkmogrify ``(18,512)`` ``.npy``
  arrays with a layer range;
* GANSpace ``{mean, comp, std}`` ``.pt``/``.npz`` files with presets ``(component, start, end, strength)`` where,
  as in the GANSpace/PTI code, ``end`` is exclusive; one unit of strength is one standard deviation of W along
  the component.  PTI's editor *sets* the coordinate to ``strength``; here it is *added*, so that strength 0
  is the identity and several edits sum (the only form a slider on a photo's own code can use);
* our manifest ``*.directions.json`` bundling any of these (plus S-space edits) with names, descriptions,
  default strengths, ranges and scales (:func:`save_manifest` writes it).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from core.common import LatentEditError
from core.edits.directions import Direction, DirectionError

MANIFEST_FORMAT = "latent-edit-directions"
MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".directions.json"

# PTI scripts/latent_editor_wrapper.py: GANSpace presets (component, start, end-exclusive, strength) for ffhq_pca.pt.
PTI_GANSPACE_PRESETS = {
    "eye_openness": (54, 7, 8, 5.0),
    "smile": (46, 4, 5, -6.0),
    "trimmed_beard": (58, 7, 9, 7.0),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _squeeze_vector(arr: np.ndarray, what: str) -> np.ndarray:
    """Drop leading singleton axes: [1,512] -> (512,), [1,18,512] -> (18,512)."""
    a = np.asarray(arr)
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (1, 2) or a.size == 0:
        raise DirectionError(f"{what}: expected a (w_dim,), (1,w_dim), (num_ws,w_dim) or (1,num_ws,w_dim) array, "
                             f"got shape {tuple(np.asarray(arr).shape)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise DirectionError(f"{what}: expected floating-point values, got {a.dtype}")
    if not np.isfinite(a).all():
        raise DirectionError(f"{what}: contains NaN or infinite values")
    return a.astype(np.float32)


def _name_of(path: pathlib.Path) -> str:
    name = path.name
    for suffix in (".npy", ".npz", ".pt", ".pth"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _torch_load(path: pathlib.Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that is not plain tensors
        raise DirectionError(f"{path.name}: cannot read as a tensor file ({type(exc).__name__}: {exc})") from None


def _read_array(path: pathlib.Path):
    """A ``.npy``/``.npz``/``.pt`` file -> numpy array, or a dict of arrays for GANSpace files."""
    if not path.is_file():
        raise DirectionError(f"direction file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DirectionError(f"{path.name}: cannot read as .npy ({exc})") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as exc:
            raise DirectionError(f"{path.name}: cannot read as .npz ({exc})") from None
    if suffix in (".pt", ".pth"):
        obj = _torch_load(path)
        if isinstance(obj, torch.Tensor):
            return obj.detach().float().numpy()
        if isinstance(obj, Mapping) and {"comp", "std"} <= set(obj):
            return {k: (v.detach().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in obj.items()}
        raise DirectionError(f"{path.name}: not a direction tensor or a GANSpace {{mean, comp, std}} file")
    raise DirectionError(f"{path.name}: unknown direction file type {suffix!r} (expected .npy, .npz, .pt)")


def read_vector(path, name: Optional[str] = None, layers=None, **fields) -> Direction:
    """One W direction from an InterfaceGAN/PTI/e4e ``.pt`` (``[1,512]``, ``[1,18,512]``) or a ``.npy``
    (``(1,512)`` boundary, ``(18,512)`` Chunkmogrify array). ``layers`` is inclusive ``(first, last)``."""
    path = pathlib.Path(path)
    arr = _read_array(path)
    if isinstance(arr, dict):
        raise DirectionError(f"{path.name}: a GANSpace file; use read_ganspace")
    vec = _squeeze_vector(arr, path.name)
    fields.setdefault("source", path.name)
    return Direction(name or _name_of(path), torch.from_numpy(vec), layers=layers, **fields)


def read_ganspace(path_or_dict, presets: Optional[Mapping[str, Sequence]] = None, n_components: int = 10,
                  prefix: str = "pca") -> dict:
    """Directions from a GANSpace ``{mean, comp, std}`` file or dict (``comp`` ``(K,[1,]w_dim)``, ``std`` ``(K,)``).

    ``presets`` maps a name to ``(component, start, end, strength)`` (``end`` exclusive, as in the GANSpace/PTI
    code); the direction gets ``layers=(start, end-1)``, ``scale=std[component]`` and
    ``default_strength=strength``. Without presets: PTI's three FFHQ presets when they fit the file
    (512-dim, enough components), else the first ``n_components`` components over all layers, named ``pca_<k>``.
    """
    if isinstance(path_or_dict, Mapping):
        data, source = path_or_dict, "ganspace"
    else:
        path = pathlib.Path(path_or_dict)
        data, source = _read_array(path), path.name
        if not isinstance(data, dict):
            raise DirectionError(f"{path.name}: not a GANSpace {{mean, comp, std}} file")
    try:
        comp = np.asarray(data["comp"], dtype=np.float32)
        std = np.asarray(data["std"], dtype=np.float32).reshape(-1)
    except KeyError as exc:
        raise DirectionError(f"{source}: GANSpace data lacks {exc}") from None
    comp = comp.reshape(comp.shape[0], -1) if comp.ndim >= 2 else comp.reshape(1, -1)
    if comp.shape[0] != std.shape[0]:
        raise DirectionError(f"{source}: {comp.shape[0]} components but {std.shape[0]} standard deviations")
    if not (np.isfinite(comp).all() and np.isfinite(std).all()):
        raise DirectionError(f"{source}: contains NaN or infinite values")
    if presets is None:
        fits = comp.shape[1] == 512 and comp.shape[0] > max(p[0] for p in PTI_GANSPACE_PRESETS.values())
        presets = PTI_GANSPACE_PRESETS if fits else None
    out = {}
    if presets is None:
        out = _components({"comp": comp, "std": std}, n_components, prefix)
        for d in out.values():
            d.source = source
        return out
    for name, preset in presets.items():
        try:
            k, start, end, strength = preset
            k, start, end, strength = int(k), int(start), int(end), float(strength)
        except (TypeError, ValueError):
            raise DirectionError(f"GANSpace preset {name!r}: expected (component, start, end, strength), got {preset!r}")
        if not 0 <= k < comp.shape[0]:
            raise DirectionError(f"GANSpace preset {name!r}: component {k} outside 0..{comp.shape[0] - 1}")
        if end <= start:
            raise DirectionError(f"GANSpace preset {name!r}: empty layer range [{start}, {end})")
        span = max(3.0, 2 * abs(strength))
        out[name] = Direction(name, torch.from_numpy(comp[k]), layers=(start, end - 1), scale=float(std[k]),
                              default_strength=strength, range=(-span, span),
                              description=f"GANSpace component {k}, layers {start}-{end - 1}", source=source)
    return out


def read_manifest(path_or_dict, base_dir=None) -> dict:
    """Directions from a ``*.directions.json`` manifest (a path, or the parsed dict with ``base_dir`` for files).

    Entry fields: ``name``; ``kind`` ``"w"|"wplus"|"ganspace"|"s"``; ``file`` (relative ``.npy``/``.pt``/``.npz``)
    or inline ``vector``; ``layers`` ``[first, last]`` inclusive or null; ``default_strength``; ``range``;
    optional ``scale``; ``description``; ``ganspace``: ``component`` (``scale`` defaults to its std);
    ``s``: ``s_edits`` ``[[style_layer, channel, delta], ...]``.
    """
    if isinstance(path_or_dict, Mapping):
        manifest = path_or_dict
        base = pathlib.Path(base_dir) if base_dir is not None else pathlib.Path.cwd()
        where = "manifest"
    else:
        path = pathlib.Path(path_or_dict)
        if not path.is_file():
            raise DirectionError(f"direction manifest not found: {path}")
        try:
            manifest = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DirectionError(f"{path.name}: not valid JSON ({exc})") from None
        base = pathlib.Path(base_dir) if base_dir is not None else path.parent
        where = path.name
    if not isinstance(manifest, Mapping) or manifest.get("format") != MANIFEST_FORMAT:
        raise DirectionError(f"{where}: not a direction manifest (format must be {MANIFEST_FORMAT!r})")
    if int(manifest.get("version", 0)) > MANIFEST_VERSION:
        raise DirectionError(f"{where}: manifest version {manifest.get('version')} is newer than {MANIFEST_VERSION}")
    entries = manifest.get("directions")
    if not isinstance(entries, list):
        raise DirectionError(f"{where}: 'directions' must be a list")
    out: dict = {}
    for entry in entries:
        d = _manifest_entry(entry, base, where)
        if d.name in out:
            raise DirectionError(f"{where}: direction {d.name!r} appears twice")
        out[d.name] = d
    w_dim, num_ws = manifest.get("w_dim"), manifest.get("num_ws")
    if w_dim is not None and num_ws is not None:
        for d in out.values():
            d.check(int(num_ws), int(w_dim))
    return out


def _safe_file(base: pathlib.Path, rel, where, name) -> pathlib.Path:
    if not isinstance(rel, str) or not rel:
        raise DirectionError(f"{where}: direction {name!r} needs a 'file' or a 'vector'")
    p = pathlib.PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DirectionError(f"{where}: direction {name!r}: file {rel!r} must be a relative path inside the manifest's folder")
    return base / pathlib.Path(*p.parts)


def _manifest_entry(entry, base: pathlib.Path, where: str) -> Direction:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise DirectionError(f"{where}: every direction needs a 'name', got {entry!r}")
    name = entry["name"]
    kind = entry.get("kind", "w")
    fields = {}
    for key in ("default_strength", "range", "scale", "description"):
        if entry.get(key) is not None:
            fields[key] = entry[key]
    fields["source"] = str(entry.get("source") or entry.get("file") or where)
    layers = entry.get("layers")
    try:
        if kind == "s":
            return Direction(name, space="s", s_edits=entry.get("s_edits") or [], layers=None, **fields)
        if kind == "ganspace":
            data = _read_array(_safe_file(base, entry.get("file"), where, name))
            if not isinstance(data, dict):
                raise DirectionError(f"{where}: direction {name!r}: file is not a GANSpace file")
            k = int(entry.get("component", -1))
            comps = read_ganspace(data, presets={name: (k, 0, 1, 0.0)})  # validates k; layers/strength set below
            d = comps[name]
            fields.setdefault("scale", d.scale)
            fields.setdefault("description", f"GANSpace component {k}")
            return Direction(name, d.vector, layers=layers, **fields)
        if kind not in ("w", "wplus"):
            raise DirectionError(f"{where}: direction {name!r}: unknown kind {kind!r} (w, wplus, ganspace, s)")
        if entry.get("vector") is not None:
            vec = _squeeze_vector(np.asarray(entry["vector"], dtype=np.float64), f"{where}: {name}")
        else:
            arr = _read_array(_safe_file(base, entry.get("file"), where, name))
            if isinstance(arr, dict):
                raise DirectionError(f"{where}: direction {name!r}: file is a GANSpace file; use kind 'ganspace'")
            vec = _squeeze_vector(arr, f"{where}: {name}")
        if kind == "w" and vec.ndim != 1:
            raise DirectionError(f"{where}: direction {name!r}: kind 'w' needs a (w_dim,) vector, got {vec.shape}")
        if kind == "wplus" and vec.ndim != 2:
            raise DirectionError(f"{where}: direction {name!r}: kind 'wplus' needs a (num_ws, w_dim) array, got {vec.shape}")
        return Direction(name, torch.from_numpy(vec), layers=layers, **fields)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, LatentEditError):
            raise
        raise DirectionError(f"{where}: direction {name!r}: {exc}") from None


def manifest_path_for(checkpoint) -> pathlib.Path:
    """``face64.pt`` -> ``face64.directions.json`` beside it."""
    p = pathlib.Path(checkpoint)
    return p.with_name(p.stem + MANIFEST_SUFFIX)


def load_directions(path_or_manifest, G=None) -> dict:
    """``{name: Direction}`` from a manifest (path or dict), a generator checkpoint (reads the manifest beside
    it; none -> ``{}``), a single direction file (``.pt``/``.npy``) or a GANSpace file.
    With ``G``, every direction is checked against its ``num_ws``, ``w_dim`` and style layers."""
    if isinstance(path_or_manifest, Mapping):
        out = read_manifest(path_or_manifest)
    else:
        path = pathlib.Path(path_or_manifest)
        beside = manifest_path_for(path)
        if path.name.endswith(".json"):
            out = read_manifest(path)
        elif beside.is_file():
            out = read_manifest(beside)
        elif not path.exists():
            raise DirectionError(f"no such file: {path}")
        elif path.suffix.lower() == ".pkl":
            out = {}  # a NVIDIA generator pickle without a manifest beside it
        elif path.suffix.lower() in (".pt", ".pth"):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                obj = None  # a full-module pickle: a generator, not a direction
            if isinstance(obj, torch.Tensor):
                out = {_name_of(path): read_vector(path)}
            elif isinstance(obj, Mapping) and {"comp", "std"} <= set(obj):
                out = read_ganspace(path)
            else:
                out = {}  # a generator checkpoint without a manifest beside it
        elif path.suffix.lower() == ".npz":
            out = read_ganspace(path)
        else:
            out = {_name_of(path): read_vector(path)}
    if G is not None:
        validate(out, G)
    return out


def validate(directions: Mapping[str, Direction], G) -> Mapping[str, Direction]:
    """Check every direction fits ``G`` (W dims, layer ranges, style layers/channels); returns the mapping."""
    dims = [int(layer.affine_weight.shape[0]) for layer in G.style_layers()]
    for d in directions.values():
        d.check(int(G.num_ws), int(G.w_dim), dims)
    return directions


def save_manifest(directions, path, w_dim: Optional[int] = None, num_ws: Optional[int] = None) -> pathlib.Path:
    """Write ``directions`` (a mapping or list) as ``path`` (``*.directions.json``) plus one ``.npy`` per W
    direction in the folder ``<stem>/`` beside it; read back by :func:`load_directions`."""
    path = pathlib.Path(path)
    items = list(directions.values()) if isinstance(directions, Mapping) else list(directions)
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    folder = path.parent / stem
    entries = []
    for d in items:
        if not _NAME_RE.match(d.name):
            raise DirectionError(f"direction name {d.name!r} must be 1-64 letters, digits, '_', '.', '-'")
        entry = {"name": d.name, "layers": list(d.layers) if d.layers is not None else None,
                 "default_strength": d.default_strength, "range": list(d.range), "scale": d.scale,
                 "description": d.description, "source": d.source}
        if d.space == "s":
            entry["kind"] = "s"
            entry["s_edits"] = [list(e) for e in d.s_edits]
        else:
            folder.mkdir(parents=True, exist_ok=True)
            rel = f"{stem}/{d.name}.npy"
            np.save(path.parent / rel, d.vector.numpy().astype(np.float32))
            entry["kind"] = "w" if d.vector.ndim == 1 else "wplus"
            entry["file"] = rel
            if w_dim is None:
                w_dim = int(d.vector.shape[-1])
            if num_ws is None and d.vector.ndim == 2:
                num_ws = int(d.vector.shape[0])
        entries.append(entry)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "w_dim": w_dim, "num_ws": num_ws,
                "directions": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    return path


def _components(data, n, prefix) -> dict:
    return {f"{prefix}_{k}": Direction(f"{prefix}_{k}", torch.from_numpy(np.asarray(data["comp"][k])),
                                       scale=float(data["std"][k]), description=f"GANSpace component {k}")
            for k in range(min(n, len(data["std"])))}


def main(argv=None) -> int:
    """``python -m core.edits PATH [--model CHECKPOINT]``: list the directions a file or manifest provides."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m core.edits", description=main.__doc__)
    parser.add_argument("path", help="manifest, direction file (.pt/.npy/.npz) or generator checkpoint")
    parser.add_argument("--model", default=None, help="generator checkpoint to validate the directions against")
    args = parser.parse_args(argv)
    G = None
    if args.model is not None:
        from core.stylegan2.formats import load_generator
        G = load_generator(args.model)
    try:
        dirs = load_directions(args.path, G=G)
    except LatentEditError as exc:
        print(f"error: {exc}")
        return 1
    if not dirs:
        print("no directions")
    for d in dirs.values():
        shape = "s-space" if d.space == "s" else "x".join(str(x) for x in d.vector.shape)
        layers = "all" if d.layers is None else f"{d.layers[0]}-{d.layers[1]}"
        print(f"{d.name:24s} {shape:10s} layers {layers:6s} default {d.default_strength:+.3g} "
              f"range [{d.range[0]:.3g}, {d.range[1]:.3g}] scale {d.scale:.4g}  {d.description}")
    return 0
