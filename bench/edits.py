"""Attribute × direction matrix on the embedded default model.

For every shipped direction, W samples are edited at several strengths, rendered, and scored with
``core.demo.score``; ``delta_per_unit`` is the least-squares slope of the mean attribute score (in [0,1])
against strength. A good direction moves its own attribute strongly and the others little. Baseline, measured
in the same run: random unit directions with the same latent scale (std of W along them), whose largest
attribute movement says what "an arbitrary move of this size" does.

    python bench/edits.py [--quick] [--json PATH] [--samples N] [--psi PSI]
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from _util import parse_args, print_table, write_json


def _extra(parser):
    parser.add_argument("--samples", type=int, default=None, help="W samples per strength (default 128, quick 32)")
    parser.add_argument("--psi", type=float, default=1.0, help="truncation of the W samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", type=int, default=None, help="random baseline directions (default 4, quick 2)")


def _slopes(G, ws, direction, strengths, score, attributes, registry):
    from core.edits import apply_edits

    means = []
    with torch.no_grad():
        for s in strengths:
            img = G.synthesis(apply_edits(ws, [(direction, float(s))], registry)).clamp(-1, 1)
            scores = score(img)
            means.append([float(np.mean(scores[a])) for a in attributes])
    means = np.asarray(means)  # (S, A)
    s = np.asarray(strengths, dtype=np.float64)
    sc = s - s.mean()
    return (sc[:, None] * (means - means.mean(0))).sum(0) / (sc ** 2).sum(), means


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], _extra)
    torch.manual_seed(args.seed)
    try:
        import core
        from core.demo import ATTRIBUTES, score
        path = core.default_model_path()
    except (ImportError, AttributeError) as exc:
        path, reason = None, f"core.demo is not available ({exc})"
    else:
        reason = f"{path} does not exist"
    if path is None or not path.is_file():
        rows = [{"direction": "n/a", "attribute": "n/a", "delta_per_unit": None,
                 "note": f"embedded default model missing: {reason}"}]
        print_table(rows, title="bench/edits: nothing measured")
        write_json(args.json, rows, measured=False)
        return 0

    from core.edits import Direction, load_directions, sample_w

    G = core.load_generator(path).eval()
    directions = load_directions(path, G=G)
    attrs = [a for a in ATTRIBUTES]
    named = [d for d in directions.values() if d.space == "w"]
    n = args.samples or (32 if args.quick else 128)
    strengths = (-1.0, 0.0, 1.0) if args.quick else (-2.0, -1.0, 0.0, 1.0, 2.0)
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        ws = G.mapping(z, truncation_psi=args.psi)

    rows, summary = [], []
    w_samples = sample_w(G, 4096, seed=args.seed + 1)
    n_random = args.random if args.random is not None else (2 if args.quick else 4)
    gen = torch.Generator().manual_seed(args.seed + 2)
    baselines = []
    for i in range(n_random):
        v = torch.randn(G.w_dim, generator=gen)
        v = v / v.norm()
        baselines.append(Direction(f"random_{i}", v, scale=float((w_samples @ v).std()),
                                   description="random unit direction, unit = std of W along it"))
    for d in named + baselines:
        slope, _ = _slopes(G, ws, d, strengths, score, attrs, directions)
        for a, v in zip(attrs, slope):
            rows.append({"direction": d.name, "attribute": a, "delta_per_unit": float(v),
                         "own": d.name == a})
        own = float(slope[attrs.index(d.name)]) if d.name in attrs else float("nan")
        others = [abs(float(v)) for a, v in zip(attrs, slope) if a != d.name]
        summary.append({"direction": d.name, "own_delta_per_unit": own, "max_other": max(others),
                        "mean_other": float(np.mean(others)),
                        "selectivity": abs(own) / max(max(others), 1e-9) if own == own else float("nan"),
                        "layers": str(list(d.layers)) if d.layers else "all", "scale": d.scale,
                        "default_strength": d.default_strength})
    rand_max = max((s["max_other"] for s in summary if s["direction"].startswith("random_")), default=float("nan"))
    for s in summary:
        s["own_vs_random_max"] = abs(s["own_delta_per_unit"]) / rand_max if rand_max == rand_max and rand_max > 0 \
            else float("nan")

    # the matrix: one line per direction, one column per attribute
    names = [d.name for d in named + baselines]
    matrix = []
    for name in names:
        line = {"direction": name}
        for r in rows:
            if r["direction"] == name:
                line[r["attribute"][:9]] = round(r["delta_per_unit"], 3)
        matrix.append(line)
    print(f"model {path.name}: {len(named)} directions, {n} samples, strengths {list(strengths)}, psi {args.psi}")
    print_table(matrix, title="delta of mean attribute score per unit strength (rows: direction, columns: attribute)")
    print()
    print_table(summary, title="summary (selectivity = |own| / max |other|; own_vs_random_max = |own| / max of random baselines)")
    write_json(args.json, rows, summary=summary, model=path.name, samples=n, strengths=list(strengths),
               psi=args.psi, measured=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
