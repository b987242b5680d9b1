"""Tune, then compare on held-out data (issue 13, section 1): the test split is disjoint from
training and validation and the same for every seed; stage 1's best lr per variant is chosen by a
stated rule; stage 2 is an ordinary, valid W&B sweep; both stages run through local_sweep; the
report pairs variant and baseline at tuned lrs beside the shared lr, from records or W&B.

Expected values are planted in synthetic records and worked out by hand here.
"""
import math

import torch
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import processes
from analysis import tuning
from analysis.fairness import audit
from analysis.runs import SourceError, load_path, run_from_record
from config import ConfigError, TrainConfig, config_from_values
from data import load_tokens, make_batches
from localsweep.common import import_engine
from localsweep.validate import bad_values, check_engine, check_schema, grid_size_and_runs
from test_analysis import FakeWandbRun, make_record, write_records
from train_helpers import (NO_WANDB, ROOT, TINY, offline_env, offline_run_contents, read_record, run_train,
                           small_corpus, tiny_args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


# --- the test split ---------------------------------------------------------------------------

def test_train_val_and_test_blocks_are_disjoint_cover_every_block_and_ignore_the_seed(tmp_path, corpus):
    cfg = TrainConfig(dataset=str(corpus), cache_dir=str(tmp_path / "cache"), seq_len=32, batch_size=4,
                      eval_batches=2)
    tokens, _ = load_tokens(cfg)
    batches = make_batches(tokens, cfg)
    train, val, test = (set(ids.tolist()) for ids in (batches.train_ids, batches.val_ids, batches.test_ids))
    n_blocks = len(tokens) // 33
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(n_blocks))
    assert len(test) == max(2 * 4, int(n_blocks * 0.05))  # max(eval_batches * batch_size, 5%)
    for seed in (1, 7):
        other = make_batches(tokens, TrainConfig(**{**cfg.to_dict(), "seed": seed}))
        assert other.test_ids.tolist() == batches.test_ids.tolist()
        assert other.val_ids.tolist() == batches.val_ids.tolist()
    # the test set is carved after validation: the validation set is the one it was without it
    without = make_batches(tokens, TrainConfig(**{**cfg.to_dict(), "test_fraction": 0.0}))
    assert without.val_ids.tolist() == batches.val_ids.tolist() and len(without.test_ids) == 0


def test_test_fraction_and_eval_test_are_checked():
    with pytest.raises(ConfigError, match="--test_fraction"):
        TrainConfig(val_fraction=0.5, test_fraction=0.5).validate()
    with pytest.raises(ConfigError, match="--test_fraction"):
        TrainConfig(test_fraction=-0.1).validate()
    with pytest.raises(ConfigError, match="needs a test set"):
        TrainConfig(test_fraction=0.0, eval_test=True).validate()


def test_a_real_run_never_trains_on_a_test_block_and_scores_the_test_set_once(tmp_path):
    """The run's logged data/fingerprint is the chain over exactly the batches data.py hands out,
    and no row of those batches is a test block; eval_test adds test/* to the summary only."""
    import train

    corpus = small_corpus(tmp_path, lines=80)
    cfg = config_from_values({**TINY, "dataset": str(corpus), "cache_dir": str(tmp_path / "cache")})
    tokens, _ = load_tokens(cfg)
    batches = make_batches(tokens, cfg)
    steps = len(batches.train_ids) // 4 + 2  # just over one epoch
    result = run_train(tiny_args(tmp_path, corpus, steps=steps, eval_every=steps, eval_test=True))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_record(tmp_path / "results", "local", "baseline-s0")["summary"]
    fingerprint, trained = "", set()
    for step in range(steps):
        batch = batches.train_batch(step)
        fingerprint = train.chain_fingerprint(fingerprint, batch)
        inputs, targets = batch
        trained |= {row.numpy().tobytes() for row in torch.cat([inputs, targets[:, -1:]], dim=1)}
    assert summary["data/fingerprint"] == fingerprint  # the run consumed exactly this stream
    test_rows = {batches.blocks[i].numpy().tobytes() for i in batches.test_ids.tolist()}
    assert test_rows and not trained & test_rows
    # a whole epoch (all training blocks but the len % batch_size an epoch leaves over), and only those
    train_rows = {batches.blocks[i].numpy().tobytes() for i in batches.train_ids.tolist()}
    assert trained <= train_rows and len(trained) >= len(train_rows) - 3
    assert math.isclose(summary["test/perplexity"], math.exp(summary["test/loss"]), rel_tol=1e-9)
    assert 0 <= summary["test/accuracy"] <= 1 and summary["test/loss"] != summary["val/loss"]
    (wandb_run,) = (tmp_path / "results" / "wandb").glob("offline-run-*")
    assert offline_run_contents(wandb_run)["summary"]["test/loss"] == summary["test/loss"]  # W&B has it too
    # without eval_test there is no test score at all
    plain = run_train(tiny_args(tmp_path, corpus, group="plain"), env=NO_WANDB)  # its record is what is read
    assert plain.returncode == 0
    assert not any(k.startswith("test/") for k in read_record(tmp_path / "results", "plain", "baseline-s0")["summary"])


