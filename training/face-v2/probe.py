# Early read of issue 16's true-latent score on the v2 run's generator before its install: OUT/face64.pt (or the
# file given), OUT/scorer.pt, the directions beside it (else the conditioned W regression's), and
# bench/editability.py's 16 held-out faces and scoring at +-2.   .venv/bin/python training/face-v2/probe.py [FACE64.pt]
import os, sys, pathlib, numpy as np, torch
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench")); torch.set_num_threads(1)
import editability as E
from core.demo import renderer as r2
from core.demo.directions import UNIT, fit_directions
from core.demo.train import load_trained_generator
from core.demo.scorer import load_scorer
from core.losses import perceptual_loss
OUT = pathlib.Path(os.environ.get("OUT", pathlib.Path.home() / ".cache/latent-edit-train/face-v2"))
G = load_trained_generator(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else OUT / "face64.pt").eval()
S = load_scorer(OUT / "scorer.pt")
MODEL = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else OUT / "face64.pt"
if MODEL.with_suffix(".directions.json").exists():  # the directions stage's (refined, matched to the renderer)
    from core.edits import load_directions
    dirs = {a: d for a, d in load_directions(MODEL, G=G).items() if a in r2.ATTRIBUTES}
    print("directions from", MODEL.with_suffix(".directions.json"))
else:
    dirs, rep = fit_directions(G, S)
    print("linear r2", rep["linear_r2"])
dom = E.Domain(G=G, directions=dirs, scorer=S, render=r2.render, render_parts=r2.render_parts, parts=tuple(r2.PARTS),
               attribute_parts=dict(r2.ATTRIBUTE_PARTS), attributes=tuple(r2.ATTRIBUTES), extras=tuple(r2.EXTRAS),
               unit=float(UNIT), lpips=perceptual_loss("alex"))
z = np.random.default_rng(E.HELD_OUT_SEED).standard_normal((16, int(G.z_dim))).astype(np.float32)
recs = E.true_latent(dom, z, (1,), (-2.0, 2.0), {})
by = {}
for r in recs:
    by.setdefault(r["attribute"], []).append(r["score"])
med = {a: float(np.median(v)) for a, v in by.items()}
for a, v in med.items():
    print(f"{a:16s} {v:.2f}")
print("median over attributes", float(np.median(list(med.values()))), "min", min(med.values()))
