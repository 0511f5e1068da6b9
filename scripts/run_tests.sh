#!/usr/bin/env bash
# Set up .venv (if needed) and run the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest -q Testing "$@"
