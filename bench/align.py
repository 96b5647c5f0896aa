"""Real-photo stages on a 4000x3000 photo: face detection, FFHQ alignment and full-resolution paste-back.

The photo is skimage's astronaut upscaled to 2400 px (Lanczos) inside a 4000x3000 gradient, with σ=3 grain, so
the FFHQ quad is about 1000 px. Each stage is timed (median of repeats after a warm-up) with core.align and with a baseline
measured in the same run:

* detect: ``core.align.detect_faces`` (MTCNN on the photo downscaled to 1024 px) vs MTCNN at a larger
  detection size (the full 4000 px, as facenet-pytorch runs it; 2048 px with --quick);
* align: ``align_face`` (FFHQ quad, padding, antialiased bicubic) vs PIL ``Image.transform(QUAD, BICUBIC)`` on the
  whole photo (no antialiasing, no padding);
* paste: ``paste_back`` (windowed inverse warp, antialiased, feathered alpha, bit-identical outside) vs a
  STIT-style full-frame PIL ``AFFINE`` warp of the crop and of its mask plus a full-frame float composite.

``cpu_s`` is the process CPU time of one run (all threads; steadier than wall time on a shared machine).
``psnr_db`` is the unedited round trip (align, then paste back with the same method) inside the face region,
against the photo. ``speedup`` = baseline seconds / seconds.

    python bench/align.py [--quick] [--json PATH]
"""
from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image

from _util import parse_args, print_table, write_json

from core.align import DetectOptions, align_face, detect_faces, paste_back  # noqa: E402  (after _util's sys.path)


