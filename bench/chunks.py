"""Segment inversion (ChunkyGAN) vs global W+ inside a region, and the cost of a cached re-edit.

For each image (a portrait of the embedded domain drawn by core.demo's renderer, and two real photos
FFHQ-aligned with core.align: skimage's astronaut and matplotlib's grace_hopper) and a fixed lower-face region
(mouth and chin of the aligned crop), every method gets the same number of optimisation steps:

* ``global W+``: the same optimiser and loss as the segment inversion (core.chunks), fitted to the whole image;
* ``global W+ (projector)``: core.projection's Karras/PTI projector in W+ on the whole image (reference; not in
  ``--quick``);
* ``segments``: core.chunks.invert_segments with the region as the single segment;
* ``segments+PTI``: the same, then segment-restricted pivotal tuning.

A second table splits the face into two segments and compares λ_reg = 0 with the default: the spread of the
segment codes, and for one edit applied to both segments the seam energy (mean squared jump of the edit's image
change across the segment boundary) and the seam contrast (that jump over the mean jump inside a segment: ≈ 1
when the edit flows across the boundary, ≫ 1 when it breaks there).

Metrics are measured inside the region only: ``masked_lpips`` (the LPIPS core.losses provides, its backbone is
printed) and ``masked_mse`` (images in [-1,1]). Re-edit rows time ``SegmentSession.render`` and
``EditSession.render`` (one edit, cached inversion) against a bare generator forward of one code measured in
the same run; the target is a ratio ≤ 1.2.

    python bench/chunks.py [--quick] [--json PATH] [--steps N] [--tune N]
"""
from __future__ import annotations

import time

import numpy as np
import torch

from _util import parse_args, print_table, timed, write_json


def _extra(parser):
    parser.add_argument("--steps", type=int, default=None, help="inversion steps per method (default 150, quick 20)")
    parser.add_argument("--tune", type=int, default=None, help="segment PTI steps (default 50, quick 10)")
    parser.add_argument("--seed", type=int, default=0)


def load_generator_or_random():
    """The embedded default model when its weights exist, else a random 64-px generator (with a note)."""
    try:
        import core

        path = core.default_model_path()
        if path.is_file():
            from core.stylegan2.formats import load_generator

            return load_generator(path).eval(), f"embedded default model {path.name}"
        reason = f"{path} does not exist"
    except (ImportError, AttributeError) as exc:
        reason = f"core.demo/formats not available ({exc})"
    from core.stylegan2.network import Generator, GeneratorConfig

    torch.manual_seed(0)
    cfg = GeneratorConfig(resolution=64, z_dim=128, w_dim=128, mapping_layers=4,
                          channels={4: 128, 8: 128, 16: 64, 32: 64, 64: 32})
    return Generator(cfg).eval(), f"RANDOM generator (64 px): {reason}; numbers only compare methods"


def _to_tensor(rgb01: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)[None] * 2 - 1


def images(res: int) -> list[tuple[str, torch.Tensor]]:
    """(name, (1,3,res,res) in [-1,1]) for the demo portrait and the two aligned real photos."""
    out = []
    try:
        from core.demo.renderer import render, sample_params

        face = render(sample_params(1, seed=3), size=res)
        face = face[0] if face.ndim == 4 else face
        out.append(("demo portrait", _to_tensor(face.astype(np.float32) / 255)))
    except Exception as exc:  # the renderer is optional here
        print(f"note: demo renderer unavailable ({exc})")
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    from core.align import align_face, find_face

    photos = [("astronaut", skimage.data.astronaut()),
              ("grace_hopper", np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))))]
    for name, photo in photos:
        layer = photo.astype(np.float32) / 255
        crop, _ = align_face(layer, find_face(layer), res)
        out.append((name, _to_tensor(np.clip(crop, 0, 1))))
    return out


