"""``python -m core demo --out DIR``: the main job end to end, without an editor.

Loads the embedded default model, inverts a portrait (by default a 256×256 portrait of the embedded face
domain, drawn by our own renderer, so it is ours to ship and is in the model's domain; ``--photo`` takes
your own image), renders a few edits from the model's direction manifest through the same
:class:`core.session.EditSession` the server uses, and writes a labelled before/after sheet (PNG).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

# small features, each pushed away from where the bundled portrait (seed 7: smile 0.63, mouth_open 0.90,
# eye_openness 0.78, gaze 0.23, glasses 0.82) has it, so every edit has room to show
DEFAULT_EDITS = ("smile:-3", "mouth_open:-3", "eye_openness:-3", "gaze:+3", "glasses:-3")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo-out"), help="output folder (default demo-out)")
    p.add_argument("--photo", type=pathlib.Path, help="your own image instead of the bundled portrait")
    p.add_argument("--model", type=pathlib.Path, help="generator checkpoint (default: the embedded face64 model)")
    p.add_argument("--method", default="pti", choices=("pti", "chunks", "w", "wplus"))
    p.add_argument("--pivot", default="auto", choices=("auto", "w", "encoder"),
                   help="where PTI starts (default auto: the encoder's code when the model has an encoder, as the "
                        "server does; w: PTI's own W projection)")
    p.add_argument("--align", default=None, choices=("auto", "none"),
                   help="default: none for the bundled portrait, auto for --photo")
    p.add_argument("--edits", default=default_edits(), help="comma-separated direction names, each optionally "
                   "NAME:STRENGTH (default: five small-feature edits of the embedded model; for other models their "
                   "first four)")
    p.add_argument("--strength", type=float, default=3.0,
                   help="strength of every edit given without one (default 3: clearly visible)")
    p.add_argument("--steps", type=int, default=None, help="projection steps (default: the method's)")
    p.add_argument("--tune-steps", type=int, default=None, help="PTI tuning steps (default: the method's)")
    p.add_argument("--seed", type=int, default=7, help="which bundled portrait (renderer seed)")


def default_edits() -> str:
    return ",".join(DEFAULT_EDITS)


def parse_edits(text: str, strength: float) -> list[tuple[str, float]]:
    """``"smile:-3,beard"`` -> ``[("smile", -3.0), ("beard", strength)]``; a strength that is no number is refused."""
    from core.common import LatentEditError

    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, value = item.partition(":")
        try:
            out.append((name.strip(), float(value) if value.strip() else float(strength)))
        except ValueError:
            raise LatentEditError(f"edit {item!r}: the strength after ':' must be a number, e.g. smile:-2") from None
    return out


def bundled_portrait(seed: int, size: int = 256) -> np.ndarray:
    """``(size,size,3)`` uint8: a portrait of the embedded domain drawn by our renderer."""
    from core import demo

    return np.asarray(demo.render(demo.sample_params(1, seed)[0], size=size), dtype=np.uint8)


def _tile(rgb: np.ndarray, label: str, size: int) -> Image.Image:
    img = Image.fromarray(rgb).resize((size, size), Image.LANCZOS if rgb.shape[0] > size else Image.NEAREST)
    tile = Image.new("RGB", (size, size + 22), "white")
    tile.paste(img, (0, 0))
    ImageDraw.Draw(tile).text((4, size + 5), label, fill="black")
    return tile


def make_sheet(tiles: list[tuple[np.ndarray, str]], size: int = 256) -> Image.Image:
    """Tiles side by side with a label under each."""
    imgs = [_tile(rgb, label, size) for rgb, label in tiles]
    sheet = Image.new("RGB", (len(imgs) * (size + 6) - 6, size + 22), "white")
    for i, t in enumerate(imgs):
        sheet.paste(t, (i * (size + 6), 0))
    return sheet


def _to_uint8(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Result layer (H,W,4) in [0,1] composited over the input (as an editor shows it) -> uint8 RGB."""
    a = rgba[..., 3:4]
    rgb = rgba[..., :3] * a + background * (1 - a)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def _pivot(args: argparse.Namespace, model_path, G) -> tuple:
    """(SessionOptions.pivot, MethodAssets or None) for ``--pivot``: "auto" is core.session.default_pivot of what
    lies beside the checkpoint (the encoder's code where there is an encoder)."""
    from core.common import LatentEditError
    from core.models import find_encoder
    from core.session import MethodAssets, default_pivot

    if args.method != "pti" or args.pivot == "w":
        return "w", None
    path, why = find_encoder(model_path, default=args.model is None)
    if path is None:
        if args.pivot == "encoder":
            raise LatentEditError(f"--pivot encoder: {why}")
        return "w", None
    if args.pivot == "auto" and default_pivot(("encoder",)) != "encoder":
        return default_pivot(("encoder",)), None
    from core.encoder import check_compatible, load_encoder

    E = load_encoder(path)
    check_compatible(E, G)
    return "encoder", MethodAssets(encoder=E)


