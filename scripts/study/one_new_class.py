# Issue #15 follow-up: a tenant whose classes have k photos each, plus one new class with a
# single photo (a user's first photo of "my mug"). Until d7e8869 the service's `lda` head then
# fell back to nearest class mean for the whole tenant; now cross-validation holds out photos of
# the classes with a second photo only, and the new class's only photo stays in every fold.
#
# For each set, seed and k, for each of NEW classes (chosen with numpy default_rng(seed)),
# the split of taxon_emb.split with that class cut to its first training photo; the heads are
# numpy replicas of head-trainer/src/heads/lda.rs (leader.py's ldacv):
#   before   the old fallback for the whole tenant: cosine NCM on square-rooted rows
#   cv       cross-validation over the classes with a second photo, LDA's bias as it was
#   now      the same with LDA's bias corrected for each class's photo count (lda::lda_fit:
#            + tr(Sigma^-1 S_w) / (2 n_c)), what the service does
# Prints child top-1 % over all test photos and over the new class's test photos, and the
# paired difference now - before ± its standard error over seeds. No setting here is tuned:
# the grid and folds are the service's, and the correction has no parameter.
#
# Reproduce: the exports of leader.py's header (/tmp/study/{pets,birds}.safetensors), then
#   OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 /tmp/study/venv/bin/python scripts/study/one_new_class.py
#   (add --calibration for the k = 5 calibration figures instead)
import sys
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import heads_lib as H
import leader as L
from taxon_emb import load, split

SEEDS = {"pets": 10, "birds": 5}
KS = [3, 5, 8]
NEW = 4  # new classes tried per seed (each its own tenant)


def folds_single_kept(ytr, nf, seed=0):
    """heads_lib.folds_of, except a class's only row gets fold nf (never held out), as
    lda::folds_of does now."""
    rng = np.random.default_rng(seed)
    f = np.zeros(len(ytr), int)
    for c in np.unique(ytr):
        idx = np.where(ytr == c)[0]
        idx = idx[rng.permutation(len(idx))]
        f[idx] = nf if len(idx) == 1 else np.arange(len(idx)) % nf
    return f


def lda_fit_counted(A, y, C, gammas):
    """leader.lda_fit with b_c + D / (2 n_c), D = tr(Sigma^-1 S_w) (lda::lda_fit's doc)."""
    cnt = np.bincount(y, minlength=C)
    M = H.onehot(y, C).T @ A / np.maximum(cnt, 1)[:, None]
    R = A - M[y]
    n = len(A)
    tr = (R * R).sum() / n / A.shape[1]
    s, U = np.linalg.eigh(R @ R.T)
    s = np.maximum(s, 0)
    URM = U.T @ (R @ M.T)
    out = {}
    for g in gammas:
        gg = g * tr
        P = (M.T - R.T @ (U @ (URM / (n * gg + s)[:, None]))) / gg
        D = np.sum((s / n) / (s / n + gg))
        out[g] = (P, -0.5 * np.sum(M * P.T, 1) + 0.5 * D / np.maximum(cnt, 1))
    return out


PLAIN_FIT = L.lda_fit


def after(Xtr, ytr, Xte, C, counted):
    L.lda_fit = lda_fit_counted if counted else PLAIN_FIT
    try:
        return after_with(Xtr, ytr, Xte, C)
    finally:
        L.lda_fit = PLAIN_FIT


def after_with(Xtr, ytr, Xte, C):
    cnt = np.bincount(ytr, minlength=C)
    multi = cnt >= 2
    if multi.sum() < 2 or (cnt == 0).any():
        return L.ldacv_predict(Xtr, ytr, Xte, C, (True, None))
    choice = select(Xtr, ytr, C, min(cnt[multi].min(), 4))
    return L.ldacv_predict(Xtr, ytr, Xte, C, choice)


def select(Xtr, ytr, C, nf):
    """leader.ldacv_select with the service's folds (folds_single_kept) and nf folds."""
    grid = L.configs()
    f = folds_single_kept(ytr, nf, 0)
    right = {c: 0 for c in grid}
    for p in (True, False):
        Xp = np.sqrt(np.maximum(Xtr, 0)) if p else Xtr
        A = H.l2n(Xp - Xp.mean(0))
        gs = [c[1] for c in grid if c[0] == p and c[1] is not None]
        for j in range(nf):
            tr, va = f != j, f == j
            fit = L.lda_fit(A[tr], ytr[tr], C, gs)
            for g in gs:
                P, c = fit[g]
                right[(p, g)] += ((A[va] @ P + c).argmax(1) == ytr[va]).sum()
            right[(p, None)] += ((A[va] @ L.ncm_fit(A[tr], ytr[tr], C).T).argmax(1) == ytr[va]).sum()
    best = max(right.values())
    return [c for c in grid if right[c] >= best][-1]


