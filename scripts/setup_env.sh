#!/usr/bin/env bash
# Create .venv with the library, its CLI and everything the tests need.
# TORCH_SPEC picks the torch build: the default pins the CPU build used by CI;
# for a GPU use e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and alone: the library's own "torch>=2.0" is then satisfied and pulls no other build.
python -m pip install --quiet $TORCH_SPEC
python -m pip install --quiet -e ".[test]"
