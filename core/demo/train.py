"""Reproduce the embedded default from scratch: ``python -m core.demo.train --out DIR [--steps N] [--resume]``.

Stages (each resumable, each skipped when its output exists):

1. ``cache``      render ``train.npz`` (z, params, images) and a held-out ``test.npz``;
2. ``scorer``     fit the attribute CNN (``scorer.pt``) and report its held-out error (``scorer_eval.json``);
3. ``generator``  phase 1: distil the renderer into a StyleGAN2 generator (``ckpt.pt`` every few minutes, ``face64.pt``);
4. ``finetune``   phase 2 from phase 1's weights: scorer reading + detail-weighted pixels (``ckpt_finetune.pt``, ``face64.pt``);
   ``polish``     phase 3 (not in the default stages) from phase 2's or the shipped weights: phase 2's losses plus
                  squared error on faces rendered afresh every step (``ckpt_polish.pt``, ``face64.pt``);
5. ``directions`` fit one W direction per attribute on generated faces (``face64.directions.json`` + ``.npy``);
6. ``install``    copy the shipped files into ``core/demo/weights/`` (only with ``--install``).

Why one module of ~550 lines: the stages share the run folder, the cache and the checkpoint/resume helpers;
the per-stage code is short and reads top to bottom (the encoder stage lives in ``train_encoder.py``).

Why distillation, not a GAN: on two shared CPU cores a GAN needs far more steps than we have, and
adversarial training gives no handle on what W means.  Here every ``z`` has exactly one target face
(``data.params_from_z``: second-moment-normalised z, first K coordinates through the normal CDF), so
mapping+synthesis are trained end to end by regression (L1 on pixels + L1 on image gradients) and W
is forced to carry the attributes; directions are then fitted InterfaceGAN-style on the trained W.
From step ``feature_from_step`` on, an L1 loss between the scorer's feature maps of output and target is
added (pixels alone left eyes and mouths blurred).  Phase 1 still left the small features (pupils, lids,
mouth, glasses) too blurred for the scorer to read them back, so phase 2 (``finetune_options``) adds an L1
loss between the scorer's reading of the output and the z's parameters and weights pixel errors by how
much fine detail the target has there (``detail_map``).

How the shipped files were made (2 shared CPU cores; one process per core beats two threads in one):

    python -m core.demo.train --out DIR --stages cache,scorer
    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 -m core.demo.train \
        --out DIR --stages generator --resume --max-minutes 66
    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 -m core.demo.train \
        --out DIR --stages finetune --resume --finetune-minutes 80
    python -m core.demo.train --out DIR --stages directions --resume --install

``python -m core.demo.train --out DIR --install`` does the same in one process (slower).

``--renderer`` names the face renderer distilled (``core.demo.data.RENDERERS``; the cache records it and one folder
never mixes two); the shipped model's run (``--renderer v2`` with wider channels) is in ``core/demo/TRAINING.md``.
``--install`` refuses a run whose renderer is not the one ``core.demo`` draws with.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.demo.data import RENDERERS, build_cache, params_from_z, renderer_module
from core.demo.renderer import ATTRIBUTES, DESCRIPTIONS, NUM_ATTRIBUTES

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"


class Bar:
    """Minimal progress bar on stderr: redraws in place on a terminal, one line per ``every`` steps otherwise."""

    def __init__(self, total: int, desc: str, every: int = 50, start: int = 0):
        self.total, self.desc, self.every, self.t0, self.start = total, desc, every, time.time(), start
        self.tty = sys.stderr.isatty()

    def update(self, step: int, **info) -> None:
        if not self.tty and step % self.every and step != self.total:
            return
        frac = step / max(1, self.total)
        done = int(30 * frac)
        rate = (step - self.start) / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        line = f"{self.desc} [{'#' * done}{'.' * (30 - done)}] {step}/{self.total} {rate:.2f}it/s eta {eta / 60:.1f}m {extra}"
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and step == self.total:
            print(file=sys.stderr)


# ----------------------------------------------------------------------------------------------- generator


@dataclass
class GeneratorTrainOptions:
    resolution: int = 64
    z_dim: int = 64               # ours: first NUM_ATTRIBUTES dims carry the face, the rest are ignored
    w_dim: int = 128              # ours: ample for 13 attributes, keeps affines small
    mapping_layers: int = 4       # ours: half of StyleGAN2's 8, the z->W map is simple here
    channels: dict = field(default_factory=lambda: {4: 128, 8: 128, 16: 96, 32: 48, 64: 24})  # ours: < 50 ms forward
    lr_multiplier: float = 0.1    # ours: StyleGAN2 uses 0.01 for GAN stability; regression tolerates a faster mapping
    steps: int = 20000            # ours: upper bound; the shipped run was limited by --max-minutes
    batch: int = 16               # ours: small batches learn more per image on CPU
    lr: float = 8e-3              # ours: Adam; 1e-2 > 3e-3 > 1e-3 in 240-step trials (StyleGAN2's GAN uses 2e-3)
    betas: tuple = (0.9, 0.99)
    warmup: int = 100             # ours: linear lr warm-up steps, then cosine decay to 2%
    grad_weight: float = 1.0      # ours: L1 on finite differences sharpens edges
    ema_half_life: int = 2000     # ours: images; the shipped weights are the EMA (Karras et al. use 10k at scale)
    feature_weight: float = 2.0   # ours: L1 between scorer feature maps of output and target (fine features: eyes, mouth)
    feature_from_step: int = 6058  # ours: the shipped run switched the feature loss on here, when pixels had converged
    attribute_weight: float = 0.0  # ours: L1 between the scorer's reading of the output and the z's parameters
    detail_weight: float = 0.0    # ours: extra pixel weight where the target has fine detail (eyes, mouth, glasses)
    mse_weight: float = 0.0       # ours: squared pixel error as well (what PSNR measures; the polish: 20)
    fresh_data: bool = False      # ours: render a new batch every step instead of drawing from the cache (the
                                  # v2 model after the finetune: 29.69 dB on cached faces, 29.24 on held-out ones)
    max_minutes: float = 0.0      # ours: > 0 ends (and anneals the lr) by wall time as well as by steps
    checkpoint_minutes: float = 3.0
    seed: int = 0


def finetune_options(max_minutes: float, base: GeneratorTrainOptions | None = None,
                     steps: int = GeneratorTrainOptions.steps) -> GeneratorTrainOptions:
    """Phase 2, from phase 1's EMA weights: the scorer reads the output's attributes and is held to the z's
    parameters, and pixel errors on fine detail count more.  Phase 1 alone left pupils, lids and mouths blurred
    (gaze read back with MAE 0.26 where chance is 0.33).  ``base``: phase 1's options, whose architecture
    (resolution, z/w dims, mapping, channels, lr multiplier) and batch phase 2 keeps; ``steps`` and
    ``max_minutes`` (0: steps only) bound it."""
    arch = {} if base is None else {k: getattr(base, k) for k in (
        "resolution", "z_dim", "w_dim", "mapping_layers", "channels", "lr_multiplier", "batch", "seed")}
    return GeneratorTrainOptions(**arch, lr=2e-3,       # ours: a quarter of phase 1's peak: refine, do not restart
                                 warmup=50, feature_from_step=0,
                                 attribute_weight=1.0,   # ours: reading error ~0.1 vs pixel L1 ~0.05
                                 detail_weight=2.0,      # ours: detail pixels count 3x on average
                                 steps=steps, max_minutes=max_minutes)


def polish_options(base: GeneratorTrainOptions | None = None, steps: int = 10000) -> GeneratorTrainOptions:
    """Phase 3, from the finetune's (or the shipped) EMA weights: phase 2's losses plus squared pixel error, on
    faces rendered afresh every step (no cache to overfit).  Measured from the shipped v2 weights (1 process,
    2 threads, batch 32, lr 1e-3 cosine over 1500 steps; 256 held-out faces of z seed 1, 29.27 dB at the start):
    cached faces +0.07 dB at step 1000 (+0.10 at 1500), fresh faces +0.13 dB at step 1000; pure squared error
    on cached faces +0.07 dB at step 750 (it drops the scorer reading that keeps small features legible)."""
    o = finetune_options(0.0, base, steps)
    o.lr = 1e-3          # ours: half the finetune's peak (a refinement of converged weights)
    o.mse_weight = 20.0  # ours: ~1 of the loss at the finetune's end (pixel MSE ~3e-3 vs L1 terms ~0.1)
    o.fresh_data = True
    return o


def parse_channels(text: str) -> dict:
    """``"4:128,8:128,16:96,32:48,64:24"`` -> ``{4: 128, ...}`` (generator channels per resolution)."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        channels = {int(r): int(c) for r, c in pairs}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--channels: expected RES:CH,RES:CH,..., got {text!r}") from exc
    if not channels or any(c <= 0 for c in channels.values()):
        raise argparse.ArgumentTypeError(f"--channels: expected positive channel counts, got {text!r}")
    return channels


