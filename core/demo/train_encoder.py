"""Train the embedded model's e4e-style encoder: ``python -m core.demo.train_encoder --out DIR [--resume]
[--minutes M] [--install] [--model PATH]`` (also ``python -m core.demo.train --stages encoder``).

Data, drawn fresh every step (nothing cached):

* generated pairs — ``z ~ N(0,I)``, ``ws = G.mapping(z)``, ``x = G.synthesis(ws)``: latent L2 to ``ws``, pixel L2
  and perceptual (``core.losses.perceptual_loss``, AlexNet-LPIPS) between ``G.synthesis(E(x))`` and ``x``;
* rendered faces — ``core.demo.render(sample_params(B, seed=TRAIN_RENDER_SEED0 + step))``: pixel + perceptual only
  (no code is known; e4e's setting for real photos).  Ours: the bench's targets are rendered faces, which the
  generator only approximates, so the encoder also sees that domain (``render_fraction`` of each batch).

e4e's editability terms (Tov et al. 2021 §3.3, encoder4editing ``training/coach.py``): the encoder predicts a
shared ``w0`` plus per-row deltas; deltas are switched on progressively (``w0`` alone first, then one more row
every ``progressive_every`` steps) and their L2 norms are penalised (``delta_weight``), which keeps codes near W
(where the directions were fitted).  Held-out numbers (``encoder64.eval.json``): generated pairs from
``EVAL_Z_SEED`` and rendered faces from ``sample_params(…, seed=EVAL_RENDER_SEED)``; ``bench/speed.py`` uses yet
another range (``bench.speed.HELDOUT_SEED``).

Resumable: ``OUT/ckpt.pt`` (encoder, optimiser, step, elapsed time, log) every ``save_every_minutes``;
``--minutes`` is the total training time over all runs (the learning rate follows it, cosine to 0).  Output:
``OUT/encoder64.pt`` (core.encoder format) + ``OUT/encoder64.eval.json`` (``OUT/snapshot.pt``: the latest weights,
written with each checkpoint); ``--install`` copies both into
``core/demo/weights/``.  The encoder belongs to one generator: retrain after the model changes (its sha256 is
stored in the file's ``opts["latent_edit_meta"]``), e.g.::

    nice -n 19 python -m core.demo.train_encoder --out ~/.cache/latent-edit-train/encoder --minutes 90 --install

After a refinement of the generator (``core.demo.train`` stage ``polish``), ``--init core/demo/weights/encoder64.pt``
starts from the previous encoder's weights with every row's delta on (its progressive schedule already ran).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_OUT = pathlib.Path.home() / ".cache" / "latent-edit-train" / "encoder"
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
TRAIN_RENDER_SEED0 = 1_000_000  # rendered training faces: sample_params(B, seed=TRAIN_RENDER_SEED0 + step)
EVAL_Z_SEED = 424_242  # held-out generated pairs during training
EVAL_RENDER_SEED = 424_243  # held-out rendered faces during training


@dataclass
class EncoderTrainOptions:
    """Defaults: e4e (encoder4editing ``options/train_options.py``) where it has one, else ours (noted)."""

    minutes: float = 90.0  # ours: total wall-time budget (2 shared CPU cores, one thread)
    batch: int = 16  # ours (e4e: batch_size=8 on a GPU at 1024 px)
    render_fraction: float = 0.25  # ours: share of each image-loss batch drawn from the renderer (no latent target)
    # ours (CPU budget: G costs more than the encoder): pairs come from a replay pool that gets ``fresh_pairs`` new
    # pairs per step (up to ``pool_size``), and only every ``image_every``-th step renders E's codes through G for
    # the pixel/LPIPS terms and the rendered faces; the steps between train on the latent L2 (+ delta norm) alone
    pool_size: int = 4096
    initial_pool: int = 256
    fresh_pairs: int = 4
    image_every: int = 3
    learning_rate: float = 1e-3  # ours: Adam, small encoder from scratch (e4e: Ranger lr 1e-4, pretrained IR-SE50)
    warmup_steps: int = 100  # ours: linear warm-up, then cosine decay over ``minutes``
    latent_weight: float = 1.0  # ours: L2 to the known code (e4e has no code for real photos)
    l2_weight: float = 1.0  # e4e l2_lambda=1.0
    lpips_weight: float = 0.8  # e4e lpips_lambda=0.8
    lpips_net: str = "alex"  # e4e lpips_type='alex'
    delta_weight: float = 2e-4  # e4e delta_norm_lambda=2e-4 (Σ_i ‖Δ_i‖₂)
    # e4e progressive_start=20000, progressive_step_every=2000 (steps); ours follows the time budget instead:
    # w0 alone for the first 15 %, then one more delta row at a time until all are on at 50 %
    progressive_start: float = 0.15
    progressive_end: float = 0.5
    truncation_psi: float = 1.0  # ours: the full W distribution
    save_every_minutes: float = 5.0  # ours
    eval_every: int = 250  # ours: steps between held-out evaluations (logged)
    eval_samples: int = 64  # ours: held-out faces per evaluation during training
    final_eval_samples: int = 256  # ours: held-out faces for the final report
    seed: int = 0  # ours


def _lr(step: int, frac: float, o: EncoderTrainOptions) -> float:
    warm = min(1.0, (step + 1) / max(1, o.warmup_steps))
    return o.learning_rate * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def _stage(frac: float, o: EncoderTrainOptions, num_ws: int):
    """e4e progressive stage at ``frac`` of the budget: rows 1…stage get deltas (0 before the start); None = all."""
    if frac < o.progressive_start:
        return 0
    span = max(1e-9, o.progressive_end - o.progressive_start)
    k = 1 + int((frac - o.progressive_start) / span * (num_ws - 2))
    return None if k >= num_ws - 1 else k


def rendered_batch(n: int, seed: int) -> torch.Tensor:
    """``n`` rendered faces ``(n,3,64,64)`` in [-1,1] from ``sample_params(n, seed)``."""
    from core.demo import render, sample_params

    img = render(sample_params(n, seed=seed))
    return torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def encoder_losses(E, G, x: torch.Tensor, ws_true, lpips, o: EncoderTrainOptions, stage=None,
                   images: bool = True) -> dict:
    """Per-batch loss terms for images ``x`` (N,3,R,R) in [-1,1]; ``ws_true`` (N,num_ws,w_dim) or None.

    ``images=False`` skips the generator pass (pixel and LPIPS terms are then 0)."""
    codes = E(x, stage=stage) if E.config.kind == "e4e" else E(x)
    ws = codes + E.latent_avg
    out = {"l2": torch.zeros(()), "lpips": torch.zeros(()), "delta": E.deltas(codes).norm(dim=-1).sum(dim=1).mean()}
    if images:
        y = G.synthesis(ws, noise_mode="const")
        out["l2"], out["lpips"] = (y - x).square().mean(), lpips(y, x).mean()
    out["latent"] = (ws - ws_true).square().mean() if ws_true is not None else torch.zeros(())
    return out


def _total(terms: dict, o: EncoderTrainOptions, with_latent: bool) -> torch.Tensor:
    t = o.l2_weight * terms["l2"] + o.lpips_weight * terms["lpips"] + o.delta_weight * terms["delta"]
    return t + o.latent_weight * terms["latent"] if with_latent else t


@torch.no_grad()
def evaluate(E, G, n: int = 64) -> dict:
    """Held-out image MSE / latent MSE on generated pairs and image MSE on rendered faces (eval mode)."""
    from core.encoder import encode

    was = E.training
    E.eval()
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(EVAL_Z_SEED))
    ws = G.mapping(z)
    x = G.synthesis(ws, noise_mode="const")
    w_hat = encode(E, x)
    y = G.synthesis(w_hat, noise_mode="const")
    xr = rendered_batch(n, EVAL_RENDER_SEED)
    yr = G.synthesis(encode(E, xr), noise_mode="const")
    E.train(was)
    return {"gen_mse": float((y - x).square().mean()), "gen_latent_mse": float((w_hat - ws).square().mean()),
            "render_mse": float((yr.clamp(-1, 1) - xr).square().mean()),
            "delta_norm": float(E.deltas(w_hat - E.latent_avg).norm(dim=-1).mean())}


def build_encoder(G, seed: int = 0):
    from core.encoder import Encoder, small_config

    torch.manual_seed(seed)
    E = Encoder(small_config(G.w_dim, G.num_ws, G.resolution), start_from_latent_avg=True,
                opts={"stylegan_size": G.resolution, "input_nc": 3})
    E.latent_avg.copy_(G.w_avg.reshape(1, -1).expand(G.num_ws, -1))
    with torch.no_grad():  # ours: deltas start at exactly 0 (a row not yet trained adds nothing to w0)
        for block in E.styles[1:]:
            block.linear.weight.zero_()
    return E


def train(out: pathlib.Path, model_path: pathlib.Path, o: EncoderTrainOptions, resume: bool = True,
          log=print, init: pathlib.Path | None = None) -> pathlib.Path:
    """Train (or continue) the encoder for ``model_path``'s generator; returns ``OUT/encoder64.pt``.

    ``init``: an encoder file (``core.encoder`` format, e.g. the shipped one) whose weights start a new run — a
    warm start after the generator was refined; every W+ row's delta is then trained from the first step (its
    progressive schedule already ran).  Ignored when resuming ``OUT/ckpt.pt``."""
    from core.encoder import check_compatible, load_encoder, save_encoder
    from core.losses import perceptual_loss
    from core.stylegan2.formats import fingerprint, load_generator

    out.mkdir(parents=True, exist_ok=True)
    G = load_generator(model_path).eval().requires_grad_(False)
    sha = fingerprint(G)
    E = build_encoder(G, o.seed).train()
    opt = torch.optim.Adam(E.parameters(), lr=o.learning_rate)
    lpips = perceptual_loss(o.lpips_net)
    state = {"step": 0, "elapsed": 0.0, "log": []}
    ckpt = out / "ckpt.pt"
    if resume and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if saved.get("generator_sha256") != sha:
            raise SystemExit(f"{ckpt} was trained for another generator; remove it or pass a new --out")
        E.load_state_dict(saved["encoder"])
        opt.load_state_dict(saved["optim"])
        state = json.loads(saved["state"])
        log(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)")
    elif init is not None:
        start = load_encoder(init)
        check_compatible(start, G)
        if start.config != E.config:
            raise SystemExit(f"{init} has another architecture than this trainer builds; train from scratch")
        E.load_state_dict(start.state_dict())
        state["warm_start"] = True  # kept in the checkpoint: a resumed warm start stays without the schedule
        log(f"starts from {init} (trained for generator {start.opts.get('latent_edit_meta', {}).get('generator')})")
    gen = torch.Generator().manual_seed(o.seed * 7919 + state["step"])

    def meta():
        return {"generator_sha256": sha, "generator": str(model_path.name), "steps": state["step"],
                "minutes": round(state["elapsed"] / 60, 1), "options": json.dumps(dataclasses.asdict(o))}

    def save():
        tmp = ckpt.with_name("ckpt.pt.tmp")
        torch.save({"encoder": E.state_dict(), "optim": opt.state_dict(), "state": json.dumps(state),
                    "generator_sha256": sha}, tmp)
        tmp.replace(ckpt)
        was = E.training
        save_encoder(E.eval(), out / "snapshot.pt", meta=meta())  # the latest weights, loadable while training
        E.train(was)

    @torch.no_grad()
    def pairs(n):
        ws_new = G.mapping(torch.randn(n, G.z_dim, generator=gen), truncation_psi=o.truncation_psi)
        return ws_new, G.synthesis(ws_new, noise_mode="const")

    t_run, last_save = time.time(), time.time()
    start_elapsed = state["elapsed"]
    pool_ws, pool_x = pairs(o.initial_pool)
    n_render = int(round(o.batch * o.render_fraction))
    while state["elapsed"] < o.minutes * 60:
        step = state["step"]
        frac = state["elapsed"] / (o.minutes * 60)
        for g in opt.param_groups:
            g["lr"] = _lr(step, frac, o)
        stage = None if state.get("warm_start") else _stage(frac, o, G.num_ws)
        ws_new, x_new = pairs(o.fresh_pairs)
        if len(pool_ws) < o.pool_size:
            pool_ws, pool_x = torch.cat([pool_ws, ws_new]), torch.cat([pool_x, x_new])
        else:
            slots = torch.randint(len(pool_ws), (o.fresh_pairs,), generator=gen)
            pool_ws[slots], pool_x[slots] = ws_new, x_new
        images = step % o.image_every == 0
        n_gen = o.batch - n_render if images else o.batch
        pick = torch.randint(len(pool_ws), (n_gen,), generator=gen)
        terms = encoder_losses(E, G, pool_x[pick], pool_ws[pick], lpips, o, stage, images=images)
        loss = _total(terms, o, True) * (n_gen / o.batch)
        if images and n_render:
            rterms = encoder_losses(E, G, rendered_batch(n_render, TRAIN_RENDER_SEED0 + step), None, lpips, o, stage)
            loss = loss + _total(rterms, o, False) * (n_render / o.batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] = step + 1
        state["elapsed"] = start_elapsed + time.time() - t_run
        if step % 24 == 0:
            log(f"step {step} {state['elapsed'] / 60:.1f} min lr {_lr(step, frac, o):.2e} stage {stage} "
                + " ".join(f"{k} {float(v.detach()):.4f}" for k, v in terms.items()))
        if (step + 1) % o.eval_every == 0:
            ev = evaluate(E, G, o.eval_samples)
            state["log"].append({"step": step + 1, "minutes": state["elapsed"] / 60, **ev})
            log(f"eval step {step + 1}: {json.dumps(ev)}")
        if time.time() - last_save > o.save_every_minutes * 60:
            save()
            last_save = time.time()
    save()
    ev = evaluate(E, G, o.final_eval_samples)
    E.eval()
    final = out / "encoder64.pt"
    save_encoder(E, final, meta=meta())
    report = {"final": ev, "steps": state["step"], "minutes": state["elapsed"] / 60, "log": state["log"],
              "generator_sha256": sha, "options": dataclasses.asdict(o),
              "held_out": {"eval_z_seed": EVAL_Z_SEED, "eval_render_seed": EVAL_RENDER_SEED,
                           "train_render_seeds": f"{TRAIN_RENDER_SEED0}+step"}}
    (out / "encoder64.eval.json").write_text(json.dumps(report, indent=1))
    log(f"final (256 held-out): {json.dumps(ev)}; wrote {final}")
    return final


def install(out: pathlib.Path) -> None:
    """Copy ``OUT/encoder64.pt`` and its eval report into ``core/demo/weights/``."""
    for name in ("encoder64.pt", "encoder64.eval.json"):
        shutil.copy2(out / name, WEIGHTS_DIR / name)
    print(f"installed {out / 'encoder64.pt'} -> {WEIGHTS_DIR / 'encoder64.pt'}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    ap.add_argument("--minutes", type=float, default=EncoderTrainOptions.minutes, help="total training minutes")
    ap.add_argument("--install", action="store_true", help="copy the result into core/demo/weights/")
    ap.add_argument("--model", type=pathlib.Path, default=None, help="generator (default: the shipped face64.pt)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shared 2-core machine)")
    ap.add_argument("--init", type=pathlib.Path, default=None,
                    help="start from this encoder's weights (e.g. core/demo/weights/encoder64.pt after a polish)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from core.demo import default_model_path

    model = args.model or default_model_path()
    o = EncoderTrainOptions(minutes=args.minutes)
    train(args.out, pathlib.Path(model), o, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True),
          init=args.init)
    if args.install:
        install(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
