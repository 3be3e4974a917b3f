# Heads for scripts/study/leader.py, numpy (+ scikit-learn for anchor b only).
# Every head: f(Xtr, ytr, Xte, C, seed) -> scores (n_te x C); argmax is the prediction.
import numpy as np
from scipy.optimize import minimize


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def onehot(y, C):
    Y = np.zeros((len(y), C))
    Y[np.arange(len(y)), y] = 1
    return Y


# ---------------------------------------------------------------- pre-processing
def prep(Xtr, Xte, mode):
    """'raw'; 'cl2n' = centre by training mean, L2 normalise; 'pt' = sqrt then cl2n;
    'cl2n_std' = cl2n then per-dim standardise (train stats)."""
    if mode == "raw":
        return Xtr, Xte
    if mode.startswith("pt"):
        Xtr = np.sqrt(np.maximum(Xtr, 0))
        Xte = np.sqrt(np.maximum(Xte, 0))
    m = Xtr.mean(0)
    A, B = l2n(Xtr - m), l2n(Xte - m)
    if mode.endswith("_std"):
        mu, sd = A.mean(0), A.std(0) + 1e-8
        A, B = (A - mu) / sd, (B - mu) / sd
    return A, B


# ---------------------------------------------------------------- anchors
def ncm_scores(Xtr, ytr, Xte, C, mode="cl2n"):
    A, B = prep(Xtr, Xte, mode)
    M = l2n(onehot(ytr, C).T @ A)
    return B @ M.T


def anchor_ncm(Xtr, ytr, Xte, C, seed=0):
    return ncm_scores(Xtr, ytr, Xte, C, "cl2n")


