#!/usr/bin/env bash
# Stops the services scripts/quickstart.sh started (SIGTERM: they finish in-flight work first).
cd "$(dirname "$0")/.."
for name in head-trainer feature-server; do
  pidfile=data/run/$name.pid
  if [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; then
    echo "stopped $name"
  fi
  rm -f "$pidfile"
done
