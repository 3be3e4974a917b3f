#!/usr/bin/env python3
"""Heads from outside Taxon, on exactly the embeddings and splits a `client eval` used.

    client eval ROOT --shots 1,3,5,8 --seeds 10 --save-embeddings DIR --out REPORT_DIR
    scripts/anchors/run.sh DIR --out REPORT_DIR/same-embeddings.md [--gate]

`DIR` is what `client eval --save-embeddings` wrote (client/src/eval/dump.rs): the server's own
embeddings of every photo (exported, four views averaged), each (k, seed)'s split and every
Taxon head's top-1 answer with its probability. Here the same splits are given to:

- `ncm`: nearest class mean, cosine, on embeddings centred by the training mean (the anchor's
  NCM, ../shared/anchors/heads-pytorch.md);
- `logreg`: scikit-learn's LogisticRegression (C = 1, lbfgs, multinomial) on embeddings
  standardised by StandardScaler fitted on the training photos: the off-the-shelf linear probe;
- `flat-recipe`: the PyTorch anchor's flat head recipe (one linear layer; AdamW lr 1e-3,
  weight decay 1e-4, 100 epochs, batch 64, on embeddings centred and scaled to mean norm 10),
  written in numpy: torch is not installable here (PyPI's wheel brings gigabytes of CUDA).

It prints and writes a Markdown table per k: every Taxon head and every anchor (mean ± std
over seeds), the best anchor, and the default head minus the best anchor as the mean of the
per-seed (paired) differences with its standard error. Expected calibration error (15 bins)
of each Taxon head, and of logreg's probabilities, is shown beside.

`--gate` exits 1 when, at any k, the default head is below the best anchor by more than twice
the standard error of that difference (its noise): the CI check that the product does not
fall behind an off-the-shelf head on its own embeddings. Needs numpy and scikit-learn
(scripts/anchors/requirements.txt; run.sh makes the venv).
"""
import argparse
import csv
import json
import math
import struct
import sys
from collections import defaultdict

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

ECE_BINS = 15


def read_safetensors(path):
    """(tensors by name, metadata) of a safetensors file, with numpy alone."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": "<f4", "U32": "<u4", "U8": "u1", "F64": "<f8", "I64": "<i8"}
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        buf = data[8 + n + start : 8 + n + end]
        out[name] = np.frombuffer(buf, dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out, meta


def load(dir_):
    """Embedding per photo path, child per path, and the runs' splits and answers."""
    tensors, _ = read_safetensors(f"{dir_}/embeddings.safetensors")
    x = tensors["examples.embedding"].astype(np.float64)
    row_of_hash = {bytes(h).hex(): i for i, h in enumerate(tensors["examples.hash"])}
    emb, child = {}, {}
    with open(f"{dir_}/photos.tsv", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            i = row_of_hash.get(r["sha256"])
            if i is None:
                sys.exit(f"{r['path']}: no embedding with its sha256 in the export")
            emb[r["path"]] = x[i]
            child[r["path"]] = r["child"]
    splits = [json.loads(l) for l in open(f"{dir_}/splits.jsonl")]
    preds = [json.loads(l) for l in open(f"{dir_}/predictions.jsonl")]
    return emb, child, splits, preds


def ncm(xtr, ytr, xte, classes):
    m = xtr.mean(0)
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    rows = unit(xtr - m)
    means = unit(np.stack([rows[ytr == c].mean(0) for c in range(classes)]))
    return (unit(xte - m) @ means.T).argmax(1), None


def logreg(xtr, ytr, xte, classes):
    scaler = StandardScaler().fit(xtr)
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(xtr), ytr)
    p = lr.predict_proba(scaler.transform(xte))
    return lr.classes_[p.argmax(1)], p.max(1)