def make_photo(H: int = 3000, W: int = 4000, face_px: int = 2400) -> np.ndarray:
    """uint8 (H,W,3): a gradient with the astronaut upscaled to face_px² near the centre, plus grain."""
    from skimage import data

    yy, xx = np.mgrid[:H, :W]
    photo = np.stack([xx * 200 // W + 30, yy * 200 // H + 30, np.full((H, W), 120)], -1).astype(np.uint8)
    up = np.asarray(Image.fromarray(data.astronaut()).resize((face_px, face_px), Image.Resampling.LANCZOS))
    y0, x0 = (H - face_px) // 2, (W - face_px) // 2
    photo[y0:y0 + face_px, x0:x0 + face_px] = up
    # sensor-like grain (σ = 3 levels): an upscaled image alone has no detail at the photo's own pixel scale
    grain = np.random.default_rng(0).normal(0.0, 3.0, photo.shape).round().astype(np.int16)
    return np.clip(photo.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def pil_align(photo: np.ndarray, transform) -> np.ndarray:
    """Baseline: PIL's QUAD transform of the whole photo (quad in PIL's continuous coordinates)."""
    S = transform.size
    quad = (transform.quad + 0.5).flatten()
    return np.asarray(Image.fromarray(photo).transform((S, S), Image.Transform.QUAD, tuple(quad),
                                                        Image.Resampling.BICUBIC))


def pil_paste(photo: np.ndarray, crop: np.ndarray, transform, erode: float = 0.05) -> np.ndarray:
    """Baseline (STIT-style): warp the crop and an eroded square mask to the full frame, composite in float."""
    H, W = photo.shape[:2]
    t = transform.resized(crop.shape[0])
    inv = t.inverse
    a, b = inv[0, 0], inv[0, 1]
    d, e = inv[1, 0], inv[1, 1]
    c = inv[0, 2] + 0.5 - 0.5 * (a + b)
    f = inv[1, 2] + 0.5 - 0.5 * (d + e)
    coeffs = (a, b, c, d, e, f)
    S = crop.shape[0]
    mask = np.zeros((S, S), np.uint8)
    m = int(round(erode * S))
    mask[m:S - m, m:S - m] = 255
    warped = np.asarray(Image.fromarray(crop).transform((W, H), Image.Transform.AFFINE, coeffs,
                                                         Image.Resampling.BILINEAR), dtype=np.float32)
    alpha = np.asarray(Image.fromarray(mask).transform((W, H), Image.Transform.AFFINE, coeffs,
                                                        Image.Resampling.BILINEAR), dtype=np.float32) / 255
    out = photo.astype(np.float32) * (1 - alpha[..., None]) + warped * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def run_timed(fn, repeats: int, warmup: int):
    """(median wall seconds, median process CPU seconds, last result) over ``repeats`` runs after ``warmup``.

    Like _util.timed, plus CPU time (all threads), which contention on a shared machine disturbs less.
    """
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus)), result


def psnr_in(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2)[mask].mean()
    return float(10 * np.log10(255.0 ** 2 / max(err, 1e-12)))


def main():
    args = parse_args(__doc__.splitlines()[0])
    repeats, warmup = (1, 0) if args.quick else (3, 1)
    photo = make_photo()
    H, W = photo.shape[:2]
    rows = []

    base_side = 2048 if args.quick else 0  # 0 = no downscale
    base_name = f"MTCNN at {base_side} px" if base_side else "MTCNN at full 4000 px"
    t_base, c_base, _ = run_timed(lambda: detect_faces(photo, DetectOptions(max_side=base_side)), 1, 0)
    t_ours, c_ours, faces = run_timed(lambda: detect_faces(photo), repeats, 0)
    face = faces[0]
    rows.append(dict(stage="detect", method=base_name, crop_px="-", seconds=t_base, cpu_s=c_base, speedup=1.0,
                     psnr_db=float("nan")))
    rows.append(dict(stage="detect", method="detect_faces (1024 px)", crop_px="-", seconds=t_ours, cpu_s=c_ours,
                     speedup=t_base / t_ours, psnr_db=float("nan")))

    # the face region for PSNR: the detector's box
    x0, y0, x1, y1 = (int(round(v)) for v in face.box)
    region = np.zeros((H, W), bool)
    region[y0:y1, x0:x1] = True

    for size in ((256,) if args.quick else (256, 1024)):
        t_o, c_o, (crop, tr) = run_timed(lambda: align_face(photo, face, size), repeats, warmup)
        t_b, c_b, base_crop = run_timed(lambda: pil_align(photo, tr), repeats, warmup)
        rows.append(dict(stage="align", method="PIL QUAD bicubic", crop_px=size, seconds=t_b, cpu_s=c_b,
                         speedup=1.0, psnr_db=float("nan")))
        rows.append(dict(stage="align", method="align_face", crop_px=size, seconds=t_o, cpu_s=c_o,
                         speedup=t_b / t_o, psnr_db=float("nan")))
        t_b, c_b, base_out = run_timed(lambda: pil_paste(photo, base_crop, tr), repeats, warmup)
        t_o, c_o, out = run_timed(lambda: paste_back(photo, crop, tr, None), repeats, warmup)
        rows.append(dict(stage="paste", method="PIL AFFINE full frame", crop_px=size, seconds=t_b, cpu_s=c_b,
                         speedup=1.0, psnr_db=psnr_in(base_out, photo, region)))
        rows.append(dict(stage="paste", method="paste_back", crop_px=size, seconds=t_o, cpu_s=c_o,
                         speedup=t_b / t_o, psnr_db=psnr_in(out, photo, region)))

    title = (f"core.align on a {W}x{H} photo (face box {x1 - x0}x{y1 - y0} px; "
             f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')})")
    print_table(rows, title=title)
    total = sum(r["seconds"] for r in rows if r["method"] in ("detect_faces (1024 px)", "align_face", "paste_back")
                and r["crop_px"] in ("-", 256))
    print(f"detect + align + paste at 256 px: {total:.2f} s")
    write_json(args.json, rows, photo=[H, W], face_box=[x0, y0, x1, y1], quick=args.quick)


if __name__ == "__main__":
    main()
