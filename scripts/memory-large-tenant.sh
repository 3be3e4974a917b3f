#!/usr/bin/env bash
# Peak memory (VmHWM) of both services while one tenant grows to every bird photo (5,902, in
# 100 classes, four enrolls at once: what `client eval --save-embeddings` does first). The
# load where one tenant is large: each enroll rereads its tenant whole.
#
#   scripts/memory-large-tenant.sh      (release build; about 8 minutes on 2 cores)
#
# Extra head-trainer flags or environment go in HT_ARGS / HT_ENV, e.g.
#   HT_ENV='MALLOC_ARENA_MAX=2' scripts/memory-large-tenant.sh
set -euo pipefail
cd "$(dirname "$0")/.."
datasets=${TAXON_DATASETS:-../shared/datasets}
cargo build -q --release -p feature-server -p head-trainer -p taxon-client
bin=${CARGO_TARGET_DIR:-target}/release
weights=weights/mobilenet_v2.safetensors
[ -f "$weights" ] || "$bin/feature-server" fetch-weights mobilenet_v2 --out weights
work=$(mktemp -d)
source scripts/lib/services.sh
trap stop_services EXIT
# shellcheck disable=SC2086 # HT_ARGS is a word list on purpose (HT_ENV: see services.sh)
start_services "$bin" "$work" --backbone mobilenet_v2 --weights "$weights" \
  -- --share-embedding-cache --quota-rps 0 ${HT_ARGS:-}
"$bin/client" --server "$server" health --wait 120
lscpu | grep -m1 'Model name' || true
started=$SECONDS
"$bin/client" --server "$server" eval "$datasets/birds" --shots 1 --seeds 1 \
  --heads prototype --save-embeddings "$work/embeddings" --out "$work/report" >/dev/null
echo "embedded and enrolled $(($(wc -l <"$work/embeddings/photos.tsv") - 1)) photos in $((SECONDS - started)) s"
for p in "head-trainer $hpid" "feature-server $fpid"; do
  set -- $p
  echo "$1 peak $(awk '/VmHWM/ {printf "%d MiB", $2 / 1024}' "/proc/$2/status")"
done