# --- variant_lr: one sweep value ties a variant to its lr -------------------------------------

def test_variant_lr_sets_attention_and_lr_and_refuses_disagreement():
    cfg = config_from_values({"variant_lr": "rope_small@0.003"})
    assert (cfg.attention, cfg.lr, cfg.variant_lr) == ("rope_small", 0.003, "rope_small@0.003")
    assert config_from_values({"variant_lr": "rope_small@0.003", "lr": "0.003"}).lr == 0.003
    with pytest.raises(ConfigError, match="disagrees with --lr"):
        config_from_values({"variant_lr": "rope_small@0.003", "lr": 0.01})
    with pytest.raises(ConfigError, match="disagrees with --attention"):
        config_from_values({"variant_lr": "rope_small@0.003", "attention": "baseline"})
    for bad in ("rope_small", "rope_small@fast", "@0.1", "rope_small@-1"):
        with pytest.raises(ConfigError, match="expected VARIANT@LR"):
            config_from_values({"variant_lr": bad})
    with pytest.raises(ConfigError, match="unknown attention variant"):
        config_from_values({"variant_lr": "flash_magic@0.1"})


# --- choosing each variant's lr (stage 1) ------------------------------------------------------

def stage1_record(variant, lr, seed, loss, status="finished", **config):
    record = make_record(variant, seed, loss, status=status, config={"lr": lr, **config})
    record["run_id"] = record["run_name"] = f"{variant}-lr{lr}-s{seed}"
    return record


def stage1_records(table):
    """{(variant, lr): {seed: final val loss, or the status of a run that did not finish}} -> records."""
    return [stage1_record(v, lr, s, x if isinstance(x, float) else 9.0, "finished" if isinstance(x, float) else x)
            for (v, lr), per_seed in table.items() for s, x in per_seed.items()]


def stage1_runs(table):
    return [run_from_record(r) for r in stage1_records(table)]


def test_the_best_mean_lr_wins_ties_go_to_the_smaller_lr_and_failures_disqualify():
    runs = stage1_runs({
        ("baseline", 0.001): {0: 7.0, 1: 7.2},  # mean 7.1
        ("baseline", 0.003): {0: 6.9, 1: 7.1},  # mean 7.0: best
        ("baseline", 0.01): {0: 7.3, 1: 7.5},
        ("rope_small", 0.001): {0: 7.0, 1: 7.0},  # mean 7.0
        ("rope_small", 0.003): {0: 7.0, 1: 7.0},  # mean 7.0: a tie, the smaller lr wins
        ("rope_small", 0.01): {0: 6.0, 1: "diverged"},  # best seed, but diverged on the other
        ("lora_small", 0.001): {0: "failed", 1: 7.0},
        ("lora_small", 0.003): {0: "diverged", 1: "diverged"},
    })
    choices = tuning.choose_lrs(runs)
    assert choices["baseline"].lr == 0.003 and choices["baseline"].note == ""
    assert choices["rope_small"].lr == 0.001
    assert "tied with lr 0.003" in choices["rope_small"].note
    assert "low end of the grid" in choices["rope_small"].note
    assert choices["lora_small"].lr is None and "no lr finished on every tuning seed" in choices["lora_small"].note
    point = next(p for p in choices["rope_small"].points if p.lr == 0.01)
    assert not point.qualifies and point.problems == ["seed 1 diverged"]
    # a missing run disqualifies its lr as a failure does
    missing = tuning.choose_lrs(stage1_runs({("baseline", 0.001): {0: 7.0, 1: 7.0}, ("baseline", 0.003): {0: 6.0}}))
    assert missing["baseline"].lr == 0.001
    assert next(p for p in missing["baseline"].points if p.lr == 0.003).problems == ["seed 1 did not run"]


