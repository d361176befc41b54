#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install dskd_ray into it, with extras given as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

python=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python="$candidate"
    break
  fi
done
[ -n "$python" ] || { echo "dskd: error: Python >= 3.11 is needed" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
[ $# -gt 0 ] && spec=".[$(IFS=,; echo "$*")]"
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e "$spec"
