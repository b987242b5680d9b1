"""train.py end to end at a tiny size, offline: what a run logs and records, reproducibility,
fairness fingerprints, the agent contract, and the data loading paths."""
import json

import pytest

import train
from config import TrainConfig
from data import load_texts, load_tokens, make_batches
from train_helpers import TINY, offline_run_contents, read_record, run_train, small_corpus, tiny_args

STEP_KEYS = {"train/loss", "train/accuracy", "train/lr", "train/grad_norm", "train/aux_loss", "perf/step_time_ms",
             "perf/tokens_per_sec", "memory/allocated_gb", "memory/peak_gb"}
VAL_KEYS = {"val/loss", "val/accuracy", "val/perplexity"}
SUMMARY_KEYS = VAL_KEYS | {"params/total", "params/attention", "flops/per_token", "time/total_s", "memory/peak_gb",
                           "data/fingerprint", "init/shared_fingerprint", "status", "hardware/processes",
                           "hardware/device", "kv_cache/bytes_per_token"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def train_in_process(tmp_path, corpus, monkeypatch, **overrides) -> dict:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = tiny_args(tmp_path, corpus, **overrides)
    assert train.main(args) == 0
    cfg = TrainConfig(**{k: v for k, v in overrides.items() if k in ("attention", "seed")})
    return read_record(tmp_path / "results", overrides.get("group", "local"), cfg.run_name)


def test_tiny_run_writes_record_and_offline_wandb_run(tmp_path, corpus):
    result = run_train(tiny_args(tmp_path, corpus, attention="rope_small", seed=3))
    assert result.returncode == 0, result.stderr
    record = read_record(tmp_path / "results", "local", "rope_small-s3")
    assert {"schema", "run_id", "run_name", "group", "attention", "family", "seed", "status", "error", "config",
            "summary", "history"} <= record.keys()
    assert (record["schema"], record["status"], record["error"], record["family"]) == (1, "finished", None, "rope")
    assert SUMMARY_KEYS <= record["summary"].keys()
    assert [row["step"] for row in record["history"]] == list(range(1, TINY["steps"] + 1))
    for row in record["history"]:
        assert STEP_KEYS <= row.keys()
        assert (VAL_KEYS <= row.keys()) == (row["step"] % TINY["eval_every"] == 0), row
    assert record["summary"]["val/loss"] == record["history"][-1]["val/loss"]
    assert record["config"]["attention"] == "rope_small" and record["config"]["steps"] == TINY["steps"]
    assert (record["summary"]["hardware/processes"], record["summary"]["hardware/device"]) == (1, "cpu")

    (run_dir,) = (tmp_path / "results" / "wandb").glob("offline-run-*")
    logged = offline_run_contents(run_dir)
    assert logged["group"] == "local"
    assert logged["config"]["attention"] == "rope_small"
    logged_losses = [row["train/loss"] for row in logged["history"] if "train/loss" in row]
    assert logged_losses == pytest.approx([row["train/loss"] for row in record["history"]])
    assert "rope_small-s3" in result.stderr  # the progress bar names the run


def test_same_seed_same_history_and_fairness_fingerprints(tmp_path, corpus, monkeypatch):
    first = train_in_process(tmp_path / "a", corpus, monkeypatch, attention="lora_small", seed=1)
    again = train_in_process(tmp_path / "b", corpus, monkeypatch, attention="lora_small", seed=1)
    other_variant = train_in_process(tmp_path / "c", corpus, monkeypatch, attention="enhanced_small", seed=1)
    other_seed = train_in_process(tmp_path / "d", corpus, monkeypatch, attention="lora_small", seed=2)

    def losses(record):
        return [(row["train/loss"], row.get("val/loss")) for row in record["history"]]

    assert losses(first) == losses(again)
    for key in ("data/fingerprint", "init/shared_fingerprint"):
        assert first["summary"][key] == other_variant["summary"][key]
        assert first["summary"][key] != other_seed["summary"][key]
    assert losses(first) != losses(other_variant)  # the attention really differs
    # another kind (multi-query with QK-norm) shares the init too; its KV cache by hand:
    # 1 layer x K and V x 1 key/value head x 16 dims x 2 bytes
    zoo = train_in_process(tmp_path / "e", corpus, monkeypatch, attention="qknorm", n_kv_heads=1, seed=1)
    assert zoo["summary"]["init/shared_fingerprint"] == first["summary"]["init/shared_fingerprint"]
    assert zoo["summary"]["kv_cache/bytes_per_token"] == 1 * 2 * 1 * 16 * 2
    # lora_small at d_model 32, head dim 16: a latent of d_model/8 = 4 plus one rotary key of 1 head dim = 16
    assert first["summary"]["kv_cache/bytes_per_token"] == 1 * (4 + 16) * 2


def test_agent_contract_sweep_values_and_group(tmp_path, corpus):
    """As `wandb agent` launches a run: params file + sweep id in the environment, the same values
    as --name=value arguments (booleans as True/False)."""
    params = {"attention": {"value": "bias_only"}, "seed": {"value": 4}, "attention_bias": {"value": False},
              "lr": {"value": 0.002}}
    param_path = tmp_path / "params.json"
    param_path.write_text(json.dumps(params))
    args = tiny_args(tmp_path, corpus, attention="bias_only", seed=4, attention_bias=False, lr=0.002)
    env = {"WANDB_SWEEP_ID": "swp123", "WANDB_SWEEP_PARAM_PATH": str(param_path), "WANDB_RUN_ID": "runabc12"}
    result = run_train(args, env=env)
    assert result.returncode == 0, result.stderr

    record = read_record(tmp_path / "results", "swp123", "bias_only-s4")
    assert record["group"] == "swp123" and record["run_id"] == "runabc12"
    assert record["config"]["attention_bias"] is False and record["config"]["lr"] == 0.002
    (run_dir,) = (tmp_path / "results" / "swp123" / "wandb").glob("offline-run-*-runabc12")  # beside the records
    logged = offline_run_contents(run_dir)
    assert logged["group"] == "swp123"
    assert logged["config"]["attention"] == "bias_only"
    assert logged["config"]["attention_bias"] is False  # not the "False" -> True trap
    assert logged["config"]["seed"] == 4 and logged["config"]["lr"] == 0.002


@pytest.mark.parametrize("sweep_id", ["swp999", None])  # None: local_sweep.py, the params file alone
def test_agent_values_that_disagree_with_the_command_line_fail_loudly(tmp_path, corpus, sweep_id):
    param_path = tmp_path / "params.json"
    param_path.write_text(json.dumps({"attention": {"value": "rope_only"}}))
    env = {"WANDB_SWEEP_PARAM_PATH": str(param_path), "WANDB_RUN_GROUP": "grp999"}
    if sweep_id:
        env["WANDB_SWEEP_ID"] = sweep_id
    result = run_train(tiny_args(tmp_path, corpus, attention="baseline"), env=env)
    assert result.returncode == 2
    assert "attention='rope_only' disagrees" in result.stderr
    record = read_record(tmp_path / "results", sweep_id or "grp999", "baseline-s0")
    assert record["status"] == "failed" and "disagrees" in record["error"]


def test_embedded_and_hub_style_datasets_share_the_loading_path(tmp_path, corpus):
    """A .txt file and a saved `datasets` directory (what a hub dataset becomes) with the same
    documents give the same token stream."""
    from datasets import Dataset

    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines()]
    saved = tmp_path / "saved_dataset"
    Dataset.from_dict({"content": lines}).save_to_disk(str(saved))

    from_file = TrainConfig(dataset=str(corpus), cache_dir=str(tmp_path / "cache"))
    from_dir = TrainConfig(dataset=str(saved), text_column="content", cache_dir=str(tmp_path / "cache"))
    assert len(load_texts(from_file)) == len(lines)
    tokens_file, vocab_file = load_tokens(from_file)
    tokens_dir, vocab_dir = load_tokens(from_dir)
    assert vocab_file == vocab_dir == 8192
    assert list(tokens_file) == list(tokens_dir)
    assert len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 2  # each source cached once


def test_validation_blocks_are_disjoint_from_training_and_independent_of_seed(tmp_path, corpus):
    cfg = TrainConfig(dataset=str(corpus), cache_dir=str(tmp_path / "cache"), seq_len=32, batch_size=4,
                      eval_batches=2)
    tokens, _ = load_tokens(cfg)
    batches = make_batches(tokens, cfg)
    assert not set(batches.train_ids.tolist()) & set(batches.val_ids.tolist())
    assert batches.blocks.shape[1] == 33
    # non-overlapping: the blocks tile the start of the token stream
    assert batches.blocks.flatten().tolist() == [int(t) for t in tokens[:batches.blocks.numel()]]
    other_seed = make_batches(tokens, TrainConfig(**{**cfg.to_dict(), "seed": 7}))
    assert other_seed.val_ids.tolist() == batches.val_ids.tolist()
    assert not other_seed.train_batch(0)[0].equal(batches.train_batch(0)[0])
    inputs, targets = batches.train_batch(0)  # a language model's pair: targets are the inputs shifted by one
    assert inputs.shape == targets.shape == (4, 32) and inputs[:, 1:].equal(targets[:, :-1])
