"""How legibly each renderer draws each attribute at the model's resolution (before any training).

python bench/legibility.py [--quick] [--json PATH] [--size 64]

For held-out faces (``sample_params`` seed 2024, never a training seed) and every attribute, the attribute is moved
by 2 units of strength (``2 × directions.UNIT`` = 1/3 of its range: base ``p_k × 2/3``, edited ``+ 1/3``, so nothing
clips) and the two renders are compared.  Columns, per renderer (``core.demo.renderer`` v1 is the baseline):

* ``changed_px``: pixels whose largest channel changes by more than 8/255 (mean over faces);
* ``delta_changed``: mean |Δ| (0..1, mean over channels) on those pixels;
* ``mass``: Σ over pixels of mean-channel |Δ| (in pixel units: 1 = one pixel changed from black to white);
* ``mass_blur1``: the same after a Gaussian blur of σ = 1 px of Δ: what survives a generator that draws the face
  slightly soft (a 1-px shift of a thin line mostly cancels, a grown area does not);
* ``part_px`` / ``delta_part``: size of the attribute's part region (its ``ATTRIBUTE_PARTS``, union over both renders'
  ``render_parts``) and mean |Δ| inside it (not for head_x and face_scale, whose region is the whole picture).
"""
from __future__ import annotations

import importlib

from _util import parse_args, print_table, write_json

import numpy as np

from core.demo.renderer import ATTRIBUTES, sample_params

RENDERERS = {"v1": "core.demo.renderer", "v2": "core.demo.renderer_v2"}
MOVE = 1.0 / 3.0  # 2 units of strength (core.demo.directions.UNIT = 1/6)


def _blur1(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur, σ = 1 px, of ``(N,H,W)`` (zero padding: Δ is zero at the borders mostly)."""
    t = np.arange(-3, 4)
    k = np.exp(-0.5 * t * t)
    k /= k.sum()
    y = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 2, x)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="same"), 1, y)


def measure(module: str, n: int, size: int, seed: int = 2024) -> list[dict]:
    mod = importlib.import_module(module)
    attribute_parts = getattr(mod, "ATTRIBUTE_PARTS", {}) if hasattr(mod, "render_parts") else {}
    base = sample_params(n, seed=seed)
    rows = []
    for k, name in enumerate(ATTRIBUTES):
        lo = base.copy()
        lo[:, k] = base[:, k] * (1 - MOVE)
        hi = lo.copy()
        hi[:, k] += MOVE
        a = mod.render(lo, size=size).astype(np.float64) / 255
        b = mod.render(hi, size=size).astype(np.float64) / 255
        d = np.abs(b - a)
        dm = d.mean(-1)                                     # (N,H,W)
        changed = d.max(-1) > 8 / 255
        row = {"renderer": module.rsplit(".", 1)[-1], "attribute": name,
               "changed_px": float(changed.sum((1, 2)).mean()),
               "delta_changed": float((dm * changed).sum() / max(changed.sum(), 1)),
               "mass": float(dm.sum((1, 2)).mean()),
               "mass_blur1": float(np.abs(_blur1((b - a).mean(-1))).sum((1, 2)).mean())}
        parts = attribute_parts.get(name, ())
        if parts and set(parts) != set(mod.PARTS):                # head_x, face_scale: the whole picture
            ids = [mod.PARTS.index(q) for q in parts]
            region = np.isin(mod.render_parts(lo, size=size), ids) | np.isin(mod.render_parts(hi, size=size), ids)
            row["part_px"] = float(region.sum((1, 2)).mean())
            row["delta_part"] = float((dm * region).sum() / max(region.sum(), 1))
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], extra=lambda p: p.add_argument("--size", type=int, default=64))
    n = 8 if args.quick else 32
    per = {key: measure(mod, n, args.size) for key, mod in RENDERERS.items()}
    rows = []
    for r1, r2 in zip(per["v1"], per["v2"]):
        rows.append({"attribute": r1["attribute"],
                     "v1_changed_px": r1["changed_px"], "v2_changed_px": r2["changed_px"],
                     "v1_delta_changed": r1["delta_changed"], "v2_delta_changed": r2["delta_changed"],
                     "v1_mass": r1["mass"], "v2_mass": r2["mass"],
                     "v1_mass_blur1": r1["mass_blur1"], "v2_mass_blur1": r2["mass_blur1"],
                     "blur1_ratio_v2_v1": r2["mass_blur1"] / max(r1["mass_blur1"], 1e-9),
                     "v1_part_px": r1.get("part_px", float("nan")), "v2_part_px": r2.get("part_px", float("nan")),
                     "v1_delta_part": r1.get("delta_part", float("nan")),
                     "v2_delta_part": r2.get("delta_part", float("nan"))})
    print_table(rows, title=f"legibility of a 2-unit move at {args.size} px, {n} held-out faces (seed 2024)")
    write_json(args.json, rows, size=args.size, n=n)


if __name__ == "__main__":
    main()
