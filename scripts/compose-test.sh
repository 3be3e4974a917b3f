#!/usr/bin/env bash
# The compose deployments, built and run for real, driven through their published port with
# the `client` a user runs:
#   1. images: the local Debian base (scripts/docker-base.sh) when no registry can be reached,
#      then `docker-compose build` with binaries already built on this host; sizes printed;
#   2. one node (docker-compose.yml): time to SERVING, enroll six pet breeds, classify their
#      held-out photos, restart the head-trainer and check the classes survive in the volume;
#   3. scaled (docker-compose.scale.yml): PostgreSQL, two head-trainers behind nginx, two
#      feature-servers. While a loop enrolls new classes and classifies, SIGKILL each
#      head-trainer in turn, then a feature-server: classify keeps answering (the client
#      retries UNAVAILABLE), every acknowledged enroll is there at the end, the killed
#      containers come back by themselves. Then `--scale feature-server=3` without a restart,
#      and each replica's embed count;
#   4. everything down, volumes removed.
#
#   scripts/compose-test.sh            (needs Docker, docker-compose, the binaries and weights)
#
# TAXON_PROFILE: which host build to put in the images (release by default; CI passes debug,
# the build its tests made). TAXON_DATASETS: the photo sets (../shared/datasets).
set -euo pipefail
cd "$(dirname "$0")/.."

datasets=${TAXON_DATASETS:-../shared/datasets}
profile=${TAXON_PROFILE:-release}
bin=${CARGO_TARGET_DIR:-target}/$profile
client=$bin/client
weights=weights/mobilenet_v2.safetensors
for f in "$bin/feature-server" "$bin/head-trainer" "$client" "$weights" "$datasets/pets"; do
  [ -e "$f" ] || { echo "FAILED compose test: $f is missing"; exit 1; }
done
# The context copies target/<profile>/*; a CARGO_TARGET_DIR elsewhere is linked in.
if [ "${CARGO_TARGET_DIR:-target}" != target ]; then
  mkdir -p "target/$profile"
  for b in feature-server head-trainer client; do cp "$bin/$b" "target/$profile/$b"; done
fi

t0=$SECONDS
phase() { printf '\n--- %s (%d s in)\n' "$1" $((SECONDS - t0)); }
fail() { echo "FAILED compose test: $*"; exit 1; }

