"""Ground-truth editability of the embedded default (issue 16 item 3): every inversion method against the renderer.

    python bench/editability.py [--quick | --medium] [--json PATH] [--methods W,PTI] [--threads N]
        [--faces N] [--extra-faces N] [--true-faces N] [--ecs-attributes smile,glasses | none] [--scales 1,4]

The embedded domain has a ground truth no photo has: the renderer.  A held-out face ``p`` is rendered, inverted
with each method through ``core.session.create_session(..., SessionOptions(method=..., align="none"))`` (the
path users get) and edited with a shipped direction at strength ``s``; the truth is the renderer's image of the
edited face, ``p`` with the attribute moved by ``s × core.demo.directions.UNIT`` and clamped to [0,1] (the
target the directions are refined to).  Per (face, method, attribute, strength), images in [-1,1]:

* ``total_mse``: MSE(edited result, true edited render) — what the user sees;
* ``score``: edit-delta score ``1 − MSE(edit delta − true delta) / MSE(true delta)`` (1 = the true edit,
  0 = no change, < 0 = a wrong change); deltas are against the unedited result and the unedited render;
* ``hit``: the scorer's change of the edited attribute ÷ the requested (clamped) move;
* ``leak``: the largest change of any other attribute ÷ the own change (scorer readings);
* ``err_in`` / ``err_out``: MSE of (edit delta − true delta) inside / outside the attribute's region: the pixels
  any part of ``core.demo.ATTRIBUTE_PARTS[attribute]`` touches in the part maps (``core.demo.render_parts`` of
  the unfiltered 4× drawing) of the face before or after the edit; 4× layers use it upsampled;
  ``true_in`` is the share of the true delta's energy inside the region (how well the region holds the edit);
* ``ecs_lpips`` / ``ecs_mse``: MAGEC's edit-consistency score (Grechka et al. 2021, Eq. 4; ``core.metrics.ecs``)
  ``2·d(p(x), x_cyc) / (d(p(x), x_edit) + d(x_edit, x_cyc))``: ``p(x)`` the unedited result, ``x_edit`` the edited
  result, ``x_cyc`` the edited result inverted again with the same method and edited back (``−s``); ``d`` the
  project's LPIPS (AlexNet; the JSON names the backbone) or MSE; 0 is perfect, > 1 worse than an edit's size;
* ``rec_mse`` / ``rec_lpips``: the inversion's reconstruction at generator resolution; ``seconds`` its wall time.

Rows: per method × layer scale (1 = the generator's 64 px; 4 = a 256 px layer, the upsampled-delta path, judged
against the renderer's 256 px render) × domain (in-domain, or with an extra from ``core.demo.EXTRAS``) ×
attribute group (small features: smile, mouth_open, eye_openness, gaze, eyebrow_height, glasses; large: the
rest), medians over the cases.  Row ``true latent`` needs no inversion: ``w = G.mapping(z)`` is edited directly
and ``G`` is judged against ``render(params_from_z(z))`` (4×: the render at 256 px plus the upsampled generator
delta) — the upper bound any inversion can reach; ECS is undefined there.  A second table gives the true latent
per attribute (the issue's yardstick: strength ±2, median over the held-out faces), a third the edit-delta score
per attribute and method (in-domain, 64 px).

Skipped cases, counted in ``skipped``: requests the attribute's range cannot hold (the clamped move is less than
half of ``s × UNIT``), and attribute/extra pairs where the extra covers more than half of the attribute's region.

Held-out faces: ``z = numpy.random.default_rng(HELD_OUT_SEED).standard_normal``; training renders its caches from
``default_rng(0)`` (train) and ``default_rng(1)`` (test) (core/demo/train.py, data.build_cache) and fits the
directions on torch seeds 123/321/99/7, so these faces were never seen.  The renderer, part maps, generator,
directions and scorer are taken through ``core.demo`` (``render``, ``render_parts``, ``default_model_path``, ...),
so a new embedded domain is measured by the same code.

Settings (``SETTINGS``): full = 16 in-domain faces (issue 16's count), 4 per extra, strengths ±1, ±2, ±3, every
method at its default steps (``core.session.METHOD_STEPS``), ECS for every attribute at ±2, both scales: hours on
2 CPU cores.  ``--medium``: 3 faces (4× on 2), 1 per extra, 50 projection steps (PTI 50 + 25 tuning; MAGEC 50), ECS at +2
on smile, glasses and hair_color of the in-domain faces at 64 px.  ``--quick`` (57 s wall on 2 idle cores, 2026-12-04):
1 face, 1 extra (face_paint), 10 projection steps (PTI 10 + 5; MAGEC 10, its phases split 5 + 5), strengths ±2, ECS at +2 on smile of the in-domain
face at 64 px, 4× on the in-domain face, 4 true-latent faces.  Few steps make every inverted row worse than the
methods' defaults would: compare methods within one setting only.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from _util import parse_args, print_table, write_json

HELD_OUT_SEED = 1616  # numpy seed of the held-out z; training uses default_rng(0) and default_rng(1)
SMALL_FEATURES = ("smile", "mouth_open", "eye_openness", "gaze", "eyebrow_height", "glasses")
MIN_MOVE = 0.5  # a request counts when the clamped move is at least this fraction of s × UNIT
MAX_OCCLUDED = 0.5  # skip an attribute/extra pair when the extra covers more of the attribute's region
FINE = 4  # part-map regions come from the unfiltered drawing at FINE × the image size

# Inversion methods: row name -> SessionOptions fields (align="none" is added).  A new method is one more entry.
METHODS: dict[str, dict] = {
    "W": {"method": "w"},
    "W+": {"method": "wplus"},
    "PTI": {"method": "pti"},
    "PTI+locality": {"method": "pti", "locality": True},
    "chunks": {"method": "chunks"},
    "magec": {"method": "magec"},
    "pti (magec pivot)": {"method": "pti", "pivot": "magec"},
    "encoder": {"method": "encoder"},
    "pti (encoder pivot)": {"method": "pti", "pivot": "encoder"},
}


@dataclass(frozen=True)
class Settings:
    """What one run measures; ``steps`` maps a SessionOptions method to (project, tune) (missing: its default)."""

    faces: int = 16                                   # issue 16: median over 16 held-out faces
    extra_faces: int = 4                              # the first faces again, with each extra
    extras: Optional[tuple] = None                    # None: every core.demo.EXTRAS
    strengths: tuple = (-3.0, -2.0, -1.0, 1.0, 2.0, 3.0)  # issue 16 item 3
    steps: dict = field(default_factory=dict)         # empty: core.session.METHOD_STEPS
    scales: tuple = (1, 4)                            # generator size and 4× layers
    scale4_faces: Optional[int] = None                # faces (in-domain first) also run at 4×; None: all
    ecs_strengths: tuple = (-2.0, 2.0)
    ecs_attributes: Optional[tuple] = None            # None: every attribute
    ecs_extras: bool = True                           # ECS also on faces with extras
    ecs_scale4: bool = True                           # ECS also on 4× layers
    true_faces: int = 16


SETTINGS = {
    "full": Settings(),
    "medium": Settings(faces=3, extra_faces=1, steps={"w": (50, 0), "wplus": (50, 0), "pti": (50, 25),
                                                      "chunks": (50, 0), "magec": (50, 0)},
                       scale4_faces=2, ecs_strengths=(2.0,), ecs_attributes=("smile", "glasses", "hair_color"),
                       ecs_extras=False, ecs_scale4=False),
    "quick": Settings(faces=1, extra_faces=1, extras=("face_paint",), strengths=(-2.0, 2.0),
                      steps={"w": (10, 0), "wplus": (10, 0), "pti": (10, 5), "chunks": (10, 0), "magec": (10, 0)},
                      scale4_faces=1, ecs_strengths=(2.0,), ecs_attributes=("smile",),
                      ecs_extras=False, ecs_scale4=False, true_faces=4),
}


# ------------------------------------------------------------------------------------------ pure scoring

def group_of(attribute: str) -> str:
    return "small" if attribute in SMALL_FEATURES else "large"


def edited_params(p: np.ndarray, k: int, strength: float, unit: float) -> tuple[np.ndarray, float]:
    """``p`` with attribute ``k`` moved by ``strength × unit``, clamped to [0,1]; returns (params, actual move)."""
    q = np.array(p, np.float32).copy()
    q[k] = np.clip(q[k] + strength * unit, 0.0, 1.0)
    return q, float(q[k] - np.float32(p[k]))


def saturated(move: float, strength: float, unit: float, min_fraction: float = MIN_MOVE) -> bool:
    """True when the clamped ``move`` is less than ``min_fraction`` of the requested ``strength × unit``."""
    return abs(move) < min_fraction * abs(strength * unit)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def delta_score(edit_delta: np.ndarray, true_delta: np.ndarray) -> float:
    """``1 − MSE(edit − true) / MSE(true)``; NaN when the true delta is zero."""
    ref = float(np.mean(np.square(np.asarray(true_delta, np.float64))))
    return float("nan") if ref == 0 else 1.0 - mse(edit_delta, true_delta) / ref


def target_hit(changes: np.ndarray, k: int, requested: float) -> float:
    """Own attribute change ÷ the requested move (scorer readings; 1 = exactly the request)."""
    return float(changes[k] / requested) if requested else float("nan")


def leak(changes: np.ndarray, k: int) -> float:
    """Largest |change| of another attribute ÷ |own change| (inf when the own attribute did not move)."""
    others = np.abs(np.delete(np.asarray(changes, np.float64), k))
    own = abs(float(changes[k]))
    top = float(others.max()) if len(others) else 0.0
    return top / own if own > 0 else (0.0 if top == 0 else float("inf"))


def region_split(err: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """Mean of the per-pixel error ``err`` (H,W) inside and outside ``region`` (H,W) bool (NaN where empty).
    ``inside × region.mean() + outside × (1 − region.mean())`` is the mean over the whole image."""
    err = np.asarray(err, np.float64)
    region = np.asarray(region, bool)
    inside = float(err[region].mean()) if region.any() else float("nan")
    outside = float(err[~region].mean()) if (~region).any() else float("nan")
    return inside, outside


def energy_inside(delta: np.ndarray, region: np.ndarray) -> float:
    """Share of ``Σ delta²`` ((H,W,C) or (H,W)) that lies inside ``region`` (NaN for a zero delta)."""
    e = np.square(np.asarray(delta, np.float64))
    e = e.sum(-1) if e.ndim == 3 else e
    total = float(e.sum())
    return float(e[np.asarray(region, bool)].sum() / total) if total > 0 else float("nan")


def touched(fine_labels: np.ndarray, ids: Sequence[int], factor: int = FINE) -> np.ndarray:
    """(H,W) bool: output pixels any drawing pixel of the labels ``ids`` touches, from (factor·H, factor·W)."""
    h, w = fine_labels.shape[0] // factor, fine_labels.shape[1] // factor
    return np.isin(fine_labels, list(ids)).reshape(h, factor, w, factor).any(axis=(1, 3))


def occluded_fraction(region: np.ndarray, cover: np.ndarray) -> float:
    """Share of ``region`` that ``cover`` hides (0 for an empty region)."""
    n = int(np.count_nonzero(region))
    return float(np.count_nonzero(region & cover) / n) if n else 0.0


def median(values) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(v)) if v else float("nan")


SUMMARY_COLUMNS = ("score", "total_mse", "hit", "leak", "err_in", "err_out", "true_in", "ecs_lpips", "ecs_mse",
                   "rec_mse", "rec_lpips", "seconds")


def summarise(records: Sequence[dict], keys: Sequence[str], columns: Sequence[str] = SUMMARY_COLUMNS) -> list[dict]:
    """One row per distinct ``keys`` value tuple (in first-seen order): ``n`` and the median of each column."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["n"] = len(rs)
        for c in columns:
            row[c] = median(r.get(c) for r in rs)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ the domain