def main(args: argparse.Namespace) -> int:
    import core
    from core.common import LatentEditError
    from core.session import SessionOptions, create_session

    try:
        model_path = args.model or core.default_model_path()
        G = core.load_generator(model_path)
        directions = core.load_directions(model_path, G)  # the manifest beside the checkpoint, if any
        if not directions:  # a checkpoint without direction files: SeFa directions from its own weights
            directions = core.sefa(G)
        if args.photo:
            try:
                rgb = np.asarray(Image.open(args.photo).convert("RGB"), dtype=np.uint8)
            except (OSError, ValueError) as exc:  # missing, unreadable or not an image
                raise LatentEditError(f"cannot read the photo {args.photo}: {exc}") from None
            align = args.align or "auto"
        else:
            rgb = bundled_portrait(args.seed)
            align = args.align or "none"
        edits = parse_edits(args.edits, args.strength)
        if args.edits == default_edits() and not {n for n, _ in edits} <= set(directions):
            edits = [(n, args.strength) for n in list(directions)[:4]]  # another model: its first directions
        unknown = [n for n, _ in edits if n not in directions]
        if unknown:
            raise LatentEditError(f"unknown edit(s) {unknown}; this model has: {', '.join(sorted(directions))}")
        layer = np.concatenate([rgb.astype(np.float32) / 255.0, np.ones(rgb.shape[:2] + (1,), np.float32)], axis=2)
        pivot, assets = _pivot(args, model_path, G)
        opts = SessionOptions(method=args.method, align=align, project_steps=args.steps, tune_steps=args.tune_steps,
                              pivot=pivot)
        last = [-1]

        def progress(event):
            pct = int(event.fraction * 100)
            if pct // 10 != last[0] // 10:
                print(f"  {pct:3d}%  {event.message}", flush=True)
                last[0] = pct

        start = f" from the {'encoder' if pivot == 'encoder' else 'W projection'}" if args.method == "pti" else ""
        print(f"model {model_path} ({G.resolution}px, {len(directions)} directions); method {args.method}{start}, "
              f"align {align}")
        t0 = time.perf_counter()
        session = create_session(G, layer, None, opts, progress=progress, directions=directions, assets=assets)
        t_invert = time.perf_counter() - t0
        # what the generator itself reproduces (at its own resolution): the inversion's honest quality
        rec = session.inversion.generated()[0].permute(1, 2, 0).clamp(-1, 1).add(1).mul(127.5).round()
        tiles = [(rgb, "input"), (rec.byte().numpy(), f"inversion ({G.resolution} px)")]
        t1 = time.perf_counter()
        for name, strength in edits:
            out = session.render([(name, strength)])
            tiles.append((_to_uint8(out, layer[..., :3]), f"{name} {strength:+g}"))
        t_render = (time.perf_counter() - t1) / max(1, len(edits))
    except LatentEditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "before_after.png"
    make_sheet(tiles).save(path)
    Image.fromarray(rgb).save(args.out / "input.png")
    print(f"inversion {t_invert:.1f} s, each re-edit {t_render * 1000:.0f} ms")
    print(path.resolve())
    return 0
