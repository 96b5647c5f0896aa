"""Expanding the latent space (Yin et al. 2022, issue 20): sparse vs dense directions, content fusion none vs relevance.

    python bench/expanded.py [--quick] [--json PATH] [--threads N]

Everything is judged against the embedded domain's ground truth with bench/editability.py's helpers (its
held-out faces, ``HELD_OUT_SEED``; the truth is the renderer's image of the edited face; part-map regions from
``core.demo.ATTRIBUTE_PARTS``).  Images in [-1,1].

Table 1, directions (no inversion: ``w = G.mapping(z)`` of the held-out faces, as editability's ``true latent``
row), every attribute at ±2, dense ``<attribute>`` vs sparse ``<attribute>_sparse`` from the shipped manifest, and
the renderer's own edits (set ``renderer (truth)``: what the scorer reads into the ground truth; its ``mean_leak``
÷ the dense one is ``truth_leak_ratio``, the lowest leak ratio a perfect direction would reach):
``active`` (the share of a direction's W+ entries above 5 % of its largest: how sparse the set is),
``leak`` (largest other scorer change ÷ own change; ``mean_leak`` = the mean over attributes of each
attribute's median), ``hit`` (own scorer change ÷ requested), ``err_out`` / ``err_in`` (MSE of the edit delta
minus the true delta outside / inside the attribute's region — outside it the true delta is ~0, so err_out is
the change the edit makes where it should not; ``true_in`` its share inside), ``score`` (edit-delta score).

Table 2, fusion (``EditSession.render(fusion=...)``): the held-out faces alone and with extras, inverted through
``create_session`` with the embedded encoder (Yin et al. edit encoder codes: e4e/pSp), edited at ±2 with both
direction sets, ``fusion="none"`` vs ``"relevance"``: ``total_mse`` (result vs the true edited render), ``score``,
``err_in``/``err_out``, ``lpips`` (result vs truth; the project's LPIPS, backbone named in the JSON);
``render_ms`` a re-render (median of repeats) and ``fit_s`` the once-per-session content fit; with the learned
content extractor installed (``core/demo/weights/face64.content.pt``), rows ``learned``: the same fusion with the
content fit started from the extractor's prediction, as sessions do (``fit_s`` both).

Table 3, Yin Table 1 analogue (faces with extras): L2 (MSE) and LPIPS of the edit vs the ground-truth edit, rows
dense/none (the InterfaceGAN-style baseline), sparse/none ("edit"), sparse/relevance ("edit_refine").

``--quick``: 4 true-latent faces, 1 in-domain face + 1 per extra (face_paint, mask) for fusion.  Full: 16 true-latent
faces, 4 in-domain + 2 per extra.  The fusion's τ was chosen on faces of numpy seed 2020, never these.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time

import numpy as np
import torch

from _util import parse_args, print_table, write_json
import editability as E

STRENGTHS = (-2.0, 2.0)
SETTINGS = {
    "quick": dict(true_faces=4, faces=1, extra_faces=1, extras=("face_paint", "mask"), repeats=3),
    "full": dict(true_faces=16, faces=4, extra_faces=2, extras=None, repeats=5),
}
SETS = ("dense", "sparse")
TRUTH = "renderer (truth)"  # Table 1's floor: the renderer's own edits, read by the same scorer
FUSIONS = ("none", "relevance")


def split_directions(directions: dict, names) -> dict:
    """{"dense": {name: Direction}, "sparse": {name: the name_sparse Direction}} for the attributes that have both."""
    both = [n for n in names if n in directions and n + "_sparse" in directions]
    return {"dense": {n: directions[n] for n in both}, "sparse": {n: directions[n + "_sparse"] for n in both}}


def mean_finite(values) -> float:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else float("nan")


def direction_rows(dom, sets: dict, z, skipped: dict) -> tuple[list, list]:
    """Table 1: records per set from editability.true_latent, summarised per set and per set × attribute."""
    records = []
    for name, dirs in sets.items():
        d = dataclasses.replace(dom, directions=dirs)  # every attribute: build_cases indexes dom.attributes
        for r in E.true_latent(d, z, (1,), STRENGTHS, skipped):
            r["set"] = name
            records.append(r)
    records += truth_records(dom, z, skipped)
    cols = ("score", "hit", "leak", "err_in", "err_out", "true_in", "total_mse")
    per_attr = E.summarise(records, ("set", "attribute"), cols)
    rows = []
    for name in list(sets) + [TRUTH]:
        mine = [r for r in per_attr if r["set"] == name]
        row = {"set": name, "n": sum(r["n"] for r in mine)}
        row["mean_leak"] = mean_finite(r["leak"] for r in mine)
        row["active"] = active_share(dom.G, sets[name]) if name in sets else float("nan")
        for c in ("hit", "score", "err_in", "err_out", "true_in"):
            row[c] = mean_finite(r[c] for r in mine)
        rows.append(row)
    return rows, per_attr


def active_share(G, directions: dict) -> float:
    """Mean over ``directions`` of the share of W+ offset entries above 5 % of the largest
    (``core.expanded.sparsity_report``): how sparse a set is (a W direction counts on every row)."""
    from core.expanded import sparsity_report

    return mean_finite(sparsity_report(d.delta(1.0, int(G.num_ws), int(G.w_dim)))["active"] for d in directions.values())


def truth_records(dom, z, skipped: dict) -> list:
    """Table 1 records of set ``TRUTH``: the renderer's own edit of each case scored like a direction's (score 1,
    no error by construction); its ``leak`` is what the scorer reads into the ground truth — the floor any
    direction's leak is measured against."""
    from core.demo.data import params_from_z

    out = []
    for i, p in enumerate(params_from_z(z)):
        base, cases = E.build_cases(dom, p, (), (1,), STRENGTHS, skipped)
        reads = dom.readings([base[1]] + [c.true[1] for c in cases])
        for c, r in zip(cases, reads[1:]):
            rec = E.score_case(dom, c, 1, c.true[1], base[1], base[1], r, reads[0])
            rec.update(set=TRUTH, face=i)
            out.append(rec)
    return out


