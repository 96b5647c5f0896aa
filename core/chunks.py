"""ChunkyGAN (Šubrtová et al. 2022) segment inversion, local edits and seamless compositing.

n segments with soft masks ``S_i`` (normalised to sum 1 where anything is selected) each get their own
latent code ``X_i``; the output is

    O = S^X·I + (1 − S^X)·Σ_i G(X_i)·S_i            S^X = 1 where the masks sum to 0 (the static region)

and the codes minimise  masked LPIPS(O, I) + λ_reg Σ_i ‖X_i − X_μ‖²  (Eq. 2: a plain sum of squares; an L2 image
term and a per-element normalisation of the regulariser are options), the image term evaluated on the dilated
selection's bounding box only.  Codes live in W, W+ (default) or S (per-segment style offsets).  The masks are
fixed (a selection or a label map: §5's static masks), or produced by a segment generator ``S = G^S(X^S)`` whose
code X^S is optimised jointly (§3, ``mask_generator``; core.segmenter's part head).  Optional extras:
low-resolution soft-mask refinement for several static segments, segment-restricted pivotal tuning (PTI on each
segment's masked loss, each segment its own ``tune_steps`` updates) and hole-filling refinement (§5, Fig. 10):
re-fit one code inside a correction mask starting from the edited code.

A :class:`SegmentSession` keeps the codes, masks and unedited renders, so a re-edit is one generator forward
(of the edited segments' codes, batched) plus compositing. Pixels where the composite alpha is 0 are
bit-identical to the input image.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from core.blend import composite
from core.common import CancelLike, InvalidInput, ProgressFn, Stages
from core.compositing import DEFAULT_FEATHER, compose
from core.geometry import LayerGeometry
from core.inversion import Inversion
from core.losses import ImageLoss, perceptual_loss
from core.optim import Schedule, optimise

SPACES = ("w", "w+", "s")  # ChunkyGAN §3: W, W+ and S-space codes
PREVIEW_EVERY = 10  # pass the current composite to ``progress`` every this many steps (and at the end)


@dataclasses.dataclass
class ChunksOptions:
    """Segment-inversion settings; defaults cite their source."""

    steps: int = 200  # Chunkmogrify README: "100 or 200 is ok, 500 is max"
    initial_learning_rate: float = 0.1  # Chunkmogrify _config.yaml lr 0.1 (= Karras et al. 2020 projector)
    lr_rampup_length: float = 0.05  # Karras et al. 2020 projector
    lr_rampdown_length: float = 0.25  # Karras et al. 2020 projector
    initial_noise_factor: float = 0.05  # Karras et al. 2020 projector: code noise × w std, ramped down
    noise_ramp_length: float = 0.75  # Karras et al. 2020 projector
    w_avg_samples: int = 600  # PTI base_coach.py: 600 samples for w_avg / w_std
    reg: float = 1.0  # ChunkyGAN §4.1 λ_reg = 1 (W+) on Eq. 2's plain Σ_i ‖X_i − X_μ‖²
    reg_normalise: bool = False  # option: the regulariser per element / W variance instead (this module before issue 21)
    lpips_weight: float = 1.0  # ChunkyGAN Eq. 2: LPIPS reconstruction loss
    # ChunkyGAN Eq. 2 has no L2 term: None = 0 with the ImageNet LPIPS, 1 with the random-backbone fallback (whose
    # distance is not the paper's LPIPS).  Measured with the fallback (embedded model, 40 W+ steps, one face):
    # whole-image L2 global 0.0075 -> 0.0013 and automatic segments 0.0297 -> 0.0012 when the L2 term is added.
    l2_weight: Optional[float] = None
    net: str = "vgg"  # Chunkmogrify / Karras projector: VGG16 LPIPS
    lpips_size: int = 256  # PTI w_projector: LPIPS at 256² (area downsampling)
    dilate: int = 3  # Chunkmogrify: the loss sees the region inside a 7×7-dilated mask (radius 3)
    crop_pad: int = 8  # extra context around the dilated mask's bounding box; our choice
    noise_mode: str = "const"  # PTI synthesis noise_mode='const'
    refine_masks: bool = False  # Chunkmogrify "multimask descent"; only with several segments
    mask_resolution: int = 16  # low-resolution grid of the refined soft-mask logits; our choice
    mask_lr: float = 0.05  # learning rate of the mask logits; our choice
    mask_code_lr: float = 0.01  # learning rate of the segment code X^S (masks S = G^S(X^S)); our choice
    s_lr_scale: float = 0.1  # S-space codes: the W schedule's lr × this (styles move ~10× more per unit); our choice
    tune_lr: float = 3e-4  # PTI hyperparameters pti_learning_rate; Chunkmogrify stylegan_tune.py
    feather: float = DEFAULT_FEATHER  # SegmentSession.render's inward feather, px (one default with sessions)
    refine_steps: int = 100  # hole-filling refinement steps; our choice (half the inversion budget)
    refine_anchor: float = 0.1  # ‖X' − X_edited‖² weight during hole filling (per element / w variance); our choice
    ring: int = 4  # width (px) of the static ring matched to the input around a correction; our choice
    seed: int = 0

    def schedule(self) -> Schedule:
        """The lr / latent-noise schedule of the segment inversion (core.optim)."""
        return Schedule(self.initial_learning_rate, self.lr_rampup_length, self.lr_rampdown_length,
                        self.initial_noise_factor, self.noise_ramp_length)


# ----------------------------------------------------------------------------------------------- validation

def _check_image(G, image: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(image):
        raise InvalidInput(f"image must be a tensor, got {type(image).__name__}")
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise InvalidInput(f"image must be (1,3,H,W); got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise InvalidInput(f"image must be a float tensor in [-1,1]; got dtype {image.dtype}")
    res = int(G.resolution)
    if tuple(image.shape[-2:]) != (res, res):
        raise InvalidInput(f"image is {tuple(image.shape[-2:])} but the generator's resolution is {res}×{res}")
    if not bool(torch.isfinite(image).all()):
        raise InvalidInput("image contains NaN or infinite values")
    return image.float()


def check_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Validate segment masks: ``(H,W)``, ``(n,H,W)`` or ``(n,1,H,W)`` in [0,1] -> ``(n,1,H,W)`` float32.

    Raises InvalidInput for a wrong size, NaN / out-of-range values and empty segments.
    """
    if not torch.is_tensor(masks):
        raise InvalidInput(f"masks must be a tensor, got {type(masks).__name__}")
    if masks.dtype == torch.bool:
        masks = masks.float()
    if not masks.is_floating_point():
        raise InvalidInput(f"masks must be float in [0,1]; got dtype {masks.dtype}")
    if masks.ndim == 2:
        masks = masks[None, None]
    elif masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] < 1:
        raise InvalidInput(f"masks must be (n,H,W); got {tuple(masks.shape)}")
    if tuple(masks.shape[-2:]) != tuple(size):
        raise InvalidInput(f"masks are {tuple(masks.shape[-2:])} but the image is {tuple(size)}")
    if not bool(torch.isfinite(masks).all()):
        raise InvalidInput("masks contain NaN or infinite values")
    if float(masks.min()) < 0 or float(masks.max()) > 1:
        raise InvalidInput(f"mask values must lie in [0,1]; got [{float(masks.min()):.3g}, {float(masks.max()):.3g}]")
    empty = [i for i in range(masks.shape[0]) if not bool((masks[i] > 0).any())]
    if empty:
        raise InvalidInput(f"segment mask(s) {empty} are empty (nothing selected)")
    return masks.float()


