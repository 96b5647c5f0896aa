"""Pivotal Tuning Inversion (Roich et al. 2021): tune a copy of the generator so fixed pivots reproduce targets.

``pivotal_tune(G, ws, target)`` returns a deep copy of ``G`` whose every parameter was optimised with Adam on
``λ_L2·MSE + λ_LPIPS·LPIPS`` at the pivot(s) ``ws``; ``G`` itself is never modified (also when cancelled).
With locality regularisation (PTI §3.3) each step also renders random codes ``w_r`` at distance α from the
pivot and penalises their change from the original generator.  Save the result as a delta with
``core.stylegan2.formats.save_generator(G_tuned, path, base=G)``.

With the random-backbone LPIPS fallback the tuning keeps PTI's loss (L2 + AlexNet-LPIPS): measured on the
unit tests' out-of-domain target (tiny generator, 120 steps, lr 3e-3), image MSE / MS-SSIM after tuning were
L2 + random-Alex 0.0412 / 0.960, L2 only 0.0420 / 0.957, L2 + random-VGG 0.0429 / 0.956 (4× slower),
random-Alex only 0.102 / 0.870.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import torch

from core.common import CancelLike, InvalidInput, ProgressFn, check_cancel, report_step
from core.losses import ImageLoss, as_mask, locality_codes, locality_loss, perceptual_loss
from core.projection import check_target


@dataclass
class LocalityOptions:
    """PTI §3.3 locality regulariser.  PTI@da94d59 configs/hyperparameters.py + criteria/localitly_regulizer.py.

    PTI ships it off (``use_locality_regularization=False``; an earlier commit, 85632a3, had it on and an LPIPS
    threshold of 0.07).  α is a distance in the generator's W (over the whole ``(num_ws, w_dim)`` code): 30 suits
    FFHQ's W; for a generator whose random codes lie much closer to each other, scale it (the unit tests use
    α=15 on a tiny generator whose random codes lie ~19 from the pivot).
    """

    alpha: float = 30.0  # regulizer_alpha=30: w_r = w_p + α (w_z − w_p)/‖w_z − w_p‖
    weight: float = 0.1  # λ_R=0.1 (paper, design.md §2); the code folds it into regulizer_{l2,lpips}_lambda=0.1
    l2_weight: float = 1.0  # λ_R^L2=1 (paper); code: regulizer_l2_lambda = λ_R·λ_R^L2 = 0.1
    lpips_weight: float = 1.0  # λ_R^LPIPS=1 (paper); code: regulizer_lpips_lambda = λ_R·λ_R^LPIPS = 0.1
    num_samples: int = 1  # N_r: latent_ball_num_of_samples=1
    interval: int = 1  # locality_regularization_interval=1 (every step)
    psi: float = 0.5  # localitly_regulizer.py: w_z = mapping(z, truncation_psi=0.5)
    noise_mode: str = "none"  # localitly_regulizer.py renders w_r with noise_mode='none'
    seed: int = 0  # ours: seeds the random w_z


# The encoder pivot's tuning learning rate and budget (the fast path, SessionOptions(pivot="encoder")): PTI tunes
# at 3e-4 for up to 350 steps from a 450-step W pivot; starting from an encoder code the fast path has ~1/5 of that
# time.  Chosen on tuning faces disjoint from every bench's held-out set (render(sample_params(3, seed=7_500_000))),
# random-backbone LPIPS, MSE after k steps.  v1 model, encoder pivot:
#     lr 3e-4, 200 steps: 9.0e-4 1.64e-3 8.2e-4
#     lr 1e-3, 150 steps: 7.5e-4 1.29e-3 7.1e-4   | 200 steps: 6.5e-4 1.11e-3 6.1e-4
#     lr 2e-3, 150 steps: 7.1e-4 1.18e-3 6.5e-4   | 200 steps: 6.2e-4 9.8e-4  5.6e-4
# so 2e-3 (the best tried; 150 steps of it beat 200 at PTI's lr).  v2 model (the shipped one), lr 2e-3, MSE ÷ the
# 450+350 recipe's final MSE (time ÷ the recipe's) on the same three tuning faces, one run, 1 thread:
#     150 steps: 1.25 1.36 1.40 (0.10–0.12)   200: 1.08 1.17 1.19 (0.13–0.16)   250: 0.96 1.03 1.05 (0.17–0.19)
#     300: 0.85 0.92 0.93 (0.20–0.23)
# so 250: the fewest steps within 10 % of the recipe on every tuning face inside 1/5 of its time (issue 22's bar).
# The fast path runs its budget without the plateau rule: on the same faces that rule stops it at 184 steps
# (1.12× the recipe) or, before PTIOptions.plateau_start existed, at 10.  Held-out quality/time: bench/speed.py.
ENCODER_PIVOT_LR = 2e-3
ENCODER_PIVOT_TUNE_STEPS = 250  # the fast path's default tuning budget (the v2 sweep above)


@dataclass
class PTIOptions:
    """Tuning settings; defaults are PTI's (PTI@da94d59 configs/hyperparameters.py, training/coaches/*)."""

    learning_rate: float = 3e-4  # pti_learning_rate=3e-4, Adam over all parameters of G (base_coach.py)
    l2_weight: float = 1.0  # pt_l2_lambda=1
    lpips_weight: float = 1.0  # pt_lpips_lambda=1
    lpips_net: str = "alex"  # lpips_type='alex'
    lpips_threshold: Optional[float] = 0.06  # LPIPS_value_threshold=0.06: stop once LPIPS ≤ this (single_id_coach)
    # The threshold is calibrated for ImageNet AlexNet-LPIPS; with the random-backbone fallback its scale means
    # nothing, so it is ignored there unless this is True (then it applies to the fallback's distance as is).
    threshold_with_fallback: bool = False
    # The random-backbone fallback's early stop (scale-free; issue 22): stop once every image's L2 term (the
    # tuning loss's backbone-independent part) fell by less than ``plateau_gain`` (relative) over the last
    # ``plateau_window`` iterations: stop at the first k with mse(k) > (1 − gain)·mse(k − window).  The window
    # and gain, 10 / 0.02, come from issue 22's encoder study (bench/speed.py reads them from here), fixed
    # here, never tuned per image (nor on the measurement below).  Measured where it fires on full 350-step curves
    # (``python bench/early_stop.py``: embedded model, W pivot of 450 steps, random-backbone fallback, 1 thread):
    #     held-out face 8100000+0: stops at 283 (19 % of tuning saved), MSE 1.13× the 350-step MSE
    #     held-out face 8100000+1: stops at 164 (53 % saved), MSE 1.41×
    #     astronaut, grace_hopper: never (still > 2 % better per 10 steps at 350): the full 350 run
    # So it saves time on easy in-domain targets at some reconstruction cost and leaves hard photos untouched.
    plateau_window: Optional[int] = 10  # issue 22's study (above); None: no plateau rule
    plateau_gain: float = 0.02  # issue 22's study (2 % relative fall of the L2 term per window)
    plateau_with_pretrained: bool = False  # the ImageNet backbone keeps PTI's own rule (LPIPS ≤ 0.06) alone
    # ours: the plateau rule is not read before this iteration.  Adam's first steps raise the L2 term before it
    # falls (fast path, lr 2e-3, tuning faces of seed 7,500,000: 2.7–4.2× the pivot's after one step, still 1.2×
    # after ten), so a window that reaches back to the pivot itself reads "no progress" (it fired at 10 on one of
    # the three); by 25 every tuning curve was below its pivot's value
    plateau_start: int = 25
    lpips_size: Optional[int] = None  # PTI computes the tuning LPIPS at full resolution
    noise_mode: str = "const"  # base_coach.py forward: noise_mode='const'
    crop_to_mask: bool = True  # ours: with a mask, compute the loss on its bounding box only
    crop_pad: int = 8  # ours: context pixels kept around the mask's bounding box
    preview_every: int = 10  # ours: pass a preview image to ``progress`` every this many steps (and at the end)
    weights_dir: Optional[str] = None  # ours: where to look for ImageNet backbone files (see core.lpips_nets)


