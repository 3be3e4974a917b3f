#!/usr/bin/env bash
# Fuzz the feature-server's image path and request handling: each cargo-fuzz target in fuzz/
# runs for SECONDS (default 60), starting from the committed seeds (fuzz/seeds/<target>) plus
# whatever earlier runs added (fuzz/corpus/<target>, not committed). Prints executions and
# crashes per target; exits 1 if any target crashed (the reproducer is in fuzz/artifacts/).
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs cargo-fuzz (installed here if missing) and a nightly compiler for the sanitizer flags;
# without a nightly toolchain, stable is told to accept them (RUSTC_BOOTSTRAP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

targets=$(cd fuzz && cargo "${toolchain[@]}" fuzz list)
failed=0
summary=()
for target in $targets; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  cp -n "fuzz/seeds/$target"/* "$corpus"/ 2>/dev/null || true
  log="fuzz/artifacts/$target/last-run.log"
  echo "==> $target for ${seconds}s"
  set +e
  (cd fuzz && cargo "${toolchain[@]}" fuzz run "$target" "../$corpus" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=1048576 -timeout=10 \
      -print_final_stats=1) >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
  crashes=$(find "fuzz/artifacts/$target" -maxdepth 1 -type f \
      \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    tail -30 "$log"
  fi
  summary+=("$(printf '%-16s %10s executions  %3d crashes/ooms/timeouts  exit %d' \
      "$target" "${execs:-?}" "$crashes" "$rc")")
done
echo
echo "fuzzed ${seconds}s per target on $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
printf '%s\n' "${summary[@]}"
exit "$failed"
