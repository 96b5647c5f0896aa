"""Train the embedded model's segmenter: ``python -m core.demo.train_segmenter [--out DIR] [--minutes M]
[--install] [--model PATH] [--renderer v1|v2]`` — one command to redo after the generator changes (the head reads
its features; the checkpoint, ``OUT/ckpt.pt``, is only resumed for the same generator).

Two networks in one file (core.segmenter format), both predicting ``core.demo.PARTS`` labels:

* the part head (DatasetGAN, Zhang et al. 2021: a light per-pixel classifier on the generator's own synthesis
  features) — data: ``z ~ N(0,I)`` seeded, features of ``G.synthesis(G.mapping(z))``, labels
  ``render_parts(params_from_z(z))`` (the face the generator was distilled to draw for ``z``); it gives
  ChunkyGAN's ``S = G^S(X^S)``;
* the image U-Net (``core.demo.segment``) — data: ``render(params_from_z(z), extras)`` with one random extra on
  ``EXTRA_FRACTION`` of the faces, labels ``render_parts`` of the same arguments.

Held-out: ``EVAL_SEED`` latents (never trained on), with and without extras; the mean IoU over the face parts
(:data:`FACE_PARTS`) is written to ``OUT/segmenter.eval.json``.  Resumable: ``OUT/data.<renderer>.z<dim>.npz`` (the rendered data)
and ``OUT/ckpt.pt`` (weights, optimisers, steps); ``--minutes`` is the total time over all runs.  Default out:
``~/.cache/latent-edit-train/segmenter``; ``--install`` copies the file to ``core/demo/weights/face64.segmenter.pt``::

    nice -n 10 python -m core.demo.train_segmenter --minutes 22 --install                   # the shipped run
    nice -n 10 python -m core.demo.train_segmenter --model face64.pt --renderer v2 --out DIR --minutes 22 --install
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_OUT = pathlib.Path.home() / ".cache" / "latent-edit-train" / "segmenter"
TRAIN_SEED = 310_000  # training latents
EVAL_SEED = 310_001  # held-out latents (evaluation only)
EXTRA_FRACTION = 0.3  # ours: share of U-Net training faces with one extra drawn on top (out-of-domain robustness)
# the parts of the face the IoU acceptance is measured over (not the background, shirt or extras)
FACE_PARTS = ("skin", "hair", "eyes", "brows", "mouth", "glasses", "beard")


@dataclasses.dataclass
class SegmenterTrainOptions:
    """Ours throughout (CPU budget: minutes on 2 shared cores)."""

    train: int = 1500  # training faces
    held_out: int = 100  # held-out faces
    minutes: float = 12.0  # total wall time over both networks (split head_share / rest)
    head_share: float = 0.3  # the head trains on cached features: cheap
    batch: int = 32  # head batch (cached features: cheap)
    unet_batch: int = 16
    lr: float = 3e-3  # Adam
    hidden: int = 32  # PartHead width
    width: int = 8  # PartUNet base width (16 ran at 6 s/step on the shared 2 cores: too slow for minutes)
    blocks: tuple = (1, 2, 3, 4)  # synthesis blocks the head reads (8..64 px); DatasetGAN reads them all
    class_power: float = 0.5  # class weights ∝ frequency^-power (small parts: eyes, brows)
    seed: int = 0


def sample_data(n: int, seed: int, z_dim: int, extras: bool, renderer: str = "v2") -> dict:
    """``{"z" (n,z_dim), "labels" (n,64,64) u8 (plain faces), "labels_x" / "images_x" (with the extras), "extra"
    (n,) int (-1 none)}`` drawn by ``core.demo.data.RENDERERS[renderer]``."""
    from core.demo.data import params_from_z, renderer_module

    mod = renderer_module(renderer)
    EXTRAS, render, render_parts = mod.EXTRAS, mod.render, mod.render_parts

    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, z_dim)).astype(np.float32)
    params = params_from_z(z)
    extra = np.where(rng.random(n) < (EXTRA_FRACTION if extras else 0), rng.integers(0, len(EXTRAS), n), -1)
    # the head's labels are the plain face (what G draws for z); the U-Net's include the extras
    labels = render_parts(params)
    images = render(params)
    labels_x, images_x = labels.copy(), images.copy()
    for i in np.nonzero(extra >= 0)[0]:
        e = (EXTRAS[extra[i]],)
        labels_x[i], images_x[i] = render_parts(params[i], extras=e), render(params[i], extras=e)
    return {"z": z, "labels": labels, "labels_x": labels_x, "images_x": images_x, "extra": extra}


def held_out_with_extras(n: int, z_dim: int, renderer: str = "v2") -> dict:
    """Held-out faces, each with one extra (cycling through EXTRAS)."""
    from core.demo.data import params_from_z, renderer_module

    mod = renderer_module(renderer)
    EXTRAS, render, render_parts = mod.EXTRAS, mod.render, mod.render_parts

    z = np.random.default_rng(EVAL_SEED).standard_normal((n, z_dim)).astype(np.float32)
    params = params_from_z(z)
    labels = np.stack([render_parts(p, extras=(EXTRAS[i % len(EXTRAS)],)) for i, p in enumerate(params)])
    images = np.stack([render(p, extras=(EXTRAS[i % len(EXTRAS)],)) for i, p in enumerate(params)])
    return {"labels": labels, "images": images}


def mean_iou(pred: np.ndarray, truth: np.ndarray, parts=FACE_PARTS) -> tuple[float, dict]:
    """Mean over ``parts`` (those present in ``truth`` or ``pred``) of the IoU over all pixels of all images;
    ``(mean, {part: iou})``."""
    from core.demo.renderer import PARTS

    per = {}
    for name in parts:
        k = PARTS.index(name)
        p, t = pred == k, truth == k
        union = np.logical_or(p, t).sum()
        if union:
            per[name] = float(np.logical_and(p, t).sum() / union)
    return float(np.mean(list(per.values()))), per


def class_weights(labels: np.ndarray, k: int, power: float) -> torch.Tensor:
    freq = np.bincount(labels.ravel(), minlength=k).astype(np.float64) + 1.0
    w = (freq / freq.sum()) ** -power
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def _features(G, z: np.ndarray, blocks, batch: int = 50) -> dict:
    out: dict = {b: [] for b in blocks}
    with torch.no_grad():
        for s in range(0, len(z), batch):
            ws = G.mapping(torch.from_numpy(z[s:s + batch]))
            _, feats = G.block_features(ws, blocks=blocks)
            for b in blocks:
                out[b].append(feats[b][0].half())
    return {b: torch.cat(v) for b, v in out.items()}


def _to_images(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1


def train(out: pathlib.Path, opts: SegmenterTrainOptions, model_path=None, log=print, renderer: str = "v2") -> dict:
    """Build / resume the data, train both networks within ``opts.minutes`` in all, evaluate, write
    ``out/face64.segmenter.pt`` and ``out/segmenter.eval.json``; returns the evaluation."""
    import core
    from core.demo.renderer import PARTS
    from core.segmenter import PartHead, PartUNet, save_segmenter
    from core.stylegan2.formats import fingerprint, load_generator

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    G = load_generator(model_path or core.default_model_path()).eval().requires_grad_(False)
    sha = fingerprint(G)
    data_path = out / f"data.{renderer}.z{G.z_dim}.npz"  # labels depend on the renderer and z, not on G
    if data_path.is_file():
        data = dict(np.load(data_path))
    else:
        t = time.time()
        # (drawn as train + held_out rows and cut, as the shipped run did: the same z and extras on a redo)
        data = sample_data(opts.train + opts.held_out, TRAIN_SEED, G.z_dim, extras=True, renderer=renderer)
        ev = sample_data(opts.held_out, EVAL_SEED, G.z_dim, extras=False, renderer=renderer)
        evx = held_out_with_extras(opts.held_out, G.z_dim, renderer)
        data = {**{k: v[:opts.train] for k, v in data.items()}, "eval_z": ev["z"], "eval_labels": ev["labels"],
                "eval_images": ev["images_x"], "evalx_labels": evx["labels"], "evalx_images": evx["images"]}
        np.savez(data_path, **data)
        log(f"rendered {opts.train} + {opts.held_out}×2 faces in {time.time() - t:.0f} s")
    K = len(PARTS)
    channels = {b: int(G.config.channels[G.block_resolutions()[b]]) for b in opts.blocks}
    head = PartHead(channels, PARTS, int(G.resolution), opts.hidden)
    unet = PartUNet(PARTS, opts.width)
    oh, ou = torch.optim.Adam(head.parameters(), opts.lr), torch.optim.Adam(unet.parameters(), opts.lr)
    state = {"head_seconds": 0.0, "unet_seconds": 0.0, "head_steps": 0, "unet_steps": 0, "log": []}
    ckpt = out / "ckpt.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if saved.get("generator_sha256") == sha:
            head.load_state_dict(saved["head"]), oh.load_state_dict(saved["opt_head"])
            state.update(json.loads(saved["state"]))
            try:
                unet.load_state_dict(saved["unet"]), ou.load_state_dict(saved["opt_unet"])
            except (RuntimeError, ValueError):  # another U-Net width: that network starts over
                state.update(unet_seconds=0.0, unet_steps=0)
            log(f"resumed: head {state['head_steps']} steps, U-Net {state['unet_steps']} steps")
        else:
            log("checkpoint is for another generator: starting over")

    def save():
        torch.save({"head": head.state_dict(), "unet": unet.state_dict(), "opt_head": oh.state_dict(),
                    "opt_unet": ou.state_dict(), "state": json.dumps(state), "generator_sha256": sha}, ckpt)

    budget = opts.minutes * 60
    rng = np.random.default_rng(opts.seed + state["head_steps"] + 7 * state["unet_steps"])
    # ---- the head on cached generator features ----
    if state["head_seconds"] < budget * opts.head_share:
        feats = _features(G, data["z"], opts.blocks)
        labels = torch.from_numpy(data["labels"]).long()
        wts = class_weights(data["labels"], K, opts.class_power)
        t0, last = time.time() - state["head_seconds"], time.time()
        head.train()
        while time.time() - t0 < budget * opts.head_share:
            idx = torch.from_numpy(rng.integers(0, len(labels), opts.batch))
            loss = F.cross_entropy(head({b: f[idx].float() for b, f in feats.items()}), labels[idx], weight=wts)
            oh.zero_grad(), loss.backward(), oh.step()
            state["head_steps"] += 1
            if time.time() - last > 30:
                state["head_seconds"], last = time.time() - t0, time.time()
                state["log"].append(("head", state["head_steps"], float(loss.detach())))
                log(f"head step {state['head_steps']} loss {float(loss.detach()):.3f}"), save()
        state["head_seconds"] = time.time() - t0
        save()
        del feats
    # ---- the image U-Net on renders (a third with extras) ----
    images, labels = _to_images(data["images_x"]), torch.from_numpy(data["labels_x"]).long()
    wts = class_weights(data["labels_x"], K, opts.class_power)
    t0, last = time.time() - state["unet_seconds"], time.time()
    unet.train()
    while time.time() - t0 < budget * (1 - opts.head_share):
        idx = torch.from_numpy(rng.integers(0, len(labels), opts.unet_batch))
        loss = F.cross_entropy(unet(images[idx]), labels[idx], weight=wts)
        ou.zero_grad(), loss.backward(), ou.step()
        state["unet_steps"] += 1
        if time.time() - last > 30:
            state["unet_seconds"], last = time.time() - t0, time.time()
            state["log"].append(("unet", state["unet_steps"], float(loss.detach())))
            log(f"U-Net step {state['unet_steps']} loss {float(loss):.3f}"), save()
    state["unet_seconds"] = time.time() - t0
    save()
    # ---- held-out evaluation ----
    head.eval(), unet.eval()
    with torch.no_grad():
        f = _features(G, data["eval_z"], opts.blocks)
        pred_head = head({b: v.float() for b, v in f.items()}).argmax(1).numpy()
        pred_u = unet(_to_images(data["eval_images"])).argmax(1).numpy()
        pred_ux = unet(_to_images(data["evalx_images"])).argmax(1).numpy()
    report = {"generator_sha256": sha, "renderer": renderer, "held_out": int(len(data["eval_z"])), "face_parts": list(FACE_PARTS),
              "train": int(len(data["z"])), "head_steps": state["head_steps"], "unet_steps": state["unet_steps"],
              "minutes": (state["head_seconds"] + state["unet_seconds"]) / 60}
    for name, pred, truth in (("head", pred_head, data["eval_labels"]), ("unet", pred_u, data["eval_labels"]),
                              ("unet_extras", pred_ux, data["evalx_labels"])):
        m, per = mean_iou(pred, truth)
        report[f"{name}_miou"], report[f"{name}_iou"] = m, per
    save_segmenter(out / "face64.segmenter.pt", head=head.eval(), unet=unet.eval(),
                   meta={"generator_sha256": sha, "trained": "core.demo.train_segmenter", "eval": {
                       k: report[k] for k in ("head_miou", "unet_miou", "unet_extras_miou")}})
    (out / "segmenter.eval.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=SegmenterTrainOptions.minutes)
    ap.add_argument("--model", type=pathlib.Path, default=None, help="generator checkpoint (default: embedded)")
    ap.add_argument("--renderer", default="v2",
                    help="the renderer the generator was distilled from (core.demo.data.RENDERERS)")
    ap.add_argument("--threads", type=int, default=1)  # 2 threads ran 6× slower on the shared 2 cores
    ap.add_argument("--install", action="store_true", help="copy the result into core/demo/weights/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = train(args.out, SegmenterTrainOptions(minutes=args.minutes), args.model,
                   log=lambda s: print(s, flush=True), renderer=args.renderer)
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_iou")}, indent=2))
    if args.install:
        from core.segmenter import default_segmenter_path

        shutil.copy(args.out / "face64.segmenter.pt", default_segmenter_path())
        shutil.copy(args.out / "segmenter.eval.json", default_segmenter_path().with_name("face64.segmenter.eval.json"))
        print(f"installed {default_segmenter_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
