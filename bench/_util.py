"""Shared plumbing for benchmarks: the common command line, a printed table and the JSON file.

Every bench is ``python bench/NAME.py [--quick] [--json PATH]``; rows are dicts whose keys are the
column names, printed as a table and written as ``{"rows": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Iterable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """The common flags: ``--quick`` (under 60 s on 2 CPU cores) and ``--json PATH``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes; finishes in under 60 s on 2 CPU cores")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write {'rows': [...]} to this file")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def print_table(rows: Sequence[dict], columns: Iterable[str] | None = None, title: str | None = None) -> None:
    """Print rows as an aligned text table (columns default to the keys of the first row)."""
    if not rows:
        print("(no rows)")
        return
    cols = list(columns) if columns is not None else list(rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: pathlib.Path | None, rows: Sequence[dict], **meta) -> None:
    """Write ``{"rows": rows, **meta}`` when a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": list(rows), **meta}, indent=2, default=float))
    print(f"wrote {path}")


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]
