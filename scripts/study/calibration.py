# Issue #15, calibration: which temperature, fitted on a tenant's own training photos only,
# makes the `lda` head's probabilities honest on its test photos?
#
#   cv/1.3  the temperature fitted on the cross-validated held-out logits of the chosen grid
#           point, divided by 1.3 (the head up to b656137; 1.3 was read off test photos)
#   cv      the same without the divisor
#   loo     leave-one-out logits of the FINAL head in closed form, only the photo's own class
#           mean moved (the shrunk within-class covariance kept)
#   loo-sm  the same with the photo's share of the covariance taken out too (Sherman-Morrison);
#           NCM is left out exactly in both
#   loo-sm-n  loo-sm with the own-class logit carried from a mean of n_y - 1 photos to one of
#           n_y (Gaussian model, no fitted constant): what head-trainer/src/heads/lda_loo.rs does
#   loo-x   (--exact) exact leave-one-out: the head refitted without the photo, covariance,
#           centring and shrinkage scale included; the reference the closed forms approximate
#
# Prints ECE (15 bins, top-1, %) on the test photos, mean ± std over seeds, per k, for pets
# (10 seeds) and birds (5), with the splits of leader.py; then two diagnostics that look at the
# test photos and are not methods: the ECE at the test-optimal temperature, and the noise floor
# (the ECE a perfectly calibrated head with the same confidences would show on this many test
# photos); and the ratio of loo-sm's temperature to the test-optimal one. Nothing is tuned on
# test photos: no method has a free parameter. Reproduce: the embeddings as in leader.py's
# header, then
#   OMP_NUM_THREADS=1 /tmp/study/venv/bin/python scripts/study/calibration.py [--exact]
import sys
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import heads_lib as H
import leader as L
from extra import ece, fit_temperature
from taxon_emb import load, split

NCM_SCALE = 20.0


def prepared(Xtr, power):
    Xp = np.sqrt(np.maximum(Xtr, 0)) if power else Xtr
    mean = Xp.mean(0)
    return H.l2n(Xp - mean), mean


def final_logits(A, ytr, C, g):
    """Logits of the final head on its own rows and the head (P, c)."""
    if g is None:
        M = L.ncm_fit(A, ytr, C) * NCM_SCALE
        return A @ M.T, (M.T, np.zeros(C))
    P, c = L.lda_fit(A, ytr, C, [g])[g]
    return A @ P + c, (P, c)


def residual_forms(A, ytr, C, g):
    """Photos per class, residuals R and q_i = r_i Sigma^-1 r_i for every row, with
    Sigma = R^T R / n + g tau I: diag(R Sigma^-1 R^T) = diag(n K (K + n g tau I)^-1), K = R R^T."""
    n, d = A.shape
    cnt = np.bincount(ytr, minlength=C)
    M = H.onehot(ytr, C).T @ A / np.maximum(cnt, 1)[:, None]
    R = A - M[ytr]
    tau = (R * R).sum() / n / d
    s, U = np.linalg.eigh(R @ R.T)
    s = np.maximum(s, 0)
    return cnt, R, n * ((U * U) * (s / (s + n * g * tau))).sum(1)


def loo_logits(A, ytr, C, g):
    """Closed-form leave-one-out logits of the final head (see the header)."""
    n = len(A)
    Z, _ = final_logits(A, ytr, C, g)
    i = np.arange(n)
    if g is None:
        Z = Z.copy()
        Z[i, ytr] = NCM_SCALE * H.ncm_loo_cos(A, ytr, C)[i, ytr]
        return Z
    cnt, _, q = residual_forms(A, ytr, C, g)
    m1 = cnt[ytr] - 1.0
    Z = Z.copy()
    Z[i, ytr] -= q / m1 + q / (2 * m1 * m1)
    return Z


def sm_loo_logits(A, ytr, C, g, to_n=False):
    """Leave-one-out logits with the photo's own class mean AND its share of the within-class
    scatter removed (Sherman-Morrison on Sigma; the shrinkage scale tau and the 1/n kept)."""
    n = len(A)
    Z, (P, c) = final_logits(A, ytr, C, g)
    if g is None:
        return loo_logits(A, ytr, C, g)
    cnt, R, q = residual_forms(A, ytr, C, g)
    W = R @ P  # r_i Sigma^-1 m_c
    i = np.arange(n)
    m1 = cnt[ytr] - 1.0
    xm = Z - c  # x Sigma^-1 m_c
    mm = np.broadcast_to(-2 * c, Z.shape).copy()  # m_c Sigma^-1 m_c
    rm = W.copy()  # r Sigma^-1 m_c
    wy, qy = W[i, ytr], q
    xm[i, ytr] -= (wy + qy) / m1
    mm[i, ytr] += -2 * wy / m1 + qy / m1**2
    rm[i, ytr] = wy - qy / m1
    xr = wy + qy  # x Sigma^-1 r
    k = cnt[ytr] / (m1 * n)
    beta = k / (1 - k * qy)
    Z = (xm + (beta * xr)[:, None] * rm) - (mm + beta[:, None] * rm**2) / 2
    if to_n:
        # A new photo meets a class mean of n_y photos, the left-out one a mean of n_y - 1: under
        # a Gaussian class the expected squared distance is s (1 + 1/n_y) against
        # s (1 + 1/(n_y - 1)), so the own-class logit is raised by d_loo / (2 n_y^2), with
        # d_loo = (n_y / (n_y - 1))^2 r Sigma'^-1 r and r Sigma'^-1 r = q / (1 - k q).
        Z[i, ytr] += qy / (1 - k * qy) / (2 * m1 * m1)
    return Z


