#!/usr/bin/env bash
# Runs same_embeddings.py in its own venv (numpy and scikit-learn pinned, from PyPI; made once).
#   scripts/anchors/run.sh DIR [--out FILE] [--gate]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${TAXON_ANCHORS_VENV:-$here/../../.venv-anchors}
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/requirements.txt"
fi
# One thread: the numbers do not depend on it, and CI's two cores are shared with the servers.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
exec "$venv/bin/python" "$here/same_embeddings.py" "$@"
