"""Bad input, failed and diverged runs, preemption and resume, two processes, secrets."""
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as model_module
import processes
import train
from record import EXIT_CODES
from train_helpers import (NO_WANDB, ROOT, offline_env, offline_run_when_ended, read_record, run_train,
                           small_corpus, tiny_args, wait_for)

TIMING_KEYS = ("perf/step_time_ms", "perf/tokens_per_sec", "memory/allocated_gb", "memory/peak_gb")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def tree_snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def comparable(history: list[dict]) -> list[dict]:
    """History rows without the wall-clock and memory readings, which differ between runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


# --- bad input through the real command line ----------------------------------------------------

def bad_corpora(tmp: Path) -> dict:
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (tmp / "tiny.txt").write_text("only a few words here\n")
    with gzip.open(tmp / "broken.txt.gz", "wb") as f:
        f.write(b"text")
    (tmp / "broken.txt.gz").write_bytes((tmp / "broken.txt.gz").read_bytes()[:12])  # truncated gzip
    unreadable = tmp / "unreadable.txt"
    unreadable.write_text("some text\n")
    unreadable.chmod(0)
    readonly = tmp / "readonly_results"
    readonly.mkdir()
    readonly.chmod(0o500)
    (tmp / "a_file").write_text("a regular file, so nothing can be created under it, not even by root\n")
    (tmp / "not_a_dataset").mkdir()
    (tmp / "not_a_dataset" / "notes.bin").write_bytes(bytes(range(256)))
    return {"empty": tmp / "empty.txt", "latin1": tmp / "latin1.txt", "tiny": tmp / "tiny.txt",
            "broken": tmp / "broken.txt.gz", "unreadable": unreadable, "readonly": readonly,
            "under_a_file": tmp / "a_file" / "results", "corpus_under_a_file": tmp / "a_file" / "corpus.txt",
            "not_a_dataset": tmp / "not_a_dataset"}


BAD_INPUTS = [  # (case, extra arguments, text the error line must contain, whether the run gets a record)
    ("unknown variant", {"attention": "flash_magic"}, "flash_magic", False),
    ("unknown key", {"warp_speed": 9}, "--warp_speed", False),
    ("wrong int", {"steps": "ten"}, "--steps=ten", False),
    ("wrong bool", {"compile": "maybe"}, "--compile=maybe", False),
    ("zero size", {"d_model": 0}, "--d_model=0", False),
    ("negative size", {"batch_size": -4}, "--batch_size=-4", False),
    ("heads do not divide", {"d_model": 30, "n_heads": 4}, "--d_model=30", False),
    ("odd rotary dim", {"attention": "rope_only", "qk_rope_head_dim": 7}, "--qk_rope_head_dim=7", False),
    ("top_k over experts", {"top_k": 5, "n_experts": 4}, "--top_k=5", False),
    ("knob on baseline", {"kv_lora_rank": 16}, "--kv_lora_rank=16", False),
    ("bad precision", {"mixed_precision": "fp8"}, "--mixed_precision=fp8", False),
    ("missing corpus", {"dataset": "/nonexistent/corpus.txt"}, "/nonexistent/corpus.txt", True),
    ("corpus under a regular file", {"dataset": "@corpus_under_a_file"}, "a_file/corpus.txt", True),
    ("directory that is not a dataset", {"dataset": "@not_a_dataset"}, "without a dataset", True),
    ("empty corpus", {"dataset": "@empty"}, "empty.txt", True),
    ("non-UTF-8 corpus", {"dataset": "@latin1"}, "not UTF-8", True),
    ("broken gzip", {"dataset": "@broken"}, "broken.txt.gz", True),
    ("corpus too small", {"dataset": "@tiny"}, "too few", True),
    ("seq_len too long for corpus", {"seq_len": 30000}, "too few", True),
    ("unwritable results dir", {"results_dir": "@readonly"}, "readonly_results", False),
    # a path under a regular file cannot be created by anyone, root included: check_writable runs here
    ("results dir under a regular file", {"results_dir": "@under_a_file"}, "a_file/results: not writable", False),
]
if os.geteuid() != 0:  # root reads a chmod-0 file anyway
    BAD_INPUTS.append(("unreadable corpus", {"dataset": "@unreadable"}, "unreadable.txt", True))


# One case of each way bad input ends a launch goes through the real command line (`python
# train.py`: the process's exit status, nothing printed at exit): refused on the command line,
# failed after its W&B run and record were opened, a results directory nothing can be written
# under. The others call train.main, which is all `python train.py` runs (sys.exit(main(argv))),
# in this process: the same code, without ~4 s of process start and W&B service each.
THROUGH_THE_COMMAND_LINE = {"wrong int", "corpus too small", "results dir under a regular file"}
assert THROUGH_THE_COMMAND_LINE <= {case for case, *_ in BAD_INPUTS}


@pytest.mark.parametrize("case,extra,expected,recorded", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_error_line_and_nothing_lost(tmp_path, corpus, case, extra, expected, recorded, monkeypatch,
                                                   capsys):
    if case == "unwritable results dir" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    files = bad_corpora(tmp_path)
    extra = {k: (files[v[1:]] if isinstance(v, str) and v.startswith("@") else v) for k, v in extra.items()}
    results = tmp_path / "results"
    earlier = results / "local" / "baseline-s9.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"schema": 1, "status": "finished", "run_id": "old"}')
    before = tree_snapshot(results)

    args = tiny_args(tmp_path, corpus, **extra)
    if case in THROUGH_THE_COMMAND_LINE:
        result = run_train(args)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code = in_process(monkeypatch, args)  # an exception would fail the test here: no traceback either
        out, err = capsys.readouterr()

    assert code == 2, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert expected in error_lines[0]
    assert "Traceback" not in err + out
    after = tree_snapshot(results)
    own_record = {k for k in after if k.startswith("local/") and k.endswith(".json") and k not in before}
    assert {k: after[k] for k in after if k not in own_record and not k.startswith("wandb/")} == before
    assert (tmp_path / "a_file").read_text().startswith("a regular file")  # the file in the way is untouched
    # a run that got past the command line leaves its own record, failed with the reason; a refused
    # command line or an unwritable results directory leaves none
    assert len(own_record) == (1 if recorded else 0), sorted(own_record)
    for name in own_record:
        record = json.loads((results / name).read_text())
        assert record["status"] == "failed" and expected in record["error"]


# --- failed and diverged runs --------------------------------------------------------------------

def faulty_forward(fault_step: int, fault):
    """Wrap MoELM.forward so that the training forward at 1-based step `fault_step` misbehaves."""
    original = model_module.MoELM.forward
    calls = {"train": 0}

    def forward(self, ids, targets=None):
        out = original(self, ids, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] == fault_step:
                return out._replace(loss=fault(out.loss))
        return out

    return forward


def assert_wandb_run_says(results_dir: Path, record: dict, exit_code: int) -> None:
    """The run's W&B side, read back from its offline .wandb file: the summary has the record's
    status and reason, and the exit code (which sync turns into the failed state) is not 0."""
    (run_dir,) = (results_dir / "wandb").glob(f"offline-run-*-{record['run_id']}")
    # in-process, the wandb service (still running for the next test) writes the exit record a
    # moment after run.finish() returns; a process that exits flushes it on teardown
    logged = offline_run_when_ended(run_dir)
    assert logged["exit_code"] == exit_code != 0
    assert (logged["summary"]["status"], logged["summary"]["error"]) == (record["status"], record["error"])
    assert len(logged["history"]) == len(record["history"])


def in_process(monkeypatch, args) -> int:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return train.main(args)


def test_injected_nan_diverges_at_that_step(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(model_module.MoELM, "forward", faulty_forward(4, lambda loss: loss * float("nan")))
    code = in_process(monkeypatch, tiny_args(tmp_path, corpus, steps=6))
    record = read_record(tmp_path / "results", "local", "baseline-s0")
    assert code == EXIT_CODES["diverged"] != 0
    assert record["status"] == "diverged" and "step 4" in record["error"]
    assert [row["step"] for row in record["history"]] == [1, 2, 3]
    assert "error: non-finite loss at step 4" in capsys.readouterr().err
    assert_wandb_run_says(tmp_path / "results", record, EXIT_CODES["diverged"])


def test_cuda_out_of_memory_gets_its_own_message(tmp_path, corpus, monkeypatch, capsys):
    def out_of_memory(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model_module.MoELM, "forward", faulty_forward(2, out_of_memory))
    code = in_process(monkeypatch, tiny_args(tmp_path, corpus, batch_size=4, seq_len=32))
    record = read_record(tmp_path / "results", "local", "baseline-s0")
    assert code == 1 and record["status"] == "failed"
    assert "out of memory" in record["error"] and "--batch_size=4" in record["error"]
    assert "--seq_len=32" in record["error"]
    assert capsys.readouterr().err.count("error:") == 1


def test_a_crash_is_recorded_failed_with_its_reason(tmp_path, corpus, monkeypatch):
    def crash(loss):
        raise RuntimeError("something broke inside")

    monkeypatch.setattr(model_module.MoELM, "forward", faulty_forward(3, crash))
    assert in_process(monkeypatch, tiny_args(tmp_path, corpus)) == 1
    record = read_record(tmp_path / "results", "local", "baseline-s0")
    assert record["status"] == "failed" and "RuntimeError: something broke inside" in record["error"]
    assert (tmp_path / "results" / "local" / "baseline-s0.traceback.txt").exists()
    assert_wandb_run_says(tmp_path / "results", record, 1)


def test_real_divergence_in_a_sweep_does_not_stop_the_sweep(tmp_path, corpus):
    """An absurd learning rate diverges for real; the sweep still finishes the other runs."""
    sweep = tmp_path / "sweep.yaml"
    fixed = {k: {"value": str(v) if isinstance(v, Path) else v}
             for k, v in {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "n_experts": 4, "seq_len": 32,
                          "batch_size": 4, "steps": 8, "eval_every": 4, "eval_batches": 2, "dataset": corpus,
                          "cache_dir": tmp_path / "cache", "grad_clip": 0}.items()}
    import yaml

    sweep.write_text(yaml.safe_dump({
        "program": "train.py", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {**fixed, "lr": {"values": [0.003, 1.0e12]}}}))
    result = processes.run([sys.executable, str(ROOT / "local_sweep.py"), str(sweep),
                            "--results-dir", str(tmp_path / "results")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=offline_env(**NO_WANDB))  # the records are what is checked
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("baseline-s0*.json")
               if '"schema"' in p.read_text()]
    statuses = sorted((r["config"]["lr"], r["status"]) for r in records)
    assert statuses == [(0.003, "finished"), (1.0e12, "diverged")]


# --- preemption and resume -----------------------------------------------------------------------

def start_train(args, **env):
    """train.py started, as a context manager that kills what is left of it at the end."""
    return processes.started([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=offline_env(**env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LONG = {"steps": 120, "eval_every": 40, "checkpoint_every": 10, "dropout": 0.1}
# a checkpoint costs seconds here (40 steps on the shared 2-core machine: a 5.9 s loop without,
# 10.5 s with one every 10), so the kill -9 runs are 40 steps rather than 120: 3 checkpoints, and
# two of them plus 30 steps still to run after the first, when the test kills the process
KILL = {**LONG, "steps": 40, "eval_every": 20}


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, corpus):
    straight = run_train(tiny_args(tmp_path / "straight", corpus, **KILL), env=NO_WANDB)
    assert straight.returncode == 0, straight.stderr
    reference = read_record(tmp_path / "straight" / "results", "local", "baseline-s0")

    args = tiny_args(tmp_path / "killed", corpus, **KILL)
    checkpoints = tmp_path / "killed" / "results" / "local" / "checkpoints"
    with start_train(args) as process:
        assert wait_for(lambda: any(checkpoints.glob("baseline-s0-*/progress.json"))), "no checkpoint appeared"
        process.send_signal(signal.SIGKILL)
        process.wait()
    (progress,) = checkpoints.glob("baseline-s0-*/progress.json")
    killed_at = json.loads(progress.read_text())["step"]
    assert killed_at < KILL["steps"]

    resumed = run_train(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"from its checkpoint at step {killed_at}" in resumed.stderr
    record = read_record(tmp_path / "killed" / "results", "local", "baseline-s0")
    assert comparable(record["history"]) == comparable(reference["history"])
    assert record["summary"]["data/fingerprint"] == reference["summary"]["data/fingerprint"]
    assert not progress.parent.exists()  # a finished run removes its checkpoint


SENTINEL = "sentinel-api-key-0123456789abcdef0123456789abcdef"
SECRETS = {"WANDB_API_KEY": SENTINEL, "HF_TOKEN": SENTINEL}


def assert_no_secret_written(directory: Path) -> list[Path]:
    files = [p for p in directory.rglob("*") if p.is_file()]
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), path
    return files


def test_sigterm_checkpoints_and_marks_interrupted_and_no_api_key_reaches_a_written_file(tmp_path, corpus):
    """A SIGTERM mid-run: a checkpoint, the run interrupted, W&B told so, and --resume finishes it.
    Both processes run with a W&B key and an HF token in their environment: neither reaches their
    output or any file they wrote (records, checkpoint, W&B's offline run, logs)."""
    args = tiny_args(tmp_path, corpus, **{**LONG, "checkpoint_every": 0})
    record_file = tmp_path / "results" / "local" / "baseline-s0.json"
    wandb_dir = tmp_path / "results" / "wandb"
    with start_train(args, **SECRETS) as process:
        assert wait_for(lambda: any(wandb_dir.glob("offline-run-*")))
        time.sleep(1.0)  # into the training loop
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_CODES["interrupted"], stderr
    assert SENTINEL not in stdout + stderr
    record = json.loads(record_file.read_text())
    assert record["status"] == "interrupted" and "--resume" in record["error"]
    checkpoint = tmp_path / "results" / "local" / "checkpoints" / f"baseline-s0-{record['run_id']}"
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["step"] == len(record["history"])
    assert (checkpoint / "state").is_dir()
    assert_wandb_run_says(tmp_path / "results", record, EXIT_CODES["interrupted"])
    written = assert_no_secret_written(tmp_path)  # the checkpoint too: a finished run removes it
    assert any(p.suffix == ".wandb" for p in written) and (checkpoint / "progress.json") in written

    resumed = run_train(args + ["--resume"], env=SECRETS)  # the checkpoint is usable
    assert resumed.returncode == 0, resumed.stderr
    final = read_record(tmp_path / "results", "local", "baseline-s0")
    assert final["status"] == "finished" and len(final["history"]) == LONG["steps"]
    assert final["run_id"] == record["run_id"]  # the same W&B run continues

    assert SENTINEL not in resumed.stdout + resumed.stderr
    assert_no_secret_written(tmp_path)


def test_runs_differing_in_a_knob_keep_their_own_checkpoints_and_resume_checks_the_config(
        tmp_path, corpus, monkeypatch, capsys):
    """Two runs of baseline seed 0 with two lr values: each checkpoints under its run id; one
    finishing leaves the other's checkpoint; --resume continues the run of the same config and
    refuses (one error line, exit 2, checkpoint kept) where only another config's checkpoint is."""
    checkpoints = tmp_path / "results" / "local" / "checkpoints"
    base = {**LONG, "steps": 8, "eval_every": 4, "checkpoint_every": 2}
    monkeypatch.setattr(model_module.MoELM, "forward", faulty_forward(7, lambda loss: loss * float("nan")))
    assert in_process(monkeypatch, tiny_args(tmp_path, corpus, **base, lr=1e-3)) == EXIT_CODES["diverged"]
    monkeypatch.undo()
    (first,) = checkpoints.iterdir()
    first_run_id = read_record(tmp_path / "results", "local", "baseline-s0")["run_id"]
    assert first.name == f"baseline-s0-{first_run_id}"
    assert json.loads((first / "progress.json").read_text())["step"] == 6

    other = run_train(tiny_args(tmp_path, corpus, **base, lr=3e-3))  # same variant and seed, other lr
    assert other.returncode == 0, other.stderr
    assert [p.name for p in checkpoints.iterdir()] == [first.name]  # untouched by the other run
    before = tree_snapshot(first)

    capsys.readouterr()
    # in this process (bad input through the real command line: test_bad_input_one_error_line_and_nothing_lost)
    assert in_process(monkeypatch, tiny_args(tmp_path, corpus, **base, lr=2e-3) + ["--resume"]) == 2
    refused = capsys.readouterr().err
    errors = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another config" in errors[0] and "lr=0.001 there, 0.002 here" in errors[0], refused
    assert "Traceback" not in refused
    assert tree_snapshot(first) == before

    resumed = run_train(tiny_args(tmp_path, corpus, **base, lr=1e-3) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "from its checkpoint at step 6" in resumed.stderr
    assert not first.exists()


# --- several processes ---------------------------------------------------------------------------

# lr_factor for warmup 2, cosine over the remaining 4 of 6 steps to a floor of 0.1, by hand:
# warmup (step + 1) / 2; then 0.1 + 0.9 * (1 + cos(pi * (step - 2) / 4)) / 2.
WARMUP_COSINE = {"lr_schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "steps": 6}
WARMUP_COSINE_FACTORS = [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802]


def test_lr_factor_hand_values():
    cfg = train.TrainConfig(**WARMUP_COSINE)
    assert [train.lr_factor(cfg, step) for step in range(6)] == pytest.approx(WARMUP_COSINE_FACTORS, abs=1e-6)
    assert train.lr_factor(cfg, 6) == pytest.approx(0.1)  # the floor, reached after the last step


def test_two_processes_match_one(tmp_path, corpus):
    """torchrun starts two CPU processes (gloo) that Accelerate picks up: one record, one W&B
    run, the same global batch, and the same learning rate and losses as one process, under
    warmup + cosine (a constant lr would hide a schedule stepped once per process).

    Dropout and router noise draw from per-process generators, and the balance loss is a statistic
    of each process's own tokens (as in any data-parallel MoE), so those are off for the exact
    comparison; with them on, the processes train the same model up to those differences."""
    deterministic = {"dropout": 0.0, "router_noise_std": 0.0, "aux_loss_weight": 0.0, "batch_size": 4,
                     **WARMUP_COSINE}
    one = run_train(tiny_args(tmp_path / "one", corpus, **deterministic), env=NO_WANDB)
    assert one.returncode == 0, one.stderr
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = offline_env(OMP_NUM_THREADS="1")
    two = processes.run([torchrun, "--nproc_per_node=2", str(ROOT / "train.py"),
                         *tiny_args(tmp_path / "two", corpus, **deterministic)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    single = read_record(tmp_path / "one" / "results", "local", "baseline-s0")
    double = read_record(tmp_path / "two" / "results", "local", "baseline-s0")
    assert len(list((tmp_path / "two" / "results").rglob("*.json"))) == 1  # one record, main process only
    assert len(list((tmp_path / "two" / "results" / "wandb").glob("offline-run-*"))) == 1
    assert double["summary"]["data/fingerprint"] == single["summary"]["data/fingerprint"]
    lr = float(dict(arg[2:].split("=", 1) for arg in tiny_args(tmp_path, corpus))["lr"])
    assert [row["train/lr"] for row in single["history"]] == pytest.approx(
        [lr * f for f in WARMUP_COSINE_FACTORS], rel=1e-5)
    for a, b in zip(single["history"], double["history"], strict=True):
        assert b["train/lr"] == a["train/lr"], f"step {a['step']}"
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        if "val/loss" in a:
            assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-5)


def test_resume_compares_the_resolved_attention_not_only_the_settings():
    """A variant's sizes are relative to the model, so a checkpoint saved when lora_small meant
    other sizes has the same settings but another model: resuming it must be refused with the
    usual one line (not a shape mismatch when the weights load); one from before checkpoints
    carried the resolved attention is refused too; the current run's own round-trips."""
    cfg = train.TrainConfig(attention="lora_small", d_model=64, n_heads=4)
    saved = json.loads(json.dumps(train.checkpoint_config(cfg)))  # as progress.json stores it
    assert saved["attention_spec"]["kv_lora_rank"] == 8  # d_model 64 / 8
    assert train.config_differences(saved, cfg) == []
    other_sizes = saved | {"attention_spec": saved["attention_spec"] | {"kv_lora_rank": 64}}
    (difference,) = train.config_differences(other_sizes, cfg)
    assert difference.startswith("attention_spec=") and "'kv_lora_rank': 64" in difference
    before = {k: v for k, v in saved.items() if k != "attention_spec"}
    assert train.config_differences(before, cfg) == [f"attention_spec='unset' there, {saved['attention_spec']!r} here"]
