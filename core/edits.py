"""Edit directions: one registry for every common format, directions computed from a generator, and
their application to latent codes.

A :class:`Direction` moves a code by ``strength * scale * vector``:

* ``space="w"``: ``vector`` is ``(w_dim,)`` (added to every W+ row inside ``layers``) or ``(num_ws, w_dim)``
  (rows outside ``layers`` are ignored).  ``layers`` is an *inclusive* ``(first, last)`` range of W+ rows, or
  None for all rows.
* ``space="s"`` (StyleSpace, Wu et al. 2021): ``s_edits`` lists ``(style_layer, channel, delta)``; the edit adds
  ``strength * scale * delta`` to that channel of that layer's modulation styles
  (``Generator.style_layers()`` order, which is also Chunkmogrify's S-layer order).

Formats read by :func:`load_directions` (see docs/architecture.md for the manifest):

* InterfaceGAN / PTI / e4e ``.pt`` tensors ``[1,512]`` and ``[1,18,512]``;
* unit-normal InterfaceGAN ``(1,512)`` ``.npy`` boundaries (float64 too) and Chunkmogrify ``(18,512)`` ``.npy``
  arrays with a layer range;
* GANSpace ``{mean, comp, std}`` ``.pt``/``.npz`` files with presets ``(component, start, end, strength)`` where,
  as in the GANSpace/PTI code, ``end`` is exclusive; one unit of strength is one standard deviation of W along
  the component.  PTI's editor *sets* the coordinate to ``strength``; here it is *added*, so that strength 0
  is the identity and several edits sum (the only form a slider on a photo's own code can use);
* our manifest ``*.directions.json`` bundling any of these (plus S-space edits) with names, descriptions,
  default strengths, ranges and scales.

Directions computed from a generator: :func:`sefa` (Shen & Zhou 2021, closed form), :func:`ganspace`
(Härkönen et al. 2020, PCA of W) and :func:`fit_interfacegan` (Shen et al. 2020, linear boundary).  These set
``scale`` to the standard deviation of W along the direction, so strength is in standard deviations of the
latent distribution for all of them (range ±3 covers it).

Directions live in W, so they stay usable after pivotal tuning (the pivot code is unchanged; PTI §3.4).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from core.common import InvalidInput, LatentEditError

MANIFEST_FORMAT = "latent-edit-directions"
MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".directions.json"

# InterfaceGAN (Shen et al. 2020) edits with distances in [-3, 3].
DEFAULT_RANGE = (-3.0, 3.0)

# PTI scripts/latent_editor_wrapper.py: GANSpace presets (component, start, end-exclusive, strength) for ffhq_pca.pt.
PTI_GANSPACE_PRESETS = {
    "eye_openness": (54, 7, 8, 5.0),
    "smile": (46, 4, 5, -6.0),
    "trimmed_beard": (58, 7, 9, 7.0),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class DirectionError(InvalidInput):
    """A direction file or edit request that cannot be used (unknown name, wrong shape, NaN, bad layers)."""


@dataclasses.dataclass
class Direction:
    """A named edit. ``vector`` is a float32 tensor ``(w_dim,)`` or ``(num_ws, w_dim)`` (None for S-space);
    ``layers`` an inclusive ``(first, last)`` W+ row range or None; the code moves by ``strength*scale*vector``."""

    name: str
    vector: Optional[torch.Tensor] = None
    layers: Optional[tuple] = None
    default_strength: float = 1.0
    range: tuple = DEFAULT_RANGE
    scale: float = 1.0
    space: str = "w"
    s_edits: list = dataclasses.field(default_factory=list)  # [(style_layer, channel, delta)]
    description: str = ""
    source: str = ""

    def __post_init__(self):
        if self.space not in ("w", "s"):
            raise DirectionError(f"direction {self.name!r}: space must be 'w' or 's', got {self.space!r}")
        if self.space == "w":
            if self.vector is None:
                raise DirectionError(f"direction {self.name!r}: a W-space direction needs a vector")
            v = torch.as_tensor(self.vector).detach().to("cpu", torch.float32)
            if v.ndim == 3 and v.shape[0] == 1:
                v = v[0]
            if v.ndim == 2 and v.shape[0] == 1:
                v = v[0]
            if v.ndim not in (1, 2) or v.numel() == 0:
                raise DirectionError(
                    f"direction {self.name!r}: vector must be (w_dim,) or (num_ws, w_dim), got shape {tuple(v.shape)}")
            if not torch.isfinite(v).all():
                raise DirectionError(f"direction {self.name!r}: vector contains NaN or infinite values")
            self.vector = v
        else:
            self.vector = None
            edits = []
            for item in self.s_edits:
                try:
                    layer, channel, delta = item
                    edits.append((int(layer), int(channel), float(delta)))
                except (TypeError, ValueError):
                    raise DirectionError(
                        f"direction {self.name!r}: s_edits entries must be (style_layer, channel, delta), got {item!r}")
            if not edits:
                raise DirectionError(f"direction {self.name!r}: an S-space direction needs at least one s_edit")
            for layer, channel, delta in edits:
                if layer < 0 or channel < 0:
                    raise DirectionError(f"direction {self.name!r}: negative style layer or channel ({layer}, {channel})")
                if not math.isfinite(delta):
                    raise DirectionError(f"direction {self.name!r}: S-space delta is NaN or infinite")
            self.s_edits = edits
        if self.layers is not None:
            try:
                first, last = (int(x) for x in self.layers)
            except (TypeError, ValueError):
                raise DirectionError(f"direction {self.name!r}: layers must be (first, last), got {self.layers!r}")
            if first < 0 or last < first:
                raise DirectionError(f"direction {self.name!r}: bad layer range ({first}, {last}); need 0 <= first <= last")
            self.layers = (first, last)
        for field in ("default_strength", "scale"):
            value = float(getattr(self, field))
            if not math.isfinite(value):
                raise DirectionError(f"direction {self.name!r}: {field} is NaN or infinite")
            setattr(self, field, value)
        lo, hi = (float(x) for x in self.range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise DirectionError(f"direction {self.name!r}: range must be finite with lo < hi, got {self.range!r}")
        self.range = (lo, hi)

    def check(self, num_ws: int, w_dim: int, style_dims: Optional[Sequence[int]] = None) -> "Direction":
        """Raise :class:`DirectionError` unless this direction fits a model with ``num_ws`` rows of ``w_dim``
        (and, for S-space, style layers with ``style_dims`` channels). Returns self."""
        if self.space == "w":
            v = self.vector
            if v.shape[-1] != w_dim:
                raise DirectionError(
                    f"direction {self.name!r} is {v.shape[-1]}-dimensional but the model's W is {w_dim}-dimensional")
            if v.ndim == 2 and v.shape[0] != num_ws:
                raise DirectionError(
                    f"direction {self.name!r} has {v.shape[0]} W+ rows but the model has num_ws={num_ws}")
            if self.layers is not None and self.layers[1] >= num_ws:
                raise DirectionError(
                    f"direction {self.name!r}: layer range {list(self.layers)} is outside the model's "
                    f"W+ rows 0..{num_ws - 1}")
        elif style_dims is not None:
            for layer, channel, _ in self.s_edits:
                if layer >= len(style_dims):
                    raise DirectionError(
                        f"direction {self.name!r}: style layer {layer} is outside the model's "
                        f"{len(style_dims)} style layers")
                if channel >= style_dims[layer]:
                    raise DirectionError(
                        f"direction {self.name!r}: channel {channel} is outside style layer {layer}'s "
                        f"{style_dims[layer]} channels")
        return self

    def delta(self, strength: float, num_ws: int, w_dim: int, layers=None) -> torch.Tensor:
        """The W+ offset ``(num_ws, w_dim)`` for ``strength`` (``layers`` overrides the direction's range)."""
        if self.space != "w":
            raise DirectionError(f"direction {self.name!r} is an S-space edit; it has no W+ offset")
        self.check(num_ws, w_dim)
        v = self.vector
        full = v.expand(num_ws, w_dim) if v.ndim == 1 else v
        rows = _layer_mask(self.layers if layers is None else _check_layers(self.name, layers, num_ws), num_ws)
        return full * rows[:, None] * (float(strength) * self.scale)

    def info(self) -> dict:
        """Plain JSON-able description (what ``GET /v1/models`` lists)."""
        return {
            "name": self.name,
            "space": self.space,
            "layers": list(self.layers) if self.layers is not None else None,
            "default_strength": self.default_strength,
            "range": list(self.range),
            "description": self.description,
            "source": self.source,
        }


def _check_layers(name, layers, num_ws) -> tuple:
    try:
        first, last = (int(x) for x in layers)
    except (TypeError, ValueError):
        raise DirectionError(f"edit {name!r}: layers must be (first, last), got {layers!r}")
    if not 0 <= first <= last < num_ws:
        raise DirectionError(f"edit {name!r}: layer range [{first}, {last}] is outside the model's W+ rows 0..{num_ws - 1}")
    return first, last


def _layer_mask(layers, num_ws) -> torch.Tensor:
    mask = torch.zeros(num_ws)
    if layers is None:
        mask[:] = 1
    else:
        mask[layers[0]: layers[1] + 1] = 1
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Applying edits


def _resolve(item, registry: Optional[Mapping[str, Direction]]):
    """``(direction_or_name, strength[, layers])`` -> (Direction, strength, layers or None)."""
    if isinstance(item, Mapping):
        item = (item.get("direction"), item.get("strength", None), item.get("layers"))
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise DirectionError(f"an edit must be (direction, strength) or (direction, strength, layers), got {item!r}")
    ref, strength = item[0], item[1]
    layers = item[2] if len(item) == 3 else None
    if isinstance(ref, Direction):
        d = ref
    elif isinstance(ref, str):
        known = registry or {}
        if ref not in known:
            names = ", ".join(sorted(known)) or "none"
            raise DirectionError(f"unknown direction {ref!r}; known directions: {names}")
        d = known[ref]
    else:
        raise DirectionError(f"an edit's direction must be a Direction or a name, got {type(ref).__name__}")
    if strength is None:
        strength = d.default_strength
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise DirectionError(f"edit {d.name!r}: strength must be a number, got {strength!r}")
    if not math.isfinite(strength):
        raise DirectionError(f"edit {d.name!r}: strength is NaN or infinite")
    return d, strength, layers


def apply_edits(ws: torch.Tensor, edits: Iterable, registry: Optional[Mapping[str, Direction]] = None) -> torch.Tensor:
    """Return ``ws + Σ strength·scale·vector`` over the W-space ``edits``.

    ``ws`` is ``(N, num_ws, w_dim)`` (N images or N per-segment codes; every row gets the same edit).
    ``edits`` is a sequence of ``(direction_or_name, strength)`` or ``(direction_or_name, strength, (first, last))``
    (a layer range overriding the direction's; inclusive); names are looked up in ``registry``.
    S-space directions are skipped here: :func:`style_deltas_for` turns them into synthesis inputs.
    The input is never modified; edits are linear, so applying them one after another equals applying them at once.
    """
    if not isinstance(ws, torch.Tensor) or ws.ndim != 3:
        raise DirectionError(f"ws must be a tensor (N, num_ws, w_dim), got {getattr(ws, 'shape', type(ws))}")
    _, num_ws, w_dim = ws.shape
    out = ws.clone()
    for item in edits:
        d, strength, layers = _resolve(item, registry)
        if d.space != "w":
            continue
        out = out + d.delta(strength, num_ws, w_dim, layers).to(ws.device, ws.dtype)
    return out


def style_deltas_for(edits: Iterable, G, registry: Optional[Mapping[str, Direction]] = None) -> dict:
    """The ``style_deltas`` argument of ``G.synthesis`` for the S-space edits in ``edits``
    (``{style_layer_index: (C_in,) tensor}``; W-space edits are skipped; empty when there are none)."""
    layers = G.style_layers()
    dims = [int(layer.affine_weight.shape[0]) for layer in layers]
    device = layers[0].affine_weight.device if layers else "cpu"
    deltas: dict = {}
    for item in edits:
        d, strength, _ = _resolve(item, registry)
        if d.space != "s":
            continue
        d.check(G.num_ws, G.w_dim, dims)
        for layer, channel, delta in d.s_edits:
            if layer not in deltas:
                deltas[layer] = torch.zeros(dims[layer], device=device)
            deltas[layer][channel] += strength * d.scale * delta
    return deltas


def edit_inputs(ws: torch.Tensor, edits: Sequence, G, registry: Optional[Mapping[str, Direction]] = None):
    """Both synthesis inputs for a mixed list of edits: ``(edited ws, style_deltas)``."""
    edits = list(edits)
    return apply_edits(ws, edits, registry), style_deltas_for(edits, G, registry)


# ----------------------------------------------------------------------------------------------------------------
# Reading formats


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


def s_direction(name: str, edits: Sequence, **fields) -> Direction:
    """An S-space direction from ``[(style_layer, channel, delta), ...]`` (Chunkmogrify/StyleSpace presets)."""
    return Direction(name, space="s", s_edits=list(edits), **fields)


@torch.no_grad()
def style_std(G, n_samples: int = 2048, seed: int = 0) -> list:
    """Per-channel std of every style layer's affine output over W samples: ``[(C_in,) tensor]`` in
    ``G.style_layers()`` order (affine weights are used × 1/√w_dim; the bias does not change the spread)."""
    w = sample_w(G, n_samples, seed=seed)
    gain = 1.0 / math.sqrt(G.w_dim)
    return [(w @ layer.affine_weight.detach().float().cpu().T * gain).std(dim=0) for layer in G.style_layers()]


def s_in_std_units(direction: Direction, G, n_samples: int = 2048, seed: int = 0) -> Direction:
    """A copy of an S-space direction whose deltas are multiplied by their channel's style std, so one unit
    of strength is one standard deviation of that channel (StyleSpace, Wu et al. 2021, §4 edits in std steps)."""
    if direction.space != "s":
        raise DirectionError(f"{direction.name!r} is not an S-space direction")
    dims = [int(layer.affine_weight.shape[0]) for layer in G.style_layers()]
    direction.check(G.num_ws, G.w_dim, dims)
    stds = style_std(G, n_samples, seed)
    edits = [(layer, channel, delta * float(stds[layer][channel])) for layer, channel, delta in direction.s_edits]
    return dataclasses.replace(direction, s_edits=edits)


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


# ----------------------------------------------------------------------------------------------------------------
# Directions computed from a generator


@torch.no_grad()
def sample_w(G, n: int, seed: int = 0, truncation_psi: float = 1.0, batch: int = 4096) -> torch.Tensor:
    """``(n, w_dim)`` W samples ``mapping(z)``, z ~ N(0, I) from a seeded generator (deterministic)."""
    gen = torch.Generator().manual_seed(int(seed))
    device = G.w_avg.device
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), G.z_dim, generator=gen).to(device)
        out.append(G.mapping(z, truncation_psi=truncation_psi)[:, 0].float().cpu())
    return torch.cat(out)


