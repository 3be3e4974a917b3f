# Issue #15 study: a default head that leads the same-embedding anchors at k = 1/3/5/8 shots.
#
# What it does: for pets (seeds 0..9) and birds (seeds 0..4), per child k random training photos
# (numpy default_rng(seed), taxon_emb.split), the rest for testing, it scores the anchors
#   ncm   nearest class mean, cosine, centred by the training mean (unit rows, unit class means)
#   lr    sklearn LogisticRegression(C=1, max_iter=2000) on StandardScaler-ed embeddings
#   flat  the PyTorch recipe in numpy (nn.Linear init, AdamW 1e-3/1e-4, 100 epochs, batch 64,
#         centred, scaled to average norm 10)
# the current default head `combined` (numpy replica of head-trainer/src/heads/combined.rs) and
# the candidates (see heads below; `ldacv` is the proposed winner), and prints mean ± std over
# seeds of child top-1 and the paired difference (candidate - best anchor) ± its standard error
# over seeds. Every candidate choice is made by cross-validation on the training photos only.
# `--extra` adds calibration (ECE at k=5) and the per-tenant open-set cut-off study.
#
# Reproduce (embeddings exactly as the server makes them: each photo = mean of 4 views of
# MobileNetV2, debug build of this workspace):
#   cargo build -p feature-server -p head-trainer -p taxon-client     # (debug)
#   target/debug/feature-server --listen 127.0.0.1:$F --backbone mobilenet_v2 \
#       --weights weights/mobilenet_v2.safetensors &
#   target/debug/head-trainer --listen 127.0.0.1:$H --features-url http://127.0.0.1:$F \
#       --data /tmp/study/store --share-embedding-cache --quota-rps 0 --quota-concurrent-enrolls 0 &
#   target/debug/client --server http://127.0.0.1:$H health --wait 180
#   for SET in pets birds; do
#     target/debug/client --server http://127.0.0.1:$H --tenant study-$SET --timeout-s 0 \
#         enroll --dataset ../shared/datasets/$SET
#     target/debug/client --server http://127.0.0.1:$H --tenant study-$SET export /tmp/study/$SET.safetensors
#   done
#   python3 -m venv /tmp/study/venv && /tmp/study/venv/bin/pip install numpy scikit-learn
#   OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 /tmp/study/venv/bin/python scripts/study/leader.py [--extra]
# (taxon_emb.load maps each exported example to its photo by sha256 of the file bytes.)
import sys, time
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import heads_lib as H
from taxon_emb import load, split

DATA = {"pets": 10, "birds": 5}  # seeds
KS = [1, 3, 5, 8]
GAMMAS = [1.0, 3.0, 10.0, 30.0, 100.0]  # shrinkage grid, in units of tr(S_w)/d


# ------------------------------------------------------------------ the proposed head
def transform(X, mean, power):
    """pt: sqrt(max(x,0)); then centre by the training mean (of the transformed rows), unit length."""
    Xp = np.sqrt(np.maximum(X, 0)) if power else X
    return H.l2n(Xp - mean)


def lda_fit(A, y, C, gammas):
    """Shrinkage LDA on unit rows A: Sigma = S_w + g*tr(S_w)/d*I, S_w = R^T R / n,
    R = rows minus their class mean. Returns {g: (P (d x C), c (C))}: logits = x P + c.
    Via Woodbury on the n x n Gram K = R R^T (the server can do it with one Cholesky per g:
    (K + n g' I)^-1)."""
    cnt = np.bincount(y, minlength=C)
    M = H.onehot(y, C).T @ A / np.maximum(cnt, 1)[:, None]
    R = A - M[y]
    n, d = A.shape
    tr = (R * R).sum() / n / d
    K = R @ R.T
    s, U = np.linalg.eigh(K)
    s = np.maximum(s, 0)
    RM = R @ M.T  # n x C
    URM = U.T @ RM
    out = {}
    for g in gammas:
        gg = g * tr
        P = (M.T - R.T @ (U @ (URM / (n * gg + s)[:, None]))) / gg
        out[g] = (P, -0.5 * np.sum(M * P.T, 1))
    return out


def ncm_fit(A, y, C):
    return H.l2n(H.onehot(y, C).T @ A)


def configs():
    """The CV grid: (power, gamma); gamma None = cosine nearest class mean."""
    return [(p, g) for p in (True, False) for g in GAMMAS + [None]]