def normalize_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment weights ``S`` (n,1,H,W) summing to 1 where any mask is > 0 (0 elsewhere), and the soft
    coverage ``clamp(Σ masks, 0, 1)`` (1,1,H,W) that becomes the composite alpha before feathering."""
    total = masks.sum(0, keepdim=True)
    S = torch.where(total > 0, masks / total.clamp(min=1e-12), torch.zeros_like(masks))
    return S, total.clamp(0.0, 1.0)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square (2r+1)² max-filter dilation. ``(N,1,H,W)`` -> same."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


# ------------------------------------------------------------------------------------------------ latents

def w_stats(G, samples: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """``w_avg`` (w_dim,) and the per-element variance of W around it (core.projection.w_statistics)."""
    from core.projection import w_statistics

    w_avg, w_std = w_statistics(G, samples, seed)
    return w_avg.reshape(-1), max(w_std * w_std / G.w_dim, 1e-8)


def code_spread(ws: torch.Tensor) -> float:
    """Mean over segments of ``‖X_i − X̄‖²`` per element (0 for one segment). ws ``(n,num_ws,w_dim)``."""
    return float((ws - ws.mean(0, keepdim=True)).square().mean())


def _neighbour_jumps(delta: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared jumps of ``delta`` (1,C,H,W) between 4-neighbours inside the selection, split into pairs whose
    segments (arg-max of ``masks`` (n,1,H,W)) differ and pairs inside one segment."""
    labels = masks.argmax(0)[0]
    inside = masks.sum(0)[0] > 0
    d = delta[0]
    across, within = [], []
    for dy, dx in ((0, 1), (1, 0)):
        h, w = labels.shape[0] - dy, labels.shape[1] - dx
        both = inside[:h, :w] & inside[dy:, dx:]
        differ = labels[:h, :w] != labels[dy:, dx:]
        jump = (d[:, :h, :w] - d[:, dy:, dx:]).square().sum(0)
        across.append(jump[both & differ])
        within.append(jump[both & ~differ])
    return torch.cat(across), torch.cat(within)


