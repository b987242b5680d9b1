"""scripts/slurm_agent.sh: one `wandb agent` per SLURM array task on the task's own GPU. SLURM and
W&B are not here: the script runs with a stand-in `wandb` on PATH that records how it was called."""
import os
from pathlib import Path

import pytest

import processes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_agent.sh"


@pytest.fixture
def fake_wandb(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "wandb").write_text(
        f'#!/usr/bin/env bash\necho "$CUDA_VISIBLE_DEVICES|$PWD|$*" >> {calls}\n')
    (bin_dir / "wandb").chmod(0o755)
    return bin_dir, calls


def run_task(fake_wandb, tmp_path, *args, **env):
    bin_dir, _ = fake_wandb
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES" and not k.startswith("SLURM_")}
    base["PATH"] = f"{bin_dir}:{base['PATH']}"
    return processes.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True,
                         timeout=30)


def test_the_script_parses():
    assert processes.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert "#SBATCH --gres=gpu:1" in SCRIPT.read_text()


def test_each_task_runs_one_agent_on_its_own_gpu(fake_wandb, tmp_path):
    _, calls = fake_wandb
    for task, gpu in (("0", "0"), ("1", "5")):
        result = run_task(fake_wandb, tmp_path, "ent/proj/sweep42", SLURM_ARRAY_TASK_ID=task,
                          CUDA_VISIBLE_DEVICES=gpu, SLURM_SUBMIT_DIR=str(tmp_path))
        assert result.returncode == 0, result.stderr
    result = run_task(fake_wandb, tmp_path, "ent/proj/sweep42", "3", CUDA_VISIBLE_DEVICES="2",
                      SLURM_SUBMIT_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [f"0|{tmp_path}|agent ent/proj/sweep42",
                                              f"5|{tmp_path}|agent ent/proj/sweep42",
                                              f"2|{tmp_path}|agent --count 3 ent/proj/sweep42"]


@pytest.mark.parametrize("args,env,needle", [
    ((), {"CUDA_VISIBLE_DEVICES": "0"}, "usage"),
    (("ent/proj/sweep42",), {}, "no GPU assigned"),
])
def test_no_sweep_id_or_no_gpu_starts_no_agent(fake_wandb, tmp_path, args, env, needle):
    _, calls = fake_wandb
    result = run_task(fake_wandb, tmp_path, *args, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert not calls.exists()
