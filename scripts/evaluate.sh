#!/usr/bin/env bash
# The committed evaluations (docs/eval/*/report.md and same-embeddings.md, the figures in
# docs/evaluation.md and the README), remade: both services (release) on free loopback ports
# with the real MobileNetV2 weights, then for each photo set `client eval` (every head, the
# strangers of the other set, the embeddings saved) and the same-embedding anchors
# (scripts/anchors/run.sh) on exactly those embeddings and splits.
#
#   scripts/evaluate.sh [pets|birds ...]      default: pets birds; about 40 min on 2 cores
#
# Seeds: 10 on pets, 5 on birds (PyTorch's anchors used 10 and 5). The embeddings (30 MB for
# birds) go to target/eval-embeddings/, not into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
datasets=${TAXON_DATASETS:-../shared/datasets}
sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(pets birds)
weights=weights/mobilenet_v2.safetensors
cargo build -q --release -p feature-server -p head-trainer -p taxon-client
bin=${CARGO_TARGET_DIR:-target}/release
[ -f "$weights" ] || "$bin/feature-server" fetch-weights mobilenet_v2 --out weights
work=$(mktemp -d)
source scripts/lib/services.sh
trap stop_services EXIT
# One user's batch job: far over the default rate quota, and each seed in its own tenant,
# so the embeddings are shared between tenants (embedded once per run, not once per seed).
start_services "$bin" "$work" --backbone mobilenet_v2 --weights "$weights" \
  -- --share-embedding-cache --quota-rps 0
"$bin/client" --server "$server" health --wait 120
lscpu | grep -m1 'Model name' || true
for set in "${sets[@]}"; do
  case $set in
    pets) seeds=10 other=birds ;;
    birds) seeds=5 other=pets ;;
    *) echo "unknown set $set (pets, birds)" >&2; exit 2 ;;
  esac
  emb=target/eval-embeddings/$set
  echo "=== $set: client eval, $seeds seeds ($(date -u +%H:%M:%S))"
  "$bin/client" --server "$server" eval "$datasets/$set" --shots 1,3,5,8 --seeds "$seeds" \
    --open-set "$datasets/$other" --save-embeddings "$emb" --out "docs/eval/$set"
  echo "=== $set: the same-embedding anchors ($(date -u +%H:%M:%S))"
  scripts/anchors/run.sh "$emb" --out "docs/eval/$set/same-embeddings.md"
done
