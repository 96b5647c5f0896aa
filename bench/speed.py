"""Quality vs time of the ways to a first result: PTI's recipe, encoder only, encoder pivot + k tuning steps, W+.

python bench/speed.py [--quick] [--json PATH] [--device cpu|cuda] [--faces N] [--ks 10,25,50,100,150]

Targets (held out): ``--faces`` rendered faces ``core.demo.render(sample_params(N, seed=HELDOUT_SEED))`` at 64 px
(seed 7,000,000; the encoder trained on seeds 1,000,000+step and was evaluated on 424,243, the generator on
``data.build_cache`` z seeds 0/1) and the two photos bench/pti.py uses (astronaut, grace_hopper, aligned there).

Rows (one per method and image, all measured in this run, same device and threads):

* ``recipe``: ``project`` in W (450 steps, PTI §4.5) + ``pivotal_tune`` (350 steps, lr 3e-4);
* ``recipe@k``: the same W pivot after k tuning steps (read from the recipe's own tuning run);
* ``W+``: ``project`` in W+, 450 steps;
* ``encoder``: ``core.encoder.encoder_pivot`` alone (+ one synthesis);
* ``enc+k``: encoder pivot, then k tuning steps at the fast path's learning rate (``core.pti.ENCODER_PIVOT_LR``,
  what a session with ``pivot="encoder"`` uses; one tuning run of max(k) steps read at each k);
* ``enc+k@3e-4``: the same at PTI's own learning rate.

A curve point "after k steps" is the image the tuning loop renders at step k+1 (PTI computes it anyway), its time
the wall clock there minus the time spent computing the bench's own metrics.  Columns: ``mse`` ([-1,1] scale),
``lpips`` (AlexNet-LPIPS; the JSON names the backbone: a random-backbone fallback is not a calibrated metric),
``seconds``, ``mse_vs_recipe`` and ``time_vs_recipe`` (the recipe row of the same image); ``mse_vs_wplus`` and
``time_vs_wplus`` on the encoder row.  The summary checks issue 22's acceptance per image and the plateau
early-stop rule (``PLATEAU_WINDOW``, ``PLATEAU_GAIN``, ``PLATEAU_START``: core.pti's) on the enc+k curves; the
fast path's own budget (``core.pti.ENCODER_PIVOT_TUNE_STEPS``, no plateau rule, as sessions run it) is ``fast_path_ok``.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from _util import parse_args, print_table, write_json

from core.pti import ENCODER_PIVOT_TUNE_STEPS, PTIOptions

HELDOUT_SEED = 7_000_000  # rendered held-out faces; see the module docstring for the seeds used elsewhere
# the early stop the summary checks on the enc+k curves: core.pti's plateau rule with its fixed defaults
PLATEAU_WINDOW, PLATEAU_GAIN, PLATEAU_START = PTIOptions.plateau_window, PTIOptions.plateau_gain, PTIOptions.plateau_start


def _extra(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--faces", type=int, default=3, help="held-out rendered faces")
    parser.add_argument("--ks", default="10,25,50,100,150,200,250", help="tuning steps after the encoder pivot")
    parser.add_argument("--model", default=None, help="generator (default: the embedded model)")
    parser.add_argument("--encoder", default=None, help="encoder (default: core.demo.default_encoder_path())")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")


def heldout_faces(n: int) -> dict:
    """{name: (1,3,64,64) in [-1,1]} rendered from ``sample_params(n, seed=HELDOUT_SEED)``."""
    from core.demo import render, sample_params

    imgs = render(sample_params(n, seed=HELDOUT_SEED))
    t = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    return {f"face{HELDOUT_SEED}+{i}": t[i:i + 1].contiguous() for i in range(n)}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Curve:
    """Records (k updates, mse, lpips, seconds) from a tuning loop's progress callback, excluding its own time."""

    def __init__(self, target, ks, t0, device, offset=0.0):
        self.target, self.ks, self.t0, self.device, self.offset = target, set(ks), t0, device, offset
        self.points, self.mse_all, self.spent = {}, [], 0.0

    def __call__(self, event, *legacy):
        step, preview = (event, legacy[2] if len(legacy) > 2 else None) if legacy else (event.step, event.preview)
        if preview is None:
            return
        _sync(self.device)
        t_in = time.perf_counter()
        k = step - 1  # the image of step `step` was rendered after step-1 updates
        from core.metrics import lpips, mse

        if not torch.is_tensor(preview):  # a ProgressEvent preview: (H,W,3) uint8 (8-bit rounding: ~5e-6 MSE)
            preview = torch.from_numpy(np.asarray(preview)).permute(2, 0, 1)[None].float().div(127.5).sub(1)
        img = preview.to(self.target.device).clamp(-1, 1)
        m = float(mse(img, self.target))
        self.mse_all.append((k, m))
        if k in self.ks:
            secs = t_in - self.t0 - self.spent + self.offset
            self.points[k] = {"mse": m, "lpips": float(lpips(img, self.target, "alex")), "seconds": secs}
        self.spent += time.perf_counter() - t_in


