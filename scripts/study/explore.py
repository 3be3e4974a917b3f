# Exploration (peeks at test accuracy over hyperparameter grids: for finding what to CV, not
# for choosing). Usage: python explore.py SET k1,k2 head1,head2 [nseeds]
import sys, time
import numpy as np
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from taxon_emb import load, split
import heads_lib as H

name = sys.argv[1]
ks = [int(k) for k in sys.argv[2].split(",")]
names = sys.argv[3].split(",")
nseeds = int(sys.argv[4]) if len(sys.argv) > 4 else (10 if name == "pets" else 5)
X, y, cp, children, parents = load(f"/tmp/study/{name}.safetensors", f"/work/shared/datasets/{name}")
C = y.max() + 1


def make(nm):
    # name grammar: base[:arg]
    base, _, arg = nm.partition(":")
    if base == "ncm":
        return lambda a, b, c, C, s: H.ncm_scores(a, b, c, C, arg or "cl2n")
    if base == "lr":  # lr:mode:lam
        mode, lam = arg.split(":")
        def f(a, b, c, C, s):
            A, B = H.prep(a, c, mode)
            W, bb = H.lr_fit(A, b, C, float(lam))
            return B @ W.T + bb
        return f
    if base == "ridge":
        mode, lam = arg.split(":")
        def f(a, b, c, C, s):
            A, B = H.prep(a, c, mode)
            W, bb = H.ridge_fit(A, b, C, float(lam))
            return B @ W.T + bb
        return f
    return getattr(H, base)


res = {}
for k in ks:
    for nm in names:
        f = make(nm)
        accs = []
        t0 = time.time()
        for s in range(nseeds):
            tr, te = split(y, k, s)
            S = f(X[tr], y[tr], X[te], C, s)
            accs.append((S.argmax(1) == y[te]).mean() * 100)
        res[(k, nm)] = accs
        print(f"{name} k={k} {nm:28s} {np.mean(accs):6.2f} ± {np.std(accs):4.2f}  ({time.time()-t0:.1f}s)", flush=True)
