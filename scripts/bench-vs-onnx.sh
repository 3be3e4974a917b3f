#!/usr/bin/env bash
# Taxon's CPU forward pass beside ONNX Runtime, in one run, alternating (issue #5):
# images/s for each and the ratio at batch 1, 8, 32, for ResNet18 and MobileNetV2; then the
# end-to-end gRPC figures of `cargo bench -p feature-server --bench throughput` for each backbone.
#
#   scripts/bench-vs-onnx.sh                # both backbones, 5 rounds, then the gRPC bench
#   ROUNDS=5 SECONDS_PER_BURST=3 scripts/bench-vs-onnx.sh
#   NO_E2E=1 BACKBONES=resnet18 scripts/bench-vs-onnx.sh
#
# ONNX Runtime, onnx and numpy come from PyPI into .venv-onnx (created on first use). The ONNX
# graphs are built from the same safetensors files the Rust side loads: ResNet18's formula
# weights (no real ResNet18 weights ship here) and weights/mobilenet_v2.safetensors when
# present (else MobileNetV2 formula weights are not available and it is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv-onnx}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # Pinned, so that two machines' figures compare the same ONNX Runtime.
  "$venv/bin/pip" install -q onnxruntime==1.32.0 onnx==1.23.2 numpy
fi

cargo build -q --release -p feature-server --example vs_onnx
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/release/examples/vs_onnx

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" write-formula "$work/resnet18.safetensors"

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
flags=$(grep -m1 '^flags' /proc/cpuinfo)
for f in avx512f avx2 fma; do
  if grep -qw "$f" <<<"$flags"; then printf '%s: yes  ' "$f"; else printf '%s: no  ' "$f"; fi
done
echo
for backbone in ${BACKBONES:-resnet18 mobilenet_v2}; do
  case $backbone in
    resnet18) weights=$work/resnet18.safetensors ;;
    mobilenet_v2)
      weights=${TAXON_MOBILENET_WEIGHTS:-weights/mobilenet_v2.safetensors}
      if [ ! -f "$weights" ]; then
        echo "SKIP mobilenet_v2: $weights not found (cargo run -p feature-server -- fetch-weights mobilenet_v2 --out weights)"
        continue
      fi ;;
    *) echo "unknown backbone $backbone"; exit 2 ;;
  esac
  "$venv/bin/python" scripts/bench_vs_onnx.py --backbone "$backbone" --weights "$weights" \
    --rust "$bin" --work "$work" --rounds "${ROUNDS:-5}" --seconds "${SECONDS_PER_BURST:-2}"
done

if [ -z "${NO_E2E:-}" ]; then
  for backbone in ${BACKBONES:-resnet18 mobilenet_v2}; do
    echo "--- end to end over gRPC (cargo bench -p feature-server --bench throughput, $backbone)"
    TAXON_BENCH_BACKBONE=$backbone TAXON_BENCH_SKIP_MOBILENET=1 \
      cargo bench -q -p feature-server --bench throughput
  done
fi
