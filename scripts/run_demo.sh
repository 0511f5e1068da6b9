#!/usr/bin/env bash
# Set up .venv (if needed) and despeckle the bundled inputs with the bundled model:
# a simulated carotid phantom and a real ultrasound DICOM (from the pydicom-data package).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
speckle2self demo --out "${1:-demo_output}"