@torch.no_grad()
def evaluate_generator(G, test: dict, scorer_path: pathlib.Path, n: int = 256) -> dict:
    """Held-out numbers for the generator: PSNR of ``G(z)`` against the renders of the same ``z``, the same on
    fine detail only (``detail_map`` weights), and the scorer's per-attribute error against the z's parameters."""
    from core.demo.scorer import load_scorer

    zt = torch.from_numpy(test["z"][:n])
    target = torch.from_numpy(test["images"][:n]).permute(0, 3, 1, 2).float() / 127.5 - 1
    img = generate(G, zt)
    err = (img - target).square().mean(1, keepdim=True)
    detail = (err * detail_map(target)).flatten(1).mean(1)
    mae = (load_scorer(scorer_path)(img) - torch.from_numpy(test["params"][:n])).abs().mean(0)
    return {"test_psnr_db": round(float(psnr(img, target).mean()), 2),
            "test_detail_psnr_db": round(float((10 * torch.log10(4.0 / detail.clamp_min(1e-12))).mean()), 2),
            "test_attribute_mae": {a: round(float(m), 4) for a, m in zip(ATTRIBUTES, mae)}}


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def detail_map(target: torch.Tensor) -> torch.Tensor:
    """``(N,1,H,W)`` weight, mean 1 per image: where ``target`` (N,3,H,W) differs from its 3×3 box blur, widened
    by one pixel.  Large on pupils, lids, lips, teeth and glasses frames; small on flat skin, hair and background."""
    hf = (target - F.avg_pool2d(F.pad(target, (1, 1, 1, 1), mode="replicate"), 3, 1)).abs().sum(1, keepdim=True)
    hf = F.max_pool2d(hf, 3, 1, 1)
    return hf / hf.mean((2, 3), keepdim=True).clamp_min(1e-6)


