"""The embedded default domain: direction matrix, scorer accuracy, reconstruction and speed.

python bench/demo.py [--quick] [--json PATH]

Rows (``table`` column says which):
* ``directions``: per attribute direction, the mean |change| of its own attribute across strengths −3..3, the largest
  change of any other attribute, and the own-attribute change of a random W direction with the same scale (baseline).
* ``samples``: per attribute, the 5th and 95th percentile of the scorer's readings on generated samples and their
  mean error against the parameters the z asks for (``data.params_from_z``), beside the same numbers on the
  renderer's own images of those parameters (baseline: what a perfect generator would score).
* ``scorer``: held-out MAE per attribute on fresh renders.
* ``speed``: 64 px generator forward vs one renderer call (baseline), batch 1.
"""
from __future__ import annotations

import time

from _util import parse_args, print_table, timed, write_json

import numpy as np
import torch

import core
from core.demo.data import params_from_z
from core.demo.directions import edit_matrix
from core.demo import ATTRIBUTES, render, sample_params
from core.demo.scorer import load_scorer, score
from core.demo.train import generate
from core.edits import Direction


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    n = 16 if args.quick else 64
    G = core.load_generator(core.default_model_path()).eval()
    scorer = load_scorer()
    dirs = core.load_directions(core.default_model_path(), G=G)
    rows = []

    M = edit_matrix(G, scorer, dirs, n=n)
    gen = torch.Generator().manual_seed(5)
    rand = {}
    for name in ATTRIBUTES:
        v = torch.randn(G.w_dim, generator=gen)
        rand[name] = Direction(name, v / v.norm(), scale=dirs[name].scale)
    R = edit_matrix(G, scorer, rand, n=n)
    for i, name in enumerate(ATTRIBUTES):
        others = np.delete(M[i], i)
        j = int(np.argmax(np.where(np.arange(len(ATTRIBUTES)) == i, -1.0, M[i])))
        rows.append({"table": "directions", "name": name, "own_change": float(M[i, i]),
                     "max_other": float(others.max()), "max_other_attr": ATTRIBUTES[j],
                     "other_over_own": float(others.max() / max(M[i, i], 1e-9)),
                     "random_dir_own_change": float(R[i, i]),
                     "own_vs_random": float(M[i, i] / max(R[i, i], 1e-9))})

    z = torch.randn(128 if args.quick else 256, G.z_dim, generator=torch.Generator().manual_seed(11))
    fake = generate(G, z)
    want = params_from_z(z.numpy())
    got, ref = score(fake), score(render(want))
    for k, name in enumerate(ATTRIBUTES):
        rows.append({"table": "samples", "name": name, "p5": float(np.percentile(got[name], 5)),
                     "p95": float(np.percentile(got[name], 95)), "z_mae": float(np.abs(got[name] - want[:, k]).mean()),
                     "renderer_p5": float(np.percentile(ref[name], 5)), "renderer_p95": float(np.percentile(ref[name], 95)),
                     "renderer_z_mae": float(np.abs(ref[name] - want[:, k]).mean())})

    p = sample_params(100 if args.quick else 500, seed=31337)
    pred = score(render(p))
    for k, name in enumerate(ATTRIBUTES):
        rows.append({"table": "scorer", "name": name, "held_out_mae": float(np.abs(pred[name] - p[:, k]).mean())})

    z = torch.randn(1, G.z_dim)
    with torch.no_grad():
        t_g = timed(lambda: G.synthesis(G.mapping(z)), repeats=5 if args.quick else 20)
    t_r = timed(lambda: render(p[0]), repeats=5 if args.quick else 20)
    t0 = time.perf_counter()
    core.load_generator(core.default_model_path())
    t_load = time.perf_counter() - t0
    rows.append({"table": "speed", "name": "generator_forward_64px_ms", "value": t_g * 1e3,
                 "baseline_render_ms": t_r * 1e3, "ratio": t_g / t_r, "load_s": t_load})

    for table in ("directions", "samples", "scorer", "speed"):
        sub = [r for r in rows if r["table"] == table]
        print_table(sub, [c for c in sub[0] if c != "table"], title=f"\n{table}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