def lower_face_region(res: int) -> torch.Tensor:
    """(1,res,res): mouth and chin of an FFHQ-aligned crop (rows 55–85 %, columns 28–72 %)."""
    m = torch.zeros(1, res, res)
    m[0, int(0.55 * res):int(0.85 * res), int(0.28 * res):int(0.72 * res)] = 1
    return m


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], _extra)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = args.steps or (20 if args.quick else 150)
    tune = args.tune if args.tune is not None else (10 if args.quick else 50)
    from core.chunks import ChunksOptions, invert_segments
    from core.losses import masked_mse, perceptual_loss
    from core.projection import ProjectOptions, project
    from core.session import SessionOptions, create_session

    G, model_note = load_generator_or_random()
    res = int(G.resolution)
    lp = perceptual_loss("vgg")
    region = lower_face_region(res)
    opts = ChunksOptions(seed=args.seed)
    imgs = images(res)
    if args.quick:
        imgs = imgs[-2:]
    rows = []

    def measure(method, name, img, out, seconds):
        with torch.no_grad():
            rows.append({"method": method, "image": name,
                         "masked_lpips": float(lp(out.clamp(-1, 1), img, region[None])[0]),
                         "masked_mse": float(masked_mse(out, img, region[None])[0]), "seconds": seconds})

    sessions = {}
    for name, img in imgs:
        t = time.perf_counter()
        glob = invert_segments(G, img, torch.ones(1, res, res), steps=steps, options=opts)
        measure("global W+", name, img, glob.generated(), time.perf_counter() - t)
        if not args.quick:  # reference only; skipped in --quick to stay under a minute
            t = time.perf_counter()
            ws = project(G, img, space="w+", steps=steps, options=ProjectOptions(seed=args.seed))
            with torch.no_grad():
                rec = G.synthesis(ws, noise_mode="const")
            measure("global W+ (projector)", name, img, rec, time.perf_counter() - t)
        t = time.perf_counter()
        seg = invert_segments(G, img, region, steps=steps, options=opts)
        measure("segments", name, img, seg.generated(), time.perf_counter() - t)
        t = time.perf_counter()
        segt = invert_segments(G, img, region, steps=steps, tune_steps=tune, options=opts)
        measure("segments+PTI", name, img, segt.generated(), time.perf_counter() - t)
        sessions[name] = (img, seg)

    print(f"model: {model_note}")
    print(f"LPIPS backbone: {lp.backbone}; steps per method: {steps}; segment PTI steps: {tune}")
    print_table(rows, ["method", "image", "masked_lpips", "masked_mse", "seconds"],
                title="inside the lower-face region (lower is better)")
    for name, _ in imgs:
        r = {row["method"]: row for row in rows if row["image"] == name}
        print(f"  {name}: segments / global W+ masked_mse = "
              f"{r['segments']['masked_mse'] / r['global W+']['masked_mse']:.3f}, "
              f"masked_lpips = {r['segments']['masked_lpips'] / r['global W+']['masked_lpips']:.3f}")

    # ---- dispersion regulariser: two segments (eyes / mouth halves of the face), λ_reg 0 vs the default ----
    from core.chunks import code_spread, seam_contrast, seam_energy

    two = torch.zeros(2, res, res)
    two[0, int(0.30 * res):int(0.55 * res), int(0.22 * res):int(0.78 * res)] = 1
    two[1, int(0.55 * res):int(0.85 * res), int(0.22 * res):int(0.78 * res)] = 1
    reg_rows = []
    for name, img in imgs[-1:] if args.quick else imgs:
        d_edit = None
        for reg in (0.0, opts.reg):
            t = time.perf_counter()
            s2 = invert_segments(G, img, two, steps=steps, reg=reg, options=opts)
            seconds = time.perf_counter() - t
            if d_edit is None:
                g = torch.Generator().manual_seed(2)
                d_edit = torch.randn(G.w_dim, generator=g)
                d_edit = d_edit / d_edit.norm() * float(s2.ws.std()) * 4
            with torch.no_grad():
                delta = s2.generated([(d_edit, 1.0)]) - s2.generated()
            reg_rows.append({"method": f"segments x2, reg={reg:g}", "image": name, "code_spread": code_spread(s2.ws),
                             "seam_energy": seam_energy(delta, s2.masks),
                             "seam_contrast": seam_contrast(delta, s2.masks),
                             "masked_mse": float(masked_mse(s2.generated(), img, two.sum(0)[None, None])[0]),
                             "seconds": seconds})
    print_table(reg_rows, ["method", "image", "code_spread", "seam_energy", "seam_contrast", "masked_mse", "seconds"],
                title="λ_reg: code spread and seam energy of one edit applied to both segments (lower = coherent)")

    # ---- re-edit cost: cached session render vs one bare generator forward ----
    name, (img, seg) = next(iter(sessions.items()))
    d = torch.randn(G.w_dim, generator=torch.Generator().manual_seed(1))
    d = d / d.norm() * float(seg.ws.std()) * 4
    repeats = 15 if args.quick else 40

    def forward():
        with torch.no_grad():
            G.synthesis(seg.ws[:1], noise_mode="const")

    layer = np.concatenate([(img[0].permute(1, 2, 0).numpy() + 1) / 2, np.ones((res, res, 1), np.float32)], -1)
    sel = region[0].numpy()
    sess = create_session(G, np.clip(layer, 0, 1).astype(np.float32), sel,
                          SessionOptions(method="chunks", align="none", project_steps=2))
    big = np.repeat(np.repeat(layer, 4, 0), 4, 1)  # a 4× layer: delta upsampled to full resolution
    sess4 = create_session(G, np.clip(big, 0, 1).astype(np.float32), np.repeat(np.repeat(sel, 4, 0), 4, 1),
                           SessionOptions(method="chunks", align="none", project_steps=2))
    timing = []
    for label, fn in [("SegmentSession.render alpha", lambda: seg.render([(d, 1.0)])),
                      ("SegmentSession.render poisson", lambda: seg.render([(d, 1.0)], blend="poisson")),
                      ("EditSession.render alpha", lambda: sess.render([(d, 1.0)])),
                      (f"EditSession.render alpha, {4 * res}px layer", lambda: sess4.render([(d, 1.0)]))]:
        # interleaved pairs (render, forward): the ratio is robust to load from other processes
        fn(), forward()
        pairs = [(timed(fn, repeats=1, warmup=0), timed(forward, repeats=1, warmup=0)) for _ in range(repeats)]
        s, f = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
        timing.append({"method": "re-edit", "image": name, "path": label, "seconds": s, "forward_seconds": f,
                       "ratio": float(np.median([a / b for a, b in pairs]))})
    print_table(timing, ["path", "image", "seconds", "forward_seconds", "ratio"],
                title="re-edit of a cached session vs a bare generator forward (target ratio <= 1.2)")
    write_json(args.json, rows + reg_rows + timing, model=model_note, lpips_backbone=lp.backbone, steps=steps, tune_steps=tune)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
