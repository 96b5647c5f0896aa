"""MAGEC (Grechka, Goudou & Cord, BMVC 2021): W+ inversion with an image–latent consistency loss.

A descriptor network F (here: an attribute scorer, ``(N,3,H,W)`` in [-1,1] → ``(N,K)``) reads the target;
a **LinkNet** — a linear map from the latent to F's outputs, fitted on generated ``(ws, F(G(ws)))`` pairs
with F's own loss — reads the latent being optimised.  The MAGEC loss (paper Eq. 2) asks the LinkNet's
reading of the latent, and of every InterfaceGAN-edited copy of it, to agree with F's reading of the target
moved by the same edit; it is added to the usual image losses (Eq. 3) over two phases of 100 Adam steps.

Why one module of ~600 lines: descriptor, LinkNet, loss and the two-phase loop are one paper's method and
share its option dataclasses; a third of the file is the measured-choice notes below.

Entry points: :func:`load_descriptor`, :func:`fit_linknet`, :func:`magec_edits`, :func:`magec_loss`,
:func:`invert_magec` (→ ``ws``), :func:`invert_magec_report` (→ :class:`MagecResult` with metadata) and
:func:`magec_pivot_report` (PTI's MAGEC pivot: PTI's W projection plus the MAGEC term).

**W+ rows in the LinkNet** (``rows=``): ``"flat"`` is one linear map on the flattened ``(num_ws·w_dim)`` code
(a block per W+ row); ``"mean"`` applies one map to the mean of the rows.  On codes with identical rows the
two are the same function class, so the LinkNet is fitted on style-mixed samples (rows after a random
crossover come from a second code, ``mix_prob`` of them) where they differ.  Measured on the embedded model
(``python bench/magec.py --linknet-study``: 8192 fitting pairs, 1024 held-out pairs of each kind, seeds apart;
L1 to the scorer's reading — the scorer's own loss; "edited": 128 held-out W samples × the 26 add/remove edits at
±3, the LinkNet's reading of the edited code against Eq. 2's target d_e, the unedited reading moved and clamped):

    rows   output    fit    held-out W   held-out mixed W+   edited vs d_e
    flat   sigmoid   0.040  0.034        0.060               0.057     <- the default
    flat   clamp     0.046  0.043        0.064               0.065
    flat   linear    0.054  0.053        0.071               0.093
    mean   sigmoid   0.067  0.034        0.100               0.053
    mean   clamp     0.072  0.042        0.104               0.067
    mean   linear    0.079  0.053        0.107               0.091
    chance (the fit's mean): 0.24 / 0.22; the scorer's own reading of the edited images is 0.031 from d_e
    (ridge start, then 400 full-batch Adam steps at lr 3e-4 on the L1 loss)

Both row handlings fit W codes equally; on mixed W+ codes (which inversions produce: their rows drift apart)
the flattened map is 40 % closer to the scorer, because each attribute lives in some rows more than others —
so "flat", although on edited W codes (identical rows) the mean-row map is 0.004 closer.  The sigmoid
(logistic regression, as the paper's BCE LinkNet on 40 binary attributes) follows the scorer's saturation at
0 and 1 better than a linear map, clamped or not, also on edited codes against the clamped targets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from core.common import CancelLike, InvalidInput, ProgressFn, check_cancel, report_step


LINKNET_SUFFIX = ".linknet.pt"
DESCRIPTOR_SUFFIX = ".attributes.pt"
DESCRIPTOR_NAMES_SUFFIX = ".attributes.json"
LINKNET_FORMAT = "latent-edit-linknet"

# --- the descriptor F ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Descriptor:
    """An image descriptor F: ``net((N,3,H,W) in [-1,1]) -> (N,K)`` with ``names`` (K), the loss it was
    trained with (``"l1"`` | ``"mse"`` | ``"bce"``) and its output range (``None`` = unbounded)."""

    net: Callable[[torch.Tensor], torch.Tensor]
    names: tuple
    loss: str = "l1"
    output_range: Optional[tuple] = (0.0, 1.0)
    source: str = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def fingerprint(self) -> str:
        """sha256 over the names, the loss and the network's tensors (keys the LinkNet cache)."""
        h = hashlib.sha256(json.dumps([list(self.names), self.loss, self.output_range]).encode())
        state = self.net.state_dict() if hasattr(self.net, "state_dict") else {}
        for name, t in sorted(state.items()):
            t = t.detach().cpu().float().contiguous()
            h.update(f"{name}|{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def descriptor_paths(checkpoint) -> tuple[pathlib.Path, pathlib.Path]:
    """``ffhq.pkl`` -> (``ffhq.attributes.pt``, ``ffhq.attributes.json``) beside it."""
    p = pathlib.Path(checkpoint)
    return p.with_name(p.stem + DESCRIPTOR_SUFFIX), p.with_name(p.stem + DESCRIPTOR_NAMES_SUFFIX)


def embedded_descriptor() -> Descriptor:
    """The shipped attribute scorer (core.demo.scorer): 13 attributes in [0,1], trained with L1."""
    from core.demo.renderer import ATTRIBUTES
    from core.demo.scorer import WEIGHTS, load_scorer

    return Descriptor(load_scorer(), tuple(ATTRIBUTES), "l1", (0.0, 1.0), f"embedded scorer {WEIGHTS.name}")


def load_descriptor(checkpoint_path) -> Descriptor:
    """The descriptor MAGEC uses for a generator checkpoint.

    The embedded default model gets the shipped scorer.  Any other checkpoint needs an attribute classifier
    beside it: ``<stem>.attributes.pt`` (TorchScript, ``(N,3,H,W)`` in [-1,1] → ``(N,K)``) and
    ``<stem>.attributes.json`` (``{"names": [K names], "loss": "l1"|"mse"|"bce", "range": [lo, hi] | null}``;
    only ``names`` is required, defaults ``"l1"`` and ``[0, 1]``); names match the edit directions' names.
    Raises :class:`InvalidInput` naming the missing or broken file."""
    from core.demo import is_default_model

    if is_default_model(checkpoint_path):
        return embedded_descriptor()
    pt, js = descriptor_paths(checkpoint_path)
    if not pt.is_file():
        raise InvalidInput(
            f"MAGEC needs an attribute classifier for {pathlib.Path(checkpoint_path).name}: add {pt.name} "
            f"(TorchScript, (N,3,H,W) in [-1,1] -> (N,K)) and {js.name} (its attribute names) beside it")
    if not js.is_file():
        raise InvalidInput(f"MAGEC: {pt.name} has no names file; add {js.name} beside it "
                           '({"names": ["smile", ...]})')
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"MAGEC: {js.name} is not readable JSON ({exc})") from None
    if isinstance(meta, list):
        meta = {"names": meta}
    names = meta.get("names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidInput(f'MAGEC: {js.name} must hold {{"names": [non-empty strings]}}')
    loss = meta.get("loss", "l1")
    if loss not in ("l1", "mse", "bce"):
        raise InvalidInput(f"MAGEC: {js.name}: loss must be 'l1', 'mse' or 'bce', got {loss!r}")
    rng = meta.get("range", [0.0, 1.0])
    if rng is not None:
        try:
            lo, hi = (float(v) for v in rng)
        except (TypeError, ValueError):
            raise InvalidInput(f"MAGEC: {js.name}: range must be [lo, hi] or null, got {rng!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InvalidInput(f"MAGEC: {js.name}: range must be finite with lo < hi, got {rng!r}")
        rng = (lo, hi)
    try:
        net = torch.jit.load(str(pt), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise InvalidInput(f"MAGEC: {pt.name} is not a TorchScript module ({exc.__class__.__name__})") from None
    for p in net.parameters():
        p.requires_grad_(False)
    return Descriptor(net, tuple(names), loss, rng, f"{pt.name}")


def check_descriptor_output(descriptor: Descriptor, out: torch.Tensor) -> torch.Tensor:
    """Raise :class:`InvalidInput` unless ``out`` is ``(N, K)`` finite; returns it."""
    k = len(descriptor.names)
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[1] != k:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise InvalidInput(f"descriptor {descriptor.source or ''} returned {shape}, expected (N, {k}) "
                           f"for its {k} names")
    if not torch.isfinite(out).all():
        raise InvalidInput(f"descriptor {descriptor.source or ''} returned NaN or infinite values")
    return out


def descriptor_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The descriptor's training loss per sample ``(N,)`` (mean over the K outputs): L_F in Eq. 2."""
    if kind == "l1":
        return (pred - target).abs().mean(-1)
    if kind == "mse":
        return (pred - target).square().mean(-1)
    if kind == "bce":
        p = pred.clamp(1e-6, 1 - 1e-6)
        return -(target * p.log() + (1 - target) * (1 - p).log()).mean(-1)
    raise InvalidInput(f"descriptor loss must be 'l1', 'mse' or 'bce', got {kind!r}")


# --- LinkNet -------------------------------------------------------------------------------------------------

class LinkNet(nn.Module):
    """Linear map from ``ws`` ``(N,num_ws,w_dim)`` to descriptor outputs ``(N,K)``.

    ``rows="flat"``: ``A·vec(ws − w_mean) + b`` (one weight block per W+ row); ``rows="mean"``:
    ``A·mean_rows(ws − w_mean) + b``.  ``output``: "clamp" (clamped to ``output_range``), "sigmoid" (rescaled to
    ``output_range`` (logistic regression, for bounded descriptors such as probabilities)."""

    def __init__(self, num_ws: int, w_dim: int, num_outputs: int, rows: str = "flat", output: str = "sigmoid",
                 output_range: Optional[tuple] = (0.0, 1.0), w_mean: Optional[torch.Tensor] = None):
        super().__init__()
        if rows not in ("flat", "mean"):
            raise InvalidInput(f"LinkNet rows must be 'flat' or 'mean', got {rows!r}")
        if output not in ("clamp", "sigmoid", "linear"):
            raise InvalidInput(f"LinkNet output must be 'clamp', 'sigmoid' or 'linear', got {output!r}")
        if output != "linear" and output_range is None:
            output = "linear"  # an unbounded descriptor: nothing to clamp or squash to
        self.num_ws, self.w_dim, self.num_outputs, self.rows, self.output = num_ws, w_dim, num_outputs, rows, output
        self.output_range = None if output_range is None else (float(output_range[0]), float(output_range[1]))
        n_in = num_ws * w_dim if rows == "flat" else w_dim
        self.linear = nn.Linear(n_in, num_outputs)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("w_mean", torch.zeros(w_dim) if w_mean is None else w_mean.detach().float().reshape(w_dim))

    def features(self, ws: torch.Tensor) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise InvalidInput(f"LinkNet expects ws (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        x = ws - self.w_mean
        return x.flatten(1) if self.rows == "flat" else x.mean(1)

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        return self.activate(self.linear(self.features(ws)))

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.output == "linear":
            return y
        lo, hi = self.output_range
        return lo + (hi - lo) * torch.sigmoid(y) if self.output == "sigmoid" else y.clamp(lo, hi)

    def config(self) -> dict:
        return {"num_ws": self.num_ws, "w_dim": self.w_dim, "num_outputs": self.num_outputs, "rows": self.rows,
                "output": self.output, "output_range": None if self.output_range is None else list(self.output_range)}


@torch.no_grad()
def linknet_samples(G, descriptor: Descriptor, n: int, seed: int = 0, mix_prob: float = 0.5, batch: int = 128,
                    cancel: CancelLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ws (n,num_ws,w_dim), d (n,K))``: mapped ``z ~ N(0,I)`` (seeded); a ``mix_prob`` share style-mixed
    (rows from a random crossover on come from a second code), ``d = F(G(ws))`` on images clamped to [-1,1]."""
    if int(n) < 2:
        raise InvalidInput(f"LinkNet needs at least 2 samples, got {n}")
    gen = torch.Generator().manual_seed(seed)
    device = G.w_avg.device
    out_w, out_d = [], []
    for i in range(0, int(n), batch):
        check_cancel(cancel)
        m = min(batch, int(n) - i)
        z = torch.randn(2, m, G.z_dim, generator=gen).to(device)
        w1, w2 = G.mapping(z[0]), G.mapping(z[1])
        cut = torch.randint(1, max(2, G.num_ws), (m,), generator=gen).to(device)
        mixed = (torch.rand(m, generator=gen) < mix_prob).to(device)
        rows = torch.arange(G.num_ws, device=device)[None]
        take2 = (rows >= cut[:, None]) & mixed[:, None]
        ws = torch.where(take2[..., None], w2, w1)
        img = G.synthesis(ws, noise_mode="const").clamp(-1, 1)
        out_w.append(ws.float().cpu())
        out_d.append(check_descriptor_output(descriptor, descriptor(img)).float().cpu())
    return torch.cat(out_w), torch.cat(out_d)


def train_linknet(ws: torch.Tensor, d: torch.Tensor, loss: str = "l1", rows: str = "flat", output: str = "sigmoid",
                  output_range: Optional[tuple] = (0.0, 1.0), steps: int = 400, lr: float = 3e-4,
                  ridge: float = 1e-3, cancel: CancelLike = None) -> LinkNet:
    """Fit a :class:`LinkNet` to pairs ``ws (n,num_ws,w_dim)``, ``d (n,K)`` with the descriptor's ``loss``.

    A ridge least-squares start (on logits for a sigmoid output), then ``steps`` full-batch Adam steps on ``loss``."""
    n, num_ws, w_dim = ws.shape
    net = LinkNet(num_ws, w_dim, d.shape[1], rows, output, output_range, w_mean=ws[:, 0].mean(0))
    x = net.features(ws).double()
    if net.output == "sigmoid":
        lo, hi = net.output_range
        p = ((d.double() - lo) / (hi - lo)).clamp(0.02, 0.98)
        y = torch.log(p / (1 - p))
    else:
        y = d.double()
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    cov = xc.T @ xc / n
    lam = ridge * float(torch.diagonal(cov).mean())
    A = torch.linalg.solve(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype), xc.T @ (y - ym) / n)  # (F,K)
    with torch.no_grad():
        net.linear.weight.copy_(A.T.float())
        net.linear.bias.copy_((ym - xm @ A).float())
    if steps > 0:
        opt = torch.optim.Adam(net.linear.parameters(), lr=lr)
        xf = x.float()
        for _ in range(int(steps)):
            check_cancel(cancel)
            l = descriptor_loss(net.activate(net.linear(xf)), d, loss).mean()
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def linknet_path_for(checkpoint) -> pathlib.Path:
    """``face64.pt`` -> ``face64.linknet.pt`` beside it."""
    p = pathlib.Path(checkpoint)
    return p.with_name(p.stem + LINKNET_SUFFIX)


@dataclass
class LinkNetOptions:
    """How the LinkNet is fitted.  The paper (§3.1) gives neither N nor the optimiser; these are ours."""

    rows: str = "flat"  # ours, measured: see the module docstring (bench/magec.py --linknet-study)
    output: str = "sigmoid"  # ours, measured: see the module docstring (the paper's BCE LinkNet is a logistic one)
    mix_prob: float = 0.5  # ours: share of style-mixed samples, so each W+ row's block is identifiable
    seed: int = 2021  # ours: a seed no other fit of the embedded model uses
    steps: int = 400  # ours: Adam steps on the descriptor's loss after the ridge start (held-out L1 flat by then)
    lr: float = 3e-4  # ours: 1e-2 diverges on the 1280 flattened inputs; 3e-4 and 1e-3 end within 0.0002
    ridge: float = 1e-3  # ours: relative to the mean feature variance


def _cache_key(G, descriptor: Descriptor, n: int, o: LinkNetOptions) -> dict:
    from core.stylegan2.formats import fingerprint

    return {"generator": fingerprint(G), "descriptor": descriptor.fingerprint(), "n": int(n), "rows": o.rows,
            "output": o.output, "mix_prob": float(o.mix_prob), "seed": int(o.seed), "steps": int(o.steps)}


def _load_cached(path: pathlib.Path, key: dict) -> Optional[LinkNet]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache is refitted and overwritten
        return None
    if not isinstance(obj, dict) or obj.get("format") != LINKNET_FORMAT or obj.get("key") != key:
        return None
    cfg = obj["config"]
    net = LinkNet(cfg["num_ws"], cfg["w_dim"], cfg["num_outputs"], cfg["rows"], cfg["output"],
                  None if cfg["output_range"] is None else tuple(cfg["output_range"]))
    net.load_state_dict(obj["state_dict"])
    return net.eval().requires_grad_(False)


def fit_linknet(G, descriptor: Descriptor, n: int = 8192, options: Optional[LinkNetOptions] = None,
                cache_path=None, cancel: CancelLike = None) -> LinkNet:
    """A :class:`LinkNet` for ``G`` and ``descriptor`` fitted on ``n`` generated pairs (paper §3.1).

    With ``cache_path`` (normally :func:`linknet_path_for` of the checkpoint) a cached fit is reused when the
    generator's fingerprint (``core.stylegan2.formats.fingerprint``), the descriptor's and the settings match;
    otherwise the fit is saved there (``torch.save`` of tensors and plain data; loaded with
    ``weights_only=True``).  A cache that cannot be written is skipped silently (the fit is returned)."""
    o = options or LinkNetOptions()
    key = _cache_key(G, descriptor, n, o) if cache_path is not None else None
    if cache_path is not None and pathlib.Path(cache_path).is_file():
        net = _load_cached(pathlib.Path(cache_path), key)
        if net is not None:
            return net
    ws, d = linknet_samples(G, descriptor, n, o.seed, o.mix_prob, cancel=cancel)
    net = train_linknet(ws, d, descriptor.loss, o.rows, o.output, descriptor.output_range, o.steps, o.lr, o.ridge,
                        cancel=cancel)
    if cache_path is not None:
        try:
            torch.save({"format": LINKNET_FORMAT, "version": 1, "key": key, "config": net.config(),
                        "names": list(descriptor.names),
                        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}},
                       pathlib.Path(cache_path))
        except OSError:
            pass  # read-only model folder: keep the fit in memory only
    return net


# --- edits and the MAGEC loss (Eq. 2) ------------------------------------------------------------------------

@dataclass(frozen=True)
class MagecEdit:
    """Edit i of Eq. 2: the W+ offset ``(num_ws,w_dim)`` applied to the latent and the matching move of the
    descriptor (output ``index`` shifted by ``shift``, clamped to the descriptor's range)."""

    name: str
    index: int
    shift: float
    offset: torch.Tensor


def magec_edits(directions: Mapping, names: Sequence[str], num_ws: int, w_dim: int, strength: float = 3.0,
                unit: Optional[float] = None) -> list:
    """InterfaceGAN add/remove (``±strength``) for every descriptor name that has a W-space direction.

    ``unit`` is the descriptor change per unit of strength (default ``core.demo.directions.UNIT``, the
    convention of the shipped directions: one unit ≈ 1/6 of the attribute's [0,1] range).  Raises
    :class:`InvalidInput` when no name has a direction."""
    if unit is None:
        from core.demo.directions import UNIT as unit
    edits = []
    for k, name in enumerate(names):
        d = directions.get(name)
        if d is None or getattr(d, "space", "w") != "w":
            continue
        for s in (float(strength), -float(strength)):
            edits.append(MagecEdit(name, k, s * float(unit), d.delta(s, num_ws, w_dim).float()))
    if not edits:
        raise InvalidInput("MAGEC needs edit directions named like the descriptor's attributes "
                           f"({', '.join(names[:5])}{', …' if len(names) > 5 else ''}); none of the model's "
                           f"directions ({', '.join(sorted(directions)[:5]) or 'none'}) matches")
    return edits


def edited_descriptors(d: torch.Tensor, edits: Sequence[MagecEdit], output_range: Optional[tuple] = (0.0, 1.0)):
    """``d_{e_i}`` ``(N,E,K)``: ``d (N,K)`` with output ``index`` moved by ``shift``, clamped to the range."""
    shift = torch.zeros(len(edits), d.shape[1], dtype=d.dtype, device=d.device)
    for i, e in enumerate(edits):
        shift[i, e.index] = e.shift
    out = d[:, None] + shift[None]
    if output_range is not None:
        out = out.clamp(output_range[0], output_range[1])
    return out


def magec_loss(linknet: LinkNet, ws: torch.Tensor, d: torch.Tensor, edits: Sequence[MagecEdit],
               loss: str = "l1", output_range: Optional[tuple] = (0.0, 1.0)) -> torch.Tensor:
    """Eq. 2 per image ``(N,)``: ``L_F(LinkNet(ws), d) + mean_i L_F(LinkNet(e_i(ws)), d_{e_i})``.

    ``ws (N,num_ws,w_dim)`` (gradients flow to it), ``d (N,K)`` = F(x_real), ``edits`` from :func:`magec_edits`."""
    n = ws.shape[0]
    base = descriptor_loss(linknet(ws), d, loss)
    if not edits:
        return base
    offsets = torch.stack([e.offset for e in edits]).to(ws)  # (E,L,D)
    edited = (ws[:, None] + offsets[None]).reshape(n * len(edits), *ws.shape[1:])
    pred = linknet(edited).reshape(n, len(edits), -1)
    target = edited_descriptors(d, edits, output_range)
    return base + descriptor_loss(pred, target, loss).mean(1)


# --- the inversion (Eq. 3) -----------------------------------------------------------------------------------

@dataclass
class PhaseWeights:
    """The λ of Eq. 3 in one phase."""

    mse: float
    lpips: float
    magec: float


# λ_MAGEC: the paper's 3e-4 (§4) multiplies the BCE of 40 CelebA attributes on a 512-d FFHQ W+; ours is a
# 13-attribute L1 scorer on a 128-d, 10-row W+, so the value was measured again on tuning faces
# (`python bench/magec.py --tune`: sample_params seed 1920, 4 faces, 200 steps; ECS on smile, eye openness and
# glasses at ±2; never the bench's faces):
#     λ_MAGEC   MSE      edit-delta   ECS lpips / mse
#     0         0.0045   0.385        0.41 / 0.48      (the W+ ablation)
#     3e-4      0.0038   0.418        0.48 / 0.54
#     3e-3      0.0040   0.412        0.58 / 0.64
#     3e-2      0.0054   0.391        0.45 / 0.49
#     0.1       0.0074   0.359        0.79 / 0.83
#     0.3       0.0190   0.131        0.87 / 1.03
#     1         0.0677   -0.279       1.20 / 1.48
# Raised in phase 1 only — the paper's footnote 1: a higher relative MAGEC weight first steers the code to the
# semantically right area, then reconstruction takes over (`python bench/magec.py --tune phase1`, same faces and
# settings, phase 2 at 3e-4; "LinkNet L1": Eq. 2's first term at the end, the code's latent-level reading vs F(x)):
#     λ_MAGEC phase 1   MSE      edit-delta   ECS lpips / mse   LinkNet L1
#     0 (W+ ablation)   0.0045   0.385        0.41 / 0.48       0.174
#     3e-4 (paper)      0.0038   0.418        0.48 / 0.54       0.016
#     3e-2              0.0052   0.387        0.42 / 0.46       0.037
#     0.3               0.0163   0.178        0.83 / 0.95       0.061
#     3                 0.1159   -0.443       1.18 / 1.37       0.068
# No λ lowered ECS below the ablation's on these faces; larger λ cost reconstruction and edit fidelity, and the
# paper's 3e-4 gave the best MSE and edit-delta score, so it stays (no other value measured better).  Why the
# consistency term does not buy editability here: at 3e-4 its gradient on the code is ~1 % of the LPIPS term's
# (0.17·3e-4 against 0.004–0.006 at the mean W, two tuning faces), yet Adam's per-coordinate scaling lets it move
# the code — the LinkNet reading error falls from 0.17 (W+) to 0.016 at no MSE cost — along directions the
# image barely shows, so ECS does not follow; a weight large enough to move the image costs reconstruction.
# What ECS measures here (bench/magec.py Table 3 columns, held-out faces, both methods alike): the ±2 edits change
# the 64 px image by MSE 3e-4–9e-4, the re-inversion leaves a residual of 0.9e-4–3.4e-4, and the re-inverted
# code lands 1.4–2.1 edit lengths from the edited one — W+'s freedom, which 13 LinkNet readings do not pin down.
MAGEC_WEIGHT = 3e-4


@dataclass
class MagecOptions:
    """MAGEC inversion settings (paper §4 "Training Protocol" unless marked ours)."""

    phase1_steps: int = 100  # §4: first part, 100 optimisation steps
    phase2_steps: int = 100  # §4: "another 100 optimization steps"
    # §4 phase 1: λ_MAGEC=3e-4, λ_LPIPS=0.5, λ_MSE=1e-3 (λ_MAGEC re-measured for our scorer: see MAGEC_WEIGHT)
    phase1: PhaseWeights = field(default_factory=lambda: PhaseWeights(mse=1e-3, lpips=0.5, magec=MAGEC_WEIGHT))
    # §4 phase 2: λ_MSE = λ_LPIPS = 0.5, "leaving the other loss coefficients unchanged"
    phase2: PhaseWeights = field(default_factory=lambda: PhaseWeights(mse=0.5, lpips=0.5, magec=MAGEC_WEIGHT))
    id_weight: float = 0.0  # §4: λ_ID=3e-4 with ArcFace; off here: no identity network (MagecResult.id_term says so)
    learning_rate: float = 0.07  # §4: "The learning rate begins at 0.07"
    lr_decay: float = 0.8  # §4: "exponentially decayed with a decay factor of 0.8 every 25 epochs"
    lr_decay_every: int = 25  # §4 (an "epoch" of a single-image optimisation is one step)
    betas: tuple = (0.9, 0.999)  # §4: Adam default parameters
    eps: float = 1e-8  # §4: ε = 1e-08
    w_avg_samples: int = 50_000  # §4: z_avg from N = 50000 samples (mapped: we start in W+ at the mean W)
    edit_strength: float = 3.0  # ours: add/remove = the shipped directions' range ends ±3 (±0.5 of [0,1]);
    #                             the paper adds/removes binary attributes with InterfaceGAN
    lpips_net: str = "alex"  # ours: the paper's LPIPS [36] names no backbone; AlexNet (LPIPS's default) costs
    #                          0.031 s per 64 px step against VGG's 0.127 (measured, 1 thread)
    space: str = "w+"  # §4: the code optimised is W+; "w": one W code shared by every row (PTI's pivot space).
    #                    Measured as a PTI pivot (4 tuning faces, sample_params seed 1920, 200 MAGEC steps, then PTI's
    #                    tuning; edit-delta score over the 13 attributes at ±2): MAGEC-W 0.79, MAGEC-W+ 0.78, PTI's own
    #                    W projection 0.83 (MSE 6.0e-4 / 5.5e-4 / 5.8e-4): W does not rescue the MAGEC schedule, so the
    #                    session's MAGEC pivot is PTI's own projection with the MAGEC term (magec_pivot_report)
    seed: int = 0  # ours: seeds the mean-W sampling
    preview_every: int = 10  # ours: a preview image every this many steps (and at the end)

    def total_steps(self) -> int:
        return int(self.phase1_steps) + int(self.phase2_steps)

    def with_steps(self, steps: Optional[int]) -> "MagecOptions":
        """A copy whose two phases split ``steps`` as the paper's 100 + 100 (phase 1 gets the odd step)."""
        if steps is None:
            return self
        steps = int(steps)
        if steps < 2:
            raise InvalidInput(f"MAGEC needs at least 2 steps (two phases), got {steps}")
        first = (steps * int(self.phase1_steps) + self.total_steps() - 1) // self.total_steps()
        return dataclasses.replace(self, phase1_steps=first, phase2_steps=steps - first)

    def without_magec(self) -> "MagecOptions":
        """The paper's "w/o MAGEC" ablation: the same schedule and image losses, λ_MAGEC = 0."""
        return dataclasses.replace(self, phase1=dataclasses.replace(self.phase1, magec=0.0),
                                   phase2=dataclasses.replace(self.phase2, magec=0.0))


def magec_learning_rate(step: int, o: MagecOptions) -> float:
    """§4: ``lr = 0.07 · 0.8^⌊step/25⌋``."""
    return o.learning_rate * o.lr_decay ** (int(step) // int(o.lr_decay_every))


@dataclass
class MagecResult:
    """What :func:`invert_magec_report` returns: the code and how it was made."""

    ws: torch.Tensor
    steps: int
    final_mse: float
    final_lpips: float
    final_magec: Optional[float]
    lpips_backbone: str
    id_term: str
    edits: int
    descriptor: str
    meta: dict = field(default_factory=dict)


def _validate(G, target, linknet, descriptor, o: MagecOptions):
    from core.projection import check_target

    target = check_target(G, target)
    if o.id_weight:
        raise InvalidInput("MAGEC's identity term needs an identity network, and none is available here; "
                           "set id_weight=0")
    if o.space not in ("w", "w+"):
        raise InvalidInput(f"MagecOptions.space must be 'w' or 'w+', got {o.space!r}")
    for name in ("learning_rate", "lr_decay"):
        v = float(getattr(o, name))
        if not (math.isfinite(v) and v > 0):
            raise InvalidInput(f"MagecOptions.{name} must be a positive number, got {v}")
    uses_magec = any(p.magec for p in (o.phase1, o.phase2))
    if uses_magec:
        if linknet is None or descriptor is None:
            raise InvalidInput("MAGEC needs a LinkNet and a descriptor (see core.magec.load_descriptor)")
        if (linknet.num_ws, linknet.w_dim) != (G.num_ws, G.w_dim) or linknet.num_outputs != len(descriptor.names):
            raise InvalidInput(f"the LinkNet ({linknet.num_ws}×{linknet.w_dim} -> {linknet.num_outputs}) does not "
                               f"fit this generator ({G.num_ws}×{G.w_dim}) and descriptor "
                               f"({len(descriptor.names)} outputs); fit it again with fit_linknet")
    return target, uses_magec


def invert_magec_report(G, target: torch.Tensor, linknet: Optional[LinkNet], descriptor: Optional[Descriptor],
                        directions: Optional[Mapping], steps: Optional[int] = None,
                        options: Optional[MagecOptions] = None, progress: ProgressFn = None,
                        cancel: CancelLike = None) -> MagecResult:
    """MAGEC W+ inversion of ``target`` ``(N,3,R,R)`` in [-1,1] (N=1 in sessions; N>1 inverts each image
    independently, as N separate runs would); see :func:`invert_magec`."""
    from core.losses import ImageLoss, perceptual_loss
    from core.projection import w_statistics

    o = (options or MagecOptions()).with_steps(steps)
    target, uses_magec = _validate(G, target, linknet, descriptor, o)
    total = o.total_steps()
    n, device = target.shape[0], target.device
    lpips = perceptual_loss(o.lpips_net, device)
    loss_fn = ImageLoss(target, None, lpips, lpips_weight=1.0, l2_weight=0.0)
    edits, d = [], None
    if uses_magec:
        edits = magec_edits(directions or {}, descriptor.names, G.num_ws, G.w_dim, o.edit_strength)
        with torch.no_grad():
            d = check_descriptor_output(descriptor, descriptor(target)).float()
        linknet = linknet.to(device)
        edits = [MagecEdit(e.name, e.index, e.shift, e.offset.to(device)) for e in edits]
    w_avg, _ = w_statistics(G, o.w_avg_samples, o.seed)
    code = w_avg.to(device).repeat(n, 1 if o.space == "w" else G.num_ws, 1).requires_grad_(True)
    opt = torch.optim.Adam([code], lr=o.learning_rate, betas=tuple(o.betas), eps=o.eps)
    mse_v = lp_v = mg_v = float("nan")
    for step in range(total):
        check_cancel(cancel)
        lam = o.phase1 if step < o.phase1_steps else o.phase2
        for group in opt.param_groups:
            group["lr"] = magec_learning_rate(step, o)
        ws = code.expand(n, G.num_ws, code.shape[-1])
        x = G.synthesis(ws, noise_mode="const")
        _, lp, mse = loss_fn(x)
        loss = lam.mse * mse + lam.lpips * lp
        mg = None
        if lam.magec:
            mg = magec_loss(linknet, ws, d, edits, descriptor.loss, descriptor.output_range)
            loss = loss + lam.magec * mg
        (grad,) = torch.autograd.grad(loss.sum(), [code])
        code.grad = grad
        opt.step()
        mse_v, lp_v = float(mse.detach().mean()), float(lp.detach().mean())
        mg_v = None if mg is None else float(mg.detach().mean())
        if progress is not None:
            show = step == total - 1 or (o.preview_every and step % o.preview_every == 0)
            report_step(progress, "project", step + 1, total, float(loss.detach().mean()), x if show else None)
    return MagecResult(
        ws=code.detach().expand(n, G.num_ws, code.shape[-1]).clone(), steps=total, final_mse=mse_v,
        final_lpips=lp_v, final_magec=mg_v,
        lpips_backbone=lpips.backbone_name, edits=len(edits),
        id_term="off: no identity network available (paper: ArcFace, λ_ID=3e-4)",
        descriptor=descriptor.source if (uses_magec and descriptor is not None) else "unused (λ_MAGEC=0)",
        meta={"phase_steps": [o.phase1_steps, o.phase2_steps], "space": o.space, "phase1": vars(o.phase1).copy(),
              "phase2": vars(o.phase2).copy(), "learning_rate": o.learning_rate, "edit_strength": o.edit_strength,
              "lpips_net": o.lpips_net, "linknet": None if linknet is None else linknet.config()})


# λ of the MAGEC term (Eq. 2, the LinkNet readings' L1 over the 13 attributes) added to PTI's own W projection for
# the session's MAGEC pivot (magec_pivot_report).  Ours: the paper inverts into W+ and names no PTI pivot; a W+
# MAGEC pivot then PTI's tuning edited worse than PTI's own W pivot (see MagecOptions.space), so the pivot keeps
# PTI's projection (450 steps, its losses, noise and schedule) and adds the consistency term to every step.
# Measured (4 tuning faces, sample_params seed 1920 — not a bench face; 450 W steps then PTI's 350 tuning steps;
# edit-delta score over the 13 attributes at ±2; MSE after tuning):
#     λ       pivot MSE   LinkNet L1   MSE after PTI   edit-delta
#     0       0.0064      0.254        5.8e-4          0.828     (PTI's own W pivot)
#     0.01    0.0054      0.137        5.7e-4          0.831     <- the default
#     0.1     0.0089      0.033        6.1e-4          0.830
#     1       0.0511      0.031        1.2e-3          0.800
# A small gain: the term pulls the W code towards the descriptor's reading (LinkNet L1 halves at 0.01) without
# costing reconstruction; at 1 it fights the image loss.
MAGEC_PIVOT_WEIGHT = 1e-2


def magec_pivot_report(G, target: torch.Tensor, linknet: Optional[LinkNet], descriptor: Optional[Descriptor],
                       directions: Optional[Mapping], steps: int = 450, mask: Optional[torch.Tensor] = None,
                       weight: float = MAGEC_PIVOT_WEIGHT, edit_strength: float = 3.0, options=None,
                       progress: ProgressFn = None, cancel: CancelLike = None) -> MagecResult:
    """PTI's MAGEC pivot: PTI's W projection (``core.projection.project``, ``options`` a ``ProjectOptions``,
    ``mask`` as there) of ``target`` ``(1,3,R,R)`` in [-1,1] with ``weight`` × the MAGEC loss (Eq. 2, edits
    from ``directions`` at ±``edit_strength``) added to every step.  Returns the ``(1,num_ws,w_dim)`` code
    (identical rows) with how it was made; ``G`` is not modified."""
    from core.projection import ProjectOptions, project

    if not (math.isfinite(float(weight)) and weight >= 0):
        raise InvalidInput(f"the MAGEC pivot's weight must be a finite number >= 0, got {weight}")
    target, _ = _validate(G, target, linknet, descriptor, MagecOptions())
    edits = magec_edits(directions or {}, descriptor.names, G.num_ws, G.w_dim, edit_strength)
    edits = [MagecEdit(e.name, e.index, e.shift, e.offset.to(target.device)) for e in edits]
    with torch.no_grad():
        d = check_descriptor_output(descriptor, descriptor(target)).float()
    linknet = linknet.to(target.device)

    def consistency(ws):
        return float(weight) * magec_loss(linknet, ws, d, edits, descriptor.loss, descriptor.output_range)

    o = options or ProjectOptions()
    ws = project(G, target, space="w", steps=steps, mask=mask, progress=progress, cancel=cancel, options=o,
                 latent_loss=consistency if weight else None)
    with torch.no_grad():
        final = float(magec_loss(linknet, ws, d, edits, descriptor.loss, descriptor.output_range).mean())
    return MagecResult(ws=ws, steps=int(steps), final_mse=float("nan"), final_lpips=float("nan"),
                       final_magec=final, lpips_backbone=o.lpips_net,
                       id_term="off: no identity network available (paper: ArcFace, λ_ID=3e-4)", edits=len(edits),
                       descriptor=descriptor.source, meta={"space": "w", "weight": float(weight),
                                                           "edit_strength": float(edit_strength)})


def invert_magec(G, target: torch.Tensor, linknet: Optional[LinkNet], descriptor: Optional[Descriptor],
                 directions: Optional[Mapping], steps: Optional[int] = None, options: Optional[MagecOptions] = None,
                 progress: ProgressFn = None, cancel: CancelLike = None) -> torch.Tensor:
    """Invert ``target`` ``(1,3,R,R)`` in [-1,1] into ``ws`` ``(1,num_ws,w_dim)`` with the MAGEC loss (Eq. 3).

    ``linknet`` from :func:`fit_linknet`, ``descriptor`` from :func:`load_descriptor`, ``directions`` the model's
    ``{name: Direction}`` (``core.edits.load_directions``; those named like descriptor outputs are the edits).
    ``steps`` (default 200) is split over the two phases as the paper's 100 + 100.  ``progress`` receives a
    ``core.common.ProgressEvent`` after every step (a preview every ``options.preview_every`` steps);
    ``cancel`` is checked before every step.  ``G`` is not modified.  With ``options.without_magec()`` this is
    the paper's W+ ablation (same schedule, no LinkNet needed)."""
    return invert_magec_report(G, target, linknet, descriptor, directions, steps, options, progress, cancel).ws


def main(argv=None) -> int:
    """``python -m core.magec [CHECKPOINT]``: fit the LinkNet cached beside ``CHECKPOINT`` (default: the embedded
    model) — the one command to redo after the generator or its descriptor changes (a matching cache is reused)."""
    import argparse
    import sys
    import time

    from core.common import LatentEditError

    parser = argparse.ArgumentParser(prog="python -m core.magec",
                                     description="fit MAGEC's LinkNet beside a generator checkpoint")
    parser.add_argument("checkpoint", nargs="?", default=None, help="generator checkpoint (default: embedded)")
    parser.add_argument("--n", type=int, default=8192, help="generated (latent, descriptor) fitting pairs")
    args = parser.parse_args(argv)
    from core.demo import default_model_path
    from core.stylegan2.formats import load_generator

    path = pathlib.Path(args.checkpoint) if args.checkpoint else default_model_path()
    try:
        G = load_generator(path).eval().requires_grad_(False)
        desc = load_descriptor(path)
        out = linknet_path_for(path)
        t0 = time.perf_counter()
        net = fit_linknet(G, desc, n=args.n, cache_path=out)
        secs = time.perf_counter() - t0
        ws, d = linknet_samples(G, desc, 512, seed=77, mix_prob=0.0)  # held out: not the fit's seed
    except LatentEditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with torch.no_grad():
        err = float(descriptor_loss(net(ws), d, desc.loss).mean())
    where = str(out) if out.is_file() else "memory only (the model folder is not writable)"
    print(f"LinkNet for {path.name} ({desc.source}): {where} in {secs:.0f} s; "
          f"held-out {desc.loss} to the descriptor {err:.4f} on 512 W samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