def seam_energy(delta: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean squared jump of ``delta`` (an edit's image change, (1,C,H,W)) between 4-neighbours that belong
    to different segments (arg-max of ``masks`` (n,1,H,W), inside the selection). Lower = more coherent."""
    across, _ = _neighbour_jumps(delta, masks)
    return float(across.mean()) if across.numel() else 0.0


def seam_contrast(delta: torch.Tensor, masks: torch.Tensor) -> float:
    """:func:`seam_energy` over the mean squared jump between neighbours *inside* one segment: ≈ 1 when the
    edit flows across segment boundaries like anywhere else, ≫ 1 when it breaks at them."""
    across, within = _neighbour_jumps(delta, masks)
    if not across.numel() or not within.numel():
        return 0.0
    return float(across.mean() / within.mean().clamp(min=1e-20))


# -------------------------------------------------------------------------------------------------- session

class SegmentSession:
    """A segment inversion (:class:`core.inversion.Inversion`) with ChunkyGAN's render and hole-filling API at
    the generator's resolution: ``image`` (1,3,r,r) in [-1,1], ``masks`` (n,1,r,r), ``coverage`` (1,1,r,r),
    ``ws`` (n,num_ws,w_dim) are the inversion's; ``directions`` ({name: Direction}) resolves edit names."""

    def __init__(self, inversion: Inversion, options: Optional[ChunksOptions] = None, directions=None):
        self.inversion = inversion
        self.options = options or ChunksOptions()
        self.directions = directions
        self._alpha_cache: dict = {}

    # the inversion's state, read-only
    G = property(lambda self: self.inversion.G)
    base_G = property(lambda self: self.inversion.base_G)
    image = property(lambda self: self.inversion.image)
    masks = property(lambda self: self.inversion.masks)
    coverage = property(lambda self: self.inversion.coverage)
    ws = property(lambda self: self.inversion.ws)
    info = property(lambda self: self.inversion.info)
    tuned = property(lambda self: self.inversion.tuned)
    support = property(lambda self: self.inversion.support)

    def synthesize(self, ws: torch.Tensor, style_deltas: Optional[dict] = None) -> torch.Tensor:
        """One batched generator forward: ws (k,num_ws,w_dim) -> (k,3,r,r)."""
        return self.inversion.synthesize(ws, style_deltas)

    def reconstructions(self) -> torch.Tensor:
        """Cached unedited renders G(X_i), (n,3,r,r)."""
        return self.inversion.reconstructions()

    def edited_codes(self, edits=None, segments: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Codes with the W-space ``edits`` applied to ``segments`` (all by default). (n,num_ws,w_dim)."""
        return self.inversion.edited_codes(edits, self.directions, segments)

    def generated(self, edits=None, segments: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``Σ_i G(X_i)·S_i`` on the selection, the input image elsewhere; (1,3,r,r)."""
        return self.inversion.generated(edits, self.directions, segments)

    def layers(self, edits=None, feather: Optional[float] = None, blend: str = "alpha",
               segments: Optional[Sequence[int]] = None, color_match: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The overlay (1,3,r,r) and its alpha (1,1,r,r) (core.compositing, direct geometry): alpha is the
        soft selection feathered inwards by ``feather`` px (default ``options.feather``), exactly 0 outside it.
        ``blend="poisson"`` solves for the overlay in the gradient domain inside alpha > 0; ``color_match``
        applies the colour transfer that maps the unedited reconstruction onto the input."""
        inv = self.inversion
        feather = self.options.feather if feather is None else feather
        r = inv.image.shape[-1]
        geometry = LayerGeometry("direct", (r, r), r, (0, 0, r, r))
        overlay, alpha, _ = compose(inv, geometry, inv.image, inv.coverage * inv.support, edits, self.directions,
                                    feather, blend, color_match, segments, cache=self._alpha_cache)
        return overlay, alpha

    @torch.no_grad()
    def render(self, edits=None, feather: Optional[float] = None, blend: str = "alpha",
               segments: Optional[Sequence[int]] = None, color_match: bool = False) -> torch.Tensor:
        """The edited image (1,3,r,r) in [-1,1]; bit-identical to the input where the alpha is 0.

        ``edits``: [(direction, strength), ...] with direction a tensor (w_dim,) / (num_ws,w_dim), a
        ``core.edits.Direction`` or a name in ``self.directions``; applied to ``segments`` (all by default).
        """
        overlay, alpha = self.layers(edits, feather, blend, segments, color_match)
        return composite(self.image, overlay, alpha)

    def refine(self, correction_mask: torch.Tensor, edits=None, steps: Optional[int] = None,
               segment: Optional[int] = None, segments: Optional[Sequence[int]] = None,
               progress: ProgressFn = None, cancel: CancelLike = None) -> "SegmentSession":
        """Hole filling (:func:`refine`): a new session with ``edits`` baked in; ``self`` is not modified."""
        inv = refine(self.inversion, correction_mask, edits, self.directions, steps, segment, segments,
                     self.options, progress, cancel)
        return SegmentSession(inv, self.options, self.directions)

    # ---- persistence (plain tensors; the generator is saved by the caller) ----
    def state_dict(self) -> dict:
        return self.inversion.state_dict()

    @classmethod
    def from_state(cls, G, state: dict, options: Optional[ChunksOptions] = None, base_G=None,
                   directions=None, info=None) -> "SegmentSession":
        opts = options or ChunksOptions()
        return cls(Inversion.from_state("chunks", G, state, base_G, opts.noise_mode, info), opts, directions)


def refine(inv: Inversion, correction_mask: torch.Tensor, edits=None, directions=None, steps: Optional[int] = None,
           segment: Optional[int] = None, segments: Optional[Sequence[int]] = None,
           options: Optional[ChunksOptions] = None, progress: ProgressFn = None,
           cancel: CancelLike = None) -> Inversion:
    """Hole filling (ChunkyGAN §5, Fig. 10): let edited content continue past a segment boundary.

    The correction mask ``C`` (r,r) in [0,1] joins segment ``segment`` (default: the one it touches most). That
    segment's code is re-fitted starting from its *edited* code: it must keep reproducing the edited render
    on its old area and the input on a ring of static pixels just outside ``C``; inside ``C`` it is free.
    Returns a new :class:`Inversion` whose codes have ``edits`` baked in for ``segments`` (its unedited render
    shows the edited, hole-filled result).  ``progress(ProgressEvent)`` stage "refine"; ``inv`` is unchanged.
    """
    opts = options or ChunksOptions()
    steps = opts.refine_steps if steps is None else int(steps)
    C = check_masks(correction_mask, tuple(inv.image.shape[-2:])).to(inv.image.device)
    if C.shape[0] != 1:
        raise InvalidInput("refine takes a single correction mask (H,W)")
    ws_e = inv.edited_codes(edits, directions, segments)
    n = ws_e.shape[0]
    if segment is None:
        touch = (inv.masks * (dilate(C, 2) > 0)).flatten(1).sum(1)
        segment = int(touch.argmax())
    if not 0 <= segment < n:
        raise InvalidInput(f"segment {segment} out of range for {n} segment(s)")
    support = inv.support
    with torch.no_grad():
        rec_e = inv.synthesize(ws_e)
        target = torch.where(support, (rec_e * inv.masks).sum(0, keepdim=True), inv.image)
    # new masks: C taken from every segment and given to ``segment``
    new_masks = inv.masks * (1 - C)
    new_masks[segment] = new_masks[segment] + C[0]
    total = new_masks.sum(0, keepdim=True)  # a soft C outside the old selection: renormalise to sum 1
    new_masks = torch.where(total > 0, new_masks / total.clamp(min=1e-12), torch.zeros_like(new_masks))
    new_cov = torch.maximum(inv.coverage, C[0])
    old_area = inv.masks[segment:segment + 1]
    new_area = (new_masks[segment:segment + 1] > 0).float()
    ring = (dilate(new_area, opts.ring) > 0).float() * (~support).float() * (1 - C[0])
    weight = torch.clamp(old_area * (1 - C[0]) + ring, 0, 1)
    _, w_var = w_stats(inv.G, opts.w_avg_samples, opts.seed)
    x0 = ws_e[segment:segment + 1].detach()
    x = x0.clone().requires_grad_(True)
    loss_fn = ImageLoss(target, weight, _lpips_for(opts, target.device), lpips_weight=opts.lpips_weight,
                        l2_weight=l2_weight_for(opts, target.device), max_size=opts.lpips_size, crop=True,
                        crop_pad=opts.crop_pad)
    t0 = time.perf_counter()

    own = {k: v[segment:segment + 1] for k, v in inv.styles.items()} if inv.styles else None  # S-space codes

    def objective(_noise_scale: float):
        img = inv.G.synthesis(x, noise_mode=opts.noise_mode, style_deltas=own)
        loss = loss_fn(img)[0].sum() + opts.refine_anchor * (x - x0).square().mean() / w_var
        return loss, loss.detach(), img

    # a gentle re-fit without latent noise: the segment schedule at 1/10 of its learning rate
    sched = dataclasses.replace(opts.schedule(), initial_noise_factor=0.0)
    losses = optimise(objective, [x], steps, sched, lr_scale=0.1, progress=progress, cancel=cancel,
                      stage="refine", preview_every=PREVIEW_EVERY)
    ws_new = ws_e.clone()
    ws_new[segment] = x.detach()[0]
    info = dict(inv.info, refine_steps=steps, refine_seconds=time.perf_counter() - t0, refine_losses=losses)
    return inv.replace(ws=ws_new, masks=new_masks, coverage=new_cov, info=info)


# ------------------------------------------------------------------------------------------------ inversion

def _lpips_for(opts: ChunksOptions, device):
    return perceptual_loss(opts.net, device) if opts.lpips_weight else None


def l2_weight_for(opts: ChunksOptions, device=None) -> float:
    """``opts.l2_weight``, or when None: 0 (Eq. 2) with the ImageNet LPIPS, 1 with the random-backbone fallback."""
    if opts.l2_weight is not None:
        return float(opts.l2_weight)
    lp = _lpips_for(opts, device)
    return 0.0 if (lp is not None and lp.pretrained) else 1.0


def dispersion(codes: torch.Tensor, normalise: Optional[float] = None) -> torch.Tensor:
    """ChunkyGAN Eq. 2's regulariser ``Σ_i ‖X_i − X_μ‖²``: the plain sum of squared deviations of the segment
    codes ``codes`` (n, ...) from their mean (0 for one segment).  ``normalise`` (a per-element variance):
    the mean over elements divided by it instead (this module's pre-issue-21 form)."""
    dev = (codes - codes.mean(0, keepdim=True)).square()
    if normalise:
        return dev.flatten(1).mean(1).sum() / normalise
    return dev.sum()


def invert_segments(G, image: torch.Tensor, masks: torch.Tensor, steps: Optional[int] = None, space: str = "w+",
                    reg: Optional[float] = None, tune_steps: int = 0, progress: ProgressFn = None,
                    cancel: CancelLike = None, options: Optional[ChunksOptions] = None,
                    init_ws: Optional[torch.Tensor] = None, directions=None, mask_generator=None) -> SegmentSession:
    """Fit one latent code per segment so that the composite reproduces ``image`` inside the masks (Eq. 2).

    image (1,3,H,W) in [-1,1] at the generator's resolution; masks (n,H,W) in [0,1] (a selection is one
    segment); the static region is where they sum to 0. All-selected masks are allowed: the static region is
    empty and this is a global inversion. ``space`` "w+" (ChunkyGAN default), "w" or "s" (StyleSpace: per-segment
    offsets of every style layer's styles around those of the starting code). ``reg`` λ_reg (default
    ``options.reg``) on ``Σ_i ‖X_i − X_μ‖²`` (:func:`dispersion`). ``tune_steps`` > 0 then tunes a copy of G on
    the masked loss only (segment-restricted PTI, each segment ``tune_steps`` updates; W / W+ codes; ``G`` itself
    is never modified). ``init_ws`` (1|n,num_ws,w_dim) starts from given codes instead of w_avg.
    ``mask_generator`` ``(fn, xs)``: the masks are ``S = fn(X^S)`` — ``fn`` maps a code (1,num_ws,w_dim) to
    (n,1,H,W) weights summing to 1 (e.g. a part head on G's features, core.segmenter) — and ``X^S`` (starting at
    ``xs``) is optimised jointly with the codes (ChunkyGAN §3); ``masks`` then only bound them (the support).
    ``directions`` ({name: Direction}) resolves edit names in ``render``.
    ``progress(ProgressEvent)`` after every step: stage "project" for the codes, then "tune" for the tuning
    (each with its own step/total; ``fraction`` spans both, the tuning weighted by its n·tune_steps updates);
    ``preview`` the current composite ``(H,W,3)`` uint8 every ``PREVIEW_EVERY`` steps; ``cancel`` is checked
    before every step.
    """
    opts = dataclasses.replace(options) if options is not None else ChunksOptions()
    if steps is not None:
        opts.steps = int(steps)
    if reg is not None:
        opts.reg = float(reg)
    if space not in SPACES:
        raise InvalidInput(f"space must be one of {SPACES}; got {space!r}")
    if opts.steps < 0 or tune_steps < 0:
        raise InvalidInput("steps and tune_steps must be >= 0")
    if space == "s" and tune_steps:
        raise InvalidInput("segment-restricted tuning works on W / W+ codes; use space 'w+' with tune_steps")
    image = _check_image(G, image).to(G.w_avg.device)
    raw = check_masks(masks, tuple(image.shape[-2:])).to(image.device)
    S, coverage = normalize_masks(raw)
    support = (S.sum(0, keepdim=True) > 0).float()
    loss_mask = dilate(support, opts.dilate)
    mask_fn, xs = (None, None) if mask_generator is None else mask_generator
    if mask_fn is not None:
        xs = xs.detach().to(image).clone().requires_grad_(True)
        with torch.no_grad():
            S = mask_fn(xs) * support
    n = S.shape[0]

    w_avg, w_var = w_stats(G, opts.w_avg_samples, opts.seed)
    w_std = math.sqrt(float(w_var) * G.w_dim)  # Karras et al.: sqrt(E‖w − w̄‖²)
    num_ws = int(G.num_ws)
    if init_ws is not None:
        start = init_ws.detach().to(w_avg).expand(n, num_ws, -1).clone()
    else:
        start = w_avg.view(1, 1, -1).expand(n, num_ws, -1).clone()
    styles = None
    if space == "s":  # X_i = the styles of ``start`` + per-segment offsets (one tensor per style layer)
        styles = [torch.zeros(n, int(layer.affine_weight.shape[0]), device=image.device, requires_grad=True)
                  for layer in G.style_layers()]
        x = None
    else:
        x = (start[:, :1] if space == "w" else start).clone().requires_grad_(True)
    logits = None
    refine = opts.refine_masks and n > 1 and mask_fn is None
    if refine:
        r = max(4, min(opts.mask_resolution, image.shape[-1]))
        low = F.adaptive_avg_pool2d(S[:, 0][None], r)[0]  # (n,r,r)
        logits = torch.log(low.clamp(min=1e-3)).requires_grad_(True)
    # the image term: masked LPIPS (+ λ_L2·MSE, l2_weight_for) on the dilated selection's bounding box
    loss_fn = ImageLoss(image, loss_mask, _lpips_for(opts, image.device), lpips_weight=opts.lpips_weight,
                        l2_weight=l2_weight_for(opts, image.device), max_size=opts.lpips_size, crop=True,
                        crop_pad=opts.crop_pad)
    noise_gen = torch.Generator().manual_seed(opts.seed)
    stages = Stages(progress, {"project": opts.steps, "tune": int(tune_steps) * n})
    t0 = time.perf_counter()
    normalise = w_var if opts.reg_normalise else None

    def segment_weights() -> torch.Tensor:
        if mask_fn is not None:
            return mask_fn(xs) * support
        if not refine:
            return S
        up = F.interpolate(logits[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
        return torch.softmax(up, 0)[:, None] * support

    def codes_of() -> torch.Tensor:
        """The optimised codes X_i, one row per segment (what the regulariser compares)."""
        if styles is not None:
            return torch.cat(styles, 1)
        return x  # (n,1,w_dim) in W: the code itself, not its num_ws copies

    def objective(noise_scale: float):
        if styles is not None:
            imgs = G.synthesis(start, noise_mode=opts.noise_mode, style_deltas=dict(enumerate(styles)))
        else:
            codes = x.expand(n, num_ws, -1) if space == "w" else x
            if noise_scale > 0:
                codes = codes + noise_scale * torch.randn(codes.shape, generator=noise_gen).to(codes)
            imgs = G.synthesis(codes, noise_mode=opts.noise_mode)
        out = (imgs * segment_weights()).sum(0, keepdim=True) * support + image * (1 - support)
        loss = loss_fn(out)[0].sum()
        if opts.reg and n > 1:
            loss = loss + opts.reg * dispersion(codes_of(), normalise)
        return loss, loss.detach(), out

    params = styles if styles is not None else [x]
    extra = [{"params": [logits], "lr": opts.mask_lr}] if refine else []
    if mask_fn is not None:
        extra.append({"params": [xs], "lr": opts.mask_code_lr})
    losses = optimise(objective, params, opts.steps, opts.schedule(), w_std=0.0 if styles is not None else w_std,
                      lr_scale=opts.s_lr_scale if styles is not None else 1.0, extra_groups=extra,
                      progress=stages.callback("project"), cancel=cancel, stage="project",
                      preview_every=PREVIEW_EVERY)

    ws = start.detach().clone() if styles is not None else (x.expand(n, num_ws, -1) if space == "w" else x).detach().clone()
    with torch.no_grad():
        S_final = segment_weights().detach() if (refine or mask_fn is not None) else S
    seconds = time.perf_counter() - t0
    info = {"steps": opts.steps, "space": space, "reg": opts.reg, "losses": losses, "seconds": seconds,
            "code_spread": code_spread(codes_of().detach()), "segments": n}
    if mask_fn is not None:
        info["mask_code"] = xs.detach()
    G_out = G
    if tune_steps:
        G_out = tune_segments(G, ws, image, S_final, int(tune_steps), opts, progress=stages.callback("tune"),
                              cancel=cancel)
        info["tune_steps"] = int(tune_steps)
        info["seconds"] = time.perf_counter() - t0
    style_codes = None if styles is None else {i: v.detach().clone() for i, v in enumerate(styles)}
    moved = None if mask_fn is None else (lambda code: mask_fn(code) * support)  # the masks an X^S edit draws
    inv = Inversion("chunks", image, ws, S_final, coverage, G_out, G, opts.noise_mode, info, styles=style_codes,
                    mask_generator=moved)
    return SegmentSession(inv, opts, directions)


def tune_segments(G, ws: torch.Tensor, image: torch.Tensor, masks: torch.Tensor, steps: int,
                  opts: Optional[ChunksOptions] = None, progress: ProgressFn = None,
                  cancel: CancelLike = None):
    """Segment-restricted PTI: a tuned copy of ``G`` such that ``G(X_i)`` matches ``image`` on segment i's
    dilated area only (multi-pivot pivotal tuning, core.pti: each iteration takes one optimiser step per
    segment, each on its own masked loss, as PTI's multi-ID coach does per image). ws (n,num_ws,w_dim),
    masks (n,1,H,W)."""
    opts = opts or ChunksOptions()
    from core.pti import PTIOptions, pivotal_tune

    n = ws.shape[0]
    seg_masks = dilate((masks > 0).float(), opts.dilate)
    pti = PTIOptions(learning_rate=opts.tune_lr, lpips_weight=opts.lpips_weight,
                     l2_weight=1.0 if opts.l2_weight is None else opts.l2_weight)  # PTI: pt_l2_lambda = 1
    return pivotal_tune(G, ws, image.expand(n, -1, -1, -1), steps=steps, mask=seg_masks,
                        progress=progress, cancel=cancel, options=pti)