# --- stage 2 as a sweep YAML --------------------------------------------------------------------

TUNED = {("baseline", 0.001): {0: 7.1, 1: 7.3}, ("baseline", 0.003): {0: 7.0, 1: 7.2},
         ("rope_small", 0.001): {0: 6.8, 1: 7.0}, ("rope_small", 0.003): {0: 7.1, 1: 7.3},
         ("lora_small", 0.001): {0: "diverged", 1: 7.0}, ("lora_small", 0.003): {0: "failed", 1: 7.0}}


def test_stage2_is_a_valid_sweep_with_each_variant_at_its_lr_and_the_shared_one_on_fresh_seeds(tmp_path):
    runs = stage1_runs(TUNED)
    template = yaml.safe_load((ROOT / "sweeps" / "tune_smoke.yaml").read_text())
    config, choices, shared = tuning.stage2_config(runs, seeds=3, template=template)
    text = tuning.stage2_yaml(config, choices, shared, "stage 1")
    config = yaml.safe_load(text)
    assert shared == 0.003  # the baseline's best
    assert config["parameters"]["variant_lr"] == {"values": ["baseline@0.003", "rope_small@0.001", "rope_small@0.003"]}
    assert config["parameters"]["seed"] == {"values": [2, 3, 4]}  # after the tuning seeds 0, 1
    assert config["parameters"]["eval_test"] == {"value": True}
    assert config["metric"] == {"name": "test/loss", "goal": "minimize"}
    assert config["parameters"]["d_model"] == {"value": 64} and "lr" not in config["parameters"]
    assert config["name"] == "attnsweep-tune-smoke-stage2" and config["command"] == template["command"]
    assert "lora_small: lr none (no lr finished on every tuning seed" in text
    # W&B's own schema check, the engine, and every run through train.py's config validation
    assert import_engine().schema_violations_from_proposed_config(config) == []
    check_schema(config, "stage2")
    check_engine(config, "stage2")
    total, grid = grid_size_and_runs(config)
    assert total == 9 and bad_values(config, grid) == []
    assert {(r["variant_lr"], r["seed"]) for r in grid} == {(a, s) for a in config["parameters"]["variant_lr"]["values"]
                                                            for s in (2, 3, 4)}


def test_stage2_runs_train_as_stage1_did_under_the_seed_recipe_with_a_knob_set_back_to_the_default():
    # --recipe=seed sets grad_clip 0 (config.RECIPES); stage 1 turned clipping back on at train.py's
    # default 1.0. A stage 2 that fixes the recipe but drops grad_clip as "at the default" clips nothing.
    stage1 = config_from_values({"recipe": "seed", "grad_clip": 1.0, "d_model": 64, "attention": "baseline"})
    assert stage1.grad_clip == 1.0 and config_from_values({"recipe": "seed"}).grad_clip == 0.0
    shared = {k: v for k, v in stage1.to_dict().items() if k not in ("attention", "lr", "seed")}
    runs = [run_from_record(stage1_record(v, lr, s, 7.0 + lr, **shared))
            for v in ("baseline", "rope_small") for lr in (0.001, 0.003) for s in (0, 1)]
    config, _, _ = tuning.stage2_config(runs, seeds=2)
    _, grid = grid_size_and_runs(config)
    for values in grid:
        resolved = config_from_values(values).to_dict()
        differs = {k for k, v in stage1.to_dict().items() if resolved[k] != v}
        assert differs <= {"attention", "lr", "seed", "variant_lr", "eval_test"}, differs


def test_stage2_refuses_what_the_protocol_cannot_answer():
    runs = stage1_runs(TUNED)
    with pytest.raises(SourceError, match="not an lr of stage 1"):
        tuning.stage2_config(runs, shared_lr=0.002)
    assert tuning.stage2_config(runs, shared_lr=0.001)[2] == 0.001
    with pytest.raises(SourceError, match="at least 2 fresh seeds"):
        tuning.stage2_config(runs, seeds=1)
    no_baseline = [r for r in runs if r.variant != "baseline"]
    with pytest.raises(SourceError, match="no successful baseline lr"):
        tuning.stage2_config(no_baseline)
    varied = runs + [run_from_record(stage1_record("baseline", 0.001, 0, 7.0, d_model=128))]
    with pytest.raises(SourceError, match="varied d_model"):
        tuning.stage2_config(varied)


