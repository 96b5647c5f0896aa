"""Edit directions and their application to latent codes (``core.edits.directions``).

A :class:`Direction` moves a code by ``strength * scale * vector``:

* ``space="w"``: ``vector`` is ``(w_dim,)`` (added to every W+ row inside ``layers``) or ``(num_ws, w_dim)``
  (rows outside ``layers`` are ignored).  ``layers`` is an *inclusive* ``(first, last)`` range of W+ rows, or
  None for all rows.
* ``space="s"`` (StyleSpace, Wu et al. 2021): ``s_edits`` lists ``(style_layer, channel, delta)``; the edit adds
  ``strength * scale * delta`` to that channel of that layer's modulation styles
  (``Generator.style_layers()`` order, which is also Chunkmogrify's S-layer order).

An edit list is ``[(direction, strength[, (first, last)]), ...]`` where a direction is a :class:`Direction`, a
name in a registry ``{name: Direction}`` or a raw W tensor ``(w_dim,)`` / ``(num_ws, w_dim)``;
:func:`edit_inputs` turns it into the two synthesis inputs (edited codes, style deltas).

Directions live in W, so they stay usable after pivotal tuning (the pivot code is unchanged; PTI §3.4).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Optional, Sequence

import torch

from core.common import InvalidInput

# InterfaceGAN (Shen et al. 2020) edits with distances in [-3, 3].
DEFAULT_RANGE = (-3.0, 3.0)



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



def edit_inputs(ws: torch.Tensor, edits: Sequence, G, registry: Optional[Mapping[str, Direction]] = None
                ) -> tuple[torch.Tensor, Optional[dict]]:
    """Both synthesis inputs for a mixed list of ``edits`` (see the module docstring):
    ``(edited ws (N,num_ws,w_dim), style_deltas)``; ``style_deltas`` is None when no edit is in StyleSpace.
    A raw W tensor as an edit's direction is used as an unnamed :class:`Direction`."""
    items = []
    for item in edits:
        if isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
            item = (Direction(name="tensor", vector=item[0]), *item[1:])
        items.append(item)
    ws_e = apply_edits(ws, items, registry)  # validates every item (unknown names, bad strengths)
    return ws_e, (style_deltas_for(items, G, registry) or None)


def s_direction(name: str, edits: Sequence, **fields) -> Direction:
    """An S-space direction from ``[(style_layer, channel, delta), ...]`` (Chunkmogrify/StyleSpace presets)."""
    return Direction(name, space="s", s_edits=list(edits), **fields)

