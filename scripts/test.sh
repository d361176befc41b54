#!/usr/bin/env bash
# One command for the checks CI runs: install into .venv with test extras, lint, then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Ray workers import the package from .venv's site-packages (editable install).
exec .venv/bin/python -m pytest "$@"