def _ws_indices(G, layers) -> list:
    """``layers``: None (all), an inclusive (first, last) W+ row range, or a list of W+ row indices."""
    if layers is None:
        return list(range(G.num_ws))
    if isinstance(layers, tuple) and len(layers) == 2:
        first, last = _check_layers("sefa", layers, G.num_ws)
        return list(range(first, last + 1))
    idx = sorted({int(i) for i in layers})
    if not idx or idx[0] < 0 or idx[-1] >= G.num_ws:
        raise DirectionError(f"sefa: layers {layers!r} must be W+ rows in 0..{G.num_ws - 1}")
    return idx


@torch.no_grad()
def sefa(G, layers=None, k: int = 5, kinds: Sequence[str] = ("conv",), calibrate_samples: int = 2048,
         seed: int = 0, prefix: str = "sefa") -> dict:
    """SeFa (Shen & Zhou 2021): eigenvectors of ``AᵀA`` where A stacks the affine (modulation) weights of the
    style layers fed by the W+ rows ``layers`` (None = all; (first, last) inclusive; or a list), each output row
    normalised to unit length (genforce/sefa normalises the columns of the transposed weight). Only ``kinds``
    layers are used (SeFa uses the conv layers, not toRGB).

    Returns the top ``k`` as ``{f"{prefix}_{i}": Direction}`` in descending eigenvalue order; vectors are
    orthonormal, sign fixed so the largest-magnitude coordinate is positive; ``layers`` is the range used;
    ``scale`` is the std of W along the vector over ``calibrate_samples`` samples (1 when 0).
    """
    rows = _ws_indices(G, layers)
    weights = [layer.affine_weight.detach().double().cpu() for layer in G.style_layers()
               if layer.ws_index in rows and layer.kind in kinds]
    if not weights:
        raise DirectionError(f"sefa: no {'/'.join(kinds)} style layers are fed by W+ rows {rows}")
    A = torch.cat(weights, dim=0)  # (sum C_in, w_dim)
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    evals, evecs = torch.linalg.eigh(A.T @ A)  # ascending
    order = torch.argsort(evals, descending=True)
    k = max(1, min(int(k), A.shape[1]))
    vecs = evecs[:, order[:k]].T  # (k, w_dim)
    signs = torch.sign(vecs.gather(1, vecs.abs().argmax(dim=1, keepdim=True)))
    vecs = (vecs * signs).float()
    scales = _latent_std(G, vecs, calibrate_samples, seed)
    span = (rows[0], rows[-1]) if rows != list(range(G.num_ws)) else None
    out = {}
    for i in range(k):
        name = f"{prefix}_{i}"
        out[name] = Direction(name, vecs[i].clone(), layers=span, scale=scales[i],
                              description=f"SeFa eigenvector {i} (eigenvalue {float(evals[order[i]]):.3g}) "
                                          f"of W+ rows {rows[0]}-{rows[-1]}",
                              source="sefa")
    return out


