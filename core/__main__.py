"""Command line: ``python -m core info PATH`` | ``python -m core demo ...``.

Exit codes: 0 ok, 1 a checkpoint/input problem (one clear line on stderr), 2 a missing component.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def _info(args) -> int:
    from core.common import LatentEditError
    from core.stylegan2.formats import load_generator

    try:
        G = load_generator(args.path)
    except LatentEditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, never a traceback
        print(f"error: cannot load {args.path}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    info = G.checkpoint_info
    cfg = G.config.to_dict()
    params = sum(p.numel() for p in G.parameters())
    if args.json:
        print(json.dumps({"format": info["format"], "config": cfg, "num_ws": G.num_ws, "parameters": params,
                          "notes": info["notes"]}))
        return 0
    print(f"format:         {info['format']}")
    print(f"resolution:     {cfg['resolution']}")
    print(f"z_dim / w_dim:  {cfg['z_dim']} / {cfg['w_dim']}")
    print(f"mapping layers: {cfg['mapping_layers']} (lr multiplier {cfg['lr_multiplier']:g})")
    print(f"num_ws:         {G.num_ws}")
    print("channels:       " + ", ".join(f"{r}:{c}" for r, c in cfg["channels"].items()))
    if cfg.get("conv_clamp") is not None:
        print(f"conv_clamp:     {cfg['conv_clamp']:g}")
    print(f"parameters:     {params / 1e6:.2f} M")
    for note in info["notes"]:
        print(f"note:           {note}")
    return 0


def _demo_module():
    """``core.demo_cli`` (``add_arguments(parser)``, ``main(args)``), or None when this build lacks it."""
    try:
        return importlib.import_module("core.demo_cli")
    except ModuleNotFoundError as e:
        if e.name == "core.demo_cli":
            return None
        raise


def _demo_missing(args) -> int:
    print("error: the demo command is not available in this build (core.demo_cli is missing)", file=sys.stderr)
    return 2


def _demo(args) -> int:
    return int(_demo_module().main(args) or 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description="Latent Edit engine tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the detected format and inferred architecture of a generator checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(fn=_info)
    p = sub.add_parser("demo", help="invert a portrait and render edits with the embedded model (core.demo_cli)")
    demo = _demo_module()
    if demo is None:
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=_demo_missing)
    else:
        demo.add_arguments(p)
        p.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
