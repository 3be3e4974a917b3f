# Issue #15, calibration at k = 1: with one photo a class the default head falls back to
# nearest class mean (sqrt, centred, cosine) at a fixed scale of 20 (T = 0.05), and there is no
# photo to leave out to fit a temperature per tenant. Which fixed scale, chosen on one photo
# set and confirmed on the other (the rule: never tuned on the photos it reports)?
#
# Reads the embeddings, splits and answers that scripts/evaluate.sh saved
# (target/eval-embeddings/{pets,birds}); first checks that it rebuilds the service's own k = 1
# probabilities (worst difference printed), then fits the scale minimising the pooled NLL of
# every seed's k = 1 test answers on one set and prints the other set's pooled ECE with it.
#
#   .venv-anchors/bin/python scripts/study/k1_temperature.py [target/eval-embeddings]
import sys, numpy as np
sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/anchors")
from same_embeddings import load, ece

def unit(a): return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

def cosines(d):
    emb, child, splits, preds = load(d)
    out = []
    live = {(p["k"], p["seed"]): p for p in preds if p["head"] == ""}
    for s in splits:
        if s["k"] != 1: continue
        tr = s["train"]
        ctr = [child[p] for p in tr]
        order = sorted(set(ctr), key=ctr.index)
        xtr = np.sqrt(np.maximum(np.stack([emb[p] for p in tr]), 0))
        m = xtr.mean(0)
        means = unit(xtr - m)  # one photo per class
        ytr = np.array([order.index(c) for c in ctr])
        te = s["test"]
        xte = unit(np.sqrt(np.maximum(np.stack([emb[p] for p in te]), 0)) - m)
        cos = xte @ means[np.argsort(ytr)].T
        cls = [order[i] for i in np.argsort(ytr)]
        y = np.array([cls.index(child[p]) for p in te])
        # check against the service's answers
        pr = live[(1, s["seed"])]["test"]
        z = cos * 20.0
        p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
        conf = np.array([r["confidence"] for r in pr])
        err = np.abs(p.max(1) - conf).max()
        out.append((cos, y, err))
    return out

def nll(runs, s):
    tot, n = 0.0, 0
    for cos, y, _ in runs:
        z = cos * s; z = z - z.max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        tot -= lp[np.arange(len(y)), y].sum(); n += len(y)
    return tot / n

def pooled_ece(runs, s):
    right, conf = [], []
    for cos, y, _ in runs:
        z = cos * s; p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
        right.append(p.argmax(1) == y); conf.append(p.max(1))
    return ece(np.concatenate(right), np.concatenate(conf))

root = sys.argv[1] if len(sys.argv) > 1 else "target/eval-embeddings"
sets = {n: cosines(f"{root}/{n}") for n in ["pets", "birds"]}
for n, r in sets.items():
    print(n, "worst |conf - service conf| =", max(e for *_, e in r), "pooled ECE at 20:", round(pooled_ece(r, 20.0), 2))
grid = np.arange(5.0, 30.01, 0.25)
best = {}
for n, r in sets.items():
    best[n] = grid[np.argmin([nll(r, s) for s in grid])]
    print(n, "NLL-optimal scale", best[n])
for fit, test in [("birds", "pets"), ("pets", "birds")]:
    s = best[fit]
    print(f"scale chosen on {fit} ({s}) -> {test}: pooled ECE {pooled_ece(sets[test], s):.2f} (at 20: {pooled_ece(sets[test], 20.0):.2f}; at its own optimum {best[test]}: {pooled_ece(sets[test], best[test]):.2f})")