def _latent_std(G, vecs: torch.Tensor, n: int, seed: int) -> list:
    if n <= 1:
        return [1.0] * vecs.shape[0]
    w = sample_w(G, n, seed=seed)
    return [float(s) for s in (w @ vecs.T).std(dim=0)]


def _fingerprint(G) -> str:
    """A cheap identity for a generator's mapping network: hash of W for fixed z."""
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(12345)).to(G.w_avg.device)
    with torch.no_grad():
        w = G.mapping(z)[:, 0].float().cpu().numpy()
    return hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest()


@torch.no_grad()
def ganspace(G, n_samples: int = 20_000, n_components: int = 10, seed: int = 0, cache_path=None,
             prefix: str = "pca") -> dict:
    """GANSpace (Härkönen et al. 2020): PCA of ``n_samples`` W samples (the paper uses 10⁶; 2·10⁴ settles the
    top components of small models). Returns ``{f"{prefix}_{i}": Direction}`` in descending variance order,
    vectors orthonormal, ``scale`` = the component's std, all layers. With ``cache_path`` (``.npz``) the PCA
    is stored and reused when samples, seed and the mapping network match."""
    fp = _fingerprint(G)
    data = None
    if cache_path is not None and pathlib.Path(cache_path).is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as z:
                if (str(z["fingerprint"]) == fp and int(z["n_samples"]) == n_samples and int(z["seed"]) == seed
                        and z["comp"].shape[0] >= n_components):
                    data = {"mean": z["mean"], "comp": z["comp"], "std": z["std"]}
        except Exception:
            data = None  # unreadable cache: recompute and overwrite
    if data is None:
        w = sample_w(G, n_samples, seed=seed).double()
        mean = w.mean(dim=0)
        x = w - mean
        cov = x.T @ x / max(1, n_samples - 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: min(n_components, w.shape[1])]
        comp = evecs[:, order].T
        signs = torch.sign(comp.gather(1, comp.abs().argmax(dim=1, keepdim=True)))
        comp = comp * signs
        data = {"mean": mean.float().numpy(), "comp": comp.float().numpy(),
                "std": evals[order].clamp_min(0).sqrt().float().numpy()}
        if cache_path is not None:
            pathlib.Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
            with open(cache_path, "wb") as f:
                np.savez(f, fingerprint=np.array(fp), n_samples=np.array(n_samples), seed=np.array(seed), **data)
    out = _components(data, n_components, prefix)
    for d in out.values():
        d.source = "ganspace"
    return out


