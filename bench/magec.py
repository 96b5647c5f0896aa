"""MAGEC Tables 1 and 3 on the embedded default: MAGEC W+ inversion against the same schedule without it.

    python bench/magec.py [--quick] [--json PATH] [--faces N] [--steps S] [--threads T]
    python bench/magec.py --tune [--quick]            # λ_MAGEC on tuning faces (never the bench's faces)
    python bench/magec.py --linknet-study [--quick]   # LinkNet W+ row handling and output (core.magec docstring)

Methods (``core.magec.invert_magec_report``, paper §4 protocol: two phases of 100 steps, Adam, lr 0.07·0.8^⌊t/25⌋,
start at the mean W of 50,000 samples, W+): ``MAGEC`` (the defaults), ``W+`` (``MagecOptions.without_magec()``:
the same schedule and image losses, λ_MAGEC = 0 — the paper's "w/o MAGEC") and ``W+ +50%`` (w/o MAGEC with 50 %
more steps, the paper's "w/o MAGEC + extra opt. steps").

Table 1 (rows ``table=1``): reconstruction per method and image set — ``mse`` ([-1,1] scale), ``lpips``
(AlexNet-LPIPS; the JSON names the backbone, a random-backbone fallback is not the calibrated metric), ``steps``,
``seconds`` / ``cpu_seconds`` (wall and process CPU time of one single-image inversion, the set's first image;
1 torch thread; quality columns come from inverting the whole set in one batch, each image independently),
``mse_vs_wplus`` / ``cpu_vs_wplus`` (ratios to the W+ row of the same set, same run).  Time ratios use CPU time:
on a shared, oversubscribed machine wall time varies several-fold between consecutive runs while CPU time does
not (with one thread, CPU time is the wall time of an idle machine).

Table 3 (rows ``table=3``): per edit (every attribute of the embedded model) and method, ``ecs_lpips`` /
``ecs_mse``: MAGEC's edit-consistency score (Eq. 4, ``core.metrics.ecs``; mean over images, 0 perfect) with the
edit ``e`` = the shipped direction at strength ±2 (towards the far end of the attribute, so every image lacks the
target value — the paper scores "images not containing the target attribute"), the edited image re-inverted with
the same method and edited back; ``faces`` columns are the held-out faces, ``photos`` columns astronaut and
grace_hopper; ``delta_score``: the edit-delta score against the renderer's true edit (``bench/editability.py``'s
``delta_score``: 1 − MSE(edit delta − true delta)/MSE(true delta), faces only, same edits).

Faces: ``core.demo.sample_params(n, seed=1919)`` rendered at 64 px (``core.demo.render``).  Training uses numpy
``default_rng(0)``/``(1)`` normals, the directions torch seeds 123/321/99/7, bench/editability numpy seed 1616,
the LinkNet torch seed 2021; ``--tune`` uses ``sample_params(n, seed=1920)``, so the bench's faces were used for
nothing else.  Photos: astronaut and grace_hopper as bench/pti.py prepares them (out of the embedded domain).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from _util import parse_args, print_table, write_json

BENCH_SEED = 1919  # sample_params seed of the bench's held-out faces
TUNE_SEED = 1920  # sample_params seed of the faces λ_MAGEC is tuned on
ECS_STRENGTH = 2.0  # the edit size bench/editability.py scores ECS at
KEY_EDITS = ("smile", "eye_openness", "glasses")  # issue 19's acceptance edits
TUNE_WEIGHTS = (3e-4, 3e-3, 3e-2, 0.1, 0.3, 1.0)


def _extra(parser):
    parser.add_argument("--tune", action="store_true", help="measure λ_MAGEC on the tuning faces instead")
    parser.add_argument("--linknet-study", action="store_true", help="compare LinkNet variants instead")
    parser.add_argument("--faces", type=int, default=None, help="held-out faces (default 4, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="MAGEC / W+ steps (default 200, quick 40)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared, oversubscribed 2-core machine)")


def setup():
    """(G, checkpoint path, descriptor, directions, linknet) for the embedded default."""
    from core.demo import default_model_path
    from core.edits import load_directions
    from core.magec import fit_linknet, linknet_path_for, load_descriptor
    from core.stylegan2.formats import load_generator

    path = default_model_path()
    G = load_generator(path).eval().requires_grad_(False)
    desc = load_descriptor(path)
    dirs = load_directions(path, G)
    t0 = time.perf_counter()
    net = fit_linknet(G, desc, cache_path=linknet_path_for(path))
    print(f"LinkNet ready in {time.perf_counter() - t0:.1f} s ({linknet_path_for(path).name})")
    return G, path, desc, dirs, net


def faces(n: int, seed: int):
    """(params (n,K) float32, images (n,3,64,64) in [-1,1]) of rendered held-out faces."""
    from core.demo import render, sample_params

    p = sample_params(n, seed=seed)
    return p, to_tensor(render(p))


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def photos(G, quick: bool) -> dict:
    """{name: (1,3,R,R)} astronaut / grace_hopper, prepared as bench/pti.py does."""
    from pti import load_images

    imgs, how = load_images(G, quick)
    imgs.pop("generated", None)
    for name in imgs:
        print(f"photo {name}: {how.get(name)}")
    return imgs


def method_options(base, name: str):
    return base if name == "MAGEC" else base.without_magec()


def invert(G, targets: torch.Tensor, method: str, steps: int, ctx, base=None):
    """ws (N,num_ws,w_dim) inverting every target in one batch (each image optimised independently)."""
    from core.magec import MagecOptions, invert_magec_report

    _, _, desc, dirs, net = ctx
    o = method_options(base or MagecOptions(), method)
    return invert_magec_report(G, targets, net, desc, dirs, steps=steps, options=o)


def synth(G, ws):
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const").clamp(-1, 1)


def table1(G, ctx, targets: dict, steps: int) -> tuple[list, dict]:
    """Rows of Table 1 and {method: {set: ws}} of the 200-step methods (reused by Table 3).

    Quality: every image of a set inverted in one batch (each optimised independently, as alone).  Time: one
    single-image inversion per set (its first image) — the wait of one user — in wall and process CPU seconds."""
    from core.metrics import lpips, mse

    methods = {"MAGEC": steps, "W+": steps, "W+ +50%": steps + steps // 2}
    rows, kept = [], {"MAGEC": {}, "W+": {}}
    for set_name, imgs in targets.items():
        per = {}
        for m, st in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            ws = invert(G, imgs[:1], m, st, ctx).ws
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            if len(imgs) > 1:
                ws = invert(G, imgs, m, st, ctx).ws
            out = synth(G, ws)
            per[m] = {"table": 1, "method": m, "set": set_name, "images": len(imgs),
                      "mse": float(mse(out, imgs).mean()), "lpips": float(lpips(out, imgs, "alex").mean()),
                      "steps": st, "seconds": secs, "cpu_seconds": cpu}
            if m in kept:
                kept[m][set_name] = ws
        for m in methods:
            r = per[m]
            r["mse_vs_wplus"] = r["mse"] / per["W+"]["mse"]
            r["cpu_vs_wplus"] = r["cpu_seconds"] / per["W+"]["cpu_seconds"]
            rows.append(r)
    return rows, kept


def edit_signs(values: np.ndarray) -> np.ndarray:
    """+1 where the attribute is below 0.5 (edit towards 1), −1 otherwise."""
    return np.where(values < 0.5, 1.0, -1.0)


def cycle(G, ctx, method: str, ws: torch.Tensor, deltas: torch.Tensor, steps: int):
    """(x_proj, x_edit, x_cyc) for codes ``ws (N,..)`` and edit offsets ``deltas (N,..)``: re-invert the edited
    images with ``method`` in one batch, then undo the edit."""
    x = synth(G, ws)
    x_edit = synth(G, ws + deltas)
    ws2 = invert(G, x_edit, method, steps, ctx).ws
    x_cyc = synth(G, ws2 - deltas)
    return x, x_edit, x_cyc


def table3(G, ctx, kept: dict, face_params: np.ndarray, face_imgs: torch.Tensor, photo_imgs: dict, edits,
           steps: int) -> list:
    """ECS per edit and method (faces, photos) and the edit-delta score against the renderer (faces)."""
    from core.demo import render
    from core.demo.directions import UNIT
    from core.demo.renderer import ATTRIBUTES
    from core.metrics import ecs
    from editability import delta_score, edited_params

    _, _, desc, dirs, _ = ctx
    sets = {"faces": face_imgs, **photo_imgs}
    with torch.no_grad():
        readings = {s: desc(t).numpy() for s, t in sets.items() if s != "faces"}
    rows = []
    for method in ("MAGEC", "W+"):
        ws_sets = kept[method]
        names, all_ws, all_dl, owners = [], [], [], []
        for name in edits:
            k = ATTRIBUTES.index(name)
            for s, ws in ws_sets.items():
                vals = face_params[:, k] if s == "faces" else readings[s][:, k]
                sign = edit_signs(vals)
                for i in range(len(ws)):
                    names.append(name)
                    owners.append((s, i, float(sign[i]) * ECS_STRENGTH))
                    all_ws.append(ws[i:i + 1])
                    all_dl.append(dirs[name].delta(float(sign[i]) * ECS_STRENGTH, G.num_ws, G.w_dim)[None])
        ws_b, dl_b = torch.cat(all_ws), torch.cat(all_dl)
        t0 = time.perf_counter()
        x, x_edit, x_cyc = cycle(G, ctx, method, ws_b, dl_b, steps)
        print(f"{method}: {len(ws_b)} re-inversions in {time.perf_counter() - t0:.0f} s")
        e_lp = ecs(x, x_edit, x_cyc, "lpips").numpy()
        e_ms = ecs(x, x_edit, x_cyc, "mse").numpy()
        for name in edits:
            k = ATTRIBUTES.index(name)
            idx = [j for j, n in enumerate(names) if n == name]
            face_idx = [j for j in idx if owners[j][0] == "faces"]
            photo_idx = [j for j in idx if owners[j][0] != "faces"]
            scores = []
            for j in face_idx:
                _, i, strength = owners[j]
                q, _ = edited_params(face_params[i], k, strength, UNIT)
                true = (to_tensor(render(q[None])) - face_imgs[i:i + 1]).numpy()
                scores.append(delta_score((x_edit[j:j + 1] - x[j:j + 1]).numpy(), true))
            rows.append({"table": 3, "method": method, "edit": name,
                         "ecs_lpips_faces": float(np.nanmean(e_lp[face_idx])),
                         "ecs_mse_faces": float(np.nanmean(e_ms[face_idx])),
                         "ecs_lpips_photos": float(np.nanmean(e_lp[photo_idx])) if photo_idx else float("nan"),
                         "ecs_mse_photos": float(np.nanmean(e_ms[photo_idx])) if photo_idx else float("nan"),
                         "delta_score": float(np.mean(scores)), "faces": len(face_idx), "photos": len(photo_idx)})
    for method in ("MAGEC", "W+"):
        sel = [r for r in rows if r["method"] == method]
        rows.append({"table": 3, "method": method, "edit": "mean",
                     **{c: float(np.nanmean([r[c] for r in sel])) for c in
                        ("ecs_lpips_faces", "ecs_mse_faces", "ecs_lpips_photos", "ecs_mse_photos", "delta_score")},
                     "faces": sel[0]["faces"], "photos": sel[0]["photos"]})
    return rows


def acceptance(t1: list, t3: list) -> list:
    """Issue 19's acceptance items, each True/False with the numbers it compares."""
    out = []
    get3 = {(r["method"], r["edit"]): r for r in t3}
    for name in KEY_EDITS:
        if ("MAGEC", name) in get3:
            a, b = get3[("MAGEC", name)], get3[("W+", name)]
            for col in ("ecs_lpips_faces", "ecs_mse_faces"):
                out.append({"item": f"ECS {name} ({col}) MAGEC < W+", "magec": a[col], "wplus": b[col],
                            "holds": bool(a[col] < b[col])})
    a, b = get3[("MAGEC", "mean")], get3[("W+", "mean")]
    out.append({"item": "edit-delta score MAGEC >= W+ (mean over edits)", "magec": a["delta_score"],
                "wplus": b["delta_score"], "holds": bool(a["delta_score"] >= b["delta_score"])})
    for r in t1:
        if r["method"] == "MAGEC":
            out.append({"item": f"MSE MAGEC <= 1.5x W+ ({r['set']})", "magec": r["mse"], "wplus": r["mse"] / r["mse_vs_wplus"],
                        "holds": bool(r["mse_vs_wplus"] <= 1.5)})
            out.append({"item": f"CPU time MAGEC <= 1.3x W+ ({r['set']})", "magec": r["cpu_seconds"],
                        "wplus": r["cpu_seconds"] / r["cpu_vs_wplus"], "holds": bool(r["cpu_vs_wplus"] <= 1.3)})
    return out