def ece_floor(S, T, draws=50, seed=0):
    """Expected ECE of a perfectly calibrated head with these confidences on this many photos:
    each answer right with probability equal to its confidence."""
    P = H.softmax(S / T)
    conf = P.max(1)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        ok = rng.random(len(conf)) < conf
        Q = np.zeros_like(P)
        Q[np.arange(len(conf)), 0] = conf
        out.append(ece(Q, np.where(ok, 0, 1)))
    return np.mean(out)


def exact_loo_logits(Xtr, ytr, C, power, g):
    n = len(ytr)
    Z = np.zeros((n, C))
    for j in range(n):
        keep = np.arange(n) != j
        A, mean = prepared(Xtr[keep], power)
        _, (P, c) = final_logits(A, ytr[keep], C, g)
        Z[j] = L.transform(Xtr[j : j + 1], mean, power) @ P + c
    return Z


def main():
    exact = "--exact" in sys.argv
    methods = ["cv/1.3", "cv", "loo", "loo-sm", "loo-sm-n"] + (["loo-x"] if exact else [])
    for name, seeds in L.DATA.items():
        X, y, _, _, _ = load(f"/tmp/study/{name}.safetensors", f"/work/shared/datasets/{name}")
        C = y.max() + 1
        print(f"\n## {name}: ECE % on test photos (15 bins), mean ± std over {seeds} seeds")
        print("| k | " + " | ".join(methods) + " | T: " + " / ".join(methods)
              + " | top-1 | ECE at the test-optimal T (peeks) | noise floor |"
              + " T loo-sm / test-optimal T, median (range) |")
        print("|---" * (len(methods) + 6) + "|")
        for k in [3, 5, 8]:
            e = {m: [] for m in methods}
            t = {m: [] for m in methods}
            acc, oracle, floor, ratio = [], [], [], []
            for s in range(seeds):
                tr, te = split(y, k, s)
                Xtr, ytr = X[tr], y[tr]
                choice, cv = L.ldacv_select(Xtr, ytr, C, L.configs(), return_cv=True)
                power, g = choice
                base = NCM_SCALE if g is None else 1.0
                A, mean = prepared(Xtr, power)
                _, (P, c) = final_logits(A, ytr, C, g)
                S = L.transform(X[te], mean, power) @ P + c
                acc.append(100 * (S.argmax(1) == y[te]).mean())
                t_cv = fit_temperature(cv[choice] * base, ytr)
                temps = {"cv/1.3": t_cv / 1.3, "cv": t_cv,
                         "loo": fit_temperature(loo_logits(A, ytr, C, g), ytr),
                         "loo-sm": fit_temperature(sm_loo_logits(A, ytr, C, g), ytr),
                         "loo-sm-n": fit_temperature(sm_loo_logits(A, ytr, C, g, True), ytr)}
                if exact:
                    temps["loo-x"] = fit_temperature(exact_loo_logits(Xtr, ytr, C, power, g), ytr)
                for m in methods:
                    e[m].append(ece(H.softmax(S / temps[m]), y[te]))
                    t[m].append(temps[m])
                # Diagnostics, not methods: the test-optimal T (peeks) and the ECE a perfectly
                # calibrated head would still show on this many test photos at that T.
                t_test = fit_temperature(S, y[te])
                oracle.append(ece(H.softmax(S / t_test), y[te]))
                ratio.append(temps["loo-sm"] / t_test)
                floor.append(ece_floor(S, t_test))
            print(f"| {k} | " + " | ".join(f"{np.mean(e[m]):.2f} ± {np.std(e[m]):.2f}" for m in methods)
                  + " | " + " / ".join(f"{np.median(t[m]):.3g}" for m in methods)
                  + f" | {np.mean(acc):.2f} | {np.mean(oracle):.2f} | {np.mean(floor):.2f} | "
                  f"{np.median(ratio):.2f} ({np.min(ratio):.2f}-{np.max(ratio):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
