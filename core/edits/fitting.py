"""Directions computed from a generator (``core.edits.fitting``): :func:`sefa` (Shen & Zhou 2021, closed form),
:func:`ganspace` (Härkönen et al. 2020, PCA of W) and :func:`fit_interfacegan` (Shen et al. 2020, linear
boundary).  These set ``scale`` to the standard deviation of W along the direction, so strength is in standard
deviations of the latent distribution for all of them (range ±3 covers it).  Also StyleSpace calibration
(:func:`style_std`, :func:`s_in_std_units`) and InterfaceGAN's conditional manipulation (:func:`condition`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from core.edits.directions import Direction, DirectionError, _check_layers
from core.edits.formats import _components

@torch.no_grad()
def style_std(G, n_samples: int = 2048, seed: int = 0) -> list:
    """Per-channel std of every style layer's affine output over W samples: ``[(C_in,) tensor]`` in
    ``G.style_layers()`` order (affine weights are used × 1/√w_dim; the bias does not change the spread)."""
    w = sample_w(G, n_samples, seed=seed)
    gain = 1.0 / math.sqrt(G.w_dim)
    return [(w @ layer.affine_weight.detach().float().cpu().T * gain).std(dim=0) for layer in G.style_layers()]


def s_in_std_units(direction: Direction, G, n_samples: int = 2048, seed: int = 0) -> Direction:
    """A copy of an S-space direction whose deltas are multiplied by their channel's style std, so one unit
    of strength is one standard deviation of that channel (StyleSpace, Wu et al. 2021, §4 edits in std steps)."""
    if direction.space != "s":
        raise DirectionError(f"{direction.name!r} is not an S-space direction")
    dims = [int(layer.affine_weight.shape[0]) for layer in G.style_layers()]
    direction.check(G.num_ws, G.w_dim, dims)
    stds = style_std(G, n_samples, seed)
    edits = [(layer, channel, delta * float(stds[layer][channel])) for layer, channel, delta in direction.s_edits]
    return dataclasses.replace(direction, s_edits=edits)


@torch.no_grad()
def sample_w(G, n: int, seed: int = 0, truncation_psi: float = 1.0, batch: int = 4096) -> torch.Tensor:
    """``(n, w_dim)`` W samples ``mapping(z)``, z ~ N(0, I) from a seeded generator (deterministic)."""
    gen = torch.Generator().manual_seed(int(seed))
    device = G.w_avg.device
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), G.z_dim, generator=gen).to(device)
        out.append(G.mapping(z, truncation_psi=truncation_psi)[:, 0].float().cpu())
    return torch.cat(out)


def _ws_indices(G, layers) -> list:
    """``layers``: None (all), an inclusive (first, last) W+ row range, or a list of W+ row indices."""
    if layers is None:
        return list(range(G.num_ws))
    if isinstance(layers, tuple) and len(layers) == 2:
        first, last = _check_layers("sefa", layers, G.num_ws)
        return list(range(first, last + 1))
    idx = sorted({int(i) for i in layers})
    if not idx or idx[0] < 0 or idx[-1] >= G.num_ws:
        raise DirectionError(f"sefa: layers {layers!r} must be W+ rows in 0..{G.num_ws - 1}")
    return idx


@torch.no_grad()
def sefa(G, layers=None, k: int = 5, kinds: Sequence[str] = ("conv",), calibrate_samples: int = 2048,
         seed: int = 0, prefix: str = "sefa") -> dict:
    """SeFa (Shen & Zhou 2021): eigenvectors of ``AᵀA`` where A stacks the affine (modulation) weights of the
    style layers fed by the W+ rows ``layers`` (None = all; (first, last) inclusive; or a list), each output row
    normalised to unit length (genforce/sefa normalises the columns of the transposed weight). Only ``kinds``
    layers are used (SeFa uses the conv layers, not toRGB).

    Returns the top ``k`` as ``{f"{prefix}_{i}": Direction}`` in descending eigenvalue order; vectors are
    orthonormal, sign fixed so the largest-magnitude coordinate is positive; ``layers`` is the range used;
    ``scale`` is the std of W along the vector over ``calibrate_samples`` samples (1 when 0).
    """
    rows = _ws_indices(G, layers)
    weights = [layer.affine_weight.detach().double().cpu() for layer in G.style_layers()
               if layer.ws_index in rows and layer.kind in kinds]
    if not weights:
        raise DirectionError(f"sefa: no {'/'.join(kinds)} style layers are fed by W+ rows {rows}")
    A = torch.cat(weights, dim=0)  # (sum C_in, w_dim)
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    evals, evecs = torch.linalg.eigh(A.T @ A)  # ascending
    order = torch.argsort(evals, descending=True)
    k = max(1, min(int(k), A.shape[1]))
    vecs = evecs[:, order[:k]].T  # (k, w_dim)
    signs = torch.sign(vecs.gather(1, vecs.abs().argmax(dim=1, keepdim=True)))
    vecs = (vecs * signs).float()
    scales = _latent_std(G, vecs, calibrate_samples, seed)
    span = (rows[0], rows[-1]) if rows != list(range(G.num_ws)) else None
    out = {}
    for i in range(k):
        name = f"{prefix}_{i}"
        out[name] = Direction(name, vecs[i].clone(), layers=span, scale=scales[i],
                              description=f"SeFa eigenvector {i} (eigenvalue {float(evals[order[i]]):.3g}) "
                                          f"of W+ rows {rows[0]}-{rows[-1]}",
                              source="sefa")
    return out


def _latent_std(G, vecs: torch.Tensor, n: int, seed: int) -> list:
    if n <= 1:
        return [1.0] * vecs.shape[0]
    w = sample_w(G, n, seed=seed)
    return [float(s) for s in (w @ vecs.T).std(dim=0)]


def latent_sample_digest(G) -> str:
    """A cheap identity for a generator's mapping network (the GANSpace cache key): sha1 of W for 4 fixed z.
    Not :func:`core.stylegan2.formats.fingerprint` (sha256 of the architecture and all weights)."""
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(12345)).to(G.w_avg.device)
    with torch.no_grad():
        w = G.mapping(z)[:, 0].float().cpu().numpy()
    return hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest()


@torch.no_grad()
def ganspace(G, n_samples: int = 20_000, n_components: int = 10, seed: int = 0, cache_path=None,
             prefix: str = "pca") -> dict:
    """GANSpace (Härkönen et al. 2020): PCA of ``n_samples`` W samples (the paper uses 10⁶; 2·10⁴ settles the
    top components of small models). Returns ``{f"{prefix}_{i}": Direction}`` in descending variance order,
    vectors orthonormal, ``scale`` = the component's std, all layers. With ``cache_path`` (``.npz``) the PCA
    is stored and reused when samples, seed and the mapping network match."""
    fp = latent_sample_digest(G)
    data = None
    if cache_path is not None and pathlib.Path(cache_path).is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as z:
                if (str(z["fingerprint"]) == fp and int(z["n_samples"]) == n_samples and int(z["seed"]) == seed
                        and z["comp"].shape[0] >= n_components):
                    data = {"mean": z["mean"], "comp": z["comp"], "std": z["std"]}
        except Exception:
            data = None  # unreadable cache: recompute and overwrite
    if data is None:
        w = sample_w(G, n_samples, seed=seed).double()
        mean = w.mean(dim=0)
        x = w - mean
        cov = x.T @ x / max(1, n_samples - 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: min(n_components, w.shape[1])]
        comp = evecs[:, order].T
        signs = torch.sign(comp.gather(1, comp.abs().argmax(dim=1, keepdim=True)))
        comp = comp * signs
        data = {"mean": mean.float().numpy(), "comp": comp.float().numpy(),
                "std": evals[order].clamp_min(0).sqrt().float().numpy()}
        if cache_path is not None:
            pathlib.Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
            with open(cache_path, "wb") as f:
                np.savez(f, fingerprint=np.array(fp), n_samples=np.array(n_samples), seed=np.array(seed), **data)
    out = _components(data, n_components, prefix)
    for d in out.values():
        d.source = "ganspace"
    return out


@dataclasses.dataclass
class InterfaceGANOptions:
    method: str = "svm"           # InterfaceGAN train_boundary: linear SVM on the extremes ("ridge": regression on all)
    chosen_ratio: float = 0.02    # InterfaceGAN train_boundary: top/bottom 2% of samples
    split_ratio: float = 0.7      # InterfaceGAN train_boundary: 70% train, 30% validation
    c: float = 1.0                # sklearn SVC default C (squared hinge here, solved with L-BFGS)
    ridge: float = 1e-3           # ridge: L2 penalty relative to the mean feature variance


def fit_interfacegan(ws, scores, name: str = "attribute", options: Optional[InterfaceGANOptions] = None,
                     **fields) -> Direction:
    """InterfaceGAN (Shen et al. 2020): the unit normal of a linear boundary separating high from low
    ``scores`` in W. ``ws`` ``(N, w_dim)`` or ``(N, num_ws, w_dim)`` (row 0 is used), ``scores`` ``(N,)``.
    The normal points towards higher scores; ``scale`` = std of W along it; the validation accuracy (svm) or
    R² (ridge) is written into ``description`` when none is given."""
    opt = options or InterfaceGANOptions()
    w = torch.as_tensor(ws).detach().double().cpu()
    if w.ndim == 3:
        w = w[:, 0]
    s = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    if w.ndim != 2 or w.shape[0] != s.shape[0]:
        raise DirectionError(f"fit_interfacegan: ws {tuple(w.shape)} and scores {tuple(s.shape)} must have the same N")
    if not (torch.isfinite(w).all() and torch.isfinite(s).all()):
        raise DirectionError("fit_interfacegan: ws or scores contain NaN or infinite values")
    n = w.shape[0]
    if n < 10 or float(s.std()) == 0:
        raise DirectionError("fit_interfacegan: need at least 10 samples with varying scores")
    gen = torch.Generator().manual_seed(0)
    if opt.method == "ridge":
        mean_w, mean_s = w.mean(0), s.mean()
        x, y = w - mean_w, s - mean_s
        perm = torch.randperm(n, generator=gen)
        cut = max(2, int(n * opt.split_ratio))
        tr, va = perm[:cut], perm[cut:]
        lam = opt.ridge * float(x[tr].var(0).mean()) * len(tr)
        coef = torch.linalg.solve(x[tr].T @ x[tr] + lam * torch.eye(w.shape[1], dtype=w.dtype), x[tr].T @ y[tr])
        pred = x[va] @ coef
        quality = 1 - float(((pred - y[va]) ** 2).mean() / y[va].var()) if len(va) > 1 else float("nan")
        quality_txt = f"validation R² {quality:.3f}"
        normal = coef
    elif opt.method == "svm":
        chosen = max(2, int(n * opt.chosen_ratio))
        order = torch.argsort(s, descending=True)
        pos, neg = w[order[:chosen]], w[order[-chosen:]]
        x = torch.cat([pos, neg])
        y = torch.cat([torch.ones(chosen), -torch.ones(chosen)]).double()
        perm = torch.randperm(len(x), generator=gen)
        cut = max(2, int(len(x) * opt.split_ratio))
        tr, va = perm[:cut], perm[cut:]
        normal, bias = _linear_svm(x[tr], y[tr], opt.c)
        acc = float(((x[va] @ normal + bias).sign() == y[va]).double().mean()) if len(va) else float("nan")
        quality_txt = f"validation accuracy {acc:.3f}"
    else:
        raise DirectionError(f"fit_interfacegan: unknown method {opt.method!r} (svm, ridge)")
    norm = float(normal.norm())
    if norm == 0 or not math.isfinite(norm):
        raise DirectionError("fit_interfacegan: the scores do not depend linearly on W (zero normal)")
    normal = normal / norm
    scale = float((w @ normal).std())
    fields.setdefault("description", f"InterfaceGAN boundary normal for {name} ({quality_txt})")
    fields.setdefault("source", "interfacegan")
    return Direction(name, normal.float(), scale=scale, **fields)


@torch.no_grad()
def fit_attribute_directions(G, score_fn, n_samples: int = 2000, attributes: Optional[Sequence[str]] = None,
                             seed: int = 0, truncation_psi: float = 1.0, batch: int = 64,
                             options: Optional[InterfaceGANOptions] = None) -> dict:
    """InterfaceGAN directions for a scorer: sample ``n_samples`` W codes, render them (``noise_mode="const"``,
    clamped to [-1,1]), score them with ``score_fn(images (N,3,H,W) in [-1,1]) -> {attribute: (N,)}`` and fit
    one boundary per attribute (all the scorer returns, or ``attributes``). Returns ``{attribute: Direction}``."""
    w = sample_w(G, n_samples, seed=seed, truncation_psi=truncation_psi)
    device = G.w_avg.device
    scores: dict = {}
    for start in range(0, n_samples, batch):
        chunk = w[start:start + batch].to(device)
        img = G.synthesis(chunk[:, None].repeat(1, G.num_ws, 1)).clamp(-1, 1)
        for name, values in score_fn(img).items():
            scores.setdefault(name, []).append(torch.as_tensor(np.asarray(values), dtype=torch.float64).reshape(-1))
    names = list(attributes) if attributes is not None else list(scores)
    missing = [a for a in names if a not in scores]
    if missing:
        raise DirectionError(f"the scorer does not return {missing}; it returns {sorted(scores)}")
    return {a: fit_interfacegan(w, torch.cat(scores[a]), name=a, options=options) for a in names}


def _linear_svm(x: torch.Tensor, y: torch.Tensor, c: float):
    """L2-regularised squared-hinge linear SVM: min ½‖w‖² + C Σ max(0, 1 − y(w·x + b))²  (L-BFGS)."""
    mu = x.mean(0)
    xc = x - mu
    params = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        margin = 1 - y * (xc @ params[:-1] + params[-1])
        loss = 0.5 * params[:-1].pow(2).sum() + c * margin.clamp_min(0).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    wv = params[:-1].detach()
    return wv, float(params[-1].detach()) - float(mu @ wv)


def condition(direction: Direction, against: Iterable[Direction], name: Optional[str] = None) -> Direction:
    """InterfaceGAN's conditional manipulation: remove the components of ``direction`` along ``against``
    (Gram-Schmidt on 1-D W directions), renormalise to unit length and keep the latent std scale ratio."""
    if direction.space != "w" or direction.vector.ndim != 1:
        raise DirectionError(f"condition: {direction.name!r} must be a (w_dim,) W direction")
    basis = []
    for other in against:
        if other.space != "w" or other.vector.ndim != 1 or other.vector.shape != direction.vector.shape:
            raise DirectionError(f"condition: {other.name!r} must be a W direction of the same size")
        b = other.vector.double()
        for q in basis:
            b = b - (b @ q) * q
        if float(b.norm()) > 1e-8:
            basis.append(b / b.norm())
    v = direction.vector.double()
    norm0 = float(v.norm())
    for q in basis:
        v = v - (v @ q) * q
    if float(v.norm()) < 1e-8:
        raise DirectionError(f"condition: {direction.name!r} lies in the span of the others")
    v = v / v.norm() * norm0
    return dataclasses.replace(direction, name=name or direction.name, vector=v.float(),
                               description=(direction.description + " (conditioned)").strip())