@dataclass
class PTIResult:
    """What :func:`pivotal_tune_report` returns besides the generator (``final_lpips``: the worst image's)."""

    steps_run: int  # iterations run (each takes one optimiser step per target image)
    stopped_early: bool
    final_lpips: float
    final_mse: float
    lpips_backbone: str
    threshold_applied: bool
    optimizer_steps: int = 0  # Adam steps taken: steps_run × the number of target images
    locality_terms: int = 0  # steps whose loss included the §3.3 locality regulariser
    stop_rule: str = "none"  # the early-stop rule in force (:func:`stop_rule`)
    mse_history: tuple = ()  # the worst image's L2 term after 0, 1, … iterations (the curve the plateau reads)


def stop_rule(o: PTIOptions, pretrained: bool) -> str:
    """The early-stop rule :func:`pivotal_tune_report` applies: ``"lpips<=T"`` (PTI's, ImageNet backbone),
    ``"plateau W/G"`` (relative L2 plateau, the random-backbone fallback), both joined by ``" or "``, or
    ``"none"``."""
    rules = []
    if o.lpips_threshold is not None and (pretrained or o.threshold_with_fallback):
        rules.append(f"lpips<={o.lpips_threshold:g}")
    if o.plateau_window and (not pretrained or o.plateau_with_pretrained):
        rules.append(f"plateau {int(o.plateau_window)}/{o.plateau_gain:g}")
    return " or ".join(rules) or "none"