def _result(session, edits, fusion: str) -> np.ndarray:
    return session.render(edits, fusion=fusion)[..., :3].astype(np.float32) * 2.0 - 1.0


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def learned_extractor(G):
    """The embedded model's learned content extractor (core.demo.train_content), or None when not installed."""
    from core.models import content_path_for

    path = content_path_for(None, default=True)
    if not path.is_file():
        return None
    from core.expanded import load_content_extractor

    return load_content_extractor(path, G)


def fusion_records(dom, sets: dict, params, faces, repeats: int, skipped: dict) -> list:
    """Table 2/3 records: one encoder session per face, every case × set × fusion ("learned": relevance fusion
    with the content fit started from the learned extractor's, in a second session of the same face)."""
    import dataclasses as dc

    from core.session import SessionOptions, create_session

    opts = SessionOptions(method="encoder", align="none")
    assets = E._assets(opts)
    extractor = learned_extractor(dom.G)
    fusions = FUSIONS + (("learned",) if extractor is not None else ())
    out = []
    for i, ex in faces:
        base, cases = E.build_cases(dom, params[i], ex, (1,), STRENGTHS, skipped)
        cases = [c for c in cases if c.attribute in sets["dense"]]
        session = create_session(dom.G, E._layer(base[1]), None, opts, directions={}, assets=assets)
        sessions = {f: session for f in FUSIONS}
        t = time.perf_counter()
        session.fused_inversion()
        fit_s = {f: time.perf_counter() - t for f in FUSIONS}
        if extractor is not None:
            sessions["learned"] = create_session(dom.G, E._layer(base[1]), None, opts, directions={},
                                                 assets=dc.replace(assets, content=extractor))
            t = time.perf_counter()
            sessions["learned"].fused_inversion()
            fit_s["learned"] = time.perf_counter() - t
        mode = lambda f: "relevance" if f == "learned" else f  # noqa: E731
        probe = [(sets["dense"][cases[0].attribute], cases[0].strength)] if cases else []
        ms = {f: _median_ms(lambda: sessions[f].render(probe, fusion=mode(f)), repeats) for f in fusions}
        for s_name, dirs in sets.items():
            for fusion in fusions:
                sess, how = sessions[fusion], mode(fusion)
                un = _result(sess, [], how)
                outs = [_result(sess, [(dirs[c.attribute], c.strength)], how) for c in cases]
                reads = dom.readings([un] + outs)
                for c, o, r in zip(cases, outs, reads[1:]):
                    rec = E.score_case(dom, c, 1, o, un, base[1], r, reads[0])
                    rec.update(set=s_name, fusion=fusion, face=i, domain="+".join(ex) or "in-domain",
                               domain_kind="extras" if ex else "in-domain", render_ms=ms[fusion], fit_s=fit_s[fusion],
                               lpips=dom.distance(o, c.true[1])[0])
                    out.append(rec)
        print(f"  face {i} {'+'.join(ex) or 'in-domain'}: content fit {fit_s['relevance']:.2f} s"
              + (f", from the extractor {fit_s['learned']:.2f} s" if "learned" in fit_s else "")
              + ", re-render " + ", ".join(f"{f} {ms[f]:.1f} ms" for f in fusions), file=sys.stderr)
    return out


def _extra_args(parser):
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core machine)")


