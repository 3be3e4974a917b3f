#!/usr/bin/env bash
# Where the CPU engine's time goes, step by step: the median ms/image of every step over all
# forward passes of a burst (TAXON_CONV_PROFILE=1 prints each pass), on random input.
#
#   scripts/conv-profile.sh [BATCH] [SECONDS]            MobileNetV2, real weights
#   TAXON_CONV_FUSE=0 scripts/conv-profile.sh 1 3        its blocks layer by layer
#   BACKBONE=resnet18 WEIGHTS=path scripts/conv-profile.sh 8
#
# Uses the vs_onnx example (release) and .venv-onnx's numpy for the input (scripts/bench-vs-onnx.sh
# creates both).
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-1}
seconds=${2:-3}
backbone=${BACKBONE:-mobilenet_v2}
weights=${WEIGHTS:-weights/mobilenet_v2.safetensors}
py=${VENV:-.venv-onnx}/bin/python
cargo build -q --release -p feature-server --example vs_onnx
input=$(mktemp)
trap 'rm -f "$input"' EXIT
"$py" -c "import numpy as np; np.random.seed(0); (np.random.rand(32,3,224,224).astype('<f4')*2-1).tofile('$input')"
lscpu | grep -m1 'Model name' || true
printf 'run %s %s\nquit\n' "$batch" "$seconds" |
  TAXON_CONV_PROFILE=1 "${CARGO_TARGET_DIR:-target}/release/examples/vs_onnx" serve \
    --backbone "$backbone" --weights "$weights" --input "$input" 2>&1 |
  python3 -c '
import sys, statistics as st, collections
steps = collections.defaultdict(list); totals = []; i = 0
for line in sys.stdin:
    if "conv engine" in line:
        totals.append(float(line.split(":")[1].split()[0])); i = 0; continue
    p = line.split()
    if len(p) > 3 and p[1] == "ms/img":
        steps[(i, " ".join(p[4:]))].append(float(p[0])); i += 1
if not totals:
    sys.exit("no profile printed")
print("passes %d, median %.3f ms/img (min %.3f)" % (len(totals), st.median(totals), min(totals)))
for (i, name), v in sorted(steps.items()):
    print("%7.3f ms/img  %s" % (st.median(v), name))
'