def _components(data, n, prefix) -> dict:
    return {f"{prefix}_{k}": Direction(f"{prefix}_{k}", torch.from_numpy(np.asarray(data["comp"][k])),
                                       scale=float(data["std"][k]), description=f"GANSpace component {k}")
            for k in range(min(n, len(data["std"])))}


@dataclasses.dataclass
class InterfaceGANOptions:
    method: str = "svm"           # InterfaceGAN train_boundary: linear SVM on the extremes ("ridge": regression on all)
    chosen_ratio: float = 0.02    # InterfaceGAN train_boundary: top/bottom 2% of samples
    split_ratio: float = 0.7      # InterfaceGAN train_boundary: 70% train, 30% validation
    c: float = 1.0                # sklearn SVC default C (squared hinge here, solved with L-BFGS)
    ridge: float = 1e-3           # ridge: L2 penalty relative to the mean feature variance


def fit_interfacegan(ws, scores, name: str = "attribute", options: Optional[InterfaceGANOptions] = None,
                     **fields) -> Direction:
    """InterfaceGAN (Shen et al. 2020): the unit normal of a linear boundary separating high from low
    ``scores`` in W. ``ws`` ``(N, w_dim)`` or ``(N, num_ws, w_dim)`` (row 0 is used), ``scores`` ``(N,)``.
    The normal points towards higher scores; ``scale`` = std of W along it; the validation accuracy (svm) or
    R² (ridge) is written into ``description`` when none is given."""
    opt = options or InterfaceGANOptions()
    w = torch.as_tensor(ws).detach().double().cpu()
    if w.ndim == 3:
        w = w[:, 0]
    s = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    if w.ndim != 2 or w.shape[0] != s.shape[0]:
        raise DirectionError(f"fit_interfacegan: ws {tuple(w.shape)} and scores {tuple(s.shape)} must have the same N")
    if not (torch.isfinite(w).all() and torch.isfinite(s).all()):
        raise DirectionError("fit_interfacegan: ws or scores contain NaN or infinite values")
    n = w.shape[0]
    if n < 10 or float(s.std()) == 0:
        raise DirectionError("fit_interfacegan: need at least 10 samples with varying scores")
    gen = torch.Generator().manual_seed(0)
    if opt.method == "ridge":
        mean_w, mean_s = w.mean(0), s.mean()
        x, y = w - mean_w, s - mean_s
        perm = torch.randperm(n, generator=gen)
        cut = max(2, int(n * opt.split_ratio))
        tr, va = perm[:cut], perm[cut:]
        lam = opt.ridge * float(x[tr].var(0).mean()) * len(tr)
        coef = torch.linalg.solve(x[tr].T @ x[tr] + lam * torch.eye(w.shape[1], dtype=w.dtype), x[tr].T @ y[tr])
        pred = x[va] @ coef
        quality = 1 - float(((pred - y[va]) ** 2).mean() / y[va].var()) if len(va) > 1 else float("nan")
        quality_txt = f"validation R² {quality:.3f}"
        normal = coef
    elif opt.method == "svm":
        chosen = max(2, int(n * opt.chosen_ratio))
        order = torch.argsort(s, descending=True)
        pos, neg = w[order[:chosen]], w[order[-chosen:]]
        x = torch.cat([pos, neg])
        y = torch.cat([torch.ones(chosen), -torch.ones(chosen)]).double()
        perm = torch.randperm(len(x), generator=gen)
        cut = max(2, int(len(x) * opt.split_ratio))
        tr, va = perm[:cut], perm[cut:]
        normal, bias = _linear_svm(x[tr], y[tr], opt.c)
        acc = float(((x[va] @ normal + bias).sign() == y[va]).double().mean()) if len(va) else float("nan")
        quality_txt = f"validation accuracy {acc:.3f}"
    else:
        raise DirectionError(f"fit_interfacegan: unknown method {opt.method!r} (svm, ridge)")
    norm = float(normal.norm())
    if norm == 0 or not math.isfinite(norm):
        raise DirectionError("fit_interfacegan: the scores do not depend linearly on W (zero normal)")
    normal = normal / norm
    scale = float((w @ normal).std())
    fields.setdefault("description", f"InterfaceGAN boundary normal for {name} ({quality_txt})")
    fields.setdefault("source", "interfacegan")
    return Direction(name, normal.float(), scale=scale, **fields)