def plateau_stop(curve: list, window: int = PLATEAU_WINDOW, gain: float = PLATEAU_GAIN,
                 start: int = PLATEAU_START):
    """First k ≥ start where mse(k) > (1 − gain)·mse(k − window) on a [(k, mse)] curve; None if it never fires."""
    by_k = dict(curve)
    for k, m in curve:
        if k >= start and k - window in by_k and m > (1 - gain) * by_k[k - window]:
            return k
    return None


def _final(G, ws, target):
    from core.metrics import lpips, mse

    with torch.no_grad():
        img = G.synthesis(ws, noise_mode="const").clamp(-1, 1)
    return {"mse": float(mse(img, target)), "lpips": float(lpips(img, target, "alex"))}


def run_image(G, E, target, proj_steps, tune_steps, ks, device) -> list:
    from core.encoder import encoder_pivot
    from core.projection import ProjectOptions, project
    from core.pti import ENCODER_PIVOT_LR, PTIOptions, pivotal_tune_report

    popts, topts = ProjectOptions(), PTIOptions(preview_every=1)
    if hasattr(topts, "plateau_window"):  # PTI's recipe runs its full 350 steps; the curves show every k
        topts.plateau_window = None
    rows = []
    # --- PTI's recipe: W projection + tuning (curve read at ks and at the end)
    _sync(device)
    t0 = time.perf_counter()
    ws_w = project(G, target, space="w", steps=proj_steps, options=popts)
    _sync(device)
    t_proj = time.perf_counter() - t0
    curve = Curve(target, [k for k in ks if k < tune_steps], time.perf_counter(), device, offset=t_proj)
    G_t, rep = pivotal_tune_report(G, ws_w, target, steps=tune_steps, options=topts, progress=curve)
    _sync(device)
    t_recipe = time.perf_counter() - t0 - curve.spent
    rows.append({"method": "recipe", "steps": f"{proj_steps}+{rep.steps_run}", **_final(G_t, ws_w, target),
                 "seconds": t_recipe})
    for k, p in sorted(curve.points.items()):
        rows.append({"method": f"recipe@{k}", "steps": f"{proj_steps}+{k}", **p})
    # --- W+ projection
    t0 = time.perf_counter()
    ws_p = project(G, target, space="w+", steps=proj_steps, options=popts)
    _sync(device)
    rows.append({"method": "W+", "steps": str(proj_steps), **_final(G, ws_p, target),
                 "seconds": time.perf_counter() - t0})
    # --- encoder only (pivot + the one synthesis that shows it)
    encoder_pivot(E, target)  # warm-up (first-call allocations), not timed
    t0 = time.perf_counter()
    ws_e = encoder_pivot(E, target)
    with torch.no_grad():
        G.synthesis(ws_e, noise_mode="const")
    _sync(device)
    t_enc = time.perf_counter() - t0
    rows.append({"method": "encoder", "steps": "0", **_final(G, ws_e, target), "seconds": t_enc})
    # --- encoder pivot + k tuning steps (one run per learning rate, read at every k): the session's fast path
    # (ENCODER_PIVOT_LR) as "enc+k", PTI's own lr as "enc+k@3e-4"
    kmax = max(ks)
    for label, lr in (("", ENCODER_PIVOT_LR), ("@3e-4", topts.learning_rate)):
        t0 = time.perf_counter()
        ws_e = encoder_pivot(E, target)
        curve_e = Curve(target, ks, t0, device)
        pivotal_tune_report(G, ws_e, target, steps=kmax + 1, options=replace(topts, learning_rate=lr),
                            progress=curve_e)
        for k, p in sorted(curve_e.points.items()):
            rows.append({"method": f"enc+{k}{label}", "steps": str(k), **p})
        if not label:
            mse_curve = curve_e.mse_all
    return rows, mse_curve, plateau_stop(mse_curve)


