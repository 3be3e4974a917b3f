# Secondary questions of issue #15, run by `leader.py --extra` (or directly):
#  1. calibration: ECE (15 equal-width bins, top-1) of the ldacv head at k=5, before and after one
#     temperature per tenant fitted on the CV logits of its own training photos;
#  2. open set: per-tenant cut-off on the cosine to the nearest class mean (centred by the
#     training mean), from leave-one-out similarities of the tenant's training photos.
import sys
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import heads_lib as H
import leader as L
from taxon_emb import load, split

TGRID = np.exp(np.linspace(np.log(1e-3), np.log(1e2), 200))


def ece(P, y, bins=15):
    conf = P.max(1)
    ok = P.argmax(1) == y
    e = 0.0
    for b in range(bins):
        m = (conf > b / bins) & (conf <= (b + 1) / bins)
        if m.any():
            e += m.mean() * abs(ok[m].mean() - conf[m].mean())
    return 100 * e


def fit_temperature(logits, y):
    """T minimising the NLL of softmax(logits / T) over a log grid (the server can do the same,
    or a few Newton steps on log T)."""
    best, bt = np.inf, 1.0
    for T in TGRID:
        nll = -H.log_softmax(logits / T)[np.arange(len(y)), y].mean()
        if nll < best:
            best, bt = nll, T
    return bt


def calibration(sets, k=5):
    print(f"\n## Calibration (ldacv head, k={k}): ECE % (15 bins), before / after one temperature "
          "per tenant fitted on its CV logits")
    print("(T/1.3: the CV-fitted temperature divided by 1.3, the ratio T_cv/T_test-optimal seen on")
    print(" both sets: fold models have fewer shots, so CV logits are less sure than the final head's)")
    print("| set | ECE before | ECE after (T_cv) | ECE after (T_cv/1.3) | T_cv (median) | top-1 |")
    print("|---|---|---|---|---|---|")
    for name, (X, y, C, ns) in sets.items():
        eb, ea, ec, ts, accs = [], [], [], [], []
        for s in range(ns):
            tr, te = split(y, k, s)
            choice, cv = L.ldacv_select(X[tr], y[tr], C, L.configs(), return_cv=True)
            base = 1 / 0.05 if choice[1] is None else 1.0  # NCM cosines as the server's T=0.05
            S = L.ldacv_predict(X[tr], y[tr], X[te], C, choice) * base
            T = fit_temperature(cv[choice] * base, y[tr])
            ec.append(ece(H.softmax(S / (T / 1.3)), y[te]))
            eb.append(ece(H.softmax(S), y[te]))
            ea.append(ece(H.softmax(S / T), y[te]))
            ts.append(T)
            accs.append(100 * (S.argmax(1) == y[te]).mean())
        print(f"| {name} | {np.mean(eb):.2f} ± {np.std(eb):.2f} | {np.mean(ea):.2f} ± {np.std(ea):.2f} | "
              f"{np.mean(ec):.2f} ± {np.std(ec):.2f} | {np.median(ts):.3g} | {np.mean(accs):.2f} |")


def loo_own_sims(A, y, C):
    """Cosine of each unit row to the unit mean of the other rows of its class."""
    S = H.onehot(y, C).T @ A
    own = S[y] - A
    return (A * own).sum(1) / np.maximum(np.linalg.norm(own, axis=1), 1e-12)


def open_set(sets, ks=(3, 5, 8), qs=(0.05, 0.10), margins=(0.0, 0.05)):
    print("\n## Open set: keep a photo iff cos(unit photo, nearest unit class mean) >= tau, photos")
    print("centred by the training mean (centred=yes) or not centred at all (centred=no, recommended),")
    print("tau = quantile_q(LOO own-class cosines of the training photos) - margin;")
    print("strangers = 200 photos of the other set (evenly spaced). kept = own test photos kept.")
    print("| set | centred | k | q | margin | tau (mean) | own kept % | strangers rejected % |")
    print("|---|---|---|---|---|---|---|---|")
    names = list(sets)
    for name in names:
        X, y, C, ns = sets[name]
        Xo = sets[[n for n in names if n != name][0]][0]
        strangers = Xo[np.linspace(0, len(Xo) - 1, 200).astype(int)]
        for k, q, mg, cen in [(k, q, mg, cen) for cen in (True, False) for k in ks for q in qs
                              for mg in (margins if cen else (0.0,))]:
            if True:
                if True:
                    kept, rej, taus = [], [], []
                    for s in range(ns):
                        tr, te = split(y, k, s)
                        m = X[tr].mean(0) if cen else 0.0
                        A = H.l2n(X[tr] - m)
                        M = L.ncm_fit(A, y[tr], C)
                        tau = np.quantile(loo_own_sims(A, y[tr], C), q) - mg
                        sim_te = (H.l2n(X[te] - m) @ M.T).max(1)
                        sim_st = (H.l2n(strangers - m) @ M.T).max(1)
                        kept.append(100 * (sim_te >= tau).mean())
                        rej.append(100 * (sim_st < tau).mean())
                        taus.append(tau)
                    print(f"| {name} | {'yes' if cen else 'no'} | {k} | {q} | {mg} | {np.mean(taus):.3f} | {np.mean(kept):.1f} | "
                          f"{np.mean(rej):.1f} |", flush=True)


def run():
    sets = {}
    for name, ns in L.DATA.items():
        X, y, cp, _, _ = load(f"/tmp/study/{name}.safetensors", f"/work/shared/datasets/{name}")
        sets[name] = (X, y, y.max() + 1, ns)
    calibration(sets)
    open_set(sets)


if __name__ == "__main__":
    run()