def test_the_stage2_command_writes_the_yaml_and_bad_input_is_one_line(tmp_path, capsys):
    results = write_records(tmp_path / "stage1", stage1_records(TUNED))
    out = tmp_path / "stage2.yaml"
    assert tuning.main(["stage2", "--results", str(results), "--out", str(out), "--seeds", "2"]) == 0
    assert yaml.safe_load(out.read_text())["parameters"]["seed"] == {"values": [2, 3]}
    assert tuning.main(["stage2", "--results", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


# --- the report: tuned lrs beside the shared lr ------------------------------------------------

def stage2_record(variant, lr, seed, test_loss):
    record = make_record(variant, seed, test_loss + 0.01, config={"lr": lr, "variant_lr": f"{variant}@{lr}",
                                                                  "eval_test": True})
    record["summary"].update({"test/loss": test_loss, "test/accuracy": 0.2, "test/perplexity": math.exp(test_loss)})
    record["run_id"] = record["run_name"] = f"{variant}-lr{lr}-s{seed}"
    return record


# Stage 2 with a planted reversal: at the shared lr 0.003 rope_small is 0.10 worse than baseline on
# every seed (+-0.01), at its tuned lr 0.001 it is 0.10 better.
OFFSET = {2: 0.0, 3: 0.05, 4: -0.03}
STAGE2 = ([stage2_record("baseline", 0.003, s, 6.0 + o) for s, o in OFFSET.items()]
          + [stage2_record("rope_small", 0.003, s, 6.10 + o + 0.01 * (s - 3)) for s, o in OFFSET.items()]
          + [stage2_record("rope_small", 0.001, s, 5.90 + o + 0.01 * (s - 3)) for s, o in OFFSET.items()])


def check_report(text):
    stage1_text, _, text = text.partition("### Stage 2")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in stage1_text.splitlines() if line.startswith("| ")}
    # stage 1: the grid and the choice
    assert rows["baseline"][:4] == ["7.2000", "7.1000", "0.003", "at the high end of the grid: the best lr may lie beyond it"]
    assert rows["lora_small"][:3] == ["seed 0 diverged", "seed 0 failed", "none"]
    # stage 2: rope_small at its tuned lr beside the shared lr, paired by seed with the baseline
    tuned = [r for r in (line for line in text.splitlines() if line.startswith("| rope_small | 0.001"))][0]
    cells = [c.strip() for c in tuned.split("|")[1:-1]]
    assert cells[2:4] == [f"{5.90 + np.mean(list(OFFSET.values())):.4f}", "1"]
    assert cells[4].startswith("-0.1000 [") and "(n=3)" in cells[4] and cells[5] == "better"
    assert cells[6:8] == [f"{6.10 + np.mean(list(OFFSET.values())):.4f}", "2"]
    assert cells[8].startswith("+0.1000 [") and cells[9] == "worse"
    assert "ranking at tuned lrs: rope_small < baseline" in text
    assert "ranking at lr 0.003: baseline < rope_small" in text
    assert "tuning changes the ranking" in text


def test_report_from_records_shows_the_curves_the_choice_and_the_reversal(tmp_path):
    stage1 = write_records(tmp_path / "s1", stage1_records(TUNED))
    stage2 = write_records(tmp_path / "s2", STAGE2)
    path = tuning.write_report(load_path(stage1), load_path(stage2), tmp_path / "out", "test")
    check_report(path.read_text())
    assert (tmp_path / "out" / tuning.CURVES_PNG).stat().st_size > 1000


class SweepApi:
    """wandb.Api's runs(), answering per sweep id."""

    def __init__(self, by_sweep):
        self.by_sweep, self.calls = by_sweep, []

    def runs(self, path, filters=None, lazy=True, **kwargs):
        self.calls.append((path, filters))
        return iter(self.by_sweep[filters["sweep"]])


def test_both_commands_read_stage_runs_from_wandb(tmp_path, monkeypatch, capsys):
    import wandb

    stage1 = stage1_records(TUNED)
    api = SweepApi({"s1": [FakeWandbRun(r, "finished" if r["status"] == "finished" else "failed") for r in stage1],
                    "s2": [FakeWandbRun(r, "finished") for r in STAGE2]})
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: api)
    out = tmp_path / "stage2.yaml"
    assert tuning.main(["stage2", "--sweep", "ent/proj/s1", "--out", str(out)]) == 0
    stage2 = yaml.safe_load(out.read_text())["parameters"]
    assert stage2["variant_lr"]["values"] == ["baseline@0.003", "rope_small@0.001", "rope_small@0.003"]
    assert stage2["seed"] == {"values": [2, 3, 4]}  # 3 fresh seeds by default
    assert tuning.main(["report", "--stage1", "ent/proj/s1", "--stage2", "ent/proj/s2",
                        "--out", str(tmp_path / "report")]) == 0
    check_report((tmp_path / "report" / tuning.TUNING_REPORT).read_text())
    assert ("ent/proj", {"sweep": "s2"}) in api.calls