def anchor_lr(Xtr, ytr, Xte, C, seed=0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    s = StandardScaler().fit(Xtr)
    m = LogisticRegression(C=1.0, max_iter=2000).fit(s.transform(Xtr), ytr)
    out = np.full((len(Xte), C), -np.inf)
    out[:, m.classes_] = m.decision_function(s.transform(Xte))
    return out


def adamw(params, grads, state, lr, wd, t, b1=0.9, b2=0.999, eps=1e-8):
    """Decoupled AdamW step (PyTorch and candle-nn agree): p *= 1 - lr wd; p -= lr mhat/(sqrt(vhat)+eps)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state[i]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        p *= 1 - lr * wd
        p -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


def norm10(Xtr, Xte):
    m = Xtr.mean(0)
    s = np.linalg.norm(Xtr - m, axis=1).mean() / 10.0
    return (Xtr - m) / s, (Xte - m) / s


def anchor_flat_pt(Xtr, ytr, Xte, C, seed=0, epochs=100, bs=64, lr=1e-3, wd=1e-4):
    """The PyTorch recipe: nn.Linear (default init), AdamW, minibatch 64, 100 epochs, on
    embeddings centred and scaled to average norm 10."""
    Z, Zt = norm10(Xtr, Xte)
    rng = np.random.default_rng(1000 + seed)
    d = Z.shape[1]
    bd = 1 / np.sqrt(d)
    W = rng.uniform(-bd, bd, (C, d))
    b = rng.uniform(-bd, bd, C)
    st = [[np.zeros_like(W), np.zeros_like(W)], [np.zeros_like(b), np.zeros_like(b)]]
    Y = onehot(ytr, C)
    t = 0
    for ep in range(epochs):
        perm = rng.permutation(len(Z))
        for s0 in range(0, len(Z), bs):
            i = perm[s0 : s0 + bs]
            G = (softmax(Z[i] @ W.T + b) - Y[i]) / len(i)
            t += 1
            adamw([W, b], [G.T @ Z[i], G.sum(0)], st, lr, wd, t)
    return Zt @ W.T + b


def combined(Xtr, ytr, Xte, C, seed=0, T=0.05, lr=3e-3, wd=1e-4, max_steps=100,
             patience=10, min_imp=0.01, min_loss=1e-3, return_steps=False):
    """Replica of head-trainer's `combined` head (heads/combined.rs + train.rs)."""
    m = Xtr.mean(0)
    A, B = l2n(Xtr - m), l2n(Xte - m)
    M = l2n(onehot(ytr, C).T @ A)
    prior, prior_te = A @ M.T / T, B @ M.T / T
    Z, Zt = norm10(Xtr, Xte)
    W = np.zeros((C, Z.shape[1]))
    b = np.zeros(C)
    st = [[np.zeros_like(W), np.zeros_like(W)], [np.zeros_like(b), np.zeros_like(b)]]
    Y = onehot(ytr, C)
    cnt = Y.sum(0)
    w = 1.0 / (cnt[ytr] * (cnt > 0).sum())
    hist = []
    steps = max_steps
    for step in range(max_steps):
        L = prior + Z @ W.T + b
        lp = log_softmax(L)
        loss = -(w * lp[np.arange(len(ytr)), ytr]).sum()
        if loss < min_loss:
            steps = step
            break
        if len(hist) >= patience and hist[-patience] - loss < min_imp * hist[-patience]:
            steps = step
            break
        hist.append(loss)
        G = (np.exp(lp) - Y) * w[:, None]
        adamw([W, b], [G.T @ Z, G.sum(0)], st, lr, wd, step + 1)
    out = prior_te + Zt @ W.T + b
    return (out, steps) if return_steps else out


# ---------------------------------------------------------------- candidates
def lr_fit(Z, y, C, lam, W0=None, b0=None, prior=None, center=None, maxiter=500, tol=1e-6):
    """Multinomial LR, loss = mean CE + lam/2 ||W - center||^2 (bias free), L-BFGS.
    prior: fixed logits added (n x C)."""
    n, d = Z.shape
    Y = onehot(y, C)
    cen = 0.0 if center is None else center
    x0 = np.concatenate([(np.zeros((C, d)) if W0 is None else W0).ravel(),
                         np.zeros(C) if b0 is None else b0])

    def f(x):
        W = x[: C * d].reshape(C, d)
        b = x[C * d :]
        L = Z @ W.T + b
        if prior is not None:
            L = L + prior
        lp = log_softmax(L)
        loss = -(lp * Y).sum() / n + 0.5 * lam * ((W - cen) ** 2).sum()
        G = (np.exp(lp) - Y) / n
        gW = G.T @ Z + lam * (W - cen)
        return loss, np.concatenate([gW.ravel(), G.sum(0)])

    r = minimize(f, x0, jac=True, method="L-BFGS-B", options={"maxiter": maxiter, "gtol": tol})
    return r.x[: C * d].reshape(C, d), r.x[C * d :]


def ridge_loo(Z, y, C, lams):
    """Kernel ridge on one-hot targets with intercept (Z centred). Returns per lam
    (LOO accuracy, LOO mean squared error) and a function to predict."""
    n = len(Z)
    Y = onehot(y, C)
    mu = Z.mean(0)
    Zc = Z - mu
    Yc = Y - Y.mean(0)
    K = Zc @ Zc.T
    s, U = np.linalg.eigh(K)
    s = np.maximum(s, 0)
    UtY = U.T @ Yc
    res = []
    for lam in lams:
        g = s / (s + lam)
        F = U @ (g[:, None] * UtY)
        h = (U * U) @ g + 1.0 / n  # + intercept leverage
        Floo = Yc - (Yc - F) / (1 - h)[:, None]
        acc = (Floo.argmax(1) == y).mean()
        mse = ((Yc - (Yc - F) / (1 - h)[:, None] - Yc) ** 2).sum() / n
        res.append((acc, mse))
    return res


def ridge_fit(Z, y, C, lam):
    Y = onehot(y, C)
    mu = Z.mean(0)
    Zc = Z - mu
    ym = Y.mean(0)
    A = np.linalg.solve(Zc @ Zc.T + lam * np.eye(len(Z)), Y - ym)
    W = A.T @ Zc  # C x d
    b = ym - W @ mu
    return W, b


def lda_scores(A, ytr, B, C, alpha):
    """Shrinkage LDA on pre-processed features: Sigma = (1-a) S_w + a tr(S_w)/d I."""
    M = onehot(ytr, C).T @ A / np.bincount(ytr, minlength=C)[:, None]
    R = A - M[ytr]
    d = A.shape[1]
    S = R.T @ R / len(A)
    tr = np.trace(S) / d
    Sig = (1 - alpha) * S + alpha * tr * np.eye(d)
    P = np.linalg.solve(Sig, M.T)  # d x C
    return B @ P - 0.5 * np.sum(M * P.T, 1)


def lda_dual_scores(A, ytr, B, C, gamma):
    """Same family, written as: Sigma = S_w + gamma I (gamma in units of tr(S_w)/d)."""
    M = onehot(ytr, C).T @ A / np.bincount(ytr, minlength=C)[:, None]
    R = A - M[ytr]
    n, d = A.shape
    tr = (R * R).sum() / n / d
    g = gamma * tr
    # (R^T R/n + g I)^-1 v = (v - R^T (n g I + R R^T)^-1 R v)/g   (Woodbury, n x n solve)
    K = R @ R.T
    Kinv = np.linalg.inv(n * g * np.eye(n) + K)
    def apply(V):  # V: d x m
        return (V - R.T @ (Kinv @ (R @ V))) / g
    P = apply(M.T)
    return B @ P - 0.5 * np.sum(M * P.T, 1)


def combined_path(Xtr, ytr, Xev_list, C, T=0.05, lr=3e-3, wd=1e-4, steps=100, every=1, feat="norm10"):
    """Combined head trained for `steps` full-batch AdamW steps (no early stop); returns, for each
    eval matrix, a list of (step, logits) every `every` steps (step 0 = NCM prior)."""
    m = Xtr.mean(0)
    A = l2n(Xtr - m)
    M = l2n(onehot(ytr, C).T @ A)
    prior = A @ M.T / T
    s = np.linalg.norm(Xtr - m, axis=1).mean() / 10.0
    Z = (Xtr - m) / s
    evs = [((Xe - m) / s, l2n(Xe - m) @ M.T / T) for Xe in Xev_list]
    W = np.zeros((C, Z.shape[1])); b = np.zeros(C)
    st = [[np.zeros_like(W), np.zeros_like(W)], [np.zeros_like(b), np.zeros_like(b)]]
    Y = onehot(ytr, C); cnt = Y.sum(0); w = 1.0 / (cnt[ytr] * (cnt > 0).sum())
    out = [[] for _ in evs]
    for step in range(steps + 1):
        if step % every == 0:
            for o, (Ze, Pe) in zip(out, evs):
                o.append((step, Pe + Ze @ W.T + b))
        if step == steps:
            break
        P = softmax(prior + Z @ W.T + b)
        G = (P - Y) * w[:, None]
        adamw([W, b], [G.T @ Z, G.sum(0)], st, lr, wd, step + 1)
    return out


def folds_of(ytr, nf, seed=0):
    """Stratified folds: within each class, examples dealt round-robin (in a seeded order)."""
    rng = np.random.default_rng(seed)
    f = np.zeros(len(ytr), int)
    for c in np.unique(ytr):
        idx = np.where(ytr == c)[0]
        idx = idx[rng.permutation(len(idx))]
        f[idx] = np.arange(len(idx)) % nf
    return f


def ncm_loo_cos(A, ytr, C):
    """Leave-one-out cosines of unit rows A to every class mean (own class mean without the row).
    Rows whose class has no other example get -inf for their own class."""
    S = onehot(ytr, C).T @ A  # C x d sums
    nrm = np.linalg.norm(S, axis=1)
    cos = (A @ S.T) / np.maximum(nrm, 1e-12)
    i = np.arange(len(A))
    own = S[ytr] - A
    on = np.linalg.norm(own, axis=1)
    cos[i, ytr] = np.where(on > 1e-9, (A * own).sum(1) / np.maximum(on, 1e-12), -np.inf)
    return cos