def main():
    args = parse_args(__doc__.splitlines()[0], _extra)
    torch.set_num_threads(max(1, args.threads))
    from core.demo import default_encoder_path
    from core.encoder import check_compatible, load_encoder
    from core.metrics import lpips_backbone
    from pti import load_images, load_model  # bench/pti.py: the model and the two aligned photos

    device = torch.device(args.device)
    G, model_note = load_model(args.model)
    G = G.to(device)
    E = load_encoder(args.encoder or default_encoder_path(), device=device)
    check_compatible(E, G)
    ks = sorted({int(k) for k in args.ks.split(",")})
    proj_steps, tune_steps = (40, 30) if args.quick else (450, 350)  # PTI §4.5: 450 projection, 350 tuning steps
    if args.quick:
        ks = [5, 10, 20]
    targets = heldout_faces(1 if args.quick else args.faces)
    ph, how = load_images(G.cpu(), args.quick)
    G = G.to(device)
    targets.update({k: v for k, v in ph.items() if k != "generated"})
    how.pop("generated", None)
    rows, curves, stops = [], {}, {}
    for name, target in targets.items():
        got, curves[name], stops[name] = run_image(G, E, target.to(device), proj_steps, tune_steps, ks, device)
        for r in got:
            rows.append({"image": name, **r})
        print(f"{name}: done", flush=True)
    by = {(r["image"], r["method"]): r for r in rows}
    for r in rows:
        rec, wp = by[(r["image"], "recipe")], by[(r["image"], "W+")]
        r["mse_vs_recipe"] = r["mse"] / rec["mse"] if r.get("mse") is not None else None
        r["time_vs_recipe"] = r["seconds"] / rec["seconds"] if r.get("seconds") is not None else None
        if r["method"] == "encoder":
            r["mse_vs_wplus"], r["time_vs_wplus"] = r["mse"] / wp["mse"], r["seconds"] / wp["seconds"]
    cols = ["method", "image", "steps", "mse", "lpips", "seconds", "mse_vs_recipe", "time_vs_recipe", "mse_vs_wplus",
            "time_vs_wplus"]
    meta = {"model": model_note, "encoder": str(args.encoder or default_encoder_path()), "device": str(device),
            "threads": torch.get_num_threads(), "lpips_backbone": lpips_backbone("alex"),
            "projection_steps": proj_steps, "tuning_steps": tune_steps, "ks": ks, "images": how,
            "heldout_seed": HELDOUT_SEED, "plateau_rule": {"window": PLATEAU_WINDOW, "gain": PLATEAU_GAIN, "start": PLATEAU_START},
            "plateau_stop": stops}
    for k, v in meta.items():
        print(f"{k}: {v}")
    print_table(rows, cols, title="speed: quality vs time (held-out faces and photos)")
    acc = acceptance(rows, ks, ENCODER_PIVOT_TUNE_STEPS)
    print_table(acc, title="issue 22 acceptance per image")
    write_json(args.json, rows, acceptance=acc, curves=curves, **meta)


def acceptance(rows, ks, fast_k: int) -> list:
    """Per image: the fewest k whose enc+k MSE ≤ 1.1× the recipe's and time ≤ 1/5 of it; whether the fast path's
    budget ``fast_k`` (when among ``ks``) does; encoder vs W+."""
    out = []
    for name in dict.fromkeys(r["image"] for r in rows):
        r = {x["method"]: x for x in rows if x["image"] == name}
        ok_k = [k for k in ks if f"enc+{k}" in r and r[f"enc+{k}"]["mse_vs_recipe"] <= 1.1
                and r[f"enc+{k}"]["time_vs_recipe"] <= 0.2]
        enc = r["encoder"]
        fast = r.get(f"enc+{fast_k}")
        out.append({"image": name, "pti_k_meeting_bar": ok_k[0] if ok_k else None,
                    "fast_path_k": fast_k, "fast_path_ok": None if fast is None else fast_k in ok_k,
                    "best_enc_k_mse_vs_recipe": min(r[f"enc+{k}"]["mse_vs_recipe"] for k in ks if f"enc+{k}" in r),
                    "encoder_mse_vs_wplus": enc["mse_vs_wplus"], "encoder_time_vs_wplus": enc["time_vs_wplus"],
                    "encoder_ok": enc["mse_vs_wplus"] <= 2.0 and enc["time_vs_wplus"] <= 1 / 50})
    return out


if __name__ == "__main__":
    main()
