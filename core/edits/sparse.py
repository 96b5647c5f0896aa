"""``python -m core.edits fit-sparse CHECKPOINT``: sparse per-layer directions (Yin et al. 2022) for any generator
with an attribute classifier, written into the manifest beside it as ``<attribute>_sparse`` (kind ``wplus``).

The classifier is the one MAGEC uses (``core.magec.load_descriptor``): the shipped scorer for the embedded model,
``<stem>.attributes.pt`` + ``<stem>.attributes.json`` beside any other checkpoint.  Each fit starts from the
manifest's dense direction of the same name (``delta(1)`` on every row), or from a conditioned linear fit of the
classifier on W where there is none (``core.expanded.regression_init``).  The embedded model, the one with a
ground truth, is also aligned to the renderer's own change, with its measured options
(``core.demo.directions.SPARSE_OPTIONS``; ``--align 0``: no alignment).  Dense and other entries are kept; old
``*_sparse`` entries are replaced.  The fitting itself: ``core.expanded.fit_sparse_directions``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Optional, Sequence

SUFFIX = "_sparse"


def default_options(checkpoint):
    """The fit's options for ``checkpoint``: the embedded model's measured ones (``core.demo.directions.
    SPARSE_OPTIONS``: aligned to its renderer), else Eq. 10's (``core.expanded.SparseOptions()``)."""
    from core.demo import is_default_model
    from core.expanded import SparseOptions

    if is_default_model(checkpoint):
        from core.demo.directions import SPARSE_OPTIONS

        return SPARSE_OPTIONS
    return SparseOptions()


def fit_sparse_for_checkpoint(checkpoint, attributes: Optional[Sequence[str]] = None, options=None, out=None,
                              progress=None) -> tuple[pathlib.Path, dict]:
    """Fit ``<attribute>_sparse`` for ``checkpoint`` (all its classifier's outputs, or ``attributes``) and write
    the manifest (``out``, default the one beside the checkpoint); returns (manifest path, report)."""
    from core.demo import is_default_model
    from core.edits.formats import load_directions, manifest_path_for, save_manifest
    from core.expanded import fit_sparse_directions, regression_init
    from core.magec import load_descriptor
    from core.stylegan2.formats import load_generator

    checkpoint = pathlib.Path(checkpoint)
    G = load_generator(checkpoint).eval()
    descriptor = load_descriptor(checkpoint)
    names = list(descriptor.names)
    beside = manifest_path_for(checkpoint)
    existing = load_directions(checkpoint, G=G) if beside.is_file() else {}
    lo_hi = descriptor.output_range
    unit = (lo_hi[1] - lo_hi[0]) / 6.0 if lo_hi is not None else 1.0 / 6.0
    want = names if attributes is None else list(attributes)
    init, missing = {}, []
    for name in want:
        d = existing.get(name)
        if d is not None and d.space == "w":
            init[name] = d.delta(1.0, int(G.num_ws), int(G.w_dim))
        else:
            missing.append(name)
    if missing:
        V = regression_init(G, descriptor, unit=unit)
        init.update({n: V[names.index(n)] for n in missing if n in names})
    o = options or default_options(checkpoint)
    true_delta = None
    if is_default_model(checkpoint):  # the one model with a ground truth: align to the renderer (SparseOptions.align)
        from core.demo.directions import renderer_true_delta

        true_delta = renderer_true_delta()
    aligned = ", aligned to the renderer's change" if (true_delta is not None and o.align) else ""
    t0 = time.perf_counter()
    dirs, report = fit_sparse_directions(G, descriptor, names, init, attributes=want, options=o,
                                         output_range=lo_hi, unit=unit, suffix=SUFFIX, progress=progress,
                                         true_delta=true_delta,
                                         source=f"core.edits fit-sparse (Yin et al. 2022 Eq. 10, ID term off{aligned}) "
                                                f"with {descriptor.source or 'the attribute classifier'}")
    report.update(seconds=round(time.perf_counter() - t0, 1), regression_init=missing,
                  classifier=descriptor.source, checkpoint=checkpoint.name)
    kept = {k: v for k, v in existing.items() if not k.endswith(SUFFIX) or k in dirs}
    kept.update(dirs)
    path = save_manifest(kept, out or beside, w_dim=int(G.w_dim), num_ws=int(G.num_ws))
    return path, report


def main(argv=None) -> int:
    """CLI entry (``python -m core.edits fit-sparse --help``)."""
    from core.common import LatentEditError
    from core.expanded import SparseOptions

    p = argparse.ArgumentParser(prog="python -m core.edits fit-sparse", description=__doc__.strip().splitlines()[0])
    p.add_argument("checkpoint", help="generator checkpoint (the embedded one: core/demo/weights/face64.pt)")
    p.add_argument("--attributes", default=None, help="comma-separated classifier outputs (default: all)")
    p.add_argument("--steps", type=int, default=None, help=f"Adam steps per attribute (default {SparseOptions.steps})")
    p.add_argument("--align", type=float, default=None,
                   help="weight of the ground-truth alignment, embedded model only (default: "
                        "core.demo.directions.SPARSE_OPTIONS; 0: no alignment)")
    p.add_argument("--out", default=None, help="manifest to write (default: <stem>.directions.json beside it)")
    p.add_argument("--report", default=None, help="also write the fit report (JSON) here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    o = default_options(args.checkpoint)
    if args.steps is not None:
        o = dataclasses.replace(o, steps=args.steps)
    if args.align is not None:
        o = dataclasses.replace(o, align=args.align)
    names = None if args.attributes is None else [a.strip() for a in args.attributes.split(",") if a.strip()]

    def progress(k, step, loss):
        if step == o.steps:
            print(f"  output {k}: {step} steps, loss {loss:.4f}", file=sys.stderr)

    try:
        path, report = fit_sparse_for_checkpoint(args.checkpoint, names, o, args.out, progress)
    except LatentEditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.report:
        pathlib.Path(args.report).write_text(json.dumps(report, indent=1))
    for name, rep in report["attributes"].items():
        print(f"{name + SUFFIX:28s} active {rep['active']:.3f}  cls {rep['cls']:.4f}  l1 {rep['spa']:.4f}")
    print(f"wrote {path} ({report['seconds']} s)")
    return 0
