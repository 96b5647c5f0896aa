"""PTI early stop: where the fixed rules (core.pti.PTIOptions) fire on full tuning curves, and what they cost.

python bench/early_stop.py [--quick] [--json PATH] [--faces N] [--threads T]

For each held-out target (rendered faces ``core.demo.render(sample_params(N, seed=HELDOUT_SEED))``, a seed no
training or other bench uses, and the photos bench/pti.py aligns) a W pivot is projected (PTI §4.5: 450 steps)
and the generator tuned for the full 350 steps with every early stop off, recording the L2 term after each
iteration.  Rows: the step where the plateau rule (PTIOptions' plateau_window / plateau_gain, the rule for the
random-backbone fallback; the output names the backbone in use) would have stopped on that curve, the L2 there,
the L2 after all 350 steps, their ratio and the share of tuning steps saved.  Nothing here is tuned: the rules'
constants are fixed in core.pti and read from it.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from _util import parse_args, print_table, write_json

HELDOUT_SEED = 8_100_000  # rendered held-out faces (speed.py uses 7,000,000; training seeds are far below)


def _extra(parser):
    parser.add_argument("--faces", type=int, default=2, help="held-out rendered faces")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-photos", action="store_true", help="rendered faces only")


def heldout_faces(n: int) -> dict:
    from core.demo import render, sample_params

    imgs = render(sample_params(n, seed=HELDOUT_SEED))
    t = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    return {f"face{HELDOUT_SEED}+{i}": t[i:i + 1].contiguous() for i in range(n)}


def first_stop(history, window, gain):
    """First iteration k at which ``core.pti.plateaued`` holds on ``history[:k+1]`` (None: never)."""
    from core.pti import plateaued

    for k in range(len(history)):
        if plateaued(history[:k + 1], window, gain):
            return k
    return None


def main():
    args = parse_args(__doc__.splitlines()[0], _extra)
    torch.set_num_threads(max(1, args.threads))
    from core.losses import perceptual_loss
    from core.projection import project
    from core.pti import PTIOptions, pivotal_tune_report
    from pti import load_images, load_model

    G, note = load_model(None)
    proj, tune = (60, 80) if args.quick else (450, 350)  # PTI §4.5
    targets = heldout_faces(1 if args.quick else args.faces)
    if not (args.quick or args.no_photos):
        ph, _ = load_images(G, False)
        targets.update({k: v for k, v in ph.items() if k != "generated"})
    rule = PTIOptions()
    off = PTIOptions(lpips_threshold=None, plateau_window=None, preview_every=0)
    lp = perceptual_loss(rule.lpips_net)
    rows = []
    for name, target in targets.items():
        ws = project(G, target, space="w", steps=proj)
        t0 = time.perf_counter()
        _, rep = pivotal_tune_report(G, ws, target, steps=tune, options=off)
        secs = time.perf_counter() - t0
        h = list(rep.mse_history)
        k = first_stop(h, rule.plateau_window, rule.plateau_gain)
        end = h[-1]
        rows.append({"image": name, "rule": f"plateau {rule.plateau_window}/{rule.plateau_gain:g}",
                     "stop_step": k, "mse_at_stop": None if k is None else h[k], "mse_full": end,
                     "mse_ratio": None if k is None else h[k] / end,
                     "steps_saved": 0.0 if k is None else 1 - k / tune, "tune_seconds_full": secs})
        print(f"{name}: done", flush=True)
    meta = {"model": note, "lpips_backbone": lp.backbone_name, "pretrained": bool(lp.pretrained),
            "projection_steps": proj, "tuning_steps": tune, "heldout_seed": HELDOUT_SEED,
            "threads": torch.get_num_threads()}
    for k, v in meta.items():
        print(f"{k}: {v}")
    print_table(rows, title="PTI early stop on full tuning curves (W pivot)")
    write_json(args.json, rows, **meta)


if __name__ == "__main__":
    main()