def run_bench(args) -> int:
    from core.metrics import lpips_backbone

    quick = args.quick
    n_faces = args.faces or (2 if quick else 4)
    steps = args.steps or (40 if quick else 200)
    ctx = setup()
    G = ctx[0]
    from core.demo.renderer import ATTRIBUTES

    p, imgs = faces(n_faces, BENCH_SEED)
    phot = photos(G, quick)
    targets = {"faces": imgs, **phot}
    backbone = lpips_backbone("alex")
    t1, kept = table1(G, ctx, targets, steps)
    print_table(t1, ["method", "set", "images", "mse", "lpips", "steps", "seconds", "cpu_seconds", "mse_vs_wplus",
                     "cpu_vs_wplus"],
                title=f"Table 1 analogue: reconstruction (LPIPS backbone: {backbone})")
    edits = KEY_EDITS if quick else tuple(ATTRIBUTES)
    t3 = table3(G, ctx, kept, p, imgs, phot, edits, steps)
    print()
    print_table(t3, ["method", "edit", "ecs_lpips_faces", "ecs_mse_faces", "ecs_lpips_photos", "ecs_mse_photos",
                     "delta_score", "faces", "photos"],
                title=f"Table 3 analogue: ECS per edit (strength ±{ECS_STRENGTH}, lower is better) and edit-delta score")
    acc = acceptance(t1, t3)
    print()
    print_table(acc, ["item", "magec", "wplus", "holds"], title="issue 19 acceptance (this run)")
    from core.magec import MAGEC_WEIGHT

    write_json(args.json, t1 + t3, acceptance=acc, lpips_backbone=backbone, bench_seed=BENCH_SEED, faces=n_faces,
               steps=steps, ecs_strength=ECS_STRENGTH, magec_weight=MAGEC_WEIGHT,
               id_term="off: no identity network available")
    return 0


