#!/usr/bin/env bash
# Prepares, on a CPU machine, everything scripts/gpu-check.sh runs on a GPU machine, in
# gpu-bundle/ (ignored by git; the device tool carries it): the CUDA builds of the
# feature-server, of its measuring tool (examples/gpu_check.rs) and of the parity tests, made by
# scripts/build-cuda.sh, stripped and xz-compressed; the measuring tool again with cuDNN's
# convolutions; the real MobileNetV2 weights; and a few hundred real photos from
# ../shared/datasets (never committed). About 51 MiB: with the checkout's 7 MiB, under the 64 MiB
# that may travel to the GPU machine.
#
#   scripts/gpu-bundle.sh            then: device run, carry gpu-bundle, scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bundle
datasets=${TAXON_DATASETS:-../shared/datasets}
weights=${TAXON_MOBILENET_WEIGHTS:-weights/mobilenet_v2.safetensors}
[ -f "$weights" ] || cargo run -q -p feature-server -- fetch-weights mobilenet_v2 --out weights
[ -d "$datasets/pets" ] && [ -d "$datasets/birds" ] || { echo "no photo sets in $datasets" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/bin" "$out/photos"

# Prints the paths of the executables a cargo invocation built (of target NAME if given: a test
# build also builds the crate's binaries).
executables() {
  python3 -c 'import json, sys
want = sys.argv[1] if len(sys.argv) > 1 else None
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and want in (None, m["target"]["name"]):
        print(m["executable"])' "$@"
}

pack() { # pack SRC NAME: stripped and compressed into the bundle
  strip -o "$out/bin/$2" "$1"
  xz -T0 -6 "$out/bin/$2"
}

echo "=== building the CUDA variant"
built=$(scripts/build-cuda.sh build --release -p feature-server --bin feature-server \
  --example gpu_check --message-format=json | executables)
for exe in $built; do pack "$exe" "$(basename "$exe")"; done
# cuDNN's convolutions are measured by the forward pass alone: its server would add 9 MB.
echo "=== building the cuDNN variant of the measuring tool"
built=$(scripts/build-cuda.sh build --release -p feature-server --example gpu_check \
  --features cudnn --message-format=json | executables gpu_check)
pack "$built" gpu_check-cudnn
echo "=== building the parity tests"
parity=$(scripts/build-cuda.sh test --release --no-run -p feature-server --test parity \
  --message-format=json | executables parity)
pack "$parity" parity

cp "$weights" "$out/mobilenet_v2.safetensors"
xz -T0 -6 "$out/mobilenet_v2.safetensors"
# Real photos of every class: three per pet breed (large photos), two per bird species (small).
take() { # take SET PER_CLASS
  find "$datasets/$1" -mindepth 2 -maxdepth 2 -type d | sort | while read -r class; do
    find "$class" -maxdepth 1 -iname '*.jpg' | sort | head -n "$2" | while read -r photo; do
      cp "$photo" "$out/photos/$1-$(basename "$class")-$(basename "$photo")"
    done
  done
}
take pets 3
take birds 2
git rev-parse HEAD >"$out/commit"
echo "photos: $(ls "$out/photos" | wc -l); bundle: $(du -sh "$out" | cut -f1)"
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
total=$(($(du -sb "$out" | cut -f1) + tracked))
echo "what would travel: $((total / 1048576)) MiB (the device tool takes at most 64)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "too large to travel" >&2; exit 1; }
ls -la "$out" "$out/bin"
