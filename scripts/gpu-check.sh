#!/usr/bin/env bash
# The one run a GPU machine gets (issue #16): from the repository root, with gpu-bundle/ (made by
# scripts/gpu-bundle.sh on a CPU machine) beside it. In order, each step under its own time
# limit, every figure printed and written under $OUT (default gpu-out/):
#   1. nvidia-smi;
#   2. the parity tests on the GPU (TAXON_TEST_DEVICE=cuda), f32 and the f16/bf16 tolerances;
#   3. the forward pass alone per batch size, both backbones, f32/f16/bf16, then with cuDNN;
#   4. decode + preprocess alone on 1 and all cores (what the CPU can feed the GPU);
#   5. end to end over gRPC: the server on the GPU, warmed up, 16/32/64 streams of real JPEGs
#      at max batch 128 and 256, then one photo at a time;
#   6. peak GPU memory, per step, sampled by nvidia-smi every 250 ms.
# About 5 minutes in all. TAXON_GPU_CHECK_DEVICE=cpu TAXON_GPU_CHECK_BIN=target/debug tries the
# script itself on a CPU machine (with the binaries cargo built there).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
device=${TAXON_GPU_CHECK_DEVICE:-cuda}
export RUST_LIB_BACKTRACE=0 # an error is one line; a panic keeps its backtrace
bundle=gpu-bundle
figures="$out/figures.jsonl"
: >"$figures"
started=$SECONDS

step() { printf '\n=== %s (%d s in)\n' "$1" $((SECONDS - started)); }
# run LIMIT_S CMD...: the command under its own limit; a failure is reported, not fatal, so
# one broken step still leaves the others' figures.
run() {
  local limit=$1
  shift
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "!!! exit $rc (limit ${limit} s): $*"
  return $rc
}

step "setup"
bin=${TAXON_GPU_CHECK_BIN:-}
if [ -z "$bin" ]; then
  bin=/tmp/taxon-bin
  mkdir -p "$bin"
  for f in "$bundle"/bin/*.xz; do xz -dc "$f" >"$bin/$(basename "$f" .xz)"; done
  chmod +x "$bin"/*
  xz -dc "$bundle/mobilenet_v2.safetensors.xz" >/tmp/mobilenet_v2.safetensors
  mobilenet=/tmp/mobilenet_v2.safetensors
  photos=$bundle/photos
  parity=$bin/parity
  tool=$bin/gpu_check
  echo "bundle of commit $(cat "$bundle/commit")"
else
  mobilenet=${TAXON_MOBILENET_WEIGHTS:-weights/mobilenet_v2.safetensors}
  photos=${TAXON_GPU_CHECK_PHOTOS:-../shared/datasets/pets}
  parity=$(find "$bin/deps" -maxdepth 1 -name 'parity-*' -type f -executable -printf '%T@ %p\n' |
    sort -rn | head -1 | cut -d' ' -f2)
  tool=$bin/examples/gpu_check
fi
# CUDA 13's libraries (cuBLAS, cuRAND, NVRTC, the runtime, cuDNN), from the machine's Python
# packages: the binaries link them dynamically and carry none.
libs=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = {os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nproc
lscpu | grep -m1 'Model name'
"$tool" write-formula resnet18 /tmp/resnet18.safetensors || exit 1
echo "photos: $(find "$photos" -iname '*.jpg' | wc -l) in $photos"

# GPU memory in use, sampled all along; each step reports its own peak.
memlog="$out/gpu-memory.csv"
: >"$memlog"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 >"$memlog" &
  sampler=$!
  trap 'kill $sampler 2>/dev/null' EXIT
fi
mark() { wc -l <"$memlog"; }
peak_since() { # peak_since MARK LABEL
  local peak
  peak=$(tail -n +$(($1 + 1)) "$memlog" | awk -F', ' '$2 > m { m = $2 } END { print m + 0 }')
  echo "peak GPU memory during $2: $peak MiB"
  printf '{"what": "gpu_memory", "step": "%s", "peak_mib": %s}\n' "$2" "$peak" >>"$figures"
}

step "1. nvidia-smi"
run 30 nvidia-smi | tee "$out/nvidia-smi.txt"

step "2. parity tests on $device (f32, and the f16/bf16 tolerances)"
m=$(mark)
TAXON_TEST_DEVICE=$device TAXON_TEST_FIXTURES=$PWD/feature-server/tests/fixtures \
  TAXON_MOBILENET_WEIGHTS=$mobilenet CI=true \
  run 240 "$parity" --nocapture --test-threads 1 | tee "$out/parity.txt"
peak_since "$m" parity

step "3. the forward pass alone"
for variant in "" -cudnn; do
  [ -x "$tool$variant" ] || { echo "no $tool$variant: not measured"; continue; }
  for backbone in resnet18 mobilenet_v2; do
    w=/tmp/resnet18.safetensors
    [ $backbone = mobilenet_v2 ] && w=$mobilenet
    dtypes="f32 f16 bf16"
    [ "$device" = cpu ] && dtypes="f32 f16" # candle has no bf16 matrix product on a CPU
    for dtype in $dtypes; do
      m=$(mark)
      run 60 "$tool$variant" --out "$figures" forward --backbone $backbone \
        --weights "$w" --device "$device" --dtype $dtype --seconds 1 \
        --batches "${TAXON_GPU_CHECK_BATCHES:-1,8,32,64,128,256}"
      peak_since "$m" "forward $backbone $dtype${variant}"
    done
  done
done

step "4. decode + preprocess alone"
run 30 "$tool" --out "$figures" decode --images "$photos" \
  --threads "1,$(nproc)" --seconds 2

step "5. end to end over gRPC"
port=50151
serve() { # serve BACKBONE WEIGHTS DTYPE MAX_BATCH
  local m
  m=$(mark)
  "$bin/feature-server" --backbone "$1" --weights "$2" --dtype "$3" --max-batch "$4" \
    --device "$device" --listen "127.0.0.1:$port" --decode-threads "$(nproc)" \
    --queue-capacity 1024 >"$out/server-$1-$3-$4.log" 2>&1 &
  local pid=$!
  run 90 "$tool" --out "$figures" load --addr "http://127.0.0.1:$port" \
    --images "$photos" --streams "${TAXON_GPU_CHECK_STREAMS:-16,32,64}" \
    --seconds "${TAXON_GPU_CHECK_SECONDS:-5}" --warmup-seconds 2 --label "$1 $3 max-batch $4"
  kill -INT $pid
  wait $pid
  tail -3 "$out/server-$1-$3-$4.log"
  peak_since "$m" "serving $1 $3 max-batch $4"
}
serve resnet18 /tmp/resnet18.safetensors f32 128
serve resnet18 /tmp/resnet18.safetensors f16 128
serve resnet18 /tmp/resnet18.safetensors f16 256
serve mobilenet_v2 "$mobilenet" f16 128

step "done"
echo "figures: $figures ($(wc -l <"$figures") lines)"
