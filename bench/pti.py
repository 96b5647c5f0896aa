"""PTI Table 1 on our data: W, W+, PTI and PTI+locality on one generated and two real photos.

python bench/pti.py [--quick] [--json PATH] [--loss-study]

Rows: ``method`` (W, W+, PTI, PTI+reg), ``image``, ``lpips`` (AlexNet-LPIPS; the JSON names the backbone —
a random-backbone fallback is *not* a calibrated perceptual metric), ``mse`` ([-1,1] scale), ``ms_ssim``,
``id`` (dlib cosine similarity, or None when dlib is not installed), ``seconds`` (wall time of the method,
PTI rows include their W pivot projection), ``mse_vs_W`` (ratio to the W row of the same image, same run),
``drift`` (PTI rows: mean squared change of 16 random latents' images, tuned vs base generator),
``tune_steps`` (PTI rows: steps run; fewer than asked when the LPIPS early stop applied).
``--loss-study`` instead compares projection losses (random-backbone LPIPS vs pure L2 vs both) on known-W
targets of random tiny generators (the measurement behind core.projection.FALLBACK_L2_WEIGHT), and PTI tuning
losses on an out-of-domain target (behind keeping PTI's L2 + AlexNet-LPIPS with the fallback).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from _util import parse_args, print_table, write_json

from core.metrics import identity, lpips, lpips_backbone, ms_ssim, mse
from core.projection import ProjectOptions, effective_l2_weight, project
from core.pti import LocalityOptions, PTIOptions, pivotal_tune, pivotal_tune_report


def _extra(parser):
    parser.add_argument("--loss-study", action="store_true", help="compare projection losses on known-W targets instead")
    parser.add_argument("--model", default=None, help="generator checkpoint (default: the embedded default model)")
    parser.add_argument("--project-steps", type=int, default=None, help="override the projection steps")
    parser.add_argument("--tune-steps", type=int, default=None, help="override the tuning steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared, oversubscribed 2-core machine)")


def load_model(path):
    """The generator to benchmark and a note saying what it is."""
    from core.stylegan2.formats import load_generator

    if path is None:
        try:
            from core.demo import default_model_path

            path = default_model_path()
        except (ImportError, AttributeError) as exc:
            path = None
            note = f"embedded default model unavailable ({exc.__class__.__name__}: {exc})"
        else:
            note = f"embedded default model {path}"
            if not path.exists():
                note, path = f"embedded default model missing at {path}", None
    else:
        note = f"model {path}"
    if path is not None:
        return load_generator(path).eval(), note
    from core.stylegan2.network import Generator, GeneratorConfig

    torch.manual_seed(0)
    cfg = GeneratorConfig(resolution=64, z_dim=64, w_dim=64, mapping_layers=2,
                          channels={4: 64, 8: 64, 16: 64, 32: 32, 64: 32})
    return Generator(cfg).eval(), note + "; RANDOM 64 px generator used instead (numbers are not meaningful for faces)"


def _face_crop(rgb: np.ndarray, size: int) -> tuple[np.ndarray, str]:
    """FFHQ-aligned face crop via core.align when it works, else a centred square crop; returns (crop, how)."""
    try:
        from core.align import align_face, detect_faces

        faces = detect_faces(rgb)
        if faces:
            crop, _ = align_face(rgb, faces[0], size)
            return np.asarray(crop), "core.align FFHQ alignment"
        how = "no face detected: centre crop"
    except Exception as exc:  # noqa: BLE001 - the bench must run while core.align is still changing
        how = f"core.align failed ({exc.__class__.__name__}): centre crop"
    from PIL import Image

    h, w = rgb.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(rgb[y0:y0 + s, x0:x0 + s]).resize((size, size), Image.LANCZOS)
    return np.asarray(img), how


def load_images(G, quick: bool) -> tuple[dict, dict]:
    """{name: (1,3,R,R) in [-1,1]} and {name: how it was made}."""
    out, how = {}, {}
    with torch.no_grad():
        z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1))
        out["generated"] = G.synthesis(G.mapping(z, truncation_psi=0.7), noise_mode="const").clamp(-1, 1)
    how["generated"] = "G(mapping(z seed 1), psi=0.7)"
    photos = {}
    try:
        from skimage import data as skdata

        photos["astronaut"] = skdata.astronaut()
    except Exception as exc:  # noqa: BLE001
        how["astronaut"] = f"unavailable: {exc}"
    try:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    except Exception as exc:  # noqa: BLE001
        how["grace_hopper"] = f"unavailable: {exc}"
    if quick:
        photos = dict(list(photos.items())[:1])
    for name, rgb in photos.items():
        crop, how[name] = _face_crop(rgb, G.resolution)
        t = torch.from_numpy(crop[..., :3].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        out[name] = t.contiguous()
    return out, how


def _metrics(G, ws, target):
    with torch.no_grad():
        img = G.synthesis(ws, noise_mode="const").clamp(-1, 1)
    ids, _ = identity(img, target)
    return {
        "lpips": float(lpips(img, target, "alex")),
        "mse": float(mse(img, target)),
        "ms_ssim": float(ms_ssim(img, target)),
        "id": None if ids is None else float(ids),
    }


def _drift(G, G_tuned, n=16):
    with torch.no_grad():
        ws = G.mapping(torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(123)))
        return float((G_tuned.synthesis(ws, noise_mode="const") - G.synthesis(ws, noise_mode="const")).square().mean())


LOSSES = {  # projection losses compared by --loss-study (l2_weight=0.0 means LPIPS only)
    "l2": dict(lpips_weight=0.0, l2_weight=1.0),
    "vgg": dict(l2_weight=0.0),
    "alex": dict(lpips_net="alex", l2_weight=0.0),
    "alex+1.0l2": dict(lpips_net="alex", l2_weight=1.0),
    "vgg+1.0l2": dict(l2_weight=1.0),
    "vgg+0.3l2": dict(l2_weight=0.3),
    "vgg+0.1l2": dict(l2_weight=0.1),
}


def loss_study(quick: bool) -> list:
    """Known-W inversion on random tiny generators (32 px, w_dim 32) with each projection loss.

    Rows: method ``W[loss]``, image ``g{generator seed}t{target seed}``, mse, ms_ssim, ``w_err`` (per-layer latent
    error ‖ws − ws_true‖/√num_ws), seconds.  This is the measurement behind core.projection.FALLBACK_L2_WEIGHT.
    """
    from core.stylegan2.network import Generator, GeneratorConfig

    rows = []
    pairs = [(0, 5), (0, 6)] if quick else [(0, 5), (0, 6), (1, 5), (1, 6)]
    losses = {k: LOSSES[k] for k in ("l2", "vgg+0.1l2")} if quick else LOSSES
    for g_seed, t_seed in pairs:
        torch.manual_seed(g_seed)
        G = Generator(GeneratorConfig(resolution=32, z_dim=32, w_dim=32, mapping_layers=2,
                                      channels={4: 32, 8: 32, 16: 32, 32: 16})).eval()
        with torch.no_grad():
            ws_true = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(t_seed)))
            target = G.synthesis(ws_true, noise_mode="const")
        for name, kw in losses.items():
            o = ProjectOptions(initial_learning_rate=0.1, w_avg_samples=200, **kw)
            t0 = time.perf_counter()
            ws = project(G, target, steps=40 if quick else 150, options=o)
            secs = time.perf_counter() - t0
            with torch.no_grad():
                img = G.synthesis(ws, noise_mode="const")
            rows.append({"method": f"W[{name}]", "image": f"g{g_seed}t{t_seed}", "mse": float(mse(img, target)),
                         "ms_ssim": float(ms_ssim(img.clamp(-1, 1), target.clamp(-1, 1))),
                         "w_err": float((ws - ws_true).norm() / G.num_ws ** 0.5), "seconds": secs})
    rows += tuning_loss_study(quick)
    for name in losses:
        sel = [r for r in rows if r["method"] == f"W[{name}]"]
        rows.append({"method": f"W[{name}]", "image": "mean",
                     **{k: sum(r[k] for r in sel) / len(sel) for k in ("mse", "ms_ssim", "w_err", "seconds")}})
    return rows


TUNING_LOSSES = {"alex+l2": dict(), "l2": dict(lpips_weight=0.0), "vgg+l2": dict(lpips_net="vgg"),
                 "alex": dict(l2_weight=0.0)}


def tuning_loss_study(quick: bool) -> list:
    """PTI tuning losses on the unit tests' out-of-domain target (tiny generator seed 0, painted 12 px patch)."""
    from core.stylegan2.network import Generator, GeneratorConfig

    torch.manual_seed(0)
    G = Generator(GeneratorConfig(resolution=32, z_dim=32, w_dim=32, mapping_layers=2,
                                  channels={4: 32, 8: 32, 16: 32, 32: 16})).eval()
    with torch.no_grad():
        target = G.synthesis(G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(5))))
    yy, xx = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    target[:, 0, 10:22, 10:22] = 1.0
    target[:, 1, 10:22, 10:22] = ((yy // 3 + xx // 3) % 2) * 2 - 1.0
    target[:, 2, 10:22, 10:22] = -1.0
    pivot = project(G, target, steps=100, options=ProjectOptions(lpips_net="alex", l2_weight=1.0,
                                                                 initial_learning_rate=0.05, w_avg_samples=200))
    rows = []
    for name, kw in (TUNING_LOSSES if not quick else {"alex+l2": {}, "l2": dict(lpips_weight=0.0)}).items():
        t0 = time.perf_counter()
        G_t = pivotal_tune(G, pivot, target, steps=40 if quick else 120, options=PTIOptions(learning_rate=3e-3, **kw))
        secs = time.perf_counter() - t0
        with torch.no_grad():
            img = G_t.synthesis(pivot, noise_mode="const")
        rows.append({"method": f"PTI[{name}]", "image": "g0t5+patch", "mse": float(mse(img, target)),
                     "ms_ssim": float(ms_ssim(img.clamp(-1, 1), target.clamp(-1, 1))), "w_err": None,
                     "seconds": secs})
    return rows


def main():
    args = parse_args(__doc__.splitlines()[0], _extra)
    torch.set_num_threads(max(1, args.threads))
    if args.loss_study:
        rows = loss_study(args.quick)
        print(f"LPIPS backbone: {lpips_backbone('vgg')}")
        print_table(rows, ["method", "image", "mse", "ms_ssim", "w_err", "seconds"],
                    title="projection loss study (known-W targets, random tiny generators)")
        write_json(args.json, rows, lpips_backbone=lpips_backbone("vgg"), study="loss")
        return
    G, model_note = load_model(args.model)
    images, how = load_images(G, args.quick)
    proj_steps, tune_steps = (30, 30) if args.quick else (450, 350)  # PTI §4.5: 450 projection, 350 tuning steps
    proj_steps = args.project_steps or proj_steps
    tune_steps = args.tune_steps or tune_steps
    # --quick projects with AlexNet-LPIPS (~7x cheaper than VGG on CPU); the full run uses PTI's VGG
    popts = ProjectOptions(w_avg_samples=200, lpips_net="alex") if args.quick else ProjectOptions()
    topts = PTIOptions()
    rows = []
    for name, target in images.items():
        t0 = time.perf_counter()
        ws_w = project(G, target, space="w", steps=proj_steps, options=popts)
        t_w = time.perf_counter() - t0
        rows.append({"method": "W", "image": name, **_metrics(G, ws_w, target), "seconds": t_w})
        t0 = time.perf_counter()
        ws_p = project(G, target, space="w+", steps=proj_steps, options=popts)
        rows.append({"method": "W+", "image": name, **_metrics(G, ws_p, target), "seconds": time.perf_counter() - t0})
        for method, loc in (("PTI", False), ("PTI+reg", LocalityOptions())):
            if args.quick and method == "PTI+reg" and name != "generated":
                continue
            t0 = time.perf_counter()
            G_t, rep = pivotal_tune_report(G, ws_w, target, steps=tune_steps, locality=loc, options=topts)
            secs = time.perf_counter() - t0 + t_w
            rows.append({"method": method, "image": name, **_metrics(G_t, ws_w, target), "seconds": secs,
                         "drift": _drift(G, G_t), "tune_steps": rep.steps_run})
    base = {r["image"]: r["mse"] for r in rows if r["method"] == "W"}
    for r in rows:
        r["mse_vs_W"] = r["mse"] / max(base[r["image"]], 1e-12)
        r.setdefault("drift", None)
        r.setdefault("tune_steps", None)
    cols = ["method", "image", "lpips", "mse", "ms_ssim", "id", "seconds", "mse_vs_W", "drift", "tune_steps"]
    meta = {
        "model": model_note,
        "resolution": G.resolution,
        "lpips_backbone": lpips_backbone("alex"),
        "projection_backbone": lpips_backbone(popts.lpips_net),
        "projection_l2_weight": effective_l2_weight(popts),
        "identity": identity(images["generated"], images["generated"])[1],
        "images": how,
        "projection_steps": proj_steps,
        "tuning_steps": tune_steps,
        "threads": torch.get_num_threads(),
    }
    for k, v in meta.items():
        print(f"{k}: {v}")
    print_table(rows, cols, title="PTI Table 1 (ours)")
    write_json(args.json, rows, **meta)


if __name__ == "__main__":
    main()
