#!/usr/bin/env bash
# The GPU run in one command, for a short-lived offline GPU machine (an H100: about 6 minutes, at
# most ~7). All of it is bench/gpu.py; see its docstring, and docs/PERF.md for the exact
# invocation through the device tool and what to ship with it.
#
#     bash bench/gpu.sh [OUTDIR] [--sections check,train,...]   # OUTDIR: default $OUT, else bench/results/gpu-<date>
#     bash bench/gpu.sh /tmp/dry --dry_run                      # on a CPU: tiny sizes, every section
#
# OUTDIR receives results.tar.gz (everything), summary.txt (also printed) and the headline tables
# check.txt, train.txt, main.txt: five files, flat.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu "$@"
