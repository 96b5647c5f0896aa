"""Train the embedded model's content extractor: ``python -m core.demo.train_content [--steps N] [--install]``.

The learned form of Yin et al.'s content branch (core.expanded.ContentExtractor): its one-forward prediction of
the content features starts the per-session fit of "Keep photo detail" (or replaces it, ``FusionOptions(fit_steps=0)``).  Training pairs are what sessions see: faces of the embedded renderer, half
of them with one of its out-of-domain ``EXTRAS`` (the detail the generator cannot draw), inverted by the shipped
encoder; the loss is core.expanded.content_extractor_loss (the content pipeline's reconstruction, plus the fit's
feature penalty).  Writes ``core/demo/weights/face64.content.pt`` with ``--install``, else ``--out``; about
0.3 s a step on one core.  It belongs to the generator and encoder: retrain after either changes.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

EXTRA_SHARE = 0.5  # ours: half the training faces carry an extra, as the editability bench's held-out sets do


def face_sampler(G, E, batch: int):
    """``sample(generator) -> (ws, target)``: ``batch`` rendered faces (``(batch,3,r,r)`` in [-1,1]), half with one
    random extra, and the encoder's W+ codes of them."""
    from core.demo import EXTRAS, render, sample_params
    from core.encoder import encoder_pivot

    res = int(G.resolution)

    def sample(gen: torch.Generator):
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))
        rng = np.random.default_rng(seed)
        params = sample_params(batch, seed)
        faces = [render(p, extras=[EXTRAS[int(rng.integers(len(EXTRAS)))]] if rng.random() < EXTRA_SHARE else [],
                        size=res) for p in params]
        target = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return encoder_pivot(E, target), target

    return sample


def main(argv=None) -> int:
    from core.demo import WEIGHTS_DIR, default_encoder_path, default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("face64.content.pt"))
    ap.add_argument("--install", action="store_true", help="write core/demo/weights/face64.content.pt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import core
    from core.encoder import load_encoder
    from core.expanded import new_content_extractor, save_content_extractor, train_content_extractor
    from core.stylegan2.formats import fingerprint

    G = core.load_generator(default_model_path()).eval()
    E = load_encoder(default_encoder_path())
    net = new_content_extractor(G)
    t0 = time.time()
    history = train_content_extractor(
        G, net, face_sampler(G, E, args.batch), args.steps, lr=args.lr,
        progress=lambda s, l: s % 50 == 0 and print(f"step {s}/{args.steps} loss {l:.5f}", file=sys.stderr, flush=True))
    tail = history[-max(1, len(history) // 10):]
    meta = {"generator_sha256": fingerprint(G), "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "minutes": round((time.time() - t0) / 60, 2), "final_loss": round(float(np.mean(tail)), 6),
            "first_loss": round(history[0], 6) if history else None}
    path = WEIGHTS_DIR / "face64.content.pt" if args.install else args.out
    save_content_extractor(path, net, meta)
    print(f"wrote {path}: {meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