@dataclass
class Domain:
    """The embedded default, taken through core.demo so a new renderer or model is measured unchanged."""

    G: object
    directions: dict
    scorer: object
    render: object
    render_parts: object
    parts: tuple
    attribute_parts: dict
    attributes: tuple
    extras: tuple
    unit: float
    lpips: object

    @classmethod
    def load(cls) -> "Domain":
        import core
        import core.demo as demo
        from core.demo.directions import UNIT
        from core.losses import perceptual_loss

        G = core.load_generator(demo.default_model_path()).eval()
        return cls(G=G, directions=core.load_directions(demo.default_model_path(), G=G), scorer=demo.load_scorer(),
                   render=demo.render, render_parts=demo.render_parts, parts=tuple(demo.PARTS),
                   attribute_parts=dict(demo.ATTRIBUTE_PARTS), attributes=tuple(demo.ATTRIBUTES),
                   extras=tuple(demo.EXTRAS), unit=float(UNIT), lpips=perceptual_loss("alex"))

    def image(self, p, extras=(), size: int = 64) -> np.ndarray:
        """(size,size,3) float32 in [-1,1]."""
        return self.render(p, extras=list(extras), size=size).astype(np.float32) / 127.5 - 1.0

    def fine_parts(self, p, extras=(), size: int = 64) -> np.ndarray:
        return self.render_parts(p, extras=list(extras), size=FINE * size, supersample=1)

    def part_ids(self, attribute: str) -> list[int]:
        return [self.parts.index(x) for x in self.attribute_parts[attribute]]

    def readings(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N,K) scorer readings of (H,W,3) images in [-1,1]."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return self.scorer(x).double().numpy()

    def distance(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        """(LPIPS, MSE) of two (H,W,3) images in [-1,1]."""
        x, y = _tensor(a), _tensor(b)
        with torch.no_grad():
            return float(self.lpips(x, y)[0]), mse(a, b)


def _tensor(img: np.ndarray) -> torch.Tensor:
    """(H,W,3) -> (1,3,H,W) float."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def _upsample(x: np.ndarray, k: int) -> np.ndarray:
    """(h,w,3) -> (k·h,k·w,3), bilinear like the session's upsampled-delta path."""
    if k == 1:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
    return F.interpolate(t, scale_factor=k, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


@dataclass
class Case:
    """One (attribute, strength) request on one face: the truth it is judged against."""

    attribute: str
    k: int
    strength: float
    move: float
    true: dict          # scale -> true edited render (H,W,3) in [-1,1]
    region: np.ndarray  # (64,64) bool at generator size


def build_cases(dom: Domain, p: np.ndarray, extras: tuple, scales, strengths, skipped: dict) -> tuple[dict, list]:
    """The unedited renders per scale and the cases to measure on face ``p`` (with ``extras``)."""
    res = int(dom.G.resolution)
    base = {k: dom.image(p, extras, res * k) for k in scales}
    fine0 = dom.fine_parts(p, extras, res)
    cover = None
    if extras:
        cover = touched(fine0, [dom.parts.index("extra")])
        plain = dom.fine_parts(p, (), res)
    cases = []
    for k_attr, name in enumerate(dom.attributes):
        ids = dom.part_ids(name)
        if extras and occluded_fraction(touched(plain, ids), cover) > MAX_OCCLUDED:
            skipped["occluded"] = skipped.get("occluded", 0) + len(strengths)
            continue
        for s in strengths:
            q, move = edited_params(p, k_attr, s, dom.unit)
            if saturated(move, s, dom.unit):
                skipped["saturated"] = skipped.get("saturated", 0) + 1
                continue
            region = touched(fine0, ids) | touched(dom.fine_parts(q, extras, res), ids)
            cases.append(Case(name, k_attr, float(s), move, {k: dom.image(q, extras, res * k) for k in scales}, region))
    return base, cases


def score_case(dom: Domain, case: Case, scale: int, out: np.ndarray, unedited: np.ndarray, base: np.ndarray,
               read_out: np.ndarray, read_unedited: np.ndarray) -> dict:
    """The per-case metrics of an edited result ``out`` against the truth (images (H,W,3) in [-1,1])."""
    true = case.true[scale]
    ed, td = out - unedited, true - base
    region = np.kron(case.region, np.ones((scale, scale), bool)) if scale > 1 else case.region
    err_in, err_out = region_split(np.square(ed - td).mean(-1), region)
    changes = read_out - read_unedited
    return {"attribute": case.attribute, "group": group_of(case.attribute), "strength": case.strength,
            "total_mse": mse(out, true), "score": delta_score(ed, td), "hit": target_hit(changes, case.k, case.move),
            "leak": leak(changes, case.k), "err_in": err_in, "err_out": err_out, "true_in": energy_inside(td, region)}


# ------------------------------------------------------------------------------------------ measurements

def true_latent(dom: Domain, z: np.ndarray, scales, strengths, skipped: dict) -> list[dict]:
    """Records of the ``true latent`` row: ``w = G.mapping(z)`` edited directly, no inversion."""
    from core.demo.data import params_from_z
    from core.edits import apply_edits

    G, res = dom.G, int(dom.G.resolution)
    params = params_from_z(z)
    out = []
    with torch.no_grad():
        ws = G.mapping(torch.from_numpy(z).float())
    for i, p in enumerate(params):
        base, cases = build_cases(dom, p, (), scales, strengths, skipped)
        w = ws[i:i + 1]
        with torch.no_grad():
            gen0 = G.synthesis(w, noise_mode="const").clamp(-1, 1)[0].permute(1, 2, 0).numpy()
            gens = [G.synthesis(apply_edits(w, [(c.attribute, c.strength)], dom.directions), noise_mode="const")
                    .clamp(-1, 1)[0].permute(1, 2, 0).numpy() for c in cases]
        reads = dom.readings([gen0] + gens)
        rec = dom.distance(gen0, dom.image(p, (), res))
        for scale in scales:
            if scale == 1:
                un, outs = gen0, gens
            else:  # the layer keeps the render's detail; the generator's delta is upsampled onto it
                un = base[scale]
                outs = [base[scale] + _upsample(g - gen0, scale) for g in gens]
            for c, o, r in zip(cases, outs, reads[1:]):
                rec_row = score_case(dom, c, scale, o, un, base[scale], r, reads[0])
                rec_row.update(method="true latent", scale=scale, domain="in-domain", face=i, rec_mse=rec[1],
                               rec_lpips=rec[0], seconds=0.0, ecs_lpips=float("nan"), ecs_mse=float("nan"))
                out.append(rec_row)
    return out


def _layer(img: np.ndarray) -> np.ndarray:
    """(H,W,3) in [-1,1] -> the session's (H,W,4) float32 RGBA layer in [0,1]."""
    rgb = np.clip((img + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    return np.concatenate([rgb, np.ones(rgb.shape[:2] + (1,), np.float32)], axis=2)


def _result(session, edits) -> np.ndarray:
    """The session's result layer for ``edits`` as (H,W,3) in [-1,1]."""
    return session.render(edits)[..., :3].astype(np.float32) * 2.0 - 1.0


def session_options(fields: dict, steps: dict):
    """The SessionOptions of a METHODS entry, or None when this core does not have one of its fields."""
    from core.session import SessionOptions

    known = {f.name for f in dataclasses.fields(SessionOptions)}
    if not set(fields) <= known:
        return None
    p, t = steps.get(fields["method"], (None, None))
    return SessionOptions(align="none", project_steps=p, tune_steps=t, **fields).validate()


def inverted(dom: Domain, method: str, opts, face: int, extras: tuple, scale: int, base: dict,
             cases: list, settings: Settings) -> list[dict]:
    """Records of one method on one face at one layer scale (one inversion, one more per ECS request)."""
    from core.metrics import ecs
    from core.session import create_session

    G = dom.G
    session = create_session(G, _layer(base[scale]), None, opts, directions=dom.directions, assets=_assets(opts))
    seconds = float(session.info["seconds"])
    inv = session.inversion
    with torch.no_grad():
        rec_img = inv.generated().clamp(-1, 1)[0].permute(1, 2, 0).cpu().numpy()
        target = inv.image[0].permute(1, 2, 0).cpu().numpy()
    rec = dom.distance(rec_img, target)
    unedited = _result(session, [])
    outs = [_result(session, [(c.attribute, c.strength)]) for c in cases]
    reads = dom.readings([unedited] + outs)
    want_ecs = (scale == 1 or settings.ecs_scale4) and (not extras or settings.ecs_extras)
    records = []
    for c, out, r in zip(cases, outs, reads[1:]):
        row = score_case(dom, c, scale, out, unedited, base[scale], r, reads[0])
        row.update(method=method, scale=scale, domain="+".join(extras) or "in-domain", face=face, rec_mse=rec[1],
                   rec_lpips=rec[0], seconds=seconds, ecs_lpips=float("nan"), ecs_mse=float("nan"))
        if want_ecs and c.strength in settings.ecs_strengths and (
                settings.ecs_attributes is None or c.attribute in settings.ecs_attributes):
            again = create_session(G, _layer(out), None, opts, directions=dom.directions, assets=_assets(opts))
            x, x_edit, x_cyc = _tensor(unedited), _tensor(out), _tensor(_result(again, [(c.attribute, -c.strength)]))
            row["ecs_lpips"] = float(ecs(x, x_edit, x_cyc, "lpips", net="alex")[0])
            row["ecs_mse"] = float(ecs(x, x_edit, x_cyc, "mse")[0])
        records.append(row)
    return records


# ------------------------------------------------------------------------------------------ main

def _extra_args(parser):
    parser.add_argument("--medium", action="store_true", help="the medium setting (see the module docstring)")
    parser.add_argument("--methods", default=None, help="comma-separated METHODS rows (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is ~10x faster than 2 on a shared, oversubscribed 2-core machine)")
    parser.add_argument("--true-faces", type=int, default=None, help="faces of the true-latent rows (0: none)")
    parser.add_argument("--faces", type=int, default=None, help="in-domain faces of the inverted rows")
    parser.add_argument("--extra-faces", type=int, default=None, help="faces per extra of the inverted rows")
    parser.add_argument("--records", action="store_true", help="also write every per-case record to the JSON")
    parser.add_argument("--ecs-attributes", default=None,
                        help="comma-separated attributes whose ECS is measured ('none': no ECS; default: the setting's)")
    parser.add_argument("--scales", default=None, help="comma-separated layer scales, e.g. 1 or 1,4 (default: the setting's)")


def main() -> int:
    args = parse_args(__doc__.strip().splitlines()[0], _extra_args)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "quick" if args.quick else "medium" if args.medium else "full"
    st = SETTINGS[name]
    for key in ("true_faces", "faces", "extra_faces"):
        if getattr(args, key) is not None:
            st = dataclasses.replace(st, **{key: getattr(args, key)})
    if args.ecs_attributes is not None:
        names = () if args.ecs_attributes == "none" else tuple(a.strip() for a in args.ecs_attributes.split(","))
        st = dataclasses.replace(st, ecs_attributes=names)
    if args.scales is not None:
        st = dataclasses.replace(st, scales=tuple(int(v) for v in args.scales.split(",")))
    t_start = time.perf_counter()
    dom = Domain.load()
    from core.demo.data import params_from_z

    methods = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    extras = tuple(st.extras if st.extras is not None else dom.extras)
    n_z = max(st.faces, st.true_faces)
    z = np.random.default_rng(HELD_OUT_SEED).standard_normal((n_z, int(dom.G.z_dim))).astype(np.float32)
    params = params_from_z(z)
    skipped: dict = {}
    records = true_latent(dom, z[:st.true_faces], st.scales, st.strengths, skipped) if st.true_faces else []
    notes = []
    faces = [(i, ()) for i in range(st.faces)] + [(i, (e,)) for e in extras for i in range(st.extra_faces)]
    options = {}
    for m in methods:
        opts = session_options(METHODS[m], st.steps)
        if opts is None:
            notes.append(f"{m}: left out, core.session.SessionOptions lacks one of {sorted(METHODS[m])}")
            continue
        if _assets(opts) is not None and _assets(opts).missing:
            notes.append(f"{m}: left out, {'; '.join(_assets(opts).missing.values())}")
            continue
        options[m] = opts
    for n_face, (i, ex) in enumerate(faces):
        face_scales = [k for k in st.scales if k == 1 or st.scale4_faces is None or n_face < st.scale4_faces]
        base, cases = build_cases(dom, params[i], ex, face_scales, st.strengths, skipped)
        for m, opts in options.items():
            for k in face_scales:
                t0 = time.perf_counter()
                records += inverted(dom, m, opts, i, ex, k, base, cases, st)
                print(f"  face {i} {'+'.join(ex) or 'in-domain'} {m} {k}x: {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)

    for r in records:
        r["domain_kind"] = "in-domain" if r["domain"] == "in-domain" else "extras"
    rows = summarise(records, ("method", "scale", "domain_kind", "group"))
    per_true = []
    for r in summarise([r for r in records if r["method"] == "true latent" and abs(r["strength"]) == 2],
                       ("scale", "attribute"), ("score", "hit", "leak", "total_mse", "err_in", "err_out")):
        r["score_all"] = median(x["score"] for x in records if x["method"] == "true latent"
                                and x["scale"] == r["scale"] and x["attribute"] == r["attribute"])
        per_true.append(r)
    per_method = []
    for a in dom.attributes:
        line = {"attribute": a}
        for m in (["true latent"] if st.true_faces else []) + list(options):
            line[m] = median(x["score"] for x in records if x["method"] == m and x["scale"] == 1
                             and x["domain"] == "in-domain" and x["attribute"] == a)
        per_method.append(line)

    seconds = time.perf_counter() - t_start
    print(f"bench/editability ({name}): {st.faces} in-domain faces, {st.extra_faces} per extra {list(extras)}, "
          f"strengths {list(st.strengths)}, steps {st.steps or 'defaults'}, held-out seed {HELD_OUT_SEED}; "
          f"LPIPS {dom.lpips.backbone_name}; skipped {skipped}; {seconds:.0f} s")
    for note in notes:
        print("note:", note)
    print_table(rows, ["method", "scale", "domain_kind", "group", "n", *SUMMARY_COLUMNS],
                title="\nmedians per method × layer scale × domain × attribute group")
    if per_true:
        print_table(per_true, ["scale", "attribute", "n", "score", "score_all", "hit", "leak", "total_mse", "err_in",
                               "err_out"], title=f"\ntrue latent per attribute (score: strength ±2, {st.true_faces} "
                                                 f"faces; score_all: every strength)")
    print_table(per_method, title="\nedit-delta score per attribute and method (in-domain, 64 px, every strength)")
    meta = dict(setting=name, settings=dataclasses.asdict(st), held_out_seed=HELD_OUT_SEED,
                lpips_backbone=dom.lpips.backbone_name, skipped=skipped, notes=notes, seconds=seconds,
                true_latent_per_attribute=per_true, score_per_attribute=per_method)
    if args.records:
        meta["records"] = records
    write_json(args.json, rows, **meta)
    return 0


_ASSETS: dict = {}


def _assets(opts):
    """The embedded model's MAGEC descriptor + LinkNet / encoder when ``opts`` need them (core.models), else None."""
    needs = tuple(sorted(opts.needs())) if hasattr(opts, "needs") else ()
    if needs and needs not in _ASSETS:
        from core.models import ModelRegistry

        _ASSETS[needs] = ModelRegistry(sefa_k=0).get().method_assets(needs)
    return _ASSETS.get(needs)


if __name__ == "__main__":
    sys.exit(main())