def ldacv_select(Xtr, ytr, C, grid, nfolds=4, seed=0, return_cv=False):
    """Stratified min(k, nfolds)-fold CV on the training photos; returns the best (power, gamma)
    by CV accuracy (ties: the later in `grid`, i.e. larger gamma, NCM last) and, if asked, the
    CV logits of every config (for temperature fitting)."""
    k = np.bincount(ytr, minlength=C).min()
    nf = min(k, nfolds)
    f = H.folds_of(ytr, nf, seed)
    cvlog = {c: np.zeros((len(ytr), C)) for c in grid}
    for p in sorted(set(c[0] for c in grid)):
        Xp = np.sqrt(np.maximum(Xtr, 0)) if p else Xtr
        A = H.l2n(Xp - Xp.mean(0))
        gs = [c[1] for c in grid if c[0] == p and c[1] is not None]
        for j in range(nf):
            tr, va = f != j, f == j
            fit = lda_fit(A[tr], ytr[tr], C, gs)
            for g in gs:
                P, c = fit[g]
                cvlog[(p, g)][va] = A[va] @ P + c
            if (p, None) in grid:
                cvlog[(p, None)][va] = A[va] @ ncm_fit(A[tr], ytr[tr], C).T
    acc = {c: (cvlog[c].argmax(1) == ytr).mean() for c in grid}
    best = max(acc.values())
    choice = [c for c in grid if acc[c] >= best - 1e-12][-1]
    return (choice, cvlog) if return_cv else choice


def ldacv_predict(Xtr, ytr, Xte, C, choice):
    p, g = choice
    Xp = np.sqrt(np.maximum(Xtr, 0)) if p else Xtr
    mean = Xp.mean(0)
    A = H.l2n(Xp - mean)
    B = transform(Xte, mean, p)
    if g is None:
        return B @ ncm_fit(A, ytr, C).T
    P, c = lda_fit(A, ytr, C, [g])[g]
    return B @ P + c


def head_ldacv(Xtr, ytr, Xte, C, seed=0, grid=None):
    """The proposed default head. k = 1: cosine NCM on sqrt-transformed rows (no CV possible)."""
    grid = grid or configs()
    if np.bincount(ytr, minlength=C).min() < 2:
        return ldacv_predict(Xtr, ytr, Xte, C, (True, None))
    return ldacv_predict(Xtr, ytr, Xte, C, ldacv_select(Xtr, ytr, C, grid))


def head_ldacv_pt(Xtr, ytr, Xte, C, seed=0):
    """Same, sqrt transform fixed (chosen on birds), gamma/NCM by CV."""
    return head_ldacv(Xtr, ytr, Xte, C, seed, [(True, g) for g in GAMMAS + [None]])


def head_ncm_pt(Xtr, ytr, Xte, C, seed=0):
    return ldacv_predict(Xtr, ytr, Xte, C, (True, None))


HEADS = {
    "ncm": H.anchor_ncm,
    "lr": H.anchor_lr,
    "flat": H.anchor_flat_pt,
    "combined": H.combined,
    "ncm_pt": head_ncm_pt,
    "ldacv_pt": head_ldacv_pt,
    "ldacv": head_ldacv,
}
ANCHORS = ["ncm", "lr", "flat"]


def main():
    import warnings

    warnings.filterwarnings("ignore")
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(DATA)
    for name in names:
        X, y, cp, _, _ = load(f"/tmp/study/{name}.safetensors", f"/work/shared/datasets/{name}")
        C = y.max() + 1
        print(f"\n## {name}: {len(y)} photos, {C} children, {len(DATA) and DATA[name]} seeds")
        for k in KS:
            acc = {h: [] for h in HEADS}
            secs = {h: 0.0 for h in HEADS}
            for s in range(DATA[name]):
                tr, te = split(y, k, s)
                for h, f in HEADS.items():
                    t0 = time.perf_counter()
                    S = f(X[tr], y[tr], X[te], C, s)
                    secs[h] += time.perf_counter() - t0
                    acc[h].append(100 * (S.argmax(1) == y[te]).mean())
            best = max(ANCHORS, key=lambda a: np.mean(acc[a]))
            print(f"\n{name} k={k}  (best anchor: {best})")
            print(f"| head | top-1 % | vs best anchor (± s.e.) | s/fit |")
            print(f"|---|---|---|---|")
            for h in HEADS:
                a = np.array(acc[h])
                d = a - np.array(acc[best])
                print(f"| {h} | {a.mean():.2f} ± {a.std():.2f} | {d.mean():+.2f} ± "
                      f"{d.std(ddof=1) / np.sqrt(len(d)):.2f} | {secs[h] / len(a):.3f} |", flush=True)
    if "--extra" in sys.argv:
        import extra

        extra.run()


if __name__ == "__main__":
    main()
