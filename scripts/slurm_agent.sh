#!/usr/bin/env bash
# One W&B agent per SLURM array task, each on its own GPU. Create the sweep once, then:
#
#   sbatch --array=0-12 scripts/slurm_agent.sh ENTITY/PROJECT/SWEEP_ID [RUNS_PER_AGENT]
#
# Each task's agent asks the W&B server for runs until the sweep has none left (or it has done
# RUNS_PER_AGENT, `wandb agent --count`); the server hands every run to exactly one agent, so fewer
# tasks than runs also covers the grid. --gres=gpu:1 makes SLURM set CUDA_VISIBLE_DEVICES to the
# task's own GPU; for sweeps/fast_multigpu.yaml submit with --gres=gpu:8 (its --num_processes).
# Submit from the repository (results/ and .cache/ go there; put it on a shared filesystem), with
# the environment that has the requirements active and `wandb login` done.
#SBATCH --job-name=attnsweep-agent
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

sweep_id="${1:-}"
if [[ -z "$sweep_id" ]]; then
    echo "error: usage: sbatch --array=0-N scripts/slurm_agent.sh ENTITY/PROJECT/SWEEP_ID [RUNS_PER_AGENT]" >&2
    exit 2
fi
# Two agents on one GPU would distort the time and memory the report compares: no GPU, no agent.
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    echo "error: no GPU assigned to this task (CUDA_VISIBLE_DEVICES is empty); submit with --gres=gpu:1" >&2
    exit 2
fi
count=()
if [[ -n "${2:-}" ]]; then
    count=(--count "$2")
fi

cd "${SLURM_SUBMIT_DIR:-.}"
echo "array task ${SLURM_ARRAY_TASK_ID:-?} on $(hostname), GPU(s) ${CUDA_VISIBLE_DEVICES}: wandb agent ${sweep_id}" >&2
exec wandb agent "${count[@]}" "$sweep_id"
