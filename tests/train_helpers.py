"""Shared pieces for the tests that train: a tiny model size, a small corpus cut from the embedded
one, and a reader for what W&B wrote into an offline run."""
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import processes
from localsweep.wandb_file import history_rows, parsed_records

ROOT = Path(__file__).resolve().parent.parent

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "n_experts": 4, "top_k": 2, "seq_len": 32,
        "batch_size": 4, "steps": 6, "eval_every": 3, "eval_batches": 2, "lr": 3e-3}


def small_corpus(directory: Path, lines: int = 400) -> Path:
    """The first lines of the embedded corpus (a few hundred KB): real text, fast to tokenize."""
    path = directory / "small.txt"
    if not path.exists():
        with gzip.open(ROOT / "corpus" / "corpus.txt.gz", "rt", encoding="utf-8") as f:
            path.write_text("".join(next(f) for _ in range(lines)), encoding="utf-8")
    return path


def tiny_args(tmp: Path, corpus: Path, **overrides) -> list[str]:
    values = {**TINY, "dataset": corpus, "results_dir": tmp / "results", "cache_dir": tmp / "cache", **overrides}
    return [f"--{k}={v}" for k, v in values.items()]


def offline_env(**extra) -> dict:
    """This environment, offline, without the address of a wandb service that an in-process test
    started (WANDB_SERVICE): a child would join it, and a killed child's run id would stay taken."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


# For a run whose W&B side no assertion reads (a reference whose losses another run must match, or a
# run checked by its record alone): train.py then neither imports wandb nor starts its service, ~2-3 s
# less a process, and trains and records the same (a W&B-dependent difference in a reference would
# show as a mismatch with the run under test, which keeps W&B on).
NO_WANDB = {"WANDB_MODE": "disabled"}


def run_train(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py through the real command line, offline."""
    return processes.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=offline_env(**(env or {})),
                         capture_output=True, text=True, timeout=timeout)


def read_record(results_dir: Path, group: str, run_name: str) -> dict:
    return json.loads((results_dir / group / f"{run_name}.json").read_text())


def offline_run_contents(run_dir: Path) -> dict:
    """The config, group, sweep id, tags, logged history rows, summary and exit code stored in an
    offline run's .wandb file (read with local_sweep's reader: it is how hyperband sees a running
    run). The exit code is what `wandb sync` turns into the run's state: 0 finished, else failed;
    None when the run never ended."""
    (wandb_file,) = run_dir.glob("run-*.wandb")
    config, group, sweep_id, tags, history, summary, exit_code = {}, None, None, [], [], {}, None
    for kind, record in parsed_records(wandb_file):
        if kind == "run":
            group, sweep_id, tags = record.run.run_group, record.run.sweep_id, list(record.run.tags)
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append(history_rows(record))
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
            for item in record.summary.remove:
                summary.pop(item.key or "/".join(item.nested_key), None)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"config": config, "group": group, "sweep_id": sweep_id, "tags": tags, "history": history,
            "summary": summary, "exit_code": exit_code}


def wait_for(predicate, timeout=120.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def offline_run_when_ended(run_dir: Path, timeout=30.0) -> dict:
    """offline_run_contents once the run's exit record is in its .wandb file: wandb-core writes the
    offline log asynchronously, a moment after `run.finish()` returns in-process."""
    assert wait_for(lambda: offline_run_contents(run_dir)["exit_code"] is not None, timeout), run_dir
    return offline_run_contents(run_dir)
