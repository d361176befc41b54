#!/usr/bin/env bash
# One command for a new user: install into .venv, then run the demo (data → train → evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec .venv/bin/dskd demo "$@"
