"""ONNX Runtime beside Taxon's forward pass, alternating in one run (driven by bench-vs-onnx.sh).

Why this shape: the machine is shared, so figures from two separate runs are not comparable.
Here one process times ONNX Runtime and drives the Rust forward pass (the `vs_onnx` example,
over a line protocol on its stdin/stdout) in alternating bursts, and reports per-round ratios.

The ONNX graphs are built with the `onnx` package from the very safetensors file the Rust side
loads (torchvision names, batch-norm unfolded: ONNX Runtime folds it itself), so both engines
compute the same function; a check compares their embeddings before any timing.
"""

import argparse
import json
import statistics
import struct
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BATCHES = (1, 8, 32)
MAX_BATCH = 32


def load_safetensors(path):
    """name -> float32 array, read by hand (the format is a JSON header and raw little-endian
    data), so the venv needs no safetensors/torch."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise SystemExit(f"{name}: dtype {meta['dtype']} (only F32 handled)")
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(meta["shape"])
    return out


class Graph:
    """A tiny builder: conv + batch-norm pairs with torchvision names, then ONNX nodes."""

    def __init__(self, weights):
        self.w = weights
        self.nodes, self.inits, self.used, self.n = [], [], set(), 0

    def tmp(self):
        self.n += 1
        return f"t{self.n}"

    def init(self, name):
        if name not in self.used:
            self.used.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(self.w[name]), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.tmp()
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv_bn(self, x, conv, bn, stride, groups=1):
        w = self.w[f"{conv}.weight"]
        k = w.shape[2]
        y = self.node(
            "Conv",
            [x, self.init(f"{conv}.weight")],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=groups,
        )
        names = [self.init(f"{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        return self.node("BatchNormalization", [y, *names], epsilon=1e-5)

    def relu6(self, x):
        lo = self.const("zero", 0.0)
        hi = self.const("six", 6.0)
        return self.node("Clip", [x, lo, hi])

    def const(self, name, value):
        if name not in self.used:
            self.used.add(name)
            self.inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def model(self, x_out):
        emb = self.node("Flatten", [self.node("GlobalAveragePool", [x_out])], axis=1)
        graph = helper.make_graph(
            self.nodes,
            "taxon",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
            [helper.make_tensor_value_info(emb, TensorProto.FLOAT, ["N", None])],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m)
        return m


def resnet18(weights):
    g = Graph(weights)
    x = g.node("Relu", [g.conv_bn("x", "conv1", "bn1", 2)])
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = 64
    for i, (c_out, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
        for b in range(2):
            p = f"layer{i + 1}.{b}"
            s = stride if b == 0 else 1
            y = g.node("Relu", [g.conv_bn(x, f"{p}.conv1", f"{p}.bn1", s)])
            y = g.conv_bn(y, f"{p}.conv2", f"{p}.bn2", 1)
            short = x
            if b == 0 and (s != 1 or c_in != c_out):
                short = g.conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", s)
            x = g.node("Relu", [g.node("Add", [y, short])])
        c_in = c_out
    return g.model(x)


def mobilenet_v2(weights):
    g = Graph(weights)
    x = g.relu6(g.conv_bn("x", "features.0.0", "features.0.1", 2))
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]
    c_in, idx = 32, 1
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = c_in * t
            if t == 1:
                h = g.relu6(g.conv_bn(x, f"{p}.0.0", f"{p}.0.1", stride, hidden))
                y = g.conv_bn(h, f"{p}.1", f"{p}.2", 1)
            else:
                h = g.relu6(g.conv_bn(x, f"{p}.0.0", f"{p}.0.1", 1))
                h = g.relu6(g.conv_bn(h, f"{p}.1.0", f"{p}.1.1", stride, hidden))
                y = g.conv_bn(h, f"{p}.2", f"{p}.3", 1)
            x = g.node("Add", [x, y]) if stride == 1 and c_in == c else y
            c_in, idx = c, idx + 1
    x = g.relu6(g.conv_bn(x, "features.18.0", "features.18.1", 1))
    return g.model(x)


class Rust:
    """The `vs_onnx serve` process: one command line in, one answer line out."""

    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # `ready isa=Avx2 threads=2`: the kernels and the pool size it really runs with.
        words = self.p.stdout.readline().split()
        if not words or words[0] != "ready":
            raise SystemExit(f"vs_onnx said {' '.join(words)!r}, expected ready")
        self.info = dict(w.split("=", 1) for w in words[1:])

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        answer = self.p.stdout.readline()
        if not answer:
            raise SystemExit(f"vs_onnx exited (rc {self.p.wait()}) on {line!r}")
        return answer.split()

    def expect(self, word):
        got = self.p.stdout.readline().strip()
        if got != word:
            raise SystemExit(f"vs_onnx said {got!r}, expected {word!r}")

    def close(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.close()
        self.p.wait()


def ort_run(sess, x, secs):
    """One untimed pass, then passes for at least `secs` (and at least 2): (images, seconds)."""
    sess.run(None, {"x": x})
    t, images = time.perf_counter(), 0
    while images < 2 * len(x) or time.perf_counter() - t < secs:
        sess.run(None, {"x": x})
        images += len(x)
    return images, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", required=True, choices=["resnet18", "mobilenet_v2"])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--rust", required=True, help="path of the vs_onnx example binary")
    ap.add_argument("--work", required=True, help="scratch directory")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one burst")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    weights = load_safetensors(a.weights)
    model = (resnet18 if a.backbone == "resnet18" else mobilenet_v2)(weights)
    onnx_path = f"{a.work}/{a.backbone}.onnx"
    onnx.save(model, onnx_path)
    def session(spinning):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning (the default) keeps idle workers busy-waiting for the next op: faster on a
        # dedicated machine, unfair to anything else sharing it. Both are reported.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        return ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])

    sess = session(spinning=True)
    quiet = session(spinning=False)

    # Normalized-image statistics (mean 0, std 1), the same bytes for both engines.
    x_all = np.random.default_rng(0).standard_normal((MAX_BATCH, 3, 224, 224), dtype=np.float32)
    x_path = f"{a.work}/input.f32"
    x_all.astype("<f4").tofile(x_path)
    rust = Rust([a.rust, "serve", "--backbone", a.backbone, "--weights", a.weights,
                 "--input", x_path])
    print(f"{a.backbone}: Taxon kernels {rust.info.get('isa', '?')}, "
          f"{rust.info.get('threads', '?')} pool threads; ONNX Runtime {ort.__version__} "
          f"(MLAS picks its kernels from the same CPU flags), {a.threads} intra-op threads")

    # Same function? Compare embeddings on 8 images before timing anything.
    emb_path = f"{a.work}/rust_emb.f32"
    rust.ask(f"embed 8 {emb_path}")
    ours = np.fromfile(emb_path, dtype="<f4").reshape(8, -1)
    theirs = sess.run(None, {"x": x_all[:8]})[0]
    rel = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    print(f"{a.backbone}: Rust vs ONNX Runtime embeddings, worst |a-b|/|b| over 8 images = "
          f"{rel.max():.2e}")
    if rel.max() > 1e-3:
        raise SystemExit("the two engines disagree: the benchmark would compare different work")

    rust_ips = {b: [] for b in BATCHES}
    ort_ips = {b: [] for b in BATCHES}
    quiet_ips = {b: [] for b in BATCHES}
    ratios = {b: [] for b in BATCHES}
    for r in range(a.rounds):
        for b in BATCHES:
            x = np.ascontiguousarray(x_all[:b])
            # Alternate which engine goes first, so neither always follows the other.
            order = ("rust", "ort", "quiet") if (r + b) % 2 == 0 else ("ort", "quiet", "rust")
            got = {}
            for who in order:
                if who == "rust":
                    images, secs = map(float, rust.ask(f"run {b} {a.seconds}"))
                else:
                    images, secs = ort_run(sess if who == "ort" else quiet, x, a.seconds)
                got[who] = images / secs
            rust_ips[b].append(got["rust"])
            ort_ips[b].append(got["ort"])
            quiet_ips[b].append(got["quiet"])
            ratios[b].append(got["rust"] / got["ort"])
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(
            f"b{b} {rust_ips[b][-1]:.1f} vs {ort_ips[b][-1]:.1f}" for b in BATCHES), flush=True)
    rust.close()

    print()
    print(f"| {a.backbone} batch | Taxon img/s | ONNX Runtime {ort.__version__} img/s | "
          f"ratio (median of per-round) | ratio range | ONNX Runtime, no spinning, img/s |")
    print("|---|---|---|---|---|---|")
    for b in BATCHES:
        print(f"| {b} | {statistics.median(rust_ips[b]):.1f} | {statistics.median(ort_ips[b]):.1f} "
              f"| {statistics.median(ratios[b]):.2f} | {min(ratios[b]):.2f}-{max(ratios[b]):.2f} "
              f"| {statistics.median(quiet_ips[b]):.1f} |")
    print(f"({a.rounds} rounds, {a.seconds:.1f} s bursts alternated, {a.threads} threads each; "
          f"medians)")
    print()


if __name__ == "__main__":
    sys.exit(main())
