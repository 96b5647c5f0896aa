"""``python -m core.edits PATH [--model CHECKPOINT]``: list the directions a file or manifest provides."""
from __future__ import annotations

from core.common import LatentEditError
from core.edits.formats import load_directions


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