@torch.no_grad()
def fit_attribute_directions(G, score_fn, n_samples: int = 2000, attributes: Optional[Sequence[str]] = None,
                             seed: int = 0, truncation_psi: float = 1.0, batch: int = 64,
                             options: Optional[InterfaceGANOptions] = None) -> dict:
    """InterfaceGAN directions for a scorer: sample ``n_samples`` W codes, render them (``noise_mode="const"``,
    clamped to [-1,1]), score them with ``score_fn(images (N,3,H,W) in [-1,1]) -> {attribute: (N,)}`` and fit
    one boundary per attribute (all the scorer returns, or ``attributes``). Returns ``{attribute: Direction}``."""
    w = sample_w(G, n_samples, seed=seed, truncation_psi=truncation_psi)
    device = G.w_avg.device
    scores: dict = {}
    for start in range(0, n_samples, batch):
        chunk = w[start:start + batch].to(device)
        img = G.synthesis(chunk[:, None].repeat(1, G.num_ws, 1)).clamp(-1, 1)
        for name, values in score_fn(img).items():
            scores.setdefault(name, []).append(torch.as_tensor(np.asarray(values), dtype=torch.float64).reshape(-1))
    names = list(attributes) if attributes is not None else list(scores)
    missing = [a for a in names if a not in scores]
    if missing:
        raise DirectionError(f"the scorer does not return {missing}; it returns {sorted(scores)}")
    return {a: fit_interfacegan(w, torch.cat(scores[a]), name=a, options=options) for a in names}


