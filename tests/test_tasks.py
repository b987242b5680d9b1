"""The synthetic tasks (tasks.py): each generator's examples checked by hand, the streams'
determinism and disjointness, the refused knobs, and a tiny run producing step_at fields."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import processes
import tasks
import train
from config import ConfigError, config_from_values
from model import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent


def answers(targets):
    """{(row, position): answer} of the scored targets."""
    return {(b, t): int(targets[b, t]) for b, t in (targets != IGNORE_INDEX).nonzero().tolist()}


def test_mqar_example_by_hand():
    inputs, targets = tasks.mqar(torch.Generator().manual_seed(0), rows=3, length=16, vocab=9, pairs=3, queries=2)
    for b in range(3):
        row = inputs[b].tolist()
        keys, values = row[0:6:2], row[1:6:2]
        assert len(set(keys)) == 3 and all(1 <= k <= 4 for k in keys)  # (9 - 1) // 2 = 4 keys: 1..4
        assert all(5 <= v <= 8 for v in values)  # values: the rest, 5..8
        scored = [t for (r, t) in answers(targets) if r == b]
        assert len(scored) == 2 and all(t >= 6 for t in scored)  # two queries, after the pairs
        assert len({row[t] for t in scored}) == 2  # different keys
        for t in scored:  # the answer is the queried key's value
            assert targets[b, t] == values[keys.index(row[t])]
        assert all(row[t] == 0 for t in range(6, 16) if t not in scored)  # filler elsewhere


def test_induction_example_by_hand():
    inputs, targets = tasks.induction(torch.Generator().manual_seed(1), rows=4, length=12, vocab=5, segment=3)
    for b in range(4):
        row, segment = inputs[b].tolist(), inputs[b, 9:].tolist()
        # the segment occurs earlier, wholly before the repeat
        assert any(row[a:a + 3] == segment for a in range(0, 7))
        assert answers(targets[b:b + 1]) == {(0, 9): segment[1], (0, 10): segment[2]}  # its continuation


def test_selective_copy_example_by_hand():
    inputs, targets = tasks.selective_copy(torch.Generator().manual_seed(2), rows=4, length=12, vocab=6, marked=3,
                                           noise=1)
    for b in range(4):
        row = inputs[b].tolist()
        marked = [token for token in row[:8] if token >= 2]  # data tokens 2..5 among noise token 1
        assert len(marked) == 3 and all(token == 1 for token in row[:8] if token < 2)
        assert row[8] == 0 and row[9:] == marked  # the separator, then the marked tokens in order
        assert answers(targets[b:b + 1]) == {(0, 8): marked[0], (0, 9): marked[1], (0, 10): marked[2]}


def task_cfg(**changes):
    values = {"task": "mqar", "seq_len": 16, "batch_size": 4, "eval_batches": 2, "task_vocab": 16, **changes}
    return config_from_values(values)


@pytest.mark.parametrize("task", ["mqar", "induction", "selective_copy"])
def test_streams_are_seeded_fresh_and_disjoint(task):
    knobs = {"task_pairs": 3} if task == "mqar" else {"task_segment": 4} if task == "induction" else {"task_marked": 4}
    a, b = (tasks.make_task_batches(task_cfg(task=task, seed=seed, **knobs)) for seed in (0, 1))
    again = tasks.make_task_batches(task_cfg(task=task, seed=0, **knobs))
    assert all(x.equal(y) for x, y in zip(a.train_batch(5), again.train_batch(5)))  # determined by the seed
    assert not a.train_batch(5)[0].equal(b.train_batch(5)[0])  # and different across seeds
    assert not a.train_batch(5)[0].equal(a.train_batch(6)[0])  # fresh every step
    assert a.val_batch(1)[0].equal(b.val_batch(1)[0]) and a.test_batch(0)[0].equal(b.test_batch(0)[0])  # fixed
    heldout = {tuple(r) for r in torch.cat([a.val[0], a.test[0]]).tolist()}
    trained = {tuple(r) for step in range(50) for r in a.train_batch(step)[0].tolist()}
    assert not heldout & trained


def test_training_redraws_an_example_that_is_held_out():
    """A task so small (mqar, 1 pair, 1 query: 2 keys x 3 values x 3 query positions = 18 examples)
    that the 8 held-out examples are drawn by training all the time: each is replaced, none is trained on."""
    batches = tasks.make_task_batches(task_cfg(task_vocab=6, task_pairs=1, seq_len=5, batch_size=4, eval_batches=1))
    heldout = {tuple(r) for r in torch.cat([batches.val[0], batches.test[0]]).tolist()}
    assert not {tuple(r) for r in batches.val[0].tolist()} & {tuple(r) for r in batches.test[0].tolist()}
    trained = {tuple(r) for step in range(40) for r in batches.train_batch(step)[0].tolist()}
    assert batches.rejected > 0 and trained and not trained & heldout


def test_at_length_scales_mqar_and_is_fixed():
    batches = tasks.make_task_batches(task_cfg(task_pairs=3, task_vocab=32))
    inputs, targets = batches.at_length(32, 0)
    assert inputs.shape == (4, 32) and (targets != IGNORE_INDEX).sum(1).tolist() == [6] * 4  # twice the pairs' queries
    assert inputs.equal(tasks.make_task_batches(task_cfg(task_pairs=3, task_vocab=32, seed=5)).at_length(32, 0)[0])


@pytest.mark.parametrize("values, message", [
    ({"task": "lm", "task_pairs": 4}, "--task_pairs=4: only --task=mqar has it, not --task=lm"),
    ({"task": "induction", "task_marked": 2}, "--task_marked=2: only --task=selective_copy has it"),
    ({"task": "mqar", "vocab_size": 100}, "--vocab_size=100: --task=mqar reads no corpus"),
    ({"task": "mqar", "dataset": "x.txt"}, "--dataset=x.txt: --task=mqar reads no corpus"),
    ({"task": "mqar", "task_pairs": 4, "task_queries": 5}, "--task_queries=5: at most --task_pairs=4"),
    ({"task": "mqar", "task_pairs": 40, "task_vocab": 64}, "--task_pairs=40: at most 31 distinct keys"),
    ({"task": "mqar", "task_pairs": 4, "seq_len": 11}, "--seq_len=11: mqar needs"),
    ({"task": "induction", "task_segment": 1}, "--task_segment=1: must be at least 2"),
    ({"task": "selective_copy", "task_noise": 0}, "--task_noise=0: must be greater than 0"),
    ({"task": "copy"}, "--task=copy: allowed: lm, mqar, induction, selective_copy"),
])
def test_bad_task_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        config_from_values({"seq_len": 32, **values})


def test_a_tiny_task_run_scores_answers_and_records_step_at(tmp_path):
    """train.py on mqar: its fingerprint is the chain over tasks.py's batches, val/accuracy counts
    the answers only (a multiple of 1/answers), and the step_at fields are the first evaluation
    reaching 0.9 / 0.99 in the history, in the record and the W&B summary, or None."""
    args = ["--task=mqar", "--task_pairs=2", "--task_vocab=16", "--seq_len=12", "--d_model=32", "--n_layers=2",
            "--n_heads=2", "--d_ff=64", "--n_experts=2", "--top_k=1", "--steps=6", "--eval_every=2",
            "--eval_batches=2", "--batch_size=4", "--lr=0.01", f"--results_dir={tmp_path}"]
    result = processes.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = (tmp_path / "local").glob("baseline-s0*.json")
    rec = json.loads(path.read_text())
    summary, evals = rec["summary"], [row for row in rec["history"] if "val/accuracy" in row]
    cfg = config_from_values({a[2:].split("=")[0]: a.split("=", 1)[1] for a in args})
    batches, fingerprint = tasks.make_task_batches(cfg), ""
    for step in range(6):
        fingerprint = train.chain_fingerprint(fingerprint, batches.train_batch(step))
    assert summary["data/fingerprint"] == fingerprint
    for row in evals:  # 2 batches x 4 examples x 2 queries = 16 answers
        assert row["val/accuracy"] * 16 == pytest.approx(round(row["val/accuracy"] * 16))
    for threshold, key in ((0.9, "val/step_at_0.9"), (0.99, "val/step_at_0.99")):
        expected = next((row["step"] for row in evals if row["val/accuracy"] >= threshold), None)
        assert key in summary and summary[key] == expected
