# Loads a tenant file written by `client ... export FILE.safetensors` (see
# head-trainer/src/tenant_file.rs) with numpy only, and labels each example by the dataset
# folder its photo came from (sha256 of the file bytes -> <parent>/<child>/<file>).
# Used by scripts/study/leader.py; caches the result as FILE.npz next to the export.
import hashlib, json, os, struct
import numpy as np

DT = {"F32": "<f4", "U32": "<u4", "U8": "u1", "F64": "<f8", "I64": "<i8", "U64": "<u8"}


def read_safetensors(path):
    b = open(path, "rb").read()
    (hl,) = struct.unpack("<Q", b[:8])
    hdr = json.loads(b[8 : 8 + hl])
    meta = hdr.pop("__metadata__", {})
    base = 8 + hl
    out = {}
    for k, v in hdr.items():
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(b[base + s : base + e], dtype=DT[v["dtype"]]).reshape(v["shape"])
    return out, meta


def load(export_path, dataset_dir):
    """Returns X (n x d float64), y (child index), parent index per child, child names, parents."""
    cache = export_path + ".npz"
    if os.path.exists(cache) and os.path.getmtime(cache) > os.path.getmtime(export_path):
        z = np.load(cache, allow_pickle=True)
        return z["X"], z["y"], z["cp"], list(z["children"]), list(z["parents"])
    t, meta = read_safetensors(export_path)
    X = t["examples.embedding"].astype(np.float64)
    hashes = [bytes(h).hex() for h in t["examples.hash"]]
    where = {}
    for p in sorted(os.listdir(dataset_dir)):
        pd = os.path.join(dataset_dir, p)
        if not os.path.isdir(pd):
            continue
        for c in sorted(os.listdir(pd)):
            cd = os.path.join(pd, c)
            if not os.path.isdir(cd):
                continue
            for f in sorted(os.listdir(cd)):
                h = hashlib.sha256(open(os.path.join(cd, f), "rb").read()).hexdigest()
                where.setdefault(h, (p, c))
    lab = [where.get(h) for h in hashes]
    missing = sum(l is None for l in lab)
    if missing:
        print(f"warning: {missing} exported examples match no dataset file; dropped")
    keep = np.array([l is not None for l in lab])
    X = X[keep]
    lab = [l for l in lab if l is not None]
    children = sorted(set(c for _, c in lab))
    ci = {c: i for i, c in enumerate(children)}
    y = np.array([ci[c] for _, c in lab])
    parents = sorted(set(p for p, _ in lab))
    pi = {p: i for i, p in enumerate(parents)}
    pmap = {ci[c]: pi[p] for p, c in lab}
    cp = np.array([pmap[i] for i in range(len(children))])
    np.savez(cache, X=X, y=y, cp=cp, children=np.array(children), parents=np.array(parents))
    return X, y, cp, children, parents


def split(y, k, seed):
    """Per child (in index order): k random training photos, the rest for testing."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = np.where(y == c)[0]
        idx = idx[rng.permutation(len(idx))]
        tr += list(idx[:k])
        te += list(idx[k:])
    return np.array(tr), np.array(te)