def main() -> int:
    args = parse_args(__doc__.strip().splitlines()[0], _extra_args)
    torch.set_num_threads(max(1, args.threads))
    name = "quick" if args.quick else "full"
    st = SETTINGS[name]
    t0 = time.perf_counter()
    dom = E.Domain.load()
    from core.demo.data import params_from_z

    sets = split_directions(dom.directions, dom.attributes)
    if len(sets["dense"]) != len(dom.attributes):
        print("the manifest lacks <attribute>_sparse directions: run python -m core.edits fit-sparse "
              "core/demo/weights/face64.pt", file=sys.stderr)
        return 2
    extras = st["extras"] if st["extras"] is not None else dom.extras
    n_z = max(st["true_faces"], st["faces"], st["extra_faces"])
    z = np.random.default_rng(E.HELD_OUT_SEED).standard_normal((n_z, int(dom.G.z_dim))).astype(np.float32)
    params = params_from_z(z)
    skipped: dict = {}
    dir_rows, dir_attr = direction_rows(dom, sets, z[:st["true_faces"]], skipped)
    faces = [(i, ()) for i in range(st["faces"])] + [(i, (e,)) for e in extras for i in range(st["extra_faces"])]
    recs = fusion_records(dom, sets, params, faces, st["repeats"], skipped)
    cols = ("total_mse", "score", "err_in", "err_out", "lpips", "render_ms", "fit_s")
    fus_rows = E.summarise(recs, ("set", "fusion", "domain_kind"), cols)
    for r in fus_rows:
        r["total_mse_mean"] = mean_finite(x["total_mse"] for x in recs if x["set"] == r["set"]
                                          and x["fusion"] == r["fusion"] and x["domain_kind"] == r["domain_kind"])
    yin = []
    for label, s_name, fusion in (("dense (InterfaceGAN-style)", "dense", "none"), ("sparse: edit", "sparse", "none"),
                                  ("sparse + fusion: edit_refine", "sparse", "relevance"),
                                  ("dense + fusion", "dense", "relevance"),
                                  ("sparse + learned content", "sparse", "learned")):
        rs = [x for x in recs if x["set"] == s_name and x["fusion"] == fusion and x["domain_kind"] == "extras"]
        if not rs:
            continue
        yin.append({"row": label, "n": len(rs), "L2": mean_finite(x["total_mse"] for x in rs),
                    "LPIPS": mean_finite(x["lpips"] for x in rs)})

    dense = {r["set"]: r for r in dir_rows}
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    fr = {(r["set"], r["fusion"], r["domain_kind"]): r for r in fus_rows}
    acceptance = {
        "sparse_leak_ratio": ratio(dense["sparse"]["mean_leak"], dense["dense"]["mean_leak"]),
        "sparse_err_out_ratio": ratio(dense["sparse"]["err_out"], dense["dense"]["err_out"]),
        "sparse_hit_ratio": ratio(dense["sparse"]["hit"], dense["dense"]["hit"]),
        "truth_leak_ratio": ratio(dense[TRUTH]["mean_leak"], dense["dense"]["mean_leak"]),
    }
    for s_name in SETS:
        a, b = fr.get((s_name, "none", "extras")), fr.get((s_name, "relevance", "extras"))
        if a and b:
            acceptance[f"{s_name}_fusion_total_mse_ratio_extras"] = ratio(b["total_mse"], a["total_mse"])
            acceptance[f"{s_name}_fusion_score_extras"] = [a["score"], b["score"]]
            acceptance[f"{s_name}_fusion_render_ratio"] = ratio(b["render_ms"], a["render_ms"])
        c = fr.get((s_name, "learned", "extras"))
        if a and c:
            acceptance[f"{s_name}_learned_total_mse_ratio_extras"] = ratio(c["total_mse"], a["total_mse"])
            acceptance[f"{s_name}_learned_score_extras"] = [a["score"], c["score"]]
    seconds = time.perf_counter() - t0
    print(f"bench/expanded ({name}): held-out seed {E.HELD_OUT_SEED}, {st['true_faces']} true-latent faces; "
          f"fusion on {len(faces)} encoder-inverted faces (extras {list(extras)}), strengths {list(STRENGTHS)}; "
          f"LPIPS {dom.lpips.backbone_name}; skipped {skipped}; {seconds:.0f} s")
    print_table(dir_rows, ["set", "n", "mean_leak", "hit", "err_out", "err_in", "true_in", "score", "active"],
                title="\ndirections on true latents (means over attributes of per-attribute medians)")
    print_table(fus_rows, ["set", "fusion", "domain_kind", "n", "total_mse", "total_mse_mean", "score", "err_in",
                           "err_out", "lpips", "render_ms", "fit_s"], title="\nfusion (medians over cases)")
    print_table(yin, title="\nYin Table 1 analogue (faces with extras; means): edit vs ground-truth edit")
    print("\nacceptance:", {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v])
                            for k, v in acceptance.items()})
    rows = ([dict(r, table="directions") for r in dir_rows] + [dict(r, table="fusion") for r in fus_rows]
            + [dict(r, table="yin_table1") for r in yin])
    write_json(args.json, rows, setting=name, held_out_seed=E.HELD_OUT_SEED, lpips_backbone=dom.lpips.backbone_name,
               skipped=skipped, seconds=seconds, acceptance=acceptance, directions_per_attribute=dir_attr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