def plateaued(history, window: Optional[int], gain: float, start: int = 0) -> bool:
    """True when the last value of ``history`` (an L2 curve, one value per iteration, the pivot's first) is above
    ``(1 − gain)`` × the value ``window`` iterations earlier, from iteration ``start`` on (bench/speed.py's
    ``plateau_stop`` rule)."""
    if not window or len(history) <= max(int(window), int(start)):
        return False
    return history[-1] > (1.0 - float(gain)) * history[-1 - int(window)]


def _check_ws(G, ws: torch.Tensor, n: int) -> torch.Tensor:
    if not torch.is_tensor(ws) or ws.ndim != 3 or ws.shape[1:] != (G.num_ws, G.w_dim):
        shape = tuple(ws.shape) if torch.is_tensor(ws) else type(ws).__name__
        raise InvalidInput(f"ws must be (N, {G.num_ws}, {G.w_dim}), got {shape}")
    if ws.shape[0] != n:
        raise InvalidInput(f"{ws.shape[0]} pivots for {n} targets; give one pivot per target image")
    if not torch.isfinite(ws).all():
        raise InvalidInput("ws contains NaN or infinite values")
    return ws.detach().to(G.w_avg.device, torch.float32)


def _locality(locality: Union[bool, LocalityOptions, None]) -> Optional[LocalityOptions]:
    if locality is True:
        return LocalityOptions()
    if locality is False or locality is None:
        return None
    if isinstance(locality, LocalityOptions):
        return locality
    raise InvalidInput(f"locality must be True, False or LocalityOptions, got {type(locality).__name__}")


def pivotal_tune(G, ws: torch.Tensor, target: torch.Tensor, steps: int = 350, mask: Optional[torch.Tensor] = None,
                 locality: Union[bool, LocalityOptions] = False, progress: ProgressFn = None,
                 cancel: CancelLike = None, options: Optional[PTIOptions] = None):
    """Tune a deep copy of ``G`` so ``G_tuned.synthesis(ws) ≈ target``; returns ``G_tuned``.

    ``ws`` ``(N,num_ws,w_dim)`` pivots (from :func:`core.projection.project`), ``target`` ``(N,3,R,R)`` in [-1,1];
    N > 1 tunes one generator for all images as PTI's multi-ID coach does (PTI@da94d59 multi_id_coach.py): every
    iteration takes one optimiser step per image, in order, so N images get N× the updates of one and the time
    grows linearly with N (PTI §4.5); it stops early only when every image's latest LPIPS is under the threshold.  ``steps``: at most this many (PTI: 350).
    ``mask`` ``(N|1,1,R,R)`` / ``(R,R)`` in [0,1] restricts the reconstruction loss.  ``locality``: True for PTI's
    §3.3 regulariser with the paper's settings, or a :class:`LocalityOptions` (it acts every ``interval`` optimiser
    steps, around the pivot of the image being stepped, as in the coach).  ``progress(ProgressEvent)`` (stage
    "tune") after each iteration; ``cancel`` checked before each optimiser step (raises Cancelled; ``G`` is
    untouched).
    """
    return pivotal_tune_report(G, ws, target, steps, mask, locality, progress, cancel, options)[0]


def tuning_optimizer(params: list, lr: float) -> torch.optim.Adam:
    """Adam over the generator's weights (PTI §4.5); PyTorch's fused kernel where every weight is a float32 CPU
    tensor (the same update rule, summed in another order: one Adam step over the 64 px model's 1.1 M weights takes
    ~2 ms instead of ~6 ms of a ~75 ms tuning step, 1 thread); CUDA keeps PyTorch's default multi-tensor path."""
    fused = bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True) if fused else torch.optim.Adam(params, lr=lr)


