#!/usr/bin/env bash
# The benchmark's GPU suite (benchmarks/gpu_suite.py): every task in its own process with a
# timeout, under 8 minutes on one H200. Writes $OUT/gpu_report.md when OUT is set, else prints
# the report. Options pass through, e.g.
#   bash benchmarks/gpu.sh                 # on the GPU
#   bash benchmarks/gpu.sh --tiny          # tiny models on the CPU: a check of the suite
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --budget 300
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's curvop
exec "${PYTHON:-python}" "$here/gpu_suite.py" "$@"
