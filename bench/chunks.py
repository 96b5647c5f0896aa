"""ChunkyGAN Table 1 on the embedded domain: global vs segment projection in W, W+ and S; re-edit cost.

Images (64 px, never used for training or tuning): held-out renders of the embedded domain
(``core.demo.sample_params(seed=HELDOUT_SEED)``), the same faces each with one extra drawn on top
(``core.demo.EXTRAS``: out of the training distribution), and two real photos FFHQ-aligned with core.align
(skimage's astronaut, matplotlib's grace_hopper).  Rows, as in ChunkyGAN Table 1 (every method the same
optimiser, loss — Eq. 2: LPIPS, plus λ_reg Σ‖X_i − X_μ‖² for the segments — and number of steps; all codes start
at the mean latent, as the paper's):

* ``W`` / ``W+`` / ``S``: one code for the whole image (core.chunks.invert_segments with one all-ones segment);
* ``Ours-W`` / ``Ours-W+`` / ``Ours-S``: automatic segments (the session's ``segments="auto"`` path: one segment
  per face part of the embedded segmenter's head, masks ``S = G^S(X^S)`` optimised jointly, X^S starting at the
  encoder's code), λ_reg = 0;
* ``Ours-W+ reg``: the same with the paper's λ_reg = 1 on the plain sum; ``Ours-W+ reg norm``: λ_reg = 1 on the
  per-element form divided by the W variance (``ChunksOptions.reg_normalise``, the pre-issue-21 loss).

Metrics on the whole image: ``lpips`` (core.losses' LPIPS; its backbone is printed: without the ImageNet
weights it is the random-backbone fallback, not the paper's network), ``l2`` (mean squared error of [0,1]
images, the paper's L2), ``segments`` (their number), ``code_spread``; identity (ArcFace) is not available here.
The summary gives Ours-W+ / W+ for L2 and LPIPS per image group (target on held-out renders: L2 ≤ 0.9×).
Re-edit rows time ``SegmentSession.render`` and ``EditSession.render`` (one edit, cached inversion) against a
bare generator forward of one code in the same run (target ratio ≤ 1.2).

    python bench/chunks.py [--quick] [--json PATH] [--steps N] [--faces N]
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from _util import parse_args, print_table, timed, write_json

HELDOUT_SEED = 8_300_000  # held-out faces: sample_params(n, seed=HELDOUT_SEED); no trainer uses this range
# (row, space, automatic segments, λ_reg, regulariser normalised per element / W variance)
ROWS = (("W", "w", False, 0.0, False), ("Ours-W", "w", True, 0.0, False), ("W+", "w+", False, 0.0, False),
        ("Ours-W+", "w+", True, 0.0, False), ("Ours-W+ reg", "w+", True, 1.0, False),
        ("Ours-W+ reg norm", "w+", True, 1.0, True), ("S", "s", False, 0.0, False), ("Ours-S", "s", True, 0.0, False))


def _extra(parser):
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps per method (default 200, quick 8)")
    parser.add_argument("--faces", type=int, default=None, help="held-out faces (default 4, quick 1)")
    parser.add_argument("--seed", type=int, default=0)


def _to_tensor(rgb01: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)[None] * 2 - 1


def images(res: int, faces: int, photos: bool = True) -> list[tuple[str, str, torch.Tensor]]:
    """(group, name, (1,3,res,res) in [-1,1]): held-out renders, the same with an extra, the aligned photos."""
    from core.demo import EXTRAS, render, sample_params

    out = []
    params = sample_params(faces, seed=HELDOUT_SEED)
    for i, p in enumerate(params):
        out.append(("render", f"face {i}", _to_tensor(render(p, size=res) / 255.0)))
        extra = EXTRAS[i % len(EXTRAS)]
        out.append(("render+extra", f"face {i}+{extra}", _to_tensor(render(p, extras=(extra,), size=res) / 255.0)))
    if photos:
        import matplotlib.cbook
        import skimage.data
        from PIL import Image

        from core.align import align_face, find_face

        for name, photo in (("astronaut", skimage.data.astronaut()),
                            ("grace_hopper", np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))))):
            layer = photo.astype(np.float32) / 255
            crop, _ = align_face(layer, find_face(layer), res)
            out.append(("photo", name, _to_tensor(np.clip(crop, 0, 1))))
    return out


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], _extra)
    torch.set_num_threads(1)  # two threads ran several times slower on the shared 2 cores
    steps = args.steps or (8 if args.quick else 200)
    faces = args.faces or (1 if args.quick else 4)
    import core
    from core.chunks import ChunksOptions, code_spread, invert_segments
    from core.encoder import load_encoder
    from core.losses import perceptual_loss
    from core.segmenter import default_segmenter_path, load_segmenter
    from core.session import MethodAssets, SessionOptions, auto_segments, create_session
    from core.stylegan2.formats import load_generator

    G = load_generator(core.default_model_path()).eval().requires_grad_(False)
    from core.demo import default_encoder_path
    assets = MethodAssets(encoder=load_encoder(default_encoder_path()),
                          segmenter=load_segmenter(default_segmenter_path()))
    res = int(G.resolution)
    lp = perceptual_loss("vgg")
    opts = ChunksOptions(seed=args.seed)
    imgs = images(res, faces, photos=True)
    if args.quick:
        imgs = [imgs[0], imgs[-1]]  # one held-out render, one photo
    whole = torch.ones(1, res, res)
    rows = []
    for group, name, img in imgs:
        masks, generator, info = auto_segments(G, img, whole, assets)
        for label, space, ours, reg, norm in ROWS:
            t = time.perf_counter()
            s = invert_segments(G, img, masks if ours else whole, steps=steps, space=space, reg=reg,
                                options=dataclasses.replace(opts, reg_normalise=norm),
                                mask_generator=generator if ours else None)
            seconds = time.perf_counter() - t
            with torch.no_grad():
                out = s.generated()
                rows.append({"method": label, "group": group, "image": name, "segments": s.inversion.segments,
                             "lpips": float(lp(out.clamp(-1, 1), img)[0]),
                             "l2": float(((out.clamp(-1, 1) - img) / 2).square().mean()),
                             "code_spread": code_spread(s.ws) if space != "s" else float("nan"),
                             "seconds": seconds})
    print(f"model: {core.default_model_path().name}; LPIPS backbone: {lp.backbone}; steps per method: {steps}")
    print_table(rows, ["method", "group", "image", "segments", "lpips", "l2", "code_spread", "seconds"],
                title="Table 1 (whole image, lower is better)")
    summary = []
    for group in dict.fromkeys(r["group"] for r in rows):
        for label, *_ in ROWS:
            sel = [r for r in rows if r["group"] == group and r["method"] == label]
            summary.append({"method": label, "group": group, "images": len(sel),
                            "lpips": float(np.mean([r["lpips"] for r in sel])),
                            "l2": float(np.mean([r["l2"] for r in sel]))})
    print_table(summary, ["method", "group", "images", "lpips", "l2"], title="means per group")
    by = {(r["method"], r["group"]): r for r in summary}
    for group in dict.fromkeys(r["group"] for r in summary):
        for a, b in (("Ours-W", "W"), ("Ours-W+", "W+"), ("Ours-W+ reg", "W+"), ("Ours-W+ reg norm", "W+"),
                     ("Ours-S", "S")):
            print(f"  {group}: {a} / {b}: l2 {by[(a, group)]['l2'] / by[(b, group)]['l2']:.3f}, "
                  f"lpips {by[(a, group)]['lpips'] / by[(b, group)]['lpips']:.3f}")

    # ---- re-edit cost: cached session render vs one bare generator forward ----
    group, name, img = imgs[0]
    seg = invert_segments(G, img, torch.ones(1, res, res), steps=2, options=opts)
    d = torch.randn(G.w_dim, generator=torch.Generator().manual_seed(1))
    d = d / d.norm() * float(seg.ws.std()) * 4
    repeats = 10 if args.quick else 40

    def forward():
        with torch.no_grad():
            G.synthesis(seg.ws[:1], noise_mode="const")

    layer = np.concatenate([(img[0].permute(1, 2, 0).numpy() + 1) / 2, np.ones((res, res, 1), np.float32)], -1)
    sel = np.zeros((res, res), np.float32)
    sel[int(0.55 * res):int(0.85 * res), int(0.28 * res):int(0.72 * res)] = 1  # mouth and chin
    sess = create_session(G, np.clip(layer, 0, 1).astype(np.float32), sel,
                          SessionOptions(method="chunks", align="none", project_steps=2))
    paths = [("SegmentSession.render alpha", lambda: seg.render([(d, 1.0)])),
             ("EditSession.render alpha", lambda: sess.render([(d, 1.0)]))]
    if not args.quick:
        big = np.repeat(np.repeat(layer, 4, 0), 4, 1)  # a 4× layer: delta upsampled to full resolution
        sess4 = create_session(G, np.clip(big, 0, 1).astype(np.float32), np.repeat(np.repeat(sel, 4, 0), 4, 1),
                               SessionOptions(method="chunks", align="none", project_steps=2))
        paths += [("SegmentSession.render poisson", lambda: seg.render([(d, 1.0)], blend="poisson")),
                  (f"EditSession.render alpha, {4 * res}px layer", lambda: sess4.render([(d, 1.0)]))]
    timing = []
    for label, fn in paths:
        fn(), forward()
        # interleaved pairs (render, forward): the ratio is robust to load from other processes
        pairs = [(timed(fn, repeats=1, warmup=0), timed(forward, repeats=1, warmup=0)) for _ in range(repeats)]
        s_, f_ = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
        timing.append({"method": "re-edit", "image": name, "path": label, "seconds": s_, "forward_seconds": f_,
                       "ratio": float(np.median([a / b for a, b in pairs]))})
    print_table(timing, ["path", "image", "seconds", "forward_seconds", "ratio"],
                title="re-edit of a cached session vs a bare generator forward (target ratio <= 1.2)")
    write_json(args.json, rows + summary + timing, model=core.default_model_path().name, lpips_backbone=lp.backbone,
               steps=steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