def distill_loss(img: torch.Tensor, target: torch.Tensor, grad_weight: float, detail_weight: float = 0.0) -> torch.Tensor:
    """L1 on pixels + ``grad_weight`` × L1 on horizontal/vertical differences; ``(N,3,H,W)`` in [-1,1].

    With ``detail_weight`` > 0 every pixel's error is weighted by ``1 + detail_weight × detail_map(target)``."""
    d = img - target
    wgt = 1.0 + detail_weight * detail_map(target) if detail_weight else torch.ones_like(d[:, :1])
    loss = (d.abs() * wgt).mean()
    if grad_weight:
        loss = loss + grad_weight * 0.5 * (((d[..., 1:, :] - d[..., :-1, :]).abs() * wgt[..., 1:, :]).mean()
                                           + ((d[..., :, 1:] - d[..., :, :-1]).abs() * wgt[..., :, 1:]).mean())
    return loss


def scorer_features(net, x: torch.Tensor) -> list:
    """Feature maps of the demo scorer after each stride-2 stage (32, 16, 8 and 4 px) for ``(N,3,64,64)`` in [-1,1];
    ``torch.sigmoid(net.head(feats[-1]))`` is the scorer's reading."""
    feats = []
    for i, layer in enumerate(net.features):
        x = layer(x)
        if isinstance(layer, torch.nn.LeakyReLU) and i in (5, 9, 11, 13):
            feats.append(x)
    return feats


def build_generator(o: GeneratorTrainOptions):
    from core.stylegan2.network import Generator, GeneratorConfig

    torch.manual_seed(o.seed)
    cfg = GeneratorConfig(resolution=o.resolution, z_dim=o.z_dim, w_dim=o.w_dim, mapping_layers=o.mapping_layers,
                          channels=dict(o.channels), lr_multiplier=o.lr_multiplier)
    G = Generator(cfg)
    for conv in G.convs:  # the target is deterministic: keep noise out of the picture (strength fixed at 0)
        conv.noise_strength.requires_grad_(False)
    return G


