#!/usr/bin/env bash
# The GPU benchmark, in one go, for a lent machine (made for one H100; about 4 minutes).
#
#     bash bench/gpu.sh [OUTDIR]        # OUTDIR: default $OUT, else bench/results/gpu-<date>
#
# Needs only torch (CUDA build) and this repository. In order:
#   0. the bf16 matmul peak, and a correctness check of the CUDA kernels (ours == reference);
#   1. the seed's fast setup (batch 16 x 512, vocab 49152, bf16): all 13 variants, ours vs the
#      seed-style reference;
#   2. the sequence-length scan (batch 4, 512 to 16384) for baseline and enhanced_medium, both
#      implementations: time and peak memory, and where the reference runs out of memory;
#   3. the measured choices of the fast path, on the variants with unequal q/k and v head dims:
#      pad for flash attention or not (SDPA_PAD), grouped or looped experts (MOE_EXPERT_MATMUL);
#   4. torch.compile on for baseline and enhanced_medium (their eager numbers are in 1).
# Each section has a time budget (cases past it are recorded as skipped) and a hard timeout, so the
# script ends in under 5 minutes whatever happens. The main table is printed last; everything,
# with per-step times, goes to OUTDIR (*.json, *.csv, *.txt).
#
# A dry run on a CPU (tiny sizes, every section and file, a minute or two):
#     BENCH_DEVICE=cpu BENCH_EXTRA="--preset tiny --dtype bf16 --isolate no" SCAN_LENS=32,64 bash bench/gpu.sh /tmp/dry
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
START=$SECONDS
DEADLINE=${GPU_BENCH_SECONDS:-230}  # the whole script, in seconds (a case may overrun its budget by <= 30 s)
DEVICE=${BENCH_DEVICE:-cuda}
SCAN_LENS=${SCAN_LENS:-512,1024,2048,4096,8192,16384}
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"  # appended to every bench.step call: later flags win

left() { echo $((DEADLINE - (SECONDS - START))); }

# section NAME BUDGET_S ARGS...: run bench.step with a budget capped by what is left overall.
section() {
    local name=$1 budget=$2; shift 2
    local remaining; remaining=$(left)
    if [ "$remaining" -lt 20 ]; then
        echo "== $name: skipped, out of time" | tee "$OUTDIR/$name.txt"
        return
    fi
    [ "$budget" -gt $((remaining - 15)) ] && budget=$((remaining - 15))
    echo "== $name (budget ${budget}s, $(left)s left overall)" >&2
    # Past budget + 30 s, SIGINT: bench.step stops the running case and still writes what it has.
    timeout --signal=INT --kill-after=20 $((budget + 30)) "$PY" -m bench.step --device "$DEVICE" --time_budget "$budget" \
        --out "$OUTDIR/$name" "$@" "${EXTRA[@]}" > "$OUTDIR/$name.txt" 2> "$OUTDIR/$name.log"
    echo "   exit $? after $((SECONDS - START))s" >&2
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    date -Is
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt" >&2

"$PY" -m bench.step --preset gpu --device "$DEVICE" --peak_only --out "$OUTDIR/peak" "${EXTRA[@]}" \
    > "$OUTDIR/peak.txt" 2>&1
timeout 60 "$PY" -m bench.check --device "$DEVICE" > "$OUTDIR/check.txt" 2>&1
echo "== check: exit $? after $((SECONDS - START))s" >&2

section main 100 --preset gpu --variants all --title "1. seed fast setup, all variants, ours vs reference"
section scan 45 --preset gpu --variants baseline,enhanced_medium --batch_size 4 --warmup 1 --repeats 3 \
    --seq_lens "$SCAN_LENS" --title "2. sequence-length scan, batch 4"
section choices 20 --preset gpu --variants rope_large,enhanced_small --impls ours \
    --sdpa_pad auto,never --moe_matmul auto,loop --title "3. fast-path choices (auto = pad + grouped on CUDA bf16)"
section compile 70 --preset gpu --variants baseline,enhanced_medium --impls ours --compile on \
    --title "4. torch.compile (eager rows: table 1)"

for name in peak check scan choices compile main; do
    echo
    cat "$OUTDIR/$name.txt"
done
echo
echo "total $((SECONDS - START))s; full results in $OUTDIR"