def run_tune(args) -> int:
    """λ_MAGEC grid on the tuning faces: reconstruction, edit-delta score (all edits), ECS on the key edits."""
    from core.demo import render
    from core.demo.directions import UNIT
    from core.demo.renderer import ATTRIBUTES
    from core.magec import MagecOptions
    from core.metrics import ecs, mse
    from editability import delta_score, edited_params

    quick = args.quick
    n = args.faces or (2 if quick else 4)
    steps = args.steps or (40 if quick else 200)
    ctx = setup()
    G, _, _, dirs, _ = ctx
    p, imgs = faces(n, TUNE_SEED)
    weights = (0.0, 3e-2, 1.0) if quick else (0.0,) + TUNE_WEIGHTS
    rows = []
    for lam in weights:
        base = MagecOptions()
        o = dataclasses.replace(base, phase1=dataclasses.replace(base.phase1, magec=lam),
                                phase2=dataclasses.replace(base.phase2, magec=lam))
        t0 = time.perf_counter()
        ws = invert(G, imgs, "MAGEC" if lam else "W+", steps, ctx, base=o).ws
        secs = time.perf_counter() - t0
        x = synth(G, ws)
        scores = []
        for k, name in enumerate(ATTRIBUTES):
            sign = edit_signs(p[:, k]) * ECS_STRENGTH
            dl = torch.stack([dirs[name].delta(float(s), G.num_ws, G.w_dim) for s in sign])
            xe = synth(G, ws + dl)
            for i in range(n):
                q, _ = edited_params(p[i], k, float(sign[i]), UNIT)
                true = (to_tensor(render(q[None])) - imgs[i:i + 1]).numpy()
                scores.append(delta_score((xe[i:i + 1] - x[i:i + 1]).numpy(), true))
        # ECS on the key edits: one batch of re-inversions with the same λ
        all_ws, all_dl = [], []
        for name in KEY_EDITS:
            k = ATTRIBUTES.index(name)
            sign = edit_signs(p[:, k]) * ECS_STRENGTH
            all_ws.append(ws)
            all_dl.append(torch.stack([dirs[name].delta(float(s), G.num_ws, G.w_dim) for s in sign]))
        ws_b, dl_b = torch.cat(all_ws), torch.cat(all_dl)
        xb, xe, xc = synth(G, ws_b), synth(G, ws_b + dl_b), None
        ws2 = invert(G, xe, "MAGEC" if lam else "W+", steps, ctx, base=o).ws
        xc = synth(G, ws2 - dl_b)
        rows.append({"magec_weight": lam, "mse": float(mse(x, imgs).mean()),
                     "delta_score": float(np.mean(scores)),
                     "ecs_lpips_key": float(np.nanmean(ecs(xb, xe, xc, "lpips").numpy())),
                     "ecs_mse_key": float(np.nanmean(ecs(xb, xe, xc, "mse").numpy())),
                     "seconds_batch": secs, "faces": n, "steps": steps})
        print_table(rows[-1:], title=None)
    print()
    print_table(rows, title=f"λ_MAGEC on tuning faces (sample_params seed {TUNE_SEED}, {n} faces, {steps} steps)")
    write_json(args.json, rows, tune_seed=TUNE_SEED)
    return 0


