#!/usr/bin/env bash
# GPU training: three Speckle2Self models trained at once on one GPU, then timed.
#
# 1. On a machine with the data (once): copy the carotid TUNING images into .gpu_data/ (ignored by git;
#    real copies, about 29 MiB). Without a folder the images are benchlib.carotid_data.cases("tuning")
#    (the benchmark's subject split, from ../shared or $SPECKLE2SELF_SHARED), else /work/train_data/tuning:
#        bash scripts/gpu_session.sh --prepare [SOURCE_DIR]
# 2. On the GPU machine, with .gpu_data/ copied there (OUT: the results folder, default gpu_results/):
#        OUT=results/ bash scripts/gpu_session.sh
#    It prints nvidia-smi and the python/torch versions, then runs scripts/gpu_train.py (default:
#    7 minutes of training per run, 9.5 minutes for everything) and tees the log to
#    $OUT/gpu_session.log. The results folder then holds 3 models, summary.json, summary.md,
#    preview.png and the log.
#    Extra arguments go to gpu_train.py, e.g. `--minutes 5`, `--runs a,c`.
# Toy check on a CPU:  OUT=/tmp/gpu_toy bash scripts/gpu_session.sh --toy --device cpu --minutes 0.3
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python      # a checkout set up by scripts/setup_env.sh
else PY=python3
fi
DATA=${GPU_DATA:-.gpu_data}

if [ "${1:-}" = "--prepare" ]; then
  shift
  if [ $# -gt 0 ]; then
    exec "$PY" scripts/gpu_train.py --prepare --data "$DATA" --source "$1"
  fi
  exec "$PY" scripts/gpu_train.py --prepare --data "$DATA"
fi

OUT=${OUT:-gpu_results}
n_png=$(find "$DATA" -maxdepth 1 -type f -iname '*.png' 2>/dev/null | wc -l)
if [ "$n_png" -eq 0 ]; then
  echo "error: no training images in $DATA: run \`bash scripts/gpu_session.sh --prepare\` on the CPU machine" \
       "first, and carry [\".gpu_data\"] in the device run call" >&2
  exit 2
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) gpu_session on $(hostname), $n_png images in $DATA"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not available"; fi
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
torch.version.cuda, "| available", torch.cuda.is_available(),
"| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
} 2>&1 | tee -a "$LOG"

# GPU load and memory every 30 s while training (only where nvidia-smi exists).
MON=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 30 >>"$LOG" 2>&1 &
  MON=$!
fi
PYTHONUNBUFFERED=1 "$PY" scripts/gpu_train.py --data "$DATA" --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "$MON" ]; then kill "$MON" 2>/dev/null; wait "$MON" 2>/dev/null; fi
# The GPU rows of docs/results.md "Speed": the default output against the paper-size network on
# the GPU (SPEED=0 skips them; each takes about a minute).
if [ "${SPEED:-1}" != "0" ] && "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "== default output speed on the GPU" | tee -a "$LOG"
  "$PY" benchmarks/default_output_speed.py --device cuda --rounds 3 2>&1 | tee "$OUT/default_output_speed_cuda.md" | tee -a "$LOG"
  "$PY" benchmarks/refine_methods.py --skip-agreement --device cuda --sizes 512 2048 4000 2>&1 \
    | tee "$OUT/refine_methods_cuda.md" | tee -a "$LOG"
fi
echo "== gpu_train.py exit code $rc; files in $OUT:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
exit "$rc"
