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
                     x: Optional[torch.Tensor] = None, c0: Optional[torch.Tensor] = None) -> tuple:
    """``(loss, terms dict)`` of Eq. 10 for attribute ``k``: ``ws`` (N,num_ws,w_dim) edited by ``strength`` (N,)
    × ``d`` (num_ws,w_dim) (the move per unit).  Targets: attribute k moves by ``strength × unit`` (clamped to the
    range), every other keeps its reading on the unedited image ``x`` (``c0``: its readings; computed if None)."""
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
    return loss, {n: float(v.detach()) for n, v in terms.items()}


def fit_sparse_direction(G, classifier: Callable, k: int, init: torch.Tensor, options: Optional[SparseOptions] = None,
                         output_range=(0.0, 1.0), unit: Optional[float] = None, progress=None) -> tuple:
    """``(d (num_ws, w_dim) per unit strength, report)``: Eq. 10 for classifier output ``k``, Adam from ``init``
    ((w_dim,) broadcast to every row, or (num_ws, w_dim)).  ``G`` and the classifier are never modified (their
    parameters get no gradients)."""
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
        loss, terms = sparse_edit_loss(G, classifier, d, ws, a, k, o, lpips, output_range, unit)
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
                          source: str = "", progress=None) -> tuple:
    """``({name+suffix: core.edits.Direction (num_ws, w_dim)}, report)`` for each classifier output in ``names``
    that is in ``attributes`` (all when None); ``init[name]`` is the per-unit starting offset ((w_dim,) or
    (num_ws, w_dim)).  Each direction is ``vector = d/‖d‖``, ``scale = ‖d‖``: one unit of strength asks for
    ``unit`` (default: a sixth of the range) of its attribute, like the dense directions."""
    from core.edits import Direction

    o = options or SparseOptions()
    want = list(names) if attributes is None else [a for a in attributes]
    unknown = [a for a in want if a not in names]
    if unknown:
        raise InvalidInput(f"the classifier has no output {unknown}; it has {list(names)}")
    lo, hi, u = _target_scale(output_range, unit)
    dirs, report = {}, {"options": dataclasses.asdict(o), "unit": u, "attributes": {}}
    for name in want:
        if name not in init:
            raise InvalidInput(f"no starting direction for {name!r}")
        k = list(names).index(name)
        d, rep = fit_sparse_direction(G, classifier, k, init[name], o, output_range, u, progress)
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
    fit_steps: int = 40       # ours: Adam steps fitting the content features once per session
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
                options: Optional[FusionOptions] = None, noise_mode: str = "const") -> ContentFeatures:
    """Fit per-block content features so the content pipeline of ``ws`` (n,num_ws,w_dim) reproduces ``target``
    (1|n,3,r,r) in [-1,1] where ``weight`` (1|n,1,r,r) ≥ 0 (None: everywhere).  Started from the generator's own
    features; loss ``MSE_weight + feature_reg·Σ_i mean((f^cnt_i − f_i)²)/mean(f_i²)``.  ``G`` is not modified."""
    o = options or FusionOptions()
    n_blocks = len(G.torgbs)
    if not 0 <= int(o.first_block) < n_blocks:
        raise InvalidInput(f"first_block must be in 0..{n_blocks - 1}, got {o.first_block}")
    blocks = tuple(range(int(o.first_block), n_blocks))
    ws = ws.detach()
    n = ws.shape[0]
    if target.ndim != 4 or target.shape[1] != 3 or target.shape[-1] != G.resolution:
        raise InvalidInput(f"target must be (1|{n},3,{G.resolution},{G.resolution}), got {tuple(target.shape)}")
    target = target.detach().to(ws.device)
    w = torch.ones_like(target[:, :1]) if weight is None else weight.detach().to(ws.device).float()
    w = w.expand(n, 1, *target.shape[-2:])
    wsum = w.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    with torch.no_grad():
        img0, feats = G.block_features(ws, blocks=blocks, noise_mode=noise_mode)
    own = {b: feats[b][0].detach().contiguous() for b in blocks}
    own_energy = {b: own[b].square().mean().clamp_min(1e-12) for b in blocks}
    content = {b: own[b].clone().requires_grad_(True) for b in blocks}
    params = list(content.values())
    opt = torch.optim.Adam([{"params": [content[b]], "lr": o.fit_lr * float(own_energy[b].sqrt())} for b in blocks])

    def rec_loss(img):
        return ((img - target).square().mean(1, keepdim=True) * w).sum(dim=(1, 2, 3)) / wsum

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
    with torch.no_grad():
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
         "steps": int(o.fit_steps), "blocks": list(blocks)})


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
    ``core.compositing.compose`` (every other attribute is the inversion's).  Fits the content once, on creation:
    each segment's code against the inverted image on its segment mask."""

    def __init__(self, inversion, options: Optional[FusionOptions] = None):
        self.inversion = inversion
        self.options = options or FusionOptions()
        inv = inversion
        if getattr(inv, "styles", None):
            raise InvalidInput("Keep photo detail (fusion 'relevance') does not work with S-space segment codes yet; "
                               "use space 'w+' or fusion 'none'")
        with torch.enable_grad():
            self.content = fit_content(inv.G, inv.ws, inv.image, inv.masks, self.options, inv.noise_mode)
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
