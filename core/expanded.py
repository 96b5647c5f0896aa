"""Expanding the latent space of StyleGAN (Yin et al. 2022): sparse per-layer directions and content fusion.

Style branch (§3.1, Eq. 1–3, 9–10) — :func:`fit_sparse_directions`: one W+ direction ``d_k (num_ws, w_dim)`` per
attribute (a row per style input), learned on generated samples under an attribute classifier with an L1 sparsity
penalty, ``L_edit = λ1·L2 + λ2·LPIPS + λ3·L_ID + λ4·L_cls + λ5·L_spa`` (:class:`SparseOptions` holds the paper's
λ).  The identity term is off: no identity network (ArcFace) exists for these models.

Content branch (§3.2, Eq. 6–7) — render-time fusion of 2-D content features into the synthesis, in the
*optimisation* form: :func:`fit_content` fits, once per session, per-block features ``f^cnt_i`` such that the
synthesis driven by them reproduces the inverted image (started from the generator's own features, pulled back
towards them by a small penalty).  :func:`fused_synthesis` then runs the edited code through the generator and at
every block ``i`` mixes ``f_i = (1 − m_i)·f_i^sty + m_i·f_i^cnt`` (Eq. 7; the running skip image is mixed with the
same map).  The relevance map ``m_i`` (Eq. 6) is training-free: the per-pixel change of the block's features
between the edited and the unedited pass, relative to the block's mean feature energy,
``m = exp(−r/τ)`` (1 = unchanged: keep the photo's content; 0 = edited: take the style branch) — the paper's
learned ``softmax(Conv(Q)·Conv(K)ᵀ)`` needs its trained extractor and fusion module (Eq. 11's training), which
do not exist here.  Both passes' unedited features are cached, so a fused re-edit is one generator forward.
:class:`FusedRender` gives an :class:`core.inversion.Inversion`'s renders with fusion (``EditSession.render(...,
fusion="relevance")``).

Feature maps are the generator's block outputs (``Generator.synthesis(block_hook=...)``): ``(N,C,R,R)`` at
``R = 4·2^i``; images ``(N,3,H,W)`` in ≈[-1,1].
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from core.common import InvalidInput

FUSIONS = ("none", "relevance")


def check_fusion(fusion) -> str:
    """``fusion`` if it is one of :data:`FUSIONS`, else :class:`InvalidInput` naming the choices."""
    if not isinstance(fusion, str) or fusion not in FUSIONS:
        raise InvalidInput(f"fusion must be one of {FUSIONS} ('relevance' keeps the photo's detail outside the "
                           f"edit); got {fusion!r}")
    return fusion


# ================================================================================================ style branch

@dataclasses.dataclass
class SparseOptions:
    """Eq. 10 on generated samples.  The λ are the paper's (§4.1); the rest is ours, sized for 2 CPU cores."""

    l2: float = 0.01          # Yin §4.1: λ1 = 0.01 (pixel L2 between x and x_edit)
    lpips: float = 0.8        # Yin §4.1: λ2 = 0.8 (LPIPS between x and x_edit)
    identity: float = 0.0     # Yin §4.1: λ3 = 1 (ArcFace); 0 here: no identity network exists for these models
    cls: float = 10.0         # Yin §4.1: λ4 = 10 (attribute BCE, Eq. 9, mean over the K attributes)
    sparsity: float = 1.0     # Yin §4.1: λ5 = 1; Eq. 3's ‖d_k‖₁ taken as the MEAN |entry| (PyTorch's L1 reduction).
                              # Measured (smile, glasses; 80 steps; edit_matrix ±3 on 48 samples of seed 55): the mean
                              # at λ5 = 30 — the sum is the mean × 1280 at 64 px — already halves the own change
                              # (0.35 / 0.29 vs dense 0.70 / 0.74) at 2–3 % active entries; at λ5 = 1 it is 0.71 / 0.71
    steps: int = 100          # ours: Adam steps per attribute (2 CPU cores: ~40 s CPU each at 64 px)
    batch: int = 8            # ours: W samples per step, each edited at one random strength
    lr: float = 0.05          # ours: Adam step × the starting direction's RMS entry
    max_strength: float = 3.0  # the shipped directions' range (−3..3)
    lpips_net: str = "alex"   # ours: the cheaper LPIPS backbone (core.losses.perceptual_loss)
    seed: int = 2022          # ours: not a seed the dense fits or the benches use
    calibrate_n: int = 64     # ours (no unit in the paper): samples (of the fit's own seed) on which the scale is set
                              # so one unit moves the attribute by ``unit``, the dense directions' convention; without
                              # it the L1 leaves the own change at 0.81× the dense one's (bench/expanded.py --quick)
    calibrate_strength: float = 2.0  # ours: the strength that calibration measures at (both signs)
    align: float = 0.0        # ours, only where a ground-truth edit exists (``true_delta`` given): weight of Yin's
                              # L_align form (Eq. 8) moved to the style branch, ‖Δ_G − Δ_true‖² ÷ ‖Δ_true‖²; 0: Eq. 10
                              # as published.  The embedded model's measured values: core.demo.directions.SPARSE_OPTIONS