def test_the_audit_takes_the_per_variant_lr_of_stage2_as_the_protocol():
    runs = [run_from_record(r) for r in STAGE2]
    result = audit(runs)
    assert result.verdict == "fair", result.findings
    assert ("per-variant lr", "tuning protocol (stage 2)", "baseline: 0.003; rope_small: 0.001, 0.003") in result.checks
    # the same lrs without the stage-2 mark are an unfair difference
    unmarked = [run_from_record({**r, "config": {k: v for k, v in r["config"].items() if k != "variant_lr"}})
                for r in STAGE2]
    assert audit(unmarked).verdict == "NOT fair"


# --- both stages through local_sweep ------------------------------------------------------------

def test_local_sweep_refuses_fewer_than_two_fresh_seeds(capsys):
    from localsweep.cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["sweeps/tune_smoke.yaml", "--then-stage2", "--stage2-seeds", "1"])
    assert exit_.value.code == 2 and "--stage2-seeds=1" in capsys.readouterr().err


def test_local_sweep_runs_both_stages_and_writes_the_tuning_report(tmp_path, corpus):
    sweep = {"name": "tiny-tune", "program": "train.py", "method": "grid",
             "metric": {"name": "val/loss", "goal": "minimize"},
             "parameters": {"attention": {"values": ["baseline", "rope_small"]}, "lr": {"values": [0.001, 0.01]},
                            "seed": {"value": 0}, "dataset": {"value": str(corpus)},
                            "cache_dir": {"value": str(tmp_path / "cache")},
                            **{k: {"value": v} for k, v in TINY.items() if k not in ("lr", "steps")},
                            "steps": {"value": 4}, "eval_every": {"value": 2}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep))
    done = processes.run([sys.executable, str(ROOT / "local_sweep.py"), str(path), "--results-dir",
                          str(tmp_path / "results"), "--then-stage2", "--stage2-seeds", "2"], cwd=tmp_path,
                         # no W&B runs (the W&B side is the fakes' above): ~3 s less per run
                         env=offline_env(WANDB_MODE="disabled"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (stage2_yaml,) = (tmp_path / "results").glob(f"*/{tuning.STAGE2_NAME}")
    stage1_dir = stage2_yaml.parent
    reports = list((tmp_path / "results").glob(f"*/tuning_report/{tuning.TUNING_REPORT}"))
    assert len(reports) == 1
    stage2_dir = reports[0].parent.parent
    stage1, stage2 = load_path(stage1_dir), load_path(stage2_dir)
    assert len(stage1) == 4 and all(r.test_loss is None for r in stage1)  # tuning never reads the test set
    choices = tuning.choose_lrs(stage1)
    shared = choices["baseline"].lr
    wanted = {(v, lr, s) for v, c in choices.items() for lr in {c.lr, shared} for s in (1, 2)}
    assert {(r.variant, r.config["lr"], r.seed) for r in stage2} == wanted  # fresh seeds 1, 2
    assert all(r.succeeded and r.test_loss is not None and r.config["eval_test"] for r in stage2)
    text = reports[0].read_text()
    assert "Stage 1: loss against learning rate" in text and "ranking at tuned lrs" in text
    assert "(n=2)" in text  # rope_small paired with baseline on both fresh seeds
