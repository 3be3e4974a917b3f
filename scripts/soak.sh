#!/usr/bin/env bash
# Soak: both services under 64 concurrent classify streams of real photos for a bounded time,
# some of them large (4000x3000 JPEGs), with each process's RSS sampled every 10 s and printed
# beside the 1 GB budget, and the drift between the first and the last minute.
#
#   scripts/soak.sh [MINUTES] [BACKBONES]     (defaults: 10, "mobilenet_v2 resnet18")
#
# Loopback only; stops by itself. MobileNetV2 runs the real ImageNet weights when
# weights/mobilenet_v2.safetensors is there (scripts/quickstart.sh or `feature-server
# fetch-weights mobilenet_v2` makes it) and stand-in weights of the same shapes otherwise;
# ResNet18 always runs stand-in weights (memory and speed do not depend on the values).
# The head-trainer runs with its defaults (four views per photo, 256 MiB in-flight budget),
# except its classify cache: the photo pool (about 2,000) would fit in the default 8,192
# entries, and then after the first pass every answer would come from the cache while the
# backbone idles. With TAXON_SOAK_CACHE_ENTRIES (256) far below the pool, most requests miss
# and the feature-server embeds all the time; it prints how many images it embedded.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-10}
backbones=${2:-"mobilenet_v2 resnet18"}
streams=${TAXON_SOAK_STREAMS:-64}
datasets=${TAXON_DATASETS:-../shared/datasets}
[ -d "$datasets/pets" ] && [ -d "$datasets/birds" ] || {
  echo "needs $datasets/pets and $datasets/birds"
  exit 1
}
cargo build --release -q -p feature-server -p head-trainer -p taxon-client
cargo build --release -q -p taxon-tests --example large_photos
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
cleanup() {
  jobs -p | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
# Twenty large photos (4000x3000, ~3-6 MB each), made from pets photos.
"$bin/examples/large_photos" "$datasets/pets" "$work/large" 20 4000 3000
mapfile -t pool < <(
  { find "$datasets/birds" -type f -name '*.jpg' | sort | awk 'NR % 3 == 0'
    find "$work/large" -type f; } | sort
)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for backbone in $backbones; do
  weights=weights/$backbone.safetensors
  kind="real ImageNet weights"
  if [ "$backbone" = resnet18 ] || [ ! -f "$weights" ]; then
    weights=$work/$backbone.safetensors
    kind="stand-in weights"
    "$bin/feature-server" formula-weights "$backbone" --out "$weights" >/dev/null
  fi
  fport=$(free_port)
  hport=$(free_port)
  "$bin/feature-server" --listen "127.0.0.1:$fport" --backbone "$backbone" --weights "$weights" \
    >"$work/fs-$backbone.log" 2>&1 &
  fpid=$!
  # One tenant's load against the server-wide bounds: per-tenant quotas off (a burst of 16
  # concurrent enrolls is over the default of 4 at once).
  "$bin/head-trainer" --listen "127.0.0.1:$hport" --features-url "http://127.0.0.1:$fport" \
    --data "$work/data-$backbone" --classify-cache-entries "${TAXON_SOAK_CACHE_ENTRIES:-256}" \
    --quota-rps 0 --quota-concurrent-enrolls 0 \
    >"$work/ht-$backbone.log" 2>&1 &
  hpid=$!
  export TAXON_SERVER="http://127.0.0.1:$hport" TAXON_TENANT=soak
  "$bin/client" health --wait 120 >/dev/null
  for dir in "$datasets"/pets/*/*/; do
    "$bin/client" enroll --class "$(basename "$dir")" --parent "$(basename "$(dirname "$dir")")" \
      $(find "$dir" -type f | sort | head -5) >/dev/null
  done

  # Burst: 16 concurrent enrolls of the large photos (8 each): all must succeed, only slower.
  burst_start=$(date +%s.%N)
  pids=()
  for e in $(seq 1 16); do
    "$bin/client" --json enroll --class "burst$e" --parent burst \
      $(printf '%s\n' "$work"/large/*.jpg | awk -v e="$e" 'NR % 2 == e % 2' | head -8) \
      >"$work/burst-$e.json" 2>"$work/burst-$e.err" &
    pids+=($!)
  done
  ok=0
  for p in "${pids[@]}"; do wait "$p" && ok=$((ok + 1)) || true; done
  burst_s=$(python3 -c "import time; print(f'{time.time() - $burst_start:.1f}')")
  hwm() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
  echo "=== $backbone: burst of 16 concurrent enrolls x 8 photos of 4000x3000: $ok of 16 succeeded in ${burst_s} s; peak RSS so far: feature-server $(hwm "$fpid") MiB, head-trainer $(hwm "$hpid") MiB"
  cat "$work"/burst-*.err | sort | uniq -c | head -5

  : >"$work/rss-$backbone.tsv"
  end=$(($(date +%s) + minutes * 60))
  (
    start=$(date +%s)
    while [ "$(date +%s)" -lt "$end" ]; do
      f=$(awk '/VmRSS/ {print $2}' "/proc/$fpid/status")
      h=$(awk '/VmRSS/ {print $2}' "/proc/$hpid/status")
      printf '%s\t%s\t%s\n' "$(($(date +%s) - start))" "$f" "$h" >>"$work/rss-$backbone.tsv"
      sleep 10 # the sampling period, not a synchronisation
    done
  ) &
  sampler=$!
  : >"$work/errors-$backbone.txt"
  for s in $(seq 1 "$streams"); do
    (
      i=$s
      while [ "$(date +%s)" -lt "$end" ]; do
        batch=()
        for _ in 1 2 3 4 5 6 7 8; do
          batch+=("${pool[$((i % ${#pool[@]}))]}")
          i=$((i + 7919))
        done
        "$bin/client" classify --json "${batch[@]}" >"$work/out-$s.json" 2>>"$work/errors-$backbone.txt" || true
        grep -c '"decision"' "$work/out-$s.json" >>"$work/answered-$s.txt" || true
      done
    ) &
  done
  wait "$sampler"
  wait $(jobs -p | grep -vx "$fpid" | grep -vx "$hpid") 2>/dev/null || true
  answered=$(cat "$work"/answered-*.txt 2>/dev/null | awk '{s += $1} END {print s + 0}')
  failures=$(grep -c . "$work/errors-$backbone.txt" || true)
  rm -f "$work"/answered-*.txt
  echo
  embedded=$("$bin/client" info --features "http://127.0.0.1:$fport" --json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["images_embedded"])')
  echo "=== $backbone ($kind), $streams streams, $minutes min: $answered photos classified" \
    "($embedded images embedded by the feature-server, each in 4 views); $failures error lines"
  grep -v '^$' "$work/errors-$backbone.txt" | sort | uniq -c | sort -rn | head -5 || true
  python3 - "$work/rss-$backbone.tsv" <<'EOF'
import sys
rows = [tuple(map(int, l.split("\t"))) for l in open(sys.argv[1]) if l.strip()]
budget = 1024
print(f"{'t (s)':>6} {'feature-server':>15} {'head-trainer':>13} {'both':>9}   budget")
for t, f, h in rows:
    print(f"{t:>6} {f/1024:>11.0f} MiB {h/1024:>9.0f} MiB {(f+h)/1024:>5.0f} MiB   {budget} MiB")
peak = max(f + h for _, f, h in rows) / 1024
first = [f + h for t, f, h in rows if t < 60]
last_t = rows[-1][0]
last = [f + h for t, f, h in rows if t >= last_t - 60]
mean = lambda xs: sum(xs) / len(xs) / 1024
verdict = "within" if peak < budget else "OVER"
print(f"peak of both together: {peak:.0f} MiB ({verdict} the {budget} MiB budget); "
      f"mean of the first minute {mean(first):.0f} MiB, of the last minute {mean(last):.0f} MiB, "
      f"drift {mean(last) - mean(first):+.0f} MiB")
EOF
  echo "peak RSS over the whole run (VmHWM): feature-server $(hwm "$fpid") MiB, head-trainer $(hwm "$hpid") MiB"
  kill "$hpid" "$fpid"
  wait "$hpid" "$fpid" 2>/dev/null || true
done