def _dist():
    """``(rank, world)``: data-parallel workers when started by ``torch.distributed.run`` (gloo, CPU)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def train_generator(out: pathlib.Path, data: dict | None, o: GeneratorTrainOptions, resume: bool = True,
                    ckpt_name: str = "ckpt.pt", init_from: pathlib.Path | None = None, held_out: dict | None = None,
                    render: Callable | None = None):
    """Distil the cached renders into a generator; checkpoints ``out/ckpt_name``; returns ``(G_ema, log)``.

    ``init_from``: a checkpoint of an earlier phase whose ``G_ema`` weights start this one (fresh optimiser and
    lr schedule), or a shipped generator file (:func:`save_shipped_generator`); ignored when resuming this
    phase's own checkpoint.  With ``o.fresh_data`` every step renders its batch with ``render(params (N,K))
    -> uint8 (N,H,W,3)`` for new ``z`` drawn from the run's generator (``data`` is then not used).  ``held_out``: a cache
    (``z``, ``images``) whose first 64 faces the EMA generator is scored on at every checkpoint (the log's
    ``test_psnr_db`` entries, printed as well).

    Under ``torch.distributed.run`` each worker takes its own batch and gradients are averaged (one
    all-reduce per step, which also carries rank 0's clock); rank 0 writes checkpoints and samples.
    Two single-threaded workers are several times faster than one two-threaded process on a shared CPU.
    """
    rank, world = _dist()
    ckpt_path = out / ckpt_name
    G = build_generator(o)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    params = [p for p in G.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas))
    step, elapsed, log = 0, 0.0, []
    gen = torch.Generator().manual_seed(o.seed)
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        was = json.loads(ck.get("options", "{}"))
        for key in ("resolution", "z_dim", "w_dim", "mapping_layers", "channels"):
            now = {str(k): v for k, v in o.channels.items()} if key == "channels" else getattr(o, key)
            if key in was and was[key] != now:
                from core.common import InvalidInput

                raise InvalidInput(f"{ckpt_path} was trained with {key}={was[key]}, this run asks {now}: "
                                   f"resume with the same options (core/demo/TRAINING.md)")
        G.load_state_dict(ck["G"])
        G_ema.load_state_dict(ck["G_ema"])
        if "opt" in ck:  # a finished phase's carried checkpoint has none (carry drops it)
            opt.load_state_dict(ck["opt"])
        step, elapsed, log = ck["step"], ck["elapsed"], json.loads(ck["log"])
        gen.set_state(ck["rng"])
        if rank == 0:
            print(f"resumed generator training at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr)
    elif init_from is not None:
        ck = torch.load(init_from, map_location="cpu", weights_only=True)
        if "G_ema" in ck:
            start, origin = ck["G_ema"], f"step {ck['step']}"
        else:  # a shipped generator file
            start, origin = load_trained_generator(init_from).state_dict(), "shipped weights"
        G.load_state_dict(start)  # the EMA weights are the better start; the phase's EMA starts from them too
        G_ema.load_state_dict(start)
        if rank == 0:
            print(f"phase starts from {init_from} ({origin})", file=sys.stderr)
    if o.fresh_data:
        if render is None:
            raise ValueError("train_generator: fresh_data needs render")
        sample = held_out if data is None else data
    else:
        sample = data
        z_all = torch.from_numpy(data["z"])
        params_all = torch.from_numpy(data["params"])
        imgs = torch.from_numpy(data["images"])
        n = len(z_all)
    if world > 1:  # workers draw different batches; deterministic for a given (seed, rank, resume step)
        gen.manual_seed(o.seed + 7919 * rank + step)
    beta = 0.5 ** (o.batch * world / max(o.ema_half_life, 1e-8))
    bar = Bar(o.steps, "generator", every=25, start=step)
    t_start, t_ckpt = time.time() - elapsed, time.time()
    run_loss = None

    def save_ckpt():
        if rank != 0:
            return
        with torch.no_grad():  # a visual check: EMA samples (top) over their targets (bottom)
            from core.demo.renderer import contact_sheet

            if sample is not None:
                fake = to_uint8(generate(G_ema, torch.from_numpy(sample["z"][:8])))
                contact_sheet(np.concatenate([fake, sample["images"][:8]]), cols=8, scale=2).save(out / "samples.png")
            if held_out is not None:
                zt, tt = torch.from_numpy(held_out["z"][:64]), torch.from_numpy(held_out["images"][:64])
                value = float(psnr(generate(G_ema, zt), tt.permute(0, 3, 1, 2).float() / 127.5 - 1).mean())
                log.append({"step": step, "minutes": round((time.time() - t_start) / 60, 2),
                            "test_psnr_db": round(value, 2)})
                print(f"{ckpt_name} step {step}: held-out PSNR {value:.2f} dB (64 faces)", file=sys.stderr, flush=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"G": G.state_dict(), "G_ema": G_ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": time.time() - t_start, "log": json.dumps(log), "rng": gen.get_state(),
                    "options": json.dumps(asdict(o), default=str)}, tmp)
        tmp.replace(ckpt_path)

    G.train()
    clock = torch.tensor([time.time() - t_start])
    feat_net = None
    while step < o.steps:
        elapsed = float(clock) if world > 1 and step > 0 else time.time() - t_start
        progress = step / o.steps
        if o.max_minutes > 0:
            progress = max(progress, elapsed / (60 * o.max_minutes))
        if progress >= 1.0:
            break
        for gparam in opt.param_groups:
            gparam["lr"] = o.lr * _lr_factor(progress, step, o.warmup)
        if o.fresh_data:
            z_b = torch.randn(o.batch, o.z_dim, generator=gen)
            params_b = torch.from_numpy(params_from_z(z_b.numpy()))
            target = torch.from_numpy(render(params_b.numpy())).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        else:
            idx = torch.randint(0, n, (o.batch,), generator=gen)
            z_b, params_b = z_all[idx], params_all[idx]
            target = imgs[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        img = G.synthesis(G.mapping(z_b), noise_mode="const")
        loss = distill_loss(img, target, o.grad_weight, o.detail_weight)
        if o.mse_weight:
            loss = loss + o.mse_weight * (img - target).square().mean()
        use_feat = o.feature_weight and step >= o.feature_from_step
        if use_feat or o.attribute_weight:
            if feat_net is None:
                from core.demo.scorer import load_scorer

                feat_net = load_scorer(out / "scorer.pt")  # frozen
            fo = scorer_features(feat_net, img)
            if use_feat:
                with torch.no_grad():
                    ft = scorer_features(feat_net, target)
                loss = loss + o.feature_weight * sum((a - b).abs().mean() for a, b in zip(fo, ft)) / len(ft)
            if o.attribute_weight:
                reading = torch.sigmoid(feat_net.head(fo[-1]))
                loss = loss + o.attribute_weight * (reading - params_b).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            import torch.distributed as dist

            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([time.time() - t_start if rank == 0 else 0.0])])
            dist.all_reduce(flat)
            clock = flat[-1:].clone()
            flat = flat[:-1] / world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        opt.step()
        step += 1
        with torch.no_grad():
            b = beta if init_from is not None else min(beta, (1 + step) / (10 + step))
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.lerp_(p, 1 - b)
            for be, bb in zip(G_ema.buffers(), G.buffers()):
                be.copy_(bb)
        lv = float(loss.detach())
        run_loss = lv if run_loss is None else 0.98 * run_loss + 0.02 * lv
        if step % 25 == 0:
            log.append({"step": step, "minutes": round((time.time() - t_start) / 60, 2), "loss": round(run_loss, 5)})
        if rank == 0:
            bar.update(step, loss=run_loss, lr=opt.param_groups[0]["lr"])
        if time.time() - t_ckpt > 60 * o.checkpoint_minutes:
            save_ckpt()
            t_ckpt = time.time()
    save_ckpt()
    if world > 1:  # the next phase starts from this phase's final checkpoint: no worker may read it before rank 0 wrote it
        import torch.distributed as dist

        dist.barrier()
    G_ema.reset_w_avg()
    return G_ema, log


@torch.no_grad()
def generate(G, z: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``G.synthesis(G.mapping(z))`` in batches -> ``(N,3,H,W)`` clamped to [-1,1]."""
    out = [G.synthesis(G.mapping(z[i:i + batch]), noise_mode="const").clamp(-1, 1) for i in range(0, len(z), batch)]
    return torch.cat(out)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``(N,3,H,W)`` in [-1,1] -> uint8 ``(N,H,W,3)``."""
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``(N,3,H,W)`` images in [-1,1] (peak-to-peak 2)."""
    mse = (a - b).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def save_shipped_generator(G, path: pathlib.Path, meta: dict) -> None:
    """Write the generator with core.stylegan2.formats.save_generator."""
    try:
        from core.stylegan2.formats import save_generator
    except ImportError:  # TEMPORARY until core/stylegan2/formats.py lands: plain config + state dict
        torch.save({"config": json.dumps(G.config.to_dict()), "state_dict": G.state_dict(), "meta": json.dumps(meta)}, path)
        return
    save_generator(G, path, meta=meta)


def load_trained_generator(path: pathlib.Path):
    """Load a generator written by :func:`save_shipped_generator`."""
    try:
        from core.stylegan2.formats import load_generator
    except ImportError:  # TEMPORARY, see save_shipped_generator
        from core.stylegan2.network import Generator, GeneratorConfig

        ck = torch.load(path, map_location="cpu", weights_only=True)
        G = Generator(GeneratorConfig.from_dict(json.loads(ck["config"])))
        G.load_state_dict(ck["state_dict"])
        return G.eval()
    return load_generator(path)


# ----------------------------------------------------------------------------------------------- main


def _phase_logs(out: pathlib.Path) -> dict:
    """``{stage: log}`` of the generator phases that have written ``train_log_<stage>.json`` in ``out``."""
    return {st: json.loads((out / f"train_log_{st}.json").read_text()) for st in ("generator", "finetune", "polish")
            if (out / f"train_log_{st}.json").exists()}


# A run's state that cannot be recomputed cheaply: what --carry-to keeps and --carry-from restores (the render
# caches are not carried: build_cache remakes them bit-identically from their seeds in a few minutes)
CARRIED = ("scorer.pt", "scorer_eval.json", "ckpt.pt", "ckpt_finetune.pt", "ckpt_polish.pt", "face64.pt",
           "generator_eval.json", "train_log_generator.json", "train_log_finetune.json", "train_log_polish.json",
           "face64.directions.json", "face64.directions", "directions_eval.json", "log.txt")


def _checkpoint_step(path: pathlib.Path) -> int:
    """The ``step`` a trainer checkpoint records (-1 when it cannot be read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - unreadable: the other copy wins
        return -1


def _finished_phase(path: pathlib.Path) -> bool:
    """True for a trainer checkpoint whose phase ran all its steps (``step`` ≥ its options' ``steps``)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        return int(ck["step"]) >= int(json.loads(ck.get("options", "{}")).get("steps", 1 << 62))
    except Exception:  # noqa: BLE001 - unreadable: copied as it is
        return False


def carry(src: pathlib.Path, dst: pathlib.Path, names=CARRIED, replace: bool = True) -> list:
    """Copy the run files ``names`` found in ``src`` into ``dst`` (folders whole, through a ``.part`` copy that is
    renamed); ``replace=False`` keeps what ``dst`` already has, except a checkpoint (``ckpt*.pt``) that records
    an earlier step than ``src``'s.  A finished phase's checkpoint is copied without its optimiser state (half
    its size; resuming it only skips the phase).  Returns the names copied.  Used to move a run between machines: a session
    that must stop mid-run carries its state into the repository, the next one carries it back
    (core/demo/TRAINING.md)."""
    from core.common import InvalidInput

    if not src.is_dir():
        raise InvalidInput(f"no run state to carry at {src}")
    if src.resolve() == dst.resolve():
        return []
    dst.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names:
        a, b = src / name, dst / name
        if not a.exists():
            continue
        if b.exists() and not replace:
            newer = name.startswith("ckpt") and a.is_file() and _checkpoint_step(a) > _checkpoint_step(b)
            if not newer:
                continue
        tmp = b.with_name(b.name + ".part")
        if name.startswith("ckpt") and a.is_file() and _finished_phase(a):  # its optimiser state is never used again
            ck = torch.load(a, map_location="cpu", weights_only=True)
            ck.pop("opt", None)
            torch.save(ck, tmp)
        elif a.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(a, tmp)
            shutil.rmtree(b, ignore_errors=True)
        else:
            shutil.copy2(a, tmp)
        tmp.replace(b)
        done.append(name)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, required=True, help="work folder (caches, checkpoints, outputs)")
    ap.add_argument("--steps", type=int, default=GeneratorTrainOptions.steps, help="generator steps")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="also stop generator training after this wall time")
    ap.add_argument("--finetune-minutes", type=float, default=80.0,
                    help="wall time of the finetune phase (the shipped run: 80; 0: --finetune-steps only)")
    ap.add_argument("--finetune-steps", type=int, default=GeneratorTrainOptions.steps, help="finetune steps")
    ap.add_argument("--polish-steps", type=int, default=10000, help="polish steps (phase 3, fresh renders)")
    ap.add_argument("--polish-from", type=pathlib.Path, default=None,
                    help="weights the polish starts from (default: OUT/ckpt_finetune.pt, else the shipped face64.pt)")
    ap.add_argument("--channels", type=parse_channels, default=None,
                    help="generator channels per resolution, e.g. 4:128,8:128,16:128,32:64,64:32 "
                         "(default: GeneratorTrainOptions.channels, the shipped v1 model's)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt and keep finished stages")
    ap.add_argument("--stages", default="cache,scorer,generator,finetune,directions",
                    help="comma list of: cache, scorer, generator, finetune, polish, directions, encoder")
    ap.add_argument("--train-size", type=int, default=40000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--scorer-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is far faster than 2 on a CPU other jobs share (OpenMP spin-waits)")
    ap.add_argument("--renderer", choices=sorted(RENDERERS), default="v2",
                    help="the face renderer distilled (core.demo.data.RENDERERS); one per --out folder")
    ap.add_argument("--encoder-minutes", type=float, default=90.0, help="wall time of the encoder stage")
    ap.add_argument("--install", action="store_true", help="copy the results into core/demo/weights/")
    ap.add_argument("--carry-from", type=pathlib.Path, default=None,
                    help="first copy a carried run state (CARRIED files) into OUT where OUT lacks them")
    ap.add_argument("--carry-to", type=pathlib.Path, default=None,
                    help="after the stages, copy OUT's run state (CARRIED files) into this folder")
    args = ap.parse_args(argv)
    if args.carry_from is not None:
        rank, world = _dist()
        if rank == 0:
            got = carry(args.carry_from, args.out, replace=False)
            print(f"carried from {args.carry_from}: {', '.join(got) or 'nothing new'}", file=sys.stderr)
        if world > 1:  # no worker reads OUT before rank 0 has filled it
            import torch.distributed as dist

            dist.barrier()
    if args.install:
        import core.demo

        shipped_renderer = core.demo.render.__module__
        if shipped_renderer != RENDERERS[args.renderer]:
            print(f"--install: core.demo renders with {shipped_renderer}, this run distils {RENDERERS[args.renderer]}; "
                  f"switch core/demo/__init__.py first (core/demo/TRAINING.md)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not args.resume:
        for name in ("ckpt.pt", "scorer.pt", "face64.pt"):
            if (out / name).exists() and any(s in stages for s in ("scorer", "generator", "finetune", "polish")):
                print(f"{out / name} exists: pass --resume to continue, or choose another --out", file=sys.stderr)
                return 2
    o = GeneratorTrainOptions(steps=args.steps, max_minutes=args.max_minutes)
    if args.channels is not None:
        o.channels = args.channels
    need_data = any(s in stages for s in ("cache", "scorer", "generator", "finetune"))
    data = test = None
    rank, world = _dist()
    for turn in ((0, 1) if world > 1 else (0,)):  # workers: rank 0 renders the caches, the others then read them
        if (rank == 0) == (turn == 0):
            if need_data or "polish" in stages:  # the polish renders its own faces: it needs only the held-out cache
                test = build_cache(out / "test.npz", args.test_size, o.z_dim, seed=1, renderer=args.renderer)
            if need_data:
                bar = Bar(args.train_size, "render cache", every=5000)
                data = build_cache(out / "train.npz", args.train_size, o.z_dim, seed=0,
                                   progress=lambda a, b: bar.update(a), renderer=args.renderer)
        if world > 1 and turn == 0:
            import torch.distributed as dist

            dist.barrier()
    if "scorer" in stages and not (out / "scorer.pt").exists():
        from core.demo import scorer as sc

        # the shipped scorer: 1500 steps at lr 2e-3, then 900 more at 1e-3 (both cosine) from those weights
        phases = [sc.ScorerTrainOptions(steps=1500, lr=2e-3, seed=0), sc.ScorerTrainOptions(steps=900, lr=1e-3, seed=1)]
        if args.scorer_steps:
            phases = [sc.ScorerTrainOptions(steps=args.scorer_steps)]
        t0 = time.time()
        net = None
        for i, so in enumerate(phases):
            bar = Bar(so.steps, f"scorer {i + 1}/{len(phases)}", every=100)
            net = sc.train_scorer(data["images"], data["params"], so, progress=lambda s, t, l: bar.update(s, loss=l),
                                  init=net)
        pred = np.stack([v for v in sc.score(test["images"], net).values()], 1)
        mae = np.abs(pred - test["params"]).mean(0)
        ev = {"minutes": round((time.time() - t0) / 60, 2), "steps": [so.steps for so in phases],
              "held_out_mae": {a: round(float(m), 4) for a, m in zip(ATTRIBUTES, mae)}}
        sc.save_scorer(net, out / "scorer.pt", meta=ev)
        (out / "scorer_eval.json").write_text(json.dumps(ev, indent=2))
        print(json.dumps(ev, indent=2))
    phases = [("generator", "ckpt.pt", o, None),
              ("finetune", "ckpt_finetune.pt", finetune_options(args.finetune_minutes, o, args.finetune_steps),
               out / "ckpt.pt"),
              ("polish", "ckpt_polish.pt", polish_options(o, args.polish_steps), args.polish_from or (
                  out / "ckpt_finetune.pt" if (out / "ckpt_finetune.pt").exists() else WEIGHTS_DIR / "face64.pt"))]
    for stage, ckpt_name, po, init in phases:
        if stage not in stages:
            continue
        t0 = time.time()
        G, log = train_generator(out, data, po, resume=args.resume, ckpt_name=ckpt_name, init_from=init, held_out=test,
                                 render=lambda p: renderer_module(args.renderer).render(p, size=o.resolution))
        if _dist()[0] != 0:  # rank 0 evaluates and saves; the other workers go on to the next phase (or stop below)
            continue
        (out / f"train_log_{stage}.json").write_text(json.dumps(log))
        logs = _phase_logs(out)
        ev = evaluate_generator(G, test, out / "scorer.pt")
        meta = {"domain": f"latent-edit demo faces ({RENDERERS[args.renderer]})", "renderer": args.renderer,
                "attributes": list(ATTRIBUTES),
                "z_to_params": "core.demo.data.params_from_z",
                "train_steps": sum(lg[-1]["step"] for lg in logs.values() if lg),
                "train_minutes": round(sum(lg[-1]["minutes"] for lg in logs.values() if lg), 2),
                "phases": [c for st, c, _, _ in phases if st in logs],
                "final_loss": next((e["loss"] for e in reversed(log) if "loss" in e), None), **ev}
        save_shipped_generator(G, out / "face64.pt", meta)
        (out / "generator_eval.json").write_text(json.dumps(meta, indent=2))
        print(json.dumps(meta, indent=2), f"(stage took {(time.time() - t0) / 60:.1f} min)")
    if _dist()[0] != 0:  # directions, encoder and install run in rank 0 only
        return 0
    if "directions" in stages:
        from core.demo.directions import edit_matrix, fit_directions, match_renderer, refine_directions, write_manifest
        from core.demo.scorer import load_scorer

        G = load_trained_generator(out / "face64.pt")
        net = load_scorer(out / "scorer.pt")
        fitted, report = fit_directions(G, net)
        bar = Bar(len(ATTRIBUTES), "refine directions", every=1)
        dirs = refine_directions(G, net, fitted, progress=lambda name, step, loss: step == 1 and bar.update(
            ATTRIBUTES.index(name) + 1, attribute=name))
        bar = Bar(len(ATTRIBUTES), "match the renderer", every=1)
        dirs, report["renderer_match"] = match_renderer(
            G, net, dirs, renderer_module(args.renderer).render,
            progress=lambda name, step, loss: step == 1 and bar.update(ATTRIBUTES.index(name) + 1, attribute=name))
        write_manifest(out / "face64.directions.json", dirs, G)
        for key, d in (("edit_matrix_fitted", fitted), ("edit_matrix_abs_change_-3_to_3", dirs)):
            M = edit_matrix(G, net, d)
            report[key] = {a: {b: round(float(M[i, j]), 3) for j, b in enumerate(ATTRIBUTES)}
                           for i, a in enumerate(ATTRIBUTES)}
        (out / "directions_eval.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    if "encoder" in stages:  # the e4e-style encoder of OUT/face64.pt (else the shipped one): core.demo.train_encoder
        from core.demo import default_model_path, train_encoder

        model = out / "face64.pt" if (out / "face64.pt").exists() else default_model_path()
        train_encoder.train(out / "encoder", model, train_encoder.EncoderTrainOptions(minutes=args.encoder_minutes),
                            resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
        if args.install:
            train_encoder.install(out / "encoder")
    if args.install:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        logs = _phase_logs(out)
        if logs:
            (out / "train_log.json").write_text(json.dumps(logs))
        shipped = {"face64.pt": "face64.pt", "scorer.pt": "scorer.pt", "face64.directions.json": "face64.directions.json",
                   "face64.directions": "face64.directions", "generator_eval.json": "face64.eval.json",
                   "directions_eval.json": "face64.directions_eval.json", "scorer_eval.json": "scorer.eval.json",
                   "train_log.json": "face64.train_log.json"}
        for name, target in shipped.items():
            src, dst = out / name, WEIGHTS_DIR / target
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            elif src.exists():
                shutil.copy2(src, dst)
            else:
                continue
            print(f"installed {dst}")
    if args.carry_to is not None:
        got = carry(out, args.carry_to)
        print(f"carried to {args.carry_to}: {', '.join(got) or 'nothing'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