def run_linknet_study(args) -> int:
    """Held-out L1 of LinkNet variants (rows flat/mean × sigmoid/clamp/linear output): on W samples, on style-mixed
    W+ samples, and on edited W samples against Eq. 2's target (the reading of the unedited image moved by the edit
    and clamped) and against the scorer's reading of the edited image."""
    from core.demo import default_model_path
    from core.edits import load_directions
    from core.magec import (LinkNetOptions, descriptor_loss, edited_descriptors, linknet_samples, load_descriptor,
                            magec_edits, train_linknet, MagecOptions)
    from core.stylegan2.formats import load_generator

    G = load_generator(default_model_path()).eval().requires_grad_(False)
    desc = load_descriptor(default_model_path())
    dirs = load_directions(default_model_path(), G)
    o = LinkNetOptions()
    n = 1024 if args.quick else 8192
    held = 256 if args.quick else 1024
    n_edit = 16 if args.quick else 128
    ws, d = linknet_samples(G, desc, n, o.seed, o.mix_prob)
    wt, dt = linknet_samples(G, desc, held, seed=77, mix_prob=0.0)
    wm, dm = linknet_samples(G, desc, held, seed=78, mix_prob=1.0)
    we, de = wt[:n_edit], dt[:n_edit]
    edits = magec_edits(dirs, desc.names, G.num_ws, G.w_dim, MagecOptions().edit_strength)
    with torch.no_grad():
        true_edit = torch.stack([desc(synth(G, we + e.offset)) for e in edits], 1)  # (n,E,K)
    target = edited_descriptors(de, edits, desc.output_range)
    rows = []
    for rows_kind in ("flat", "mean"):
        for output in ("sigmoid", "clamp", "linear"):
            net = train_linknet(ws, d, desc.loss, rows_kind, output, desc.output_range, steps=o.steps, lr=o.lr,
                                ridge=o.ridge)
            with torch.no_grad():
                pe = torch.stack([net(we + e.offset) for e in edits], 1)
                rows.append({"rows": rows_kind, "output": output,
                             "fit": float(descriptor_loss(net(ws), d).mean()),
                             "held_out_w": float(descriptor_loss(net(wt), dt).mean()),
                             "held_out_mixed": float(descriptor_loss(net(wm), dm).mean()),
                             "edited_vs_eq2_target": float((pe - target).abs().mean()),
                             "edited_vs_scorer": float((pe - true_edit).abs().mean())})
    rows.append({"rows": "chance", "output": "mean", "fit": float((d - d.mean(0)).abs().mean()),
                 "held_out_w": float((dt - d.mean(0)).abs().mean()),
                 "held_out_mixed": float((dm - d.mean(0)).abs().mean()),
                 "edited_vs_eq2_target": float((true_edit - target).abs().mean()), "edited_vs_scorer": 0.0})
    print_table(rows, title=f"LinkNet variants: L1 to the scorer ({n} fitting pairs, {held} held out of each kind, "
                            f"{n_edit} × {len(edits)} edits; 'chance' row: edited columns compare the scorer's "
                            f"reading with Eq. 2's target)")
    write_json(args.json, rows)
    return 0


def main() -> int:
    args = parse_args("MAGEC Tables 1 and 3 on the embedded default", _extra)
    torch.set_num_threads(max(1, args.threads))
    if args.linknet_study:
        return run_linknet_study(args)
    if args.tune:
        return run_tune(args)
    return run_bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
