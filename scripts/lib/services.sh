# Both services on free loopback ports, for the scripts that drive them (sourced, not run).
#
#   source scripts/lib/services.sh
#   start_services "$bin" "$work" <feature-server args> -- <head-trainer args>
#   "$bin/client" --server "$server" health --wait 120
#
# Sets fport, hport, fpid, hpid and server; the logs go to $work/feature-server.log and
# $work/head-trainer.log, the head-trainer's data to $work/data. HT_ENV (a word list, e.g.
# 'MALLOC_ARENA_MAX=2') is put in the head-trainer's environment. stop_services ends both and
# waits for them; the caller's EXIT trap should call it.

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_services() {
  local bin=$1 work=$2
  shift 2
  local fs_args=() ht_args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do fs_args+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  ht_args=("$@")
  fport=$(free_port)
  hport=$(free_port)
  "$bin/feature-server" --listen "127.0.0.1:$fport" "${fs_args[@]}" \
    >"$work/feature-server.log" 2>&1 &
  fpid=$!
  # shellcheck disable=SC2086 # HT_ENV is a word list on purpose
  env ${HT_ENV:-} "$bin/head-trainer" --listen "127.0.0.1:$hport" \
    --features-url "http://127.0.0.1:$fport" --data "$work/data" "${ht_args[@]}" \
    >"$work/head-trainer.log" 2>&1 &
  hpid=$!
  server="http://127.0.0.1:$hport"
}

stop_services() {
  kill "${hpid:-}" "${fpid:-}" 2>/dev/null || true
  wait 2>/dev/null || true
}
