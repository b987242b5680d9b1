"""Shared pieces for the tests that train: a tiny model size, a small corpus cut from the embedded
one, and a reader for what W&B wrote into an offline run."""
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

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


def run_train(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py through the real command line, offline."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=offline_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def read_record(results_dir: Path, group: str, run_name: str) -> dict:
    return json.loads((results_dir / group / f"{run_name}.json").read_text())


def _wandb_log_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-style
    32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last). wandb 0.31 has no Python reader for it any more, so the test has its own."""
    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", path
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def offline_run_contents(run_dir: Path) -> dict:
    """The config, group, logged history rows and final summary (its updates merged in order)
    stored in an offline run's .wandb file: what W&B's server would show for the run."""
    from wandb.proto import wandb_internal_pb2

    (wandb_file,) = run_dir.glob("run-*.wandb")
    config, group, history, summary, tags = {}, None, [], {}, []
    for data in _wandb_log_records(wandb_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group = record.run.run_group
            tags = list(record.run.tags)
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return {"config": config, "group": group, "history": history, "summary": summary, "tags": tags}