def main():
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(SEEDS)
    for name in names:
        X, y, _, _, _ = load(f"/tmp/study/{name}.safetensors", f"/work/shared/datasets/{name}")
        C = y.max() + 1
        print(f"\n## {name}: {len(y)} photos, {C} children, {SEEDS[name]} seeds x {NEW} new classes")
        print("| k | all test photos: before / cv / now | now - before ± s.e. | the new class: before / cv / now | now - before ± s.e. |")
        print("|---|---|---|---|---|")
        for k in KS:
            per_seed = []
            for s in range(SEEDS[name]):
                tr, te = split(y, k, s)
                news = np.random.default_rng(s).choice(C, NEW, replace=False)
                acc = np.zeros(6)
                for new in news:
                    first = tr[y[tr] == new][0]
                    t = np.array([i for i in tr if y[i] != new or i == first])
                    b = L.ldacv_predict(X[t], y[t], X[te], C, (True, None)).argmax(1)
                    c = after(X[t], y[t], X[te], C, False).argmax(1)
                    a = after(X[t], y[t], X[te], C, True).argmax(1)
                    own = y[te] == new
                    acc += 100 * np.array([
                        (b == y[te]).mean(), (c == y[te]).mean(), (a == y[te]).mean(),
                        (b[own] == new).mean(), (c[own] == new).mean(), (a[own] == new).mean(),
                    ])
                per_seed.append(acc / NEW)
            P = np.array(per_seed)
            se = lambda d: d.std(ddof=1) / np.sqrt(len(d))
            d_all, d_new = P[:, 2] - P[:, 0], P[:, 5] - P[:, 3]
            m = P.mean(0)
            print(f"| {k} | {m[0]:.1f} / {m[1]:.1f} / {m[2]:.1f} | {d_all.mean():+.2f} ± {se(d_all):.2f} "
                  f"| {m[3]:.1f} / {m[4]:.1f} / {m[5]:.1f} | {d_new.mean():+.1f} ± {se(d_new):.1f} |", flush=True)


if __name__ == "__main__" and "--calibration" not in sys.argv:
    main()


def calibration(names=("pets", "birds"), k=5):
    """`--calibration`: ECE (15 bins, %) on all test photos, before (the fallback: cosine NCM on
    square-rooted rows times lda::ONE_PHOTO_SCALE) and now (the temperature fitted on the
    leave-one-out logits of the classes with a second photo, calibration.py's loo-sm-n, as
    lda_loo.rs; T by extra.fit_temperature's grid, the service's golden-section search and
    runner-up floor aside); and, over the photos the head names as the new class, their mean
    confidence against how many of them are that class."""
    import calibration as K
    from extra import ece, fit_temperature

    for name in names:
        X, y, _, _, _ = load(f"/tmp/study/{name}.safetensors", f"/work/shared/datasets/{name}")
        C = y.max() + 1
        rows = []
        for s in range(SEEDS[name]):
            tr, te = split(y, k, s)
            for new in np.random.default_rng(s).choice(C, NEW, replace=False):
                first = tr[y[tr] == new][0]
                t = np.array([i for i in tr if y[i] != new or i == first])
                Xt, yt = X[t], y[t]
                # before
                A, mean = K.prepared(Xt, True)
                B = H.l2n(np.sqrt(np.maximum(X[te], 0)) - mean)
                Pb = H.softmax(17.25 * (B @ L.ncm_fit(A, yt, C).T))
                # now
                L.lda_fit = lda_fit_counted
                try:
                    cnt = np.bincount(yt, minlength=C)
                    p, g = select(Xt, yt, C, min(cnt[cnt >= 2].min(), 4))
                    A, mean = K.prepared(Xt, p)
                    B = H.l2n((np.sqrt(np.maximum(X[te], 0)) if p else X[te]) - mean)
                    # The new class's own row divides by n_y - 1 = 0; it is dropped below.
                    with np.errstate(divide="ignore", invalid="ignore"):
                        Z = K.sm_loo_logits(A, yt, C, g, to_n=True)
                    keep = cnt[yt] >= 2
                    T = fit_temperature(Z[keep], yt[keep])
                    _, (P, c) = K.final_logits(A, yt, C, g)
                    Pn = H.softmax((B @ P + c) / T)
                finally:
                    L.lda_fit = PLAIN_FIT
                named = lambda P: P.argmax(1) == new
                row = []
                for Pr in (Pb, Pn):
                    m = named(Pr)
                    row += [ece(Pr, y[te]), Pr.max(1)[m].mean() * 100 if m.any() else np.nan,
                            (y[te][m] == new).mean() * 100 if m.any() else np.nan]
                rows.append(row)
        R = np.nanmean(np.array(rows), 0)
        print(f"\n{name} k={k}, {len(rows)} tenants: ECE before {R[0]:.1f} / now {R[3]:.1f}; "
              f"photos named the new class: confidence {R[1]:.1f} vs right {R[2]:.1f} before, "
              f"{R[4]:.1f} vs {R[5]:.1f} now")


if __name__ == "__main__" and "--calibration" in sys.argv:
    calibration()