def _linear_svm(x: torch.Tensor, y: torch.Tensor, c: float):
    """L2-regularised squared-hinge linear SVM: min ½‖w‖² + C Σ max(0, 1 − y(w·x + b))²  (L-BFGS)."""
    mu = x.mean(0)
    xc = x - mu
    params = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        margin = 1 - y * (xc @ params[:-1] + params[-1])
        loss = 0.5 * params[:-1].pow(2).sum() + c * margin.clamp_min(0).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    wv = params[:-1].detach()
    return wv, float(params[-1].detach()) - float(mu @ wv)


def condition(direction: Direction, against: Iterable[Direction], name: Optional[str] = None) -> Direction:
    """InterfaceGAN's conditional manipulation: remove the components of ``direction`` along ``against``
    (Gram-Schmidt on 1-D W directions), renormalise to unit length and keep the latent std scale ratio."""
    if direction.space != "w" or direction.vector.ndim != 1:
        raise DirectionError(f"condition: {direction.name!r} must be a (w_dim,) W direction")
    basis = []
    for other in against:
        if other.space != "w" or other.vector.ndim != 1 or other.vector.shape != direction.vector.shape:
            raise DirectionError(f"condition: {other.name!r} must be a W direction of the same size")
        b = other.vector.double()
        for q in basis:
            b = b - (b @ q) * q
        if float(b.norm()) > 1e-8:
            basis.append(b / b.norm())
    v = direction.vector.double()
    norm0 = float(v.norm())
    for q in basis:
        v = v - (v @ q) * q
    if float(v.norm()) < 1e-8:
        raise DirectionError(f"condition: {direction.name!r} lies in the span of the others")
    v = v / v.norm() * norm0
    return dataclasses.replace(direction, name=name or direction.name, vector=v.float(),
                               description=(direction.description + " (conditioned)").strip())


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


if __name__ == "__main__":
    raise SystemExit(main())
