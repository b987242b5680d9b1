#!/usr/bin/env bash
# The CPU numbers of docs/PERF.md, reproduced (about 55 minutes on 2 idle cores, an estimate).
#
#     bash bench/cpu.sh [OUTDIR]          # default bench/results/cpu-<date>
#
# Sizes: the fast-size model (512d / 8L / 8H / 2048ff, 8 experts top-2) with vocab 8192, seq 256,
# fp32, dropout 0.1 as trained, all cores. Each case runs in fresh processes (one for time, one
# for peak memory); see `python -m bench.step --help`. On a shared machine each case first waits
# (up to QUIET_WAIT seconds, default 600) until no other process is runnable; the wait and the
# load average are recorded with every case.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-bench/results/cpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}

run() {  # run NAME ARGS...
    local name=$1; shift
    echo "== $name: python -m bench.step $*" >&2
    "$PY" -m bench.step --quiet_wait "${QUIET_WAIT:-600}" --out "$OUTDIR/$name" "$@" > "$OUTDIR/$name.txt" 2> "$OUTDIR/$name.log"
    cat "$OUTDIR/$name.txt"
}

{ lscpu | grep -E "Model name|^CPU\(s\)"; "$PY" -c "import torch; print('torch', torch.__version__)"; uptime; } \
    | tee "$OUTDIR/env.txt"
"$PY" -m bench.step --peak_only --quiet_wait "${QUIET_WAIT:-600}" --out "$OUTDIR/peak" | tee "$OUTDIR/peak.txt"
# 1. the seed's 13 variants (sweeps/fast.yaml's), ours vs the seed-style reference, batch 4 (1,024 tokens a step)
SEED_VARIANTS=$("$PY" -c "from bench.gpu import sweep_variants; print(sweep_variants('fast.yaml'))")
run main --variants "$SEED_VARIANTS" --batch_size 4 --title "CPU: the seed's variants, batch 4"
# 2. MFU at batch 8 (the per-expert matmuls get twice the rows), eager and compiled
run batch8 --variants baseline,enhanced_medium --impls ours,reference --batch_size 8 --compile both \
    --compile_variants baseline,enhanced_medium --title "CPU: batch 8, eager and torch.compile"
# 3. sequence-length scan, batch 1, no dropout (see docs/PERF.md: with attention dropout the CPU
#    SDPA has no fused kernel, so both implementations materialise the scores)
run scan --variants baseline,enhanced_medium --batch_size 1 --dropout 0 --warmup 1 --repeats 2 \
    --seq_lens 256,512,1024,2048,4096 --title "CPU: sequence-length scan, batch 1, dropout 0"
# 4. the zoo beside the baseline (sweeps/zoo.yaml's variants), ours vs reference, at a quarter of the
#    width and 2 layers (256d / 2L / 4H / 1024ff: the seed's head dim 64, so per-head dims match the
#    seed's while ranks and windows scale down with d_model and the context), in one process
ZOO_VARIANTS=$("$PY" -c "from bench.gpu import sweep_variants; print(sweep_variants('zoo.yaml'))")
run zoo --variants "$ZOO_VARIANTS" --d_model 256 --n_layers 2 --n_heads 4 --d_ff 1024 --batch_size 4 --warmup 1 \
    --repeats 5 --isolate no --title "CPU: the zoo, 256d/2L/4H, batch 4 x 256"
