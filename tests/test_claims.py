"""README and docstring promises that need their own independent check: the learning-rate
schedule against hand values, results records that never clobber another run's, the hub dataset
path, the token cache under two processes, the data fingerprint recomputed from first principles,
and compile / bf16 through the real command line."""
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import processes
import train
from config import TrainConfig
from record import EXIT_CODES, write_record
from train_helpers import (NO_WANDB, ROOT, offline_env, offline_run_contents, read_record, run_train, small_corpus,
                           tiny_args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


# --- the learning-rate schedule ------------------------------------------------------------------

def test_lr_factor_hand_values():
    """warmup 3 of 10 steps, cosine to a floor of 0.1: step s < 3 gets (s+1)/3; then
    0.1 + 0.9 * (1 + cos(pi * (s-3)/7)) / 2, worked out by hand below; the floor at step 10."""
    cfg = TrainConfig(lr_schedule="cosine", warmup_steps=3, steps=10, min_lr_ratio=0.1)
    hand = [1 / 3, 2 / 3, 1.0,  # warmup
            1.0,  # cos(0) = 1
            0.1 + 0.45 * (1 + 0.9009688679),  # cos(pi/7)
            0.1 + 0.45 * (1 + 0.6234898019),  # cos(2pi/7)
            0.1 + 0.45 * (1 + 0.2225209340),  # cos(3pi/7)
            0.1 + 0.45 * (1 - 0.2225209340),
            0.1 + 0.45 * (1 - 0.6234898019),
            0.1 + 0.45 * (1 - 0.9009688679)]  # the last step, 0.14456...
    assert [train.lr_factor(cfg, s) for s in range(10)] == pytest.approx(hand, abs=1e-9)
    assert hand[-1] == pytest.approx(0.144564, abs=1e-6)
    assert train.lr_factor(cfg, 10) == pytest.approx(0.1)  # the floor, reached after the last step
    assert train.lr_factor(cfg, 25) == pytest.approx(0.1)  # and never gone below
    constant = TrainConfig(lr_schedule="constant", warmup_steps=2, steps=10)
    assert [train.lr_factor(constant, s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_logged_lr_of_every_step_of_a_real_run_is_the_schedule(tmp_path, corpus):
    """warmup 2 of 6 steps, cosine to 0.2, lr 0.01: what the optimizer used at each step, as the
    record and the W&B run log it."""
    args = tiny_args(tmp_path, corpus, steps=6, eval_every=6, lr=0.01, lr_schedule="cosine", warmup_steps=2,
                     min_lr_ratio=0.2)
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    # 0.2 + 0.4 * (1 + cos(pi * k/4)) for k = 0..3: 1, 0.88284271, 0.6, 0.31715729
    hand = [0.005, 0.01, 0.01, 0.0088284271, 0.006, 0.0031715729]
    record = read_record(tmp_path / "results", "local", "baseline-s0")
    assert [row["train/lr"] for row in record["history"]] == pytest.approx(hand, rel=1e-8)
    (run_dir,) = (tmp_path / "results" / "wandb").glob("offline-run-*")
    logged = [row["train/lr"] for row in offline_run_contents(run_dir)["history"] if "train/lr" in row]
    assert logged == pytest.approx(hand, rel=1e-8)


# --- results records: every run keeps its own -------------------------------------------------------

def record_of(run_id: str, status: str) -> dict:
    return {"schema": 1, "run_id": run_id, "run_name": "baseline-s0", "status": status,
            "error": None if status == "finished" else f"the reason {run_id} {status}"}


@pytest.mark.parametrize("first,second", [("finished", "failed"), ("failed", "finished"),
                                          ("diverged", "interrupted"), ("interrupted", "finished")])
def test_a_record_never_replaces_another_runs_record(tmp_path, first, second):
    path_a = write_record(tmp_path, "g", "baseline-s0", "aaaa", record_of("aaaa", first))
    path_b = write_record(tmp_path, "g", "baseline-s0", "bbbb", record_of("bbbb", second))
    assert path_a == tmp_path / "g" / "baseline-s0.json" and path_b == tmp_path / "g" / "baseline-s0-bbbb.json"
    assert json.loads(path_a.read_text()) == record_of("aaaa", first)
    assert json.loads(path_b.read_text()) == record_of("bbbb", second)
    # the same run writing again (a resumed run) updates its own record, wherever it is
    assert write_record(tmp_path, "g", "baseline-s0", "bbbb", record_of("bbbb", "finished")) == path_b
    assert write_record(tmp_path, "g", "baseline-s0", "aaaa", record_of("aaaa", "finished")) == path_a
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["baseline-s0-bbbb.json", "baseline-s0.json"]


def _write_at_once(directory, run_id, barrier):
    barrier.wait()
    write_record(directory, "g", "baseline-s0", run_id, record_of(run_id, "failed"))


def test_two_writers_at_once_keep_both_records(tmp_path):
    """Two processes released together by a barrier, 20 times: both records survive every time."""
    context = multiprocessing.get_context("fork")
    for trial in range(20):
        directory = tmp_path / str(trial)
        barrier = context.Barrier(2)
        writers = [context.Process(target=_write_at_once, args=(directory, run_id, barrier)) for run_id in ("a1", "b2")]
        try:
            for writer in writers:
                writer.start()
            for writer in writers:
                writer.join(30)
                assert writer.exitcode == 0
        finally:  # a writer that hung is not left running
            for writer in writers:
                if writer.pid is not None and writer.exitcode is None:
                    writer.kill()
                    writer.join()
        records = [json.loads(p.read_text()) for p in (directory / "g").glob("*.json")]
        assert sorted(r["run_id"] for r in records) == ["a1", "b2"], trial
        assert not list((directory / "g").glob(".*tmp"))  # no temp file left behind


def test_a_failed_runs_record_survives_a_later_finished_run(tmp_path, corpus):
    """Through the CLI, in the order the old code lost: a run fails (its corpus is too small),
    then another run of the same name finishes. Both records are there, each with its end time."""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words here\n")
    # the records are what is checked: W&B off (the run ids are WANDB_RUN_ID's all the same)
    failed = run_train(tiny_args(tmp_path, tiny), env={**NO_WANDB, "WANDB_RUN_ID": "failedrun"})
    assert failed.returncode == 2, failed.stderr
    finished = run_train(tiny_args(tmp_path, corpus, steps=2, eval_every=2),
                         env={**NO_WANDB, "WANDB_RUN_ID": "finishedrun"})
    assert finished.returncode == 0, finished.stderr
    first = read_record(tmp_path / "results", "local", "baseline-s0")
    second = read_record(tmp_path / "results", "local", "baseline-s0-finishedrun")
    assert (first["run_id"], first["status"]) == ("failedrun", "failed") and "too few" in first["error"]
    assert (second["run_id"], second["status"]) == ("finishedrun", "finished")
    assert first["summary"]["time/ended_at"] < second["summary"]["time/ended_at"]


# --- the hub dataset path (streaming + max_documents) ----------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch, corpus):
    """datasets.load_dataset answering hub names with a streamed IterableDataset of the corpus's
    lines (in a column named "content"), as the hub would; local loads go to the real function."""
    import datasets

    real = datasets.load_dataset
    lines = corpus.read_text(encoding="utf-8").split("\n")[:-1]  # what the "text" loader yields
    calls = []

    def load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
        if path == "text" or not streaming:
            return real(path, name, split=split, streaming=streaming, **kwargs)
        calls.append({"path": path, "name": name, "split": split, **kwargs})

        def documents():
            for line in lines:
                yield {"content": line, "title": line.upper()}

        return datasets.IterableDataset.from_generator(documents)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return lines, calls


def test_a_streamed_hub_dataset_gives_the_file_paths_tokens_cut_at_max_documents(tmp_path, corpus, fake_hub):
    from data import load_tokens

    lines, calls = fake_hub
    hub = TrainConfig(dataset="someone/corpus", dataset_config="plain", dataset_split="train", text_column="content",
                      cache_dir=str(tmp_path / "cache"))
    tokens, vocab = load_tokens(hub)
    assert calls == [{"path": "someone/corpus", "name": "plain", "split": "train", "revision": None}]  # unpinned
    file_tokens, file_vocab = load_tokens(TrainConfig(dataset=str(corpus), cache_dir=str(tmp_path / "cache")))
    assert vocab == file_vocab == 8192 and len(tokens) > 10_000
    assert np.array_equal(tokens, file_tokens)

    first = tmp_path / "first60.txt"  # the first 60 documents, as a file
    first.write_text("".join(line + "\n" for line in lines[:60]), encoding="utf-8")
    cut, _ = load_tokens(TrainConfig(**{**hub.to_dict(), "max_documents": 60}))
    expected, _ = load_tokens(TrainConfig(dataset=str(first), cache_dir=str(tmp_path / "cache")))
    assert np.array_equal(cut, expected) and 0 < len(cut) < len(tokens)


def test_the_token_cache_key_holds_everything_that_changes_the_tokens(tmp_path, corpus, fake_hub):
    """Each setting that changes a hub source's tokens makes a cache miss (a new load, a new cache
    file); the same settings again are a hit."""
    from data import load_tokens

    _, calls = fake_hub
    base = {"dataset": "someone/corpus", "dataset_config": "plain", "dataset_split": "train", "text_column": "content",
            "max_documents": 40, "cache_dir": str(tmp_path / "cache")}
    other_tokenizer = tmp_path / "tokenizer.json"
    other_tokenizer.write_text((ROOT / "corpus" / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|endoftext|>" ', 1))
    changes = [{}, {"dataset": "someone/other"}, {"dataset_config": "fancy"}, {"dataset_split": "validation"},
               {"text_column": "title"}, {"max_documents": 41}, {"tokenizer": str(other_tokenizer)}]
    for index, change in enumerate(changes):
        load_tokens(TrainConfig(**{**base, **change}))
        assert len(calls) == index + 1, change
    load_tokens(TrainConfig(**base))  # unchanged: from the cache
    assert len(calls) == len(changes)


# --- fairness, from first principles ---------------------------------------------------------------

# data/fingerprint of seed 0's first 3 batches (batch 4, seq_len 32) of the embedded corpus with
# its tokenizer. Pinned, so that a change of order, split or tokenization cannot pass as "the same
# order" merely because every run changed alike. (Changed once, on purpose, when the test split
# took its blocks out of training: ad6c46c7... before.)
GOLDEN_EMBEDDED_SEED0 = "dbb327c43662a4d636de66e851feb32ea00c354e21f59db487bb238a5afd5833"


def fingerprint_from_first_principles(token_file, seq_len, batch_size, eval_batches, val_fraction, seed, steps,
                                     test_fraction=0.05):
    """The documented data order, re-derived from the cached token stream alone (numpy, not data.py):
    non-overlapping blocks of seq_len + 1; validation = the first max(eval_batches * batch_size,
    5% of blocks) of a permutation seeded by 20260101, test = the next max(eval_batches * batch_size,
    5% of blocks), the rest (sorted) is training; epoch e walks
    the training blocks in the permutation seeded by seed * 1_000_003 + e; the fingerprint is the
    sha256 chain h <- sha256(h as hex text + the batch as int64 bytes), starting from ""."""
    import torch

    tokens = np.load(token_file)
    n = len(tokens) // (seq_len + 1)
    blocks = tokens[:n * (seq_len + 1)].astype(np.int64).reshape(n, seq_len + 1)
    n_val = max(eval_batches * batch_size, int(n * val_fraction))
    n_test = max(eval_batches * batch_size, int(n * test_fraction))
    split = torch.randperm(n, generator=torch.Generator().manual_seed(20260101)).numpy()
    train_ids = np.sort(split[n_val + n_test:])
    per_epoch = len(train_ids) // batch_size
    digest = ""
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        shuffle = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        chosen = train_ids[shuffle.numpy()][index * batch_size:(index + 1) * batch_size]
        digest = hashlib.sha256(digest.encode() + blocks[chosen].tobytes()).hexdigest()
    return digest


def test_data_fingerprint_recomputed_from_first_principles_and_pinned(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sizes = {"seq_len": 32, "batch_size": 4, "eval_batches": 2, "steps": 3}
    args = [f"--{k}={v}" for k, v in {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "n_experts": 4,
                                      "top_k": 2, "eval_every": 3, "results_dir": tmp_path / "results",
                                      "cache_dir": tmp_path / "cache", **sizes}.items()]
    assert train.main(args) == 0  # the embedded corpus and tokenizer, seed 0
    logged = read_record(tmp_path / "results", "local", "baseline-s0")["summary"]["data/fingerprint"]
    (token_file,) = (tmp_path / "cache").glob("tokens-*.npy")
    assert fingerprint_from_first_principles(token_file, val_fraction=0.05, seed=0, **sizes) == logged
    assert logged == GOLDEN_EMBEDDED_SEED0


# --- the token cache under two processes at once -------------------------------------------------

BUILD_CACHE = """
import hashlib, os, sys, time
sys.path.insert(0, sys.argv[1])
from config import TrainConfig
import data
tokenized, real_tokenize = [], data.tokenize
data.tokenize = lambda cfg: tokenized.append(cfg) or real_tokenize(cfg)
while not os.path.exists(sys.argv[4]):  # released together
    time.sleep(0.001)
tokens, vocab = data.load_tokens(TrainConfig(dataset=sys.argv[2], cache_dir=sys.argv[3]))
print(len(tokenized))
print(hashlib.sha256(tokens.tobytes()).hexdigest(), len(tokens), vocab)
"""


def test_two_processes_building_the_token_cache_at_once(tmp_path, corpus):
    """data.py: "a concurrent run ... never leaves a half-written cache behind". Two processes
    tokenize the same corpus into one empty cache directory at the same moment: both get the
    same tokens, the cache holds one complete entry that a third load reads back unchanged."""
    from data import load_tokens

    cache, go = tmp_path / "cache", tmp_path / "go"
    build_command = [sys.executable, "-c", BUILD_CACHE, str(ROOT), str(corpus), str(cache), str(go)]
    with contextlib.ExitStack() as stack:
        env = offline_env(TOKENIZERS_PARALLELISM="false")
        builders = [stack.enter_context(processes.started(build_command, env=env, stdout=subprocess.PIPE,
                                                          stderr=subprocess.PIPE, text=True)) for _ in range(2)]
        go.touch()
        outputs = [builder.communicate(timeout=120) for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0], [err for _, err in outputs]
    assert [out.split("\n")[-3] for out, _ in outputs] == ["1", "1"]  # both really built it
    results = {out.split("\n")[-2] for out, _ in outputs}
    assert len(results) == 1  # the same digest, length and vocabulary in both
    assert sorted(p.suffix for p in cache.iterdir() if p.name.startswith("tokens-")) == [".json", ".npy"]
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    reread, vocab = load_tokens(TrainConfig(dataset=str(corpus), cache_dir=str(cache)))
    meta = json.loads(next(cache.glob("tokens-*.json")).read_text())
    digest = hashlib.sha256(np.asarray(reread).tobytes()).hexdigest()
    assert results == {f"{digest} {len(reread)} {vocab}"} and meta["tokens"] == len(reread)


# --- --compile=True and --mixed_precision=bf16 through the command line, with a resume ------------

# train.py as the command line runs it, except that the process sends itself SIGTERM while it
# fetches the batch of 0-based step argv[1]: the run checkpoints after that step and stops
INTERRUPT_AT = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import data, train
stop_at, real_batch = int(sys.argv[1]), data.Batches.train_batch

def train_batch(self, step):
    if step == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_batch(self, step)

data.Batches.train_batch = train_batch
sys.exit(train.main(sys.argv[3:]))
"""


def losses(record):
    return [(row["train/loss"], row.get("val/loss")) for row in record["history"]]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler")
def test_compile_and_bf16_through_the_cli_resume_exactly_and_stay_close_to_fp32(tmp_path, corpus):
    sizes = {"steps": 6, "eval_every": 3, "checkpoint_every": 0, "cache_dir": tmp_path / "cache"}  # tokenized once
    fp32 = run_train(tiny_args(tmp_path / "fp32", corpus, **sizes, mixed_precision="no"), env=NO_WANDB)
    assert fp32.returncode == 0, fp32.stderr
    fast = {**sizes, "mixed_precision": "bf16", "compile": True}
    straight = run_train(tiny_args(tmp_path / "straight", corpus, **fast), env=NO_WANDB)
    assert straight.returncode == 0, straight.stderr

    args = tiny_args(tmp_path / "resumed", corpus, **fast)
    interrupted = processes.run([sys.executable, "-c", INTERRUPT_AT, "3", str(ROOT), *args], cwd=ROOT,
                                env=offline_env(), capture_output=True, text=True, timeout=300)
    assert interrupted.returncode == EXIT_CODES["interrupted"], interrupted.stderr
    assert read_record(tmp_path / "resumed" / "results", "local", "baseline-s0")["status"] == "interrupted"
    resumed = run_train(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "from its checkpoint at step 4" in resumed.stderr

    reference = read_record(tmp_path / "fp32" / "results", "local", "baseline-s0")
    uninterrupted = read_record(tmp_path / "straight" / "results", "local", "baseline-s0")
    record = read_record(tmp_path / "resumed" / "results", "local", "baseline-s0")
    assert record["config"]["compile"] is True and record["config"]["mixed_precision"] == "bf16"
    assert losses(record) == losses(uninterrupted)  # exactly, bit for bit
    assert record["summary"]["data/fingerprint"] == reference["summary"]["data/fingerprint"]
    assert losses(uninterrupted) != losses(reference)  # bf16 really ran
    for (loss, val), (loss32, val32) in zip(losses(uninterrupted), losses(reference), strict=True):
        assert loss == pytest.approx(loss32, rel=2e-2)
        assert (val is None) == (val32 is None) and (val is None or val == pytest.approx(val32, rel=2e-2))