def flat_recipe(xtr, ytr, xte, classes, seed):
    """The PyTorch anchor's flat head: nn.Linear, AdamW(1e-3, wd 1e-4), 100 epochs of 64."""
    m = xtr.mean(0)
    scale = 10.0 / np.linalg.norm(xtr - m, axis=1).mean()
    a, b = (xtr - m) * scale, (xte - m) * scale
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    bound = 1.0 / math.sqrt(d)
    w = rng.uniform(-bound, bound, (classes, d))
    bias = rng.uniform(-bound, bound, classes)
    params = [w, bias]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    lr, wd, b1, b2, eps, t = 1e-3, 1e-4, 0.9, 0.999, 1e-8, 0
    onehot = np.eye(classes)[ytr]
    for _ in range(100):
        order = rng.permutation(len(a))
        for s in range(0, len(a), 64):
            idx = order[s : s + 64]
            z = a[idx] @ w.T + bias
            z -= z.max(1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(1, keepdims=True)
            g = (p - onehot[idx]) / len(idx)
            grads = [g.T @ a[idx], g.sum(0)]
            t += 1
            for i, (param, grad) in enumerate(zip(params, grads)):
                param *= 1 - lr * wd
                m1[i] = b1 * m1[i] + (1 - b1) * grad
                m2[i] = b2 * m2[i] + (1 - b2) * grad * grad
                mh, vh = m1[i] / (1 - b1**t), m2[i] / (1 - b2**t)
                param -= lr * mh / (np.sqrt(vh) + eps)
    return (b @ w.T + bias).argmax(1), None


ANCHORS = {
    "ncm": lambda xtr, ytr, xte, c, seed: ncm(xtr, ytr, xte, c),
    "logreg": lambda xtr, ytr, xte, c, seed: logreg(xtr, ytr, xte, c),
    "flat-recipe": flat_recipe,
}


def ece(right, conf):
    """Expected calibration error in points, equal-width bins of the top-1 probability."""
    right, conf = np.asarray(right, float), np.clip(np.asarray(conf, float), 0, 1)
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    total = 0.0
    for b in range(ECE_BINS):
        sel = bins == b
        if sel.any():
            total += abs(conf[sel].sum() - right[sel].sum())
    return 100.0 * total / max(len(right), 1)


def mean_std(v):
    v = np.asarray(v, float)
    return v.mean(), v.std()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="what client eval --save-embeddings wrote")
    ap.add_argument("--out", help="write the Markdown section here too")
    ap.add_argument("--anchors", default="ncm,logreg,flat-recipe")
    ap.add_argument("--gate", action="store_true", help="exit 1 when the default head is "
                    "below the best anchor by more than twice the paired standard error")
    args = ap.parse_args()
    emb, child, splits, preds = load(args.dir)
    names = args.anchors.split(",")
    # acc[(k, head)][seed], for Taxon's heads (by name; "" is the default) and the anchors.
    acc = defaultdict(dict)
    cal = defaultdict(dict)
    for p in preds:
        test = p["test"]
        right = [t["predicted"] == child[t["path"]] for t in test]
        head = p["head"] or "default"
        acc[(p["k"], head)][p["seed"]] = 100.0 * np.mean(right)
        cal[(p["k"], head)][p["seed"]] = ece(right, [t["confidence"] or 0.0 for t in test])
    taxon_heads = []
    for p in preds:
        h = p["head"] or "default"
        if h not in taxon_heads:
            taxon_heads.append(h)
    for sp in splits:
        k, seed = sp["k"], sp["seed"]
        classes = sorted({child[p] for p in sp["train"]})
        index = {c: i for i, c in enumerate(classes)}
        test = [p for p in sp["test"] if child[p] in index]
        xtr = np.stack([emb[p] for p in sp["train"]])
        ytr = np.array([index[child[p]] for p in sp["train"]])
        xte = np.stack([emb[p] for p in test])
        yte = np.array([index[child[p]] for p in test])
        for name in names:
            got, conf = ANCHORS[name](xtr, ytr, xte, len(classes), seed)
            acc[(k, name)][seed] = 100.0 * np.mean(got == yte)
            if conf is not None:
                cal[(k, name)][seed] = ece(got == yte, conf)
        print(f"k={k} seed={seed}: " + ", ".join(
            f"{h} {acc[(k, h)].get(seed, float('nan')):.1f}" for h in taxon_heads[:1] + names),
            flush=True)

    lines = ["## Heads on the same embeddings and splits\n",
             f"Every column below ran on the same photos' embeddings (the server's own, exported by "
             f"`client eval --save-embeddings`) and the same (k, seed) splits; anchors by "
             f"scripts/anchors/same_embeddings.py: {', '.join(names)}. Child top-1 %, mean ± std "
             f"over seeds; Δ = default head minus the best anchor, the mean of per-seed differences "
             f"± its standard error; ECE = expected calibration error ({ECE_BINS} bins), points.\n"]
    failures = []
    for k in sorted({s["k"] for s in splits}):
        seeds = sorted(acc[(k, "default")])
        cols = taxon_heads + names
        lines.append(f"### k = {k} ({len(seeds)} seeds)\n")
        lines.append("| | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        cells = []
        for h in cols:
            m, s = mean_std([acc[(k, h)][sd] for sd in seeds])
            cells.append(f"{m:.1f} ± {s:.1f}")
        lines.append("| child top-1 | " + " | ".join(cells) + " |")
        cells = []
        for h in cols:
            if cal[(k, h)]:
                m, s = mean_std([cal[(k, h)][sd] for sd in seeds])
                cells.append(f"{m:.1f} ± {s:.1f}")
            else:
                cells.append("—")
        lines.append("| ECE | " + " | ".join(cells) + " |")
        best = max(names, key=lambda h: np.mean([acc[(k, h)][sd] for sd in seeds]))
        diffs = np.array([acc[(k, "default")][sd] - acc[(k, best)][sd] for sd in seeds])
        se = diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        lines.append(f"\nBest anchor: {best}. Default head minus {best}: "
                     f"**{diffs.mean():+.2f} ± {se:.2f}** points (paired over {len(seeds)} seeds).\n")
        if args.gate and (math.isnan(se) or diffs.mean() < -2 * se):
            failures.append(f"k={k}: default head {diffs.mean():+.2f} points against {best} "
                            f"(noise: 2 x SE = {2 * se:.2f})")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if failures:
        print("FAILED: the default head is below the best same-embedding anchor by more than "
              "its noise: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