def _target_scale(output_range, unit):
    """(lo, hi, unit): the classifier's output range (None: unbounded) and the change per unit of strength."""
    if output_range is None:
        return None, None, float(unit if unit is not None else 1.0 / 6.0)
    lo, hi = (float(v) for v in output_range)
    return lo, hi, float(unit if unit is not None else (hi - lo) / 6.0)


def classification_loss(pred: torch.Tensor, target: torch.Tensor, output_range) -> torch.Tensor:
    """Eq. 9: BCE of ``pred`` (N,K) against ``target`` (N,K), mean over the K attributes and N, with both mapped
    from ``output_range`` to [0,1] (soft targets: the minimum is at pred = target); MSE when unbounded."""
    if output_range is None:
        return (pred - target).square().mean()
    lo, hi = output_range
    p = ((pred - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
    y = ((target - lo) / (hi - lo)).clamp(0, 1)
    return -(y * p.log() + (1 - y) * (1 - p).log()).mean()


def sparse_edit_loss(G, classifier: Callable, d: torch.Tensor, ws: torch.Tensor, strength: torch.Tensor, k: int,
                     options: SparseOptions, lpips=None, output_range=(0.0, 1.0), unit: Optional[float] = None,
                     x: Optional[torch.Tensor] = None, c0: Optional[torch.Tensor] = None,
                     true: Optional[torch.Tensor] = None) -> tuple:
    """``(loss, terms dict)`` of Eq. 10 for attribute ``k``: ``ws`` (N,num_ws,w_dim) edited by ``strength`` (N,)
    × ``d`` (num_ws,w_dim) (the move per unit).  Targets: attribute k moves by ``strength × unit`` (clamped to the
    range), every other keeps its reading on the unedited image ``x`` (``c0``: its readings; computed if None).
    ``true``: the ground-truth change of each edit (N,3,H,W) in [-2,2], where one exists; adds
    ``options.align × ‖(x_edit − x) − true‖² ÷ ‖true‖²`` (term ``align``)."""
    lo, hi, unit = _target_scale(output_range, unit)
    if x is None:
        with torch.no_grad():
            x = G.synthesis(ws, noise_mode="const").clamp(-1, 1)
    if c0 is None:
        with torch.no_grad():
            c0 = classifier(x)
    x_e = G.synthesis(ws + strength.view(-1, 1, 1) * d, noise_mode="const").clamp(-1, 1)
    c = classifier(x_e)
    target = c0.clone()
    moved = c0[:, k] + strength * unit
    target[:, k] = moved if lo is None else moved.clamp(lo, hi)
    terms = {"cls": classification_loss(c, target, None if lo is None else (lo, hi)),
             "l2": (x_e - x).square().mean(),
             "spa": d.abs().mean()}
    terms["lpips"] = lpips(x_e, x).mean() if (lpips is not None and options.lpips) else x_e.new_zeros(())
    loss = (options.l2 * terms["l2"] + options.lpips * terms["lpips"] + options.cls * terms["cls"]
            + options.sparsity * terms["spa"])
    if true is not None and options.align:
        terms["align"] = (x_e - x - true).square().mean() / true.square().mean().clamp_min(1e-8)
        loss = loss + options.align * terms["align"]
    return loss, {n: float(v.detach()) for n, v in terms.items()}


def fit_sparse_direction(G, classifier: Callable, k: int, init: torch.Tensor, options: Optional[SparseOptions] = None,
                         output_range=(0.0, 1.0), unit: Optional[float] = None, progress=None,
                         true_delta: Optional[Callable] = None) -> tuple:
    """``(d (num_ws, w_dim) per unit strength, report)``: Eq. 10 for classifier output ``k``, Adam from ``init``
    ((w_dim,) broadcast to every row, or (num_ws, w_dim)).  ``G`` and the classifier are never modified (their
    parameters get no gradients).  ``true_delta(z (N,z_dim), k, strength (N,)) -> (N,3,H,W)``: the ground-truth
    image change of each sample's edit, where the domain has one (``SparseOptions.align``); None: Eq. 10 alone."""
    from core.losses import perceptual_loss

    o = options or SparseOptions()
    num_ws, w_dim = int(G.num_ws), int(G.w_dim)
    device = G.w_avg.device
    init = torch.as_tensor(init, dtype=torch.float32, device=device)
    if init.ndim == 1:
        init = init.expand(num_ws, w_dim)
    if tuple(init.shape) != (num_ws, w_dim) or not torch.isfinite(init).all():
        raise InvalidInput(f"init must be a finite (w_dim,) or ({num_ws}, {w_dim}) tensor, got {tuple(init.shape)}")
    d = init.clone().requires_grad_(True)
    rms = float(init.square().mean().sqrt()) or 1e-3
    opt = torch.optim.Adam([d], lr=o.lr * rms)
    lpips = perceptual_loss(o.lpips_net, device=device) if o.lpips else None
    gen = torch.Generator().manual_seed(o.seed + 7919 * int(k))
    history = []
    for step in range(o.steps):
        z = torch.randn(o.batch, G.z_dim, generator=gen).to(device)
        sign = torch.where(torch.rand(o.batch, generator=gen) < 0.5, -1.0, 1.0)
        a = (sign * (1.0 + (o.max_strength - 1.0) * torch.rand(o.batch, generator=gen))).to(device)
        with torch.no_grad():
            ws = G.mapping(z)
            true = true_delta(z, k, a).to(device) if (true_delta is not None and o.align) else None
        loss, terms = sparse_edit_loss(G, classifier, d, ws, a, k, o, lpips, output_range, unit, true=true)
        (grad,) = torch.autograd.grad(loss, [d])
        opt.zero_grad(set_to_none=True)
        d.grad = grad
        opt.step()
        history.append(terms)
        if progress is not None:
            progress(k, step + 1, float(loss.detach()))
    out = d.detach()
    gain = calibration_gain(G, classifier, out, k, o, output_range, unit) if o.calibrate_n else 1.0
    out = out * gain
    tail = history[-max(1, len(history) // 5):]
    report = {name: round(sum(h[name] for h in tail) / len(tail), 6) for name in tail[0]} if tail else {}
    report.update(sparsity_report(out), gain=round(gain, 4))
    return out, report


@torch.no_grad()
def calibration_gain(G, classifier: Callable, d: torch.Tensor, k: int, options: SparseOptions, output_range=(0.0, 1.0),
                     unit: Optional[float] = None) -> float:
    """The factor (clipped to [0.5, 2]) that makes ``d`` move output ``k`` by the requested ``strength × unit``
    (clamped to the range) on average at ``±calibrate_strength``, measured on ``calibrate_n`` samples of the fit's
    seed (one secant step: requested ÷ achieved mean |change|)."""
    lo, hi, unit = _target_scale(output_range, unit)
    gen = torch.Generator().manual_seed(options.seed + 1)
    z = torch.randn(options.calibrate_n, G.z_dim, generator=gen).to(G.w_avg.device)
    ws = G.mapping(z)
    c0 = classifier(G.synthesis(ws, noise_mode="const").clamp(-1, 1))[:, k]
    want, got = 0.0, 0.0
    for s in (-options.calibrate_strength, options.calibrate_strength):
        target = c0 + s * unit if lo is None else (c0 + s * unit).clamp(lo, hi)
        c = classifier(G.synthesis(ws + s * d, noise_mode="const").clamp(-1, 1))[:, k]
        want += float((target - c0).abs().sum())
        got += float((c - c0).abs().sum())
    return float(min(2.0, max(0.5, want / got))) if got > 0 else 1.0


def sparsity_report(d: torch.Tensor, rel: float = 0.05) -> dict:
    """How sparse ``d`` (num_ws, w_dim) is: the share of entries above ``rel`` × the largest |entry| and each W+
    row's share of the squared norm."""
    a = d.abs()
    top = float(a.max()) or 1.0
    rows = d.square().sum(1)
    return {"active": round(float((a > rel * top).float().mean()), 4),
            "row_energy": [round(float(v), 4) for v in (rows / rows.sum().clamp_min(1e-12))]}


def fit_sparse_directions(G, classifier: Callable, names: Sequence[str], init: Mapping[str, torch.Tensor],
                          attributes: Optional[Sequence[str]] = None, options: Optional[SparseOptions] = None,
                          output_range=(0.0, 1.0), unit: Optional[float] = None, suffix: str = "_sparse",
                          source: str = "", progress=None, true_delta: Optional[Callable] = None) -> tuple:
    """``({name+suffix: core.edits.Direction (num_ws, w_dim)}, report)`` for each classifier output in ``names``
    that is in ``attributes`` (all when None); ``init[name]`` is the per-unit starting offset ((w_dim,) or
    (num_ws, w_dim)).  Each direction is ``vector = d/‖d‖``, ``scale = ‖d‖``: one unit of strength asks for
    ``unit`` (default: a sixth of the range) of its attribute, like the dense directions.  ``true_delta``: as
    :func:`fit_sparse_direction` (the report says whether it was used)."""
    from core.edits import Direction

    o = options or SparseOptions()
    want = list(names) if attributes is None else [a for a in attributes]
    unknown = [a for a in want if a not in names]
    if unknown:
        raise InvalidInput(f"the classifier has no output {unknown}; it has {list(names)}")
    lo, hi, u = _target_scale(output_range, unit)
    aligned = true_delta is not None and bool(o.align)
    dirs, report = {}, {"options": dataclasses.asdict(o), "unit": u, "aligned_to_ground_truth": aligned,
                        "attributes": {}}
    for name in want:
        if name not in init:
            raise InvalidInput(f"no starting direction for {name!r}")
        k = list(names).index(name)
        d, rep = fit_sparse_direction(G, classifier, k, init[name], o, output_range, u, progress, true_delta)
        norm = float(d.norm())
        if not norm > 0:
            raise InvalidInput(f"sparse fit of {name!r} shrank to zero (lower SparseOptions.sparsity)")
        dirs[name + suffix] = Direction(
            name + suffix, (d / norm).cpu(), layers=None, default_strength=1.0, range=(-o.max_strength, o.max_strength),
            scale=norm, description=f"{name}, sparse per-layer direction (Yin et al. 2022); one unit ≈ +{u:.3f} "
                                    f"{name} on the classifier's scale",
            source=source or "core.expanded (Yin et al. 2022 Eq. 10: L1-sparse W+ direction, ID term off)")
        report["attributes"][name] = rep
    return dirs, report


# ================================================================================================ content branch

@dataclasses.dataclass
class FusionOptions:
    """Content fusion at render time (optimisation form, training-free relevance)."""

    first_block: int = 1      # Yin §3.2: fused "across all layers of G"; ours: from 8 px up (block 0 is the 4×4
                              # constant's block, which carries no photo detail)
    fit_steps: int = 40       # ours: Adam steps fitting the content features once per session (from the learned
                              # extractor's content where the model has one: FusedRender)
    fit_lr: float = 0.05      # ours: Adam step × each block's RMS feature
    feature_reg: float = 0.01  # ours: pulls f^cnt towards the generator's own features (relative energy)
    tau: float = 1.0          # ours: relevance m = exp(−r/τ), r = feature change ÷ mean feature energy
                              # (picked on tuning faces of seed 2020, never the benches' held-out ones)
    grow: int = 1             # ours: the edited region (1 − m) is max-pooled by this many pixels per block


@dataclasses.dataclass
class ContentFeatures:
    """Per-block content of one or more codes (batch n), as residuals over the generator: ``unedited[i]`` the
    block's features before fusion in the unedited content pipeline (n,C,R,R), ``content[i]`` = f^cnt_i −
    ``unedited[i]`` (the photo detail the generator's features miss), ``image[i]`` the same for the running skip
    image (n,3,R,R), ``energy[i]`` the mean square of ``unedited[i]`` (n,1,1,1); ``ws`` the codes they were fitted
    for; ``report`` the fit's reconstruction MSE before / after."""

    blocks: tuple
    content: dict
    image: dict
    unedited: dict
    energy: dict
    ws: torch.Tensor
    report: dict

    def select(self, idx: Sequence[int]) -> "ContentFeatures":
        """The features of the codes ``idx``."""
        pick = lambda t: {b: v[list(idx)] for b, v in t.items()}  # noqa: E731
        return dataclasses.replace(self, content=pick(self.content), image=pick(self.image),
                                   unedited=pick(self.unedited), energy=pick(self.energy), ws=self.ws[list(idx)])


def _torgb(G, i: int, x: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Block ``i``'s ToRGB of features ``x`` (its style row is 2i+1, the input gain √2 as in synthesis)."""
    from core.stylegan2.network import SQRT2

    return G.torgbs[i](x, ws[:, 2 * i + 1], None, in_gain=SQRT2)


def _content_pass(G, ws, content: Mapping, record: Optional[dict] = None, noise_mode: str = "const"):
    """Synthesis with every block in ``content`` replaced by it (m = 1): the running skip image follows (its ToRGB
    sees the content); ``record`` (a dict) receives ``block -> (pre-fusion x, replaced img)``."""

    def hook(i, x, img):
        if i not in content:
            return None
        c = content[i]
        out = img + (_torgb(G, i, c, ws) - _torgb(G, i, x, ws))
        if record is not None:
            record[i] = (x, img, out)
        return c, out

    return G.synthesis(ws, noise_mode=noise_mode, block_hook=hook)


def fit_content(G, ws: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                options: Optional[FusionOptions] = None, noise_mode: str = "const",
                start: Optional[Mapping] = None) -> ContentFeatures:
    """Fit per-block content features so the content pipeline of ``ws`` (n,num_ws,w_dim) reproduces ``target``
    (1|n,3,r,r) in [-1,1] where ``weight`` (1|n,1,r,r) ≥ 0 (None: everywhere).  Started from the generator's own
    features plus ``start`` (per-block residuals over them: a learned extractor's prediction,
    :func:`predict_residuals`) when given; loss ``MSE_weight + feature_reg·Σ_i mean((f^cnt_i − f_i)²)/mean(f_i²)``.
    ``G`` is not modified."""
    o = options or FusionOptions()
    n_blocks = len(G.torgbs)
    if not 0 <= int(o.first_block) < n_blocks:
        raise InvalidInput(f"first_block must be in 0..{n_blocks - 1}, got {o.first_block}")
    blocks = tuple(range(int(o.first_block), n_blocks))
    ws = ws.detach()
    target, rec_loss = _reconstruction_loss(G, ws, target, weight)
    with torch.no_grad():
        img0, feats = G.block_features(ws, blocks=blocks, noise_mode=noise_mode)
    own = {b: feats[b][0].detach().contiguous() for b in blocks}
    own_energy = {b: own[b].square().mean().clamp_min(1e-12) for b in blocks}
    content = {b: (own[b] + (start[b] if start is not None else 0)).detach().clone().requires_grad_(True)
               for b in blocks}
    params = list(content.values())
    opt = torch.optim.Adam([{"params": [content[b]], "lr": o.fit_lr * float(own_energy[b].sqrt())} for b in blocks])
    before = rec_loss(img0).detach()
    for _ in range(int(o.fit_steps)):
        img = _content_pass(G, ws, content, noise_mode=noise_mode)
        loss = rec_loss(img).sum()
        if o.feature_reg:
            loss = loss + o.feature_reg * sum((content[b] - own[b]).square().mean() / own_energy[b] for b in blocks)
        grads = torch.autograd.grad(loss, params)
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return _content_features(G, ws, blocks, content, noise_mode, rec_loss, before, {"steps": int(o.fit_steps)})


def _reconstruction_loss(G, ws: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> tuple:
    """``(target (n,3,r,r) on ws's device, loss(img) -> (n,) weighted per-pixel MSE)`` for the codes ``ws``
    (n,..); ``target`` (1|n,3,r,r), ``weight`` (1|n,1,r,r) ≥ 0 or None (everywhere).  InvalidInput on a target
    of the wrong shape."""
    n = ws.shape[0]
    if target.ndim != 4 or target.shape[1] != 3 or target.shape[-1] != G.resolution:
        raise InvalidInput(f"target must be (1|{n},3,{G.resolution},{G.resolution}), got {tuple(target.shape)}")
    target = target.detach().to(ws.device).expand(n, -1, -1, -1)
    w = torch.ones_like(target[:, :1]) if weight is None else weight.detach().to(ws.device).float()
    w = w.expand(n, 1, *target.shape[-2:])
    wsum = w.sum(dim=(1, 2, 3)).clamp_min(1e-8)

    def loss(img):
        return ((img - target).square().mean(1, keepdim=True) * w).sum(dim=(1, 2, 3)) / wsum

    return target, loss


@torch.no_grad()
def _content_features(G, ws, blocks, content: Mapping, noise_mode: str, rec_loss: Callable, before,
                      report: dict) -> ContentFeatures:
    """The :class:`ContentFeatures` of per-block features ``content`` (full features, not residuals) for ``ws``:
    one recorded content pass gives the residuals over the pipeline's own features and skip images."""
    content = {b: v.detach() for b, v in content.items()}
    record: dict = {}
    img = _content_pass(G, ws, content, record, noise_mode)
    after = rec_loss(img)
    unedited = {b: record[b][0].contiguous() for b in blocks}
    return ContentFeatures(
        blocks, {b: (content[b] - unedited[b]).contiguous() for b in blocks},
        {b: (record[b][2] - record[b][1]).contiguous() for b in blocks}, unedited,
        {b: unedited[b].square().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) for b in blocks}, ws,
        {"mse_before": [round(float(v), 6) for v in before], "mse_after": [round(float(v), 6) for v in after],
         "blocks": list(blocks), **report})


# ------------------------------------------------------------------------- the learned content extractor

CONTENT_SUFFIX = ".content.pt"  # <checkpoint stem>.content.pt: a ContentExtractor trained for that generator
CONTENT_FORMAT = "latent-edit-content-extractor"


class ContentExtractor(torch.nn.Module):
    """The learned form of the content branch (Yin et al. §3.2: content features from an extractor network
    instead of a per-image fit).  ``(target, own)`` — the input ``(N,3,r,r)`` in [-1,1] and the generator's
    image of its code — -> ``{block: (N,C,R,R)}`` residuals added to the generator's own block features.
    A convolutional pyramid on ``[target, own, target − own]`` with one 3×3 head per fused block; the heads start
    at zero, so an untrained extractor keeps the generator's features (and the fused render equals the plain one)."""

    def __init__(self, resolution: int, blocks: Mapping, width: int = 32):
        super().__init__()
        nn = torch.nn
        self.resolution, self.width = int(resolution), int(width)
        self.blocks = {int(b): (int(c), int(r)) for b, (c, r) in blocks.items()}
        self.stem = nn.Conv2d(9, self.width, 3, padding=1)
        lowest = min(r for _, r in self.blocks.values())
        self.levels = []
        r = self.resolution
        while r > lowest:
            r //= 2
            self.levels.append(r)
        self.down = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1) for _ in self.levels)
        self.heads = nn.ModuleDict({str(b): nn.Conv2d(self.width, c, 3, padding=1) for b, (c, _) in self.blocks.items()})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, target: torch.Tensor, own: torch.Tensor) -> dict:
        x = F.leaky_relu(self.stem(torch.cat([target, own, target - own], 1)), 0.2)
        feats = {self.resolution: x}
        for r, conv in zip(self.levels, self.down):
            x = F.leaky_relu(conv(F.avg_pool2d(x, 2)), 0.2)
            feats[r] = x
        return {b: self.heads[str(b)](feats[r]) for b, (_, r) in self.blocks.items()}

    def config(self) -> dict:
        return {"resolution": self.resolution, "width": self.width,
                "blocks": {str(b): list(v) for b, v in self.blocks.items()}}


def new_content_extractor(G, options: Optional[FusionOptions] = None, width: int = 32) -> ContentExtractor:
    """An (untrained) :class:`ContentExtractor` shaped for ``G``'s blocks from ``options.first_block`` on."""
    o = options or FusionOptions()
    res = G.block_resolutions()
    with torch.no_grad():
        _, feats = G.block_features(G.w_avg.reshape(1, 1, -1).expand(1, int(G.num_ws), -1),
                                    blocks=range(int(o.first_block), len(res)))
    return ContentExtractor(int(G.resolution), {b: (int(f[0].shape[1]), res[b]) for b, f in feats.items()}, width)


def predict_residuals(G, extractor: ContentExtractor, ws: torch.Tensor, target: torch.Tensor,
                      noise_mode: str = "const") -> tuple:
    """``(img0, own, residual)``: the generator's image of ``ws`` (n,num_ws,w_dim), its own block features
    ``{block: (n,C,R,R)}`` and the extractor's residuals over them for ``target`` (n,3,r,r) in [-1,1] (gradients
    reach the extractor only)."""
    blocks = tuple(sorted(extractor.blocks))
    with torch.no_grad():
        img0, feats = G.block_features(ws, blocks=blocks, noise_mode=noise_mode)
    return img0, {b: feats[b][0] for b in blocks}, extractor(target, img0.clamp(-1, 1))


def extract_content(G, ws: torch.Tensor, target: torch.Tensor, extractor: ContentExtractor,
                    weight: Optional[torch.Tensor] = None, noise_mode: str = "const") -> ContentFeatures:
    """:func:`fit_content`'s result from one extractor forward: ``ws`` (n,num_ws,w_dim), ``target`` (1|n,3,r,r)
    in [-1,1]; ``weight`` (1|n,1,r,r) only weighs the reported reconstruction error."""
    ws = ws.detach()
    target, rec_loss = _reconstruction_loss(G, ws, target, weight)
    with torch.no_grad():
        img0, own, residual = predict_residuals(G, extractor, ws, target, noise_mode)
        content = {b: own[b] + residual[b] for b in own}
        return _content_features(G, ws, tuple(own), content, noise_mode, rec_loss, rec_loss(img0), {"extractor": True})


def content_extractor_loss(G, extractor: ContentExtractor, ws: torch.Tensor, target: torch.Tensor,
                           feature_reg: float, noise_mode: str = "const") -> torch.Tensor:
    """The training loss of the extractor on a batch: the content pipeline's MSE against ``target`` plus
    :class:`FusionOptions`' ``feature_reg`` × each block's residual energy relative to its features (as
    :func:`fit_content` fits, so both forms agree on what the content is)."""
    _, own, residual = predict_residuals(G, extractor, ws, target, noise_mode)
    content = {b: own[b] + residual[b] for b in own}
    loss = (_content_pass(G, ws, content, noise_mode=noise_mode) - target).square().mean()
    if feature_reg:
        loss = loss + feature_reg * sum(residual[b].square().mean() / own[b].square().mean().clamp_min(1e-12)
                                        for b in own)
    return loss


def train_content_extractor(G, extractor: ContentExtractor, sample: Callable, steps: int, lr: float = 1e-3,
                            feature_reg: Optional[float] = None, seed: int = 0, progress=None) -> list:
    """Adam on :func:`content_extractor_loss` over ``steps`` batches ``sample(generator) -> (ws, target)``;
    returns the loss per step.  ``G`` is not modified."""
    reg = FusionOptions().feature_reg if feature_reg is None else float(feature_reg)
    G.requires_grad_(False)
    opt = torch.optim.Adam(extractor.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    extractor.train()
    for step in range(int(steps)):
        ws, target = sample(gen)
        loss = content_extractor_loss(G, extractor, ws.detach(), target.detach(), reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, history[-1])
    extractor.eval()
    return history


def save_content_extractor(path, extractor: ContentExtractor, meta: Optional[dict] = None) -> None:
    """``{"format", "config" (JSON text), "meta" (JSON text), "net.*" tensors}`` (read back with weights_only)."""
    import json
    import pathlib

    record = {"format": CONTENT_FORMAT, "config": json.dumps(extractor.config()), "meta": json.dumps(meta or {})}
    record.update({f"net.{k}": v.detach().cpu() for k, v in extractor.state_dict().items()})
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)


def load_content_extractor(path, G=None) -> ContentExtractor:
    """Read :func:`save_content_extractor` output (``weights_only=True``); with ``G``, refuse an extractor made
    for another generator (its fingerprint in meta).  InvalidInput naming the file."""
    import json
    import pathlib

    path = pathlib.Path(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(record, dict) or record.get("format") != CONTENT_FORMAT:
            raise InvalidInput(f"{path.name} is not a {CONTENT_FORMAT} file")
        cfg, meta = json.loads(record["config"]), json.loads(record["meta"])
        net = ContentExtractor(cfg["resolution"], {int(b): tuple(v) for b, v in cfg["blocks"].items()}, cfg["width"])
        net.load_state_dict({k[4:]: v for k, v in record.items() if k.startswith("net.")})
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable or wrong tensors: say which file
        raise InvalidInput(f"cannot read the content extractor {path.name}: {str(exc)[:200]}") from exc
    if G is not None and meta.get("generator_sha256"):
        from core.stylegan2.formats import fingerprint

        if fingerprint(G) != meta["generator_sha256"]:
            raise InvalidInput(f"the content extractor {path.name} was trained for another generator: retrain it "
                               "(python -m core.demo.train_content)")
    return net.eval().requires_grad_(False)


def relevance_map(unedited: torch.Tensor, edited: torch.Tensor, energy: torch.Tensor, tau: float,
                  grow: int = 0) -> torch.Tensor:
    """Eq. 6, training-free: ``m (N,1,R,R)`` in (0,1] from a block's features without (``unedited``) and with
    (``edited``) the edit, both (N,C,R,R): ``exp(−r/τ)``, r the per-pixel mean-square change ÷ ``energy`` (N,1,1,1)
    the block's mean feature energy; the changed region (1 − m) is max-pooled by ``grow`` pixels."""
    r = (edited - unedited).square().mean(1, keepdim=True) / energy
    edit = 1.0 - torch.exp(-r / float(tau))
    if grow > 0:
        edit = F.max_pool2d(edit, 2 * grow + 1, stride=1, padding=grow)
    return 1.0 - edit


def fused_synthesis(G, ws: torch.Tensor, content: ContentFeatures, options: Optional[FusionOptions] = None,
                    style_deltas: Optional[dict] = None, noise_mode: str = "const",
                    maps: Optional[dict] = None) -> torch.Tensor:
    """(n,3,r,r): the (edited) codes ``ws`` (n,num_ws,w_dim) rendered with ``content`` (fitted for the same n codes)
    fused in at every block: Eq. 7 with attribute-aware content ``f^cnt(d) = f^cnt + (f^sty − f^sty_unedited)``
    (the training-free stand-in for Eq. 4–5's content direction: the generator's own feature change carries
    the edit into the content), i.e. ``f = f^sty + m·(f^cnt − f^sty_unedited)``, and the same for the running
    skip image; ``maps`` (a dict) receives each block's relevance map.  Unedited ``ws`` give the content
    pipeline's image (m = 1 everywhere)."""
    o = options or FusionOptions()
    if ws.shape[0] != content.ws.shape[0]:
        raise InvalidInput(f"{ws.shape[0]} codes for content fitted on {content.ws.shape[0]}")

    def hook(i, x, img):
        if i not in content.content:
            return None
        m = relevance_map(content.unedited[i], x, content.energy[i], o.tau, o.grow).to(x.dtype)
        if maps is not None:
            maps[i] = m
        return torch.addcmul(x, m, content.content[i]), torch.addcmul(img, m, content.image[i])

    return G.synthesis(ws, noise_mode=noise_mode, style_deltas=style_deltas, block_hook=hook)


class FusedRender:
    """An :class:`core.inversion.Inversion`'s renders with content fusion; stands in for it in
    ``core.compositing.compose`` (every other attribute is the inversion's).  Gets the content once, on creation:
    each segment's code fitted against the inverted image on its segment mask (``options.fit_steps``), started
    from ``extractor``'s content (a :class:`ContentExtractor` for this generator) when given — with
    ``fit_steps=0``, the extractor's one forward alone.  Measured on tuning faces (numpy seed 2020, 4 encoder
    sessions, 3 with extras; unedited fused reconstruction MSE / seconds): fit 40 steps 1.0e-4 / 0.89, extractor
    alone 5.6e-4 / 0.03, extractor + 40 steps 4e-5 / 0.95 (5 steps from it: 1.2e-3, worse than none)."""

    def __init__(self, inversion, options: Optional[FusionOptions] = None,
                 extractor: Optional[ContentExtractor] = None):
        self.inversion = inversion
        self.options = options or FusionOptions()
        inv = inversion
        if getattr(inv, "styles", None):
            raise InvalidInput("Keep photo detail (fusion 'relevance') does not work with S-space segment codes yet; "
                               "use space 'w+' or fusion 'none'")
        if extractor is not None and self.options.fit_steps == 0:  # the learned form alone: one forward
            self.content = extract_content(inv.G, inv.ws, inv.image, extractor.to(inv.ws.device), inv.masks,
                                           inv.noise_mode)
        else:
            start = None
            if extractor is not None:  # the fit starts from the extractor's prediction
                with torch.no_grad():
                    target = inv.image.expand(inv.ws.shape[0], -1, -1, -1)
                    start = predict_residuals(inv.G, extractor.to(inv.ws.device), inv.ws, target, inv.noise_mode)[2]
            with torch.enable_grad():
                self.content = fit_content(inv.G, inv.ws, inv.image, inv.masks, self.options, inv.noise_mode, start)
            if start is not None:
                self.content.report["extractor"] = True
        with torch.no_grad():
            self._rec = fused_synthesis(inv.G, inv.ws, self.content, self.options, noise_mode=inv.noise_mode)
        self._rec_mixed = self._mix(self._rec)

    def __getattr__(self, name):
        return getattr(self.inversion, name)

    def _mix(self, outs: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        inv = self.inversion
        masks = inv.masks if masks is None else masks
        return torch.where(inv.support, (outs * masks).sum(0, keepdim=True), inv.image)

    @torch.no_grad()
    def generated(self, edits=None, directions: Optional[Mapping] = None, segments: Optional[Sequence[int]] = None):
        """Like :meth:`core.inversion.Inversion.generated`, each edited code rendered with fusion; (1,3,r,r)."""
        from core.edits.directions import edit_inputs

        inv = self.inversion
        idx = inv.segment_indices(segments)
        if not edits or not idx:
            return self._rec_mixed
        outs = self._rec.clone()
        for group, group_edits in inv.edit_groups(edits, idx):  # an edit's own "segments" narrow it further
            ws_e, deltas = edit_inputs(inv.ws[group], group_edits, inv.G, directions)
            content = self.content if len(group) == inv.segments else self.content.select(group)
            outs[group] = fused_synthesis(inv.G, ws_e, content, self.options, deltas, inv.noise_mode)
        return self._mix(outs, inv.edited_masks(edits, directions) if len(idx) == inv.segments else None)


@torch.no_grad()
def regression_init(G, classifier: Callable, n: int = 1024, unit: float = 1.0 / 6.0, ridge: float = 1e-3,
                    seed: int = 0, batch: int = 64) -> torch.Tensor:
    """``(K, w_dim)`` starting offsets per unit for classifier outputs without a dense direction: the ridge fit
    ``readings ≈ (w − mean) B`` on ``n`` samples and, for output k, the smallest move (in W's covariance metric)
    that changes k by ``unit`` and the others by 0, ``unit·Σ B (BᵀΣB)⁻¹ e_k`` (InterfaceGAN's conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=gen).to(G.w_avg.device)
    ws, ys = [], []
    for i in range(0, n, batch):
        w = G.mapping(z[i:i + batch])
        ws.append(w[:, 0].double())
        ys.append(classifier(G.synthesis(w, noise_mode="const").clamp(-1, 1)).double())
    w, y = torch.cat(ws), torch.cat(ys)
    x, y = w - w.mean(0), y - y.mean(0)
    cov = x.T @ x / len(x)
    lam = ridge * float(torch.diagonal(cov).mean())
    B = torch.linalg.solve(cov + lam * torch.eye(len(cov), dtype=cov.dtype, device=cov.device), x.T @ y / len(x))
    V = cov @ B @ torch.linalg.pinv(B.T @ cov @ B)
    return (unit * V.T).float()
