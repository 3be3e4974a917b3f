#!/usr/bin/env bash
# Memory of both services together, under load, against the 1 GB budget; and whether it stays
# flat from one round of load to the next (bounded queues and caches).
#
#   scripts/memory.sh [ROUNDS]        (default 4; needs ../shared/datasets/{pets,birds})
#
# The feature-server runs ResNet18 (the default and the larger backbone) on stand-in weights
# of the real shapes (`feature-server formula-weights`): memory does not depend on the values.
# The head-trainer runs with its defaults (four views per photo). Load: all 37 pets breeds
# enrolled (5 photos each), then ROUNDS rounds of three concurrent `client classify` streams,
# each round on 150 bird photos never seen before (so every round embeds, and the classify
# cache keeps growing towards its bound). A sampler reads VmRSS of both processes every 0.2 s.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-4}
datasets=${TAXON_DATASETS:-../shared/datasets}
[ -d "$datasets/pets" ] && [ -d "$datasets/birds" ] || {
  echo "needs $datasets/pets and $datasets/birds"
  exit 1
}
cargo build --release -q -p feature-server -p head-trainer -p taxon-client
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
"$bin/feature-server" formula-weights resnet18 --out "$work/resnet18.safetensors" >/dev/null

source scripts/lib/services.sh
# Per-tenant quotas off: the load is one tenant's, against the server-wide bounds.
start_services "$bin" "$work" --backbone resnet18 --weights "$work/resnet18.safetensors" \
  -- --quota-rps 0 --quota-concurrent-enrolls 0
python3 - "$fpid" "$hpid" "$work/rss.tsv" <<'EOF' &
import sys, time
fpid, hpid, out = sys.argv[1], sys.argv[2], sys.argv[3]
def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
with open(out, "w", buffering=1) as f:
    while True:
        a, b = rss(fpid), rss(hpid)
        if a is None or b is None:
            break
        f.write(f"{time.time():.2f}\t{a}\t{b}\n")
        time.sleep(0.2)
EOF
spid=$!
cleanup() { stop_services; rm -rf "$work"; }
trap cleanup EXIT
export TAXON_SERVER="$server" TAXON_TENANT=memory
"$bin/client" health --wait 120 >/dev/null

mark() { printf '%s\t%s\n' "$(date +%s.%N)" "$1" >>"$work/marks.tsv"; }
mark start
for dir in "$datasets"/pets/*/*/; do
  breed=$(basename "$dir")
  parent=$(basename "$(dirname "$dir")")
  "$bin/client" enroll --class "$breed" --parent "$parent" \
    $(find "$dir" -type f | sort | head -5) >/dev/null
done
mark "enrolled 37 breeds x 5 photos"
mapfile -t birds < <(find "$datasets/birds" -type f -name '*.jpg' | sort | awk 'NR % 9 == 0')
for r in $(seq 1 "$rounds"); do
  start=$(((r - 1) * 150))
  pids=()
  for s in 0 1 2; do
    "$bin/client" classify "${birds[@]:$((start + s * 50)):50}" >/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"
  mark "classify round $r (150 new photos, 3 streams)"
done

python3 - "$work/rss.tsv" "$work/marks.tsv" <<'EOF'
import sys
rows = [tuple(map(float, l.split("\t"))) for l in open(sys.argv[1]) if l.strip()]
marks = [(float(t), what.strip()) for t, what in (l.split("\t", 1) for l in open(sys.argv[2]))]
budget = 1024 * 1024
print(f"{'phase':<58} {'feature-server':>15} {'head-trainer':>13} {'both':>9}   budget")
prev = marks[0][0]
for t, what in marks[1:]:
    seg = [r for r in rows if prev <= r[0] <= t] or rows[-1:]
    peak = max(seg, key=lambda r: r[1] + r[2])
    print(f"{'peak during ' + what:<58} {peak[1]/1024:>11.0f} MiB {peak[2]/1024:>9.0f} MiB {(peak[1]+peak[2])/1024:>5.0f} MiB   1024 MiB")
    prev = t
last = rows[-1]
peak = max(rows, key=lambda r: r[1] + r[2])
print(f"{'at the end':<58} {last[1]/1024:>11.0f} MiB {last[2]/1024:>9.0f} MiB {(last[1]+last[2])/1024:>5.0f} MiB")
verdict = "within" if peak[1] + peak[2] < budget else "OVER"
print(f"peak of both together: {(peak[1]+peak[2])/1024:.0f} MiB ({verdict} the 1024 MiB budget)")
EOF