def pivotal_tune_report(G, ws, target, steps: int = 350, mask=None, locality=False, progress: ProgressFn = None,
                        cancel: CancelLike = None, options: Optional[PTIOptions] = None):
    """:func:`pivotal_tune` that also returns a :class:`PTIResult` (steps run, early stop, final losses)."""
    o = options or PTIOptions()
    if int(steps) < 0:
        raise InvalidInput(f"steps must be at least 0, got {steps}")
    steps = int(steps)
    target = check_target(G, target)
    ws = _check_ws(G, ws, target.shape[0])
    mask = as_mask(mask, target)
    loc = _locality(locality)
    if loc is not None and (loc.num_samples < 1 or loc.interval < 1):
        raise InvalidInput("locality num_samples and interval must be at least 1")
    device = target.device
    lpips = perceptual_loss(o.lpips_net, device, o.weights_dir)
    threshold = o.lpips_threshold if (lpips.pretrained or o.threshold_with_fallback) else None
    window = o.plateau_window if (o.plateau_window and (not lpips.pretrained or o.plateau_with_pretrained)) else None
    if window is not None and (int(window) < 1 or not 0 <= float(o.plateau_gain) < 1):
        raise InvalidInput(f"plateau_window must be >= 1 and plateau_gain in [0, 1); got {o.plateau_window}, "
                           f"{o.plateau_gain}")

    # one loss per image, each with its own mask (and bounding-box crop); target features are built once here
    n = ws.shape[0]
    masks = [None if mask is None else mask[i:i + 1] if mask.shape[0] == n else mask for i in range(n)]
    loss_fns = [ImageLoss(target[i:i + 1], masks[i], lpips, lpips_weight=o.lpips_weight, l2_weight=o.l2_weight,
                          max_size=o.lpips_size, crop=o.crop_to_mask, crop_pad=o.crop_pad) for i in range(n)]
    check_cancel(cancel)
    G_tuned = copy.deepcopy(G)
    G_tuned.train(G.training).requires_grad_(True)
    params = [p for p in G_tuned.parameters()]
    opt = tuning_optimizer(params, o.learning_rate)
    gen = torch.Generator().manual_seed(loc.seed) if loc is not None else None

    lps = [float("nan")] * n  # each image's LPIPS, measured just before its own latest step
    mses = [float("nan")] * n
    history = [[] for _ in range(n)]  # each image's L2 term after 0, 1, … iterations
    stopped, step, updates, loc_terms = False, 0, 0, 0

    def done() -> bool:
        if threshold is not None and all(v <= threshold for v in lps):
            return True
        return window is not None and all(plateaued(h, window, o.plateau_gain, o.plateau_start) for h in history)

    for step in range(steps + 1):
        preview = None
        for i in range(n):
            # the last pass only measures the result (and allows the early stop), it takes no optimiser step
            if step < steps:
                check_cancel(cancel)
                img = G_tuned.synthesis(ws[i:i + 1], noise_mode=o.noise_mode)
            else:
                with torch.no_grad():
                    img = G_tuned.synthesis(ws[i:i + 1], noise_mode=o.noise_mode)
            total, lp, mse = loss_fns[i](img)
            lps[i], mses[i] = float(lp.detach().max()), float(mse.detach().mean())
            history[i].append(mses[i])
            preview = img.detach() if preview is None else preview
            if step == steps or done():
                continue
            loss = total.mean()
            if loc is not None and updates % loc.interval == 0:
                codes = torch.cat([locality_codes(G, ws[i:i + 1], 1, loc.alpha, loc.psi, gen)
                                   for _ in range(loc.num_samples)])
                loss = loss + loc.weight * locality_loss(G_tuned, G, codes, lpips, loc.l2_weight, loc.lpips_weight,
                                                         max_size=o.lpips_size, noise_mode=loc.noise_mode)
                loc_terms += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            updates += 1
        if done():
            stopped = step < steps
            if stopped:
                report_step(progress, "tune", steps, steps, float(total.detach().mean()), preview)  # done early: 100 %
            break
        if step == steps:
            break
        show = step == steps - 1 or (o.preview_every and step % o.preview_every == 0)
        report_step(progress, "tune", step + 1, steps, float(total.detach().mean()), preview if show else None)
    for p in params:
        p.grad = None
    G_tuned.requires_grad_(False).eval()
    report = PTIResult(steps_run=step, stopped_early=stopped, final_lpips=max(lps), final_mse=sum(mses) / n,
                       lpips_backbone=lpips.backbone_name, threshold_applied=threshold is not None,
                       optimizer_steps=updates, locality_terms=loc_terms,
                       stop_rule=stop_rule(o, lpips.pretrained),
                       mse_history=tuple(max(v) for v in zip(*history)))
    return G_tuned, report