work=$(mktemp -d)
project=taxon-ci-$$
one=(docker-compose -p "$project" -f docker-compose.yml)
scale=(docker-compose -p "$project-scale" -f docker-compose.scale.yml)
cleanup() {
  [ -f "$work/loop.pid" ] && kill "$(cat "$work/loop.pid")" 2>/dev/null
  "${one[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  "${scale[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Images from the local base, binaries from this host; a published port Docker picks.
base=taxon-base/debian:bookworm
export TAXON_BUILD_BASE=$base TAXON_RUNTIME_BASE=$base TAXON_BASE=$base
export TAXON_BINARIES=prebuilt TAXON_PROFILE=$profile
export TAXON_WEIGHTS_DIR=$PWD/weights TAXON_PORT=127.0.0.1: TAXON_HTTP_PORT=127.0.0.1:
export TAXON_RETRY_S=60

phase "images"
scripts/docker-base.sh
build_started=$SECONDS
"${scale[@]}" build -q >"$work/build.log" 2>&1 || { cat "$work/build.log"; fail "docker-compose build"; }
echo "built in $((SECONDS - build_started)) s (binaries: the host's $profile build)"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^taxon(-lb|-postgres)?:latest' \
  | sed 's/^/image size: /'

# The published port of `service` in compose `$@` (it changes when the container restarts).
port_of() {
  local service=$1
  shift
  "$@" port "$service" 50052 | sed 's/.*://'
}
# The HTTP face (API and page), checked through its published port: readiness, the page,
# and one held-out pug classified over HTTP/JSON.
check_http() {
  local base=http://127.0.0.1:$1 pug reply
  curl -fsS "$base/readyz" | grep -q '"status":"ready"' || fail "HTTP /readyz at $base"
  curl -fsS "$base/" | grep -q 'id="classify-file"' || fail "no page at $base/"
  pug=$(ls "$datasets/pets/dog/pug"/*.jpg | sort | tail -1)
  reply=$(curl -sS -H 'X-Tenant: pets' -H 'Content-Type: image/jpeg' --data-binary "@$pug" \
    "$base/v1/classify?top_k=2") || fail "HTTP classify at $base"
  echo "$reply" | grep -q '"label":"pug"' || fail "HTTP classify of a pug answered: $reply"
  echo "HTTP API at the published port: ready, page served, a held-out pug classified over JSON"
}
# Waits until the container `id` has been restarted more than `restarts` times and reports
# healthy (Docker's own probe: `client health`).
wait_healthy() {
  local id=$1 restarts=${2:--1} deadline=$((SECONDS + 180)) state
  while state=$(docker inspect -f '{{.RestartCount}} {{.State.Health.Status}}' "$id") \
    && ! { [ "${state% *}" -gt "$restarts" ] && [ "${state#* }" = healthy ]; }; do
    [ $SECONDS -lt $deadline ] || fail "container $id not healthy ($state): $(docker logs --tail 20 "$id" 2>&1)"
    sleep 0.5 # polling Docker's health state; there is no event to wait on in compose v1
  done
}
# SIGKILLs the container's main process (a crash, not a stop: the restart policy applies)
# and waits for Docker to bring it back healthy; prints how long that took.
crash() {
  local id=$1 name restarts ip killed=$SECONDS
  name=$(docker inspect -f '{{.Name}}' "$id")
  restarts=$(docker inspect -f '{{.RestartCount}}' "$id")
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")
  kill -9 "$(docker inspect -f '{{.State.Pid}}' "$id")"
  wait_healthy "$id" "$restarts"
  echo "${name#/}: SIGKILLed, restarted and healthy after $((SECONDS - killed)) s" \
    "(address $ip, now $(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id"))"
}

# Six breeds that look unlike each other; the first 7 photos of each are enrolled, the last
# 3 classified. A smoke check of the deployment, not an accuracy figure: the bar is 2/3.
breeds="cat/Bombay cat/Persian cat/Siamese dog/pug dog/samoyed dog/beagle"
enroll_breeds() {
  local server=$1
  for b in $breeds; do
    mapfile -t photos < <(ls "$datasets/pets/$b"/*.jpg | sort | head -7)
    "$client" --server "$server" --tenant pets enroll --class "${b#*/}" --parent "${b%/*}" \
      "${photos[@]}" --json >>"$work/enroll.json" || fail "enroll $b"
  done
}
classify_held_out() {
  local server=$1 out=$2
  local held=()
  for b in $breeds; do
    mapfile -t -O "${#held[@]}" held < <(ls "$datasets/pets/$b"/*.jpg | sort | tail -3)
  done
  "$client" --server "$server" --tenant pets classify --json "${held[@]}" >"$out" \
    || fail "classify: $(cat "$out")"
  python3 - "$out" <<'EOF'
import json, os, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
right = sum(l["label"] == os.path.basename(os.path.dirname(l["image"])) for l in lines)
errors = sum(1 for l in lines if l.get("error"))
print(f"held-out photos: {right}/{len(lines)} right, {errors} errors")
sys.exit(0 if errors == 0 and len(lines) == 18 and right >= 12 else 1)
EOF
}

phase "one node: docker-compose up"
up_started=$SECONDS
"${one[@]}" up -d >/dev/null 2>&1 || { "${one[@]}" logs --tail 30; fail "up"; }
ht=$("${one[@]}" ps -q head-trainer)
server=http://127.0.0.1:$(port_of head-trainer "${one[@]}")
"$client" --server "$server" health --wait 180 >/dev/null || fail "one node never SERVING"
echo "time to SERVING: $((SECONDS - up_started)) s (weights present, images built)"
enroll_breeds "$server"
classify_held_out "$server" "$work/one.json" || fail "held-out photos misclassified"
check_http "$("${one[@]}" port head-trainer 8080 | sed 's/.*://')"
"$client" --server "$server" --tenant pets classes --json >"$work/classes-before.json"

phase "one node: the head-trainer restarted, then SIGKILLed"
"${one[@]}" restart head-trainer >/dev/null 2>&1
server=http://127.0.0.1:$(port_of head-trainer "${one[@]}")
"$client" --server "$server" health --wait 120 >/dev/null || fail "not SERVING after restart"
"$client" --server "$server" --tenant pets classes --json >"$work/classes-restart.json"
cmp -s "$work/classes-before.json" "$work/classes-restart.json" \
  || fail "classes changed across a restart: $(diff "$work/classes-before.json" "$work/classes-restart.json")"
crash "$ht"
server=http://127.0.0.1:$(port_of head-trainer "${one[@]}")
"$client" --server "$server" --tenant pets classes --json >"$work/classes-killed.json"
cmp -s "$work/classes-before.json" "$work/classes-killed.json" || fail "classes lost to SIGKILL"
classify_held_out "$server" "$work/one-after.json" || fail "misclassified after the restarts"
# The CLI as the compose file offers it, inside the network with the current folder at /work.
mkdir -p target/compose-test
cp "$(ls "$datasets/pets/dog/pug"/*.jpg | sort | tail -1)" target/compose-test/pug.jpg
"${one[@]}" run --rm -T client --tenant pets classify --json /work/target/compose-test/pug.jpg 2>"$work/run.err" \
  | grep -q '"label":"pug"' || fail "docker-compose run client did not classify the pug: $(cat "$work/run.err")"
echo "docker-compose run client: classified a pug from inside the network"
echo "classes survive a restart and a SIGKILL"
"${one[@]}" down -v >/dev/null 2>&1

phase "scaled: docker-compose -f docker-compose.scale.yml up"
up_started=$SECONDS
"${scale[@]}" up -d >/dev/null 2>&1 || { "${scale[@]}" logs --tail 30; fail "scaled up"; }
server=http://127.0.0.1:$(port_of lb "${scale[@]}")
"$client" --server "$server" health --wait 180 >/dev/null || fail "scaled never SERVING"
echo "time to SERVING: $((SECONDS - up_started)) s (PostgreSQL, 2 feature-servers, 2 head-trainers, nginx)"
: >"$work/enroll.json"
enroll_breeds "$server"
classify_held_out "$server" "$work/scaled.json" || fail "held-out photos misclassified"
check_http "$("${scale[@]}" port lb 8080 | sed 's/.*://')"

# The loop: each round enrolls a new class of two bird photos (new photos, so the
# feature-servers embed them) and classifies three pets. An enroll is acknowledged when the
# client exits 0; those are checked at the end.
# Bird photos: the loop takes them from the front, the scale-out check from the back, so
# every enroll sends photos no replica has embedded yet.
mapfile -t birds < <(find "$datasets/birds" -name '*.jpg' | sort)
[ "${#birds[@]}" -ge 1000 ] || fail "expected the bird photos in $datasets/birds"
spare=$((${#birds[@]} - 200))
loop() {
  local i=0 p
  while [ ! -e "$work/stop" ] && [ $((i * 2 + 1)) -lt "$spare" ]; do
    p=$((i * 2))
    if "$client" --server "$server" --tenant pets enroll --class "loop$i" --parent loop \
      "${birds[p]}" "${birds[p + 1]}" --json >"$work/loop-enroll.out" 2>>"$work/loop.err"; then
      echo "loop$i" >>"$work/acked"
    else
      echo "enroll loop$i failed: $(tail -1 "$work/loop.err")" >>"$work/failed"
    fi
    if ! "$client" --server "$server" --tenant pets classify --json \
      "$datasets/pets/cat/Bombay"/*.jpg >"$work/loop-classify.out" 2>>"$work/loop.err" \
      || grep -q '"error"' "$work/loop-classify.out"; then
      echo "classify round $i failed: $(tail -1 "$work/loop.err")" >>"$work/failed"
    fi
    echo "$i" >"$work/rounds"
    i=$((i + 1))
  done
}
: >"$work/acked"
: >"$work/failed"
: >"$work/loop.err"
loop &
echo $! >"$work/loop.pid"
rounds() { cat "$work/rounds" 2>/dev/null || echo -1; }
# Lets the loop make progress between faults: waits for `n` more rounds.
await_rounds() {
  local target=$(($(rounds) + $1)) deadline=$((SECONDS + 300))
  while [ "$(rounds)" -lt "$target" ]; do
    [ $SECONDS -lt $deadline ] || fail "the loop stalled at round $(rounds)"
    sleep 1 # polling the loop's progress file
  done
}
await_rounds 3
crash "$("${scale[@]}" ps -q head-trainer-1)"
await_rounds 3
crash "$("${scale[@]}" ps -q head-trainer-2)"
await_rounds 3
crash "$("${scale[@]}" ps -q feature-server | head -1)"
await_rounds 3
touch "$work/stop"
wait "$(cat "$work/loop.pid")"
rm -f "$work/loop.pid"

acked=$(wc -l <"$work/acked")
retries=$(grep -c 'retrying in' "$work/loop.err" || true)
echo "loop: $(($(rounds) + 1)) rounds, $acked enrolls acknowledged, $(wc -l <"$work/failed") calls failed, $retries retries after UNAVAILABLE"
[ -s "$work/failed" ] && { cat "$work/failed"; fail "calls failed while replicas were killed"; }
"$client" --server "$server" --tenant pets classes --json >"$work/classes-scaled.json"
python3 - "$work/classes-scaled.json" "$work/acked" <<'EOF' || fail "an acknowledged enroll was lost"
import json, sys
have = {c["name"]: c["examples"] for c in json.load(open(sys.argv[1]))}
acked = [l.strip() for l in open(sys.argv[2]) if l.strip()]
lost = [c for c in acked if have.get(c) != 2]
print(f"acknowledged enrolls present with both photos: {len(acked) - len(lost)}/{len(acked)}")
sys.exit(1 if lost or not acked else 0)
EOF

# Prometheus metrics inside the network (port 9090, not published), scraped from within
# each container with the image's own Python.
scrape() {
  docker exec "$1" python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9090/metrics").read().decode())' \
    || fail "no /metrics in $(docker inspect -f '{{.Name}}' "$1")"
}
calls=0
for s in head-trainer-1 head-trainer-2; do
  n=$(scrape "$("${scale[@]}" ps -q $s)" | awk '/^taxon_head_trainer_rpcs_total\{rpc="taxon.v1.Classifier/ { s += $NF } END { print s + 0 }')
  echo "metrics: $s answered $n Classifier calls since it (re)started"
  calls=$((calls + n))
done
[ "$calls" -gt 0 ] || fail "the head-trainers' metrics counted no calls"
n=$(scrape "$("${scale[@]}" ps -q feature-server | head -1)" | awk '/^taxon_features_items_total/ { s += $NF } END { print s + 0 }')
echo "metrics: a feature-server answered $n items since it (re)started"

phase "scaled: --scale feature-server=3, no restart"
embedded() {
  for id in $("${scale[@]}" ps -q feature-server); do
    printf '%s %s\n' "$(docker inspect -f '{{.Name}}' "$id")" \
      "$(docker exec "$id" client info --features http://127.0.0.1:50051 --json \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["images_embedded"])')"
  done
}
"${scale[@]}" up -d --no-deps --no-recreate --scale feature-server=3 feature-server >/dev/null 2>&1
for id in $("${scale[@]}" ps -q feature-server); do wait_healthy "$id"; done
# The head-trainers re-resolve `feature-server` every 5 s: enroll until the third replica
# has embedded something (bounded), then a fixed run of 60 new photos, counted per replica.
fresh=$spare
enroll_fresh() {
  local n=$1 class=$2
  "$client" --server "$server" --tenant pets enroll --class "$class" --parent loop \
    "${birds[@]:fresh:n}" --json >/dev/null || fail "enroll $class"
  fresh=$((fresh + n))
}
i=0
until embedded | awk '$2 == 0 { zero = 1 } END { exit zero }'; do
  [ $i -lt 30 ] || fail "a feature-server replica never got work: $(embedded)"
  enroll_fresh 4 "spread$i"
  i=$((i + 1))
done
embedded >"$work/before"
for c in 0 1 2 3 4 5; do enroll_fresh 10 "even$c"; done
embedded >"$work/after"
echo "images embedded per replica over a run of 60 new photos after scaling out:"
join "$work/before" "$work/after" | awk '{ printf "  %s %d\n", $1, $3 - $2 }'

phase "memory: each container's cgroup peak (page cache included), against its limit"
peak_of() {
  local id=$1 f
  for f in /sys/fs/cgroup/system.slice/docker-$id.scope/memory.peak \
    /sys/fs/cgroup/docker/$id/memory.peak /sys/fs/cgroup/memory/docker/$id/memory.max_usage_in_bytes; do
    [ -r "$f" ] && { echo $(($(cat "$f") / 1048576)) MiB; return; }
  done
  echo "unknown (no cgroup peak file)"
}
for id in $("${scale[@]}" ps -q | xargs docker inspect -f '{{.Id}} {{.State.Running}}' | awk '$2 == "true" { print $1 }'); do
  printf '  %s peak %s, limit %s MiB\n' "$(docker inspect -f '{{.Name}}' "$id")" \
    "$(peak_of "$(docker inspect -f '{{.Id}}' "$id")")" \
    "$(($(docker inspect -f '{{.HostConfig.Memory}}' "$id") / 1048576))"
done

phase "down -v"
"${scale[@]}" down -v >/dev/null 2>&1
echo "compose test passed in $((SECONDS - t0)) s"
