"""The analysis (issue 4): the seed report's tables to the printed digit, the round trip through
the seed's schema, W&B runs read like local records, the statistics, and the fairness audit.

Expected numbers are worked out here independently (statistics.pstdev, scipy on the same
numbers, hand arithmetic), not by calling the code under test a second time.
"""
import copy
import dataclasses
import hashlib
import json
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats as sps

from analysis import report, stats, tables
from analysis.fairness import audit
from analysis.runs import (SourceError, family_of, load_path, load_wandb, run_from_record,
                           run_from_wandb, to_seed_schema, varying_settings)
from record import TRAIN_KEYS

SEED_FIXTURE = Path(__file__).parent / "fixtures" / "analysis_seed_fast.json"


# --- synthetic records, shaped like train.py's -----------------------------------------------

def make_record(variant, seed, loss, *, status="finished", config=None, data_fp=None, init_fp=None,
                steps=6, eval_every=3, params=1_000_000):
    """A results record (DESIGN.md section 6) whose final val loss is `loss`."""
    cfg = {"attention": variant, "seed": seed, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
           "n_experts": 4, "top_k": 2, "vocab_size": 512, "seq_len": 32, "batch_size": 4, "steps": steps,
           "lr": 1e-3, "weight_decay": 0.01, "dataset": "corpus/corpus.txt.gz",
           "tokenizer": "corpus/tokenizer.json", "project": "attnsweep", "group": "g1",
           "results_dir": "results", "q_lora_rank": None, **(config or {})}
    history = []
    last_step = steps if status == "finished" else steps // 2
    for step in range(1, last_step + 1):
        row = {"step": step, **{key: 0.5 + step for key in TRAIN_KEYS}}
        row["train/loss"] = loss + 1.0 + (steps - step) / steps
        if step % eval_every == 0 or step == steps:
            val = loss + 0.2 * (steps - step) / steps
            row.update({"val/loss": val, "val/accuracy": 0.1 + 0.01 * step, "val/perplexity": math.exp(val)})
        history.append(row)
    summary = {"params/total": params, "params/attention": params // 10, "flops/per_token": 6 * params,
               "init/shared_fingerprint": init_fp or f"init-{seed}", "status": status,
               "error": None if status == "finished" else "RuntimeError: boom", "time/total_s": 42.0}
    if status == "finished":
        summary.update({"val/loss": loss, "val/accuracy": history[-1]["val/accuracy"],
                        "val/perplexity": math.exp(loss), "memory/peak_gb": 1.25,
                        "data/fingerprint": data_fp or f"data-{seed}"})
    return {"schema": 1, "run_id": f"id-{variant}-{seed}", "run_name": f"{variant}-s{seed}", "group": "g1",
            "attention": variant, "family": family_of(variant), "seed": seed, "status": status,
            "error": summary["error"], "config": cfg, "summary": summary, "history": history}


def write_records(directory: Path, records) -> Path:
    for rec in records:
        path = directory / rec["group"] / f"{rec['run_name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    return directory


# Known effects on top of a per-seed offset shared by all variants (what pairing removes).
SEED_OFFSET = {0: 0.00, 1: 0.03, 2: -0.02}
EFFECTS = {  # variant: per-seed difference to baseline
    "baseline": {0: 0.0, 1: 0.0, 2: 0.0},
    "rope_small": {0: -0.050, 1: -0.048, 2: -0.053},  # clearly better
    "lora_small": {0: 0.0010, 1: -0.0030, 2: 0.0015},  # no effect
    "enhanced_xl": {0: 0.041, 1: 0.039, 2: 0.044},  # clearly worse
}


def three_seed_records():
    return [make_record(v, s, 7.80 + SEED_OFFSET[s] + d) for v, per_seed in EFFECTS.items() for s, d in per_seed.items()]


def section(runs, key):
    return {s.key: s for s in tables.build_sections(runs, audit(runs))}[key]


# --- 1. the seed report's tables from a seed-schema fixture ------------------------------------

# Verbatim from the seed report (../shared/seed/000_55474a67b0431d90.txt).
SEED_TOP5 = [
    "1. **medium_rope_small**: Loss=7.7571, Acc=0.1022, Time=0.4min, Memory=15.2GB, Params=162.6M",
    "2. **medium_enhanced_medium**: Loss=7.7807, Acc=0.0999, Time=0.4min, Memory=15.7GB, Params=164.7M",
    "3. **medium_rope_only**: Loss=7.7881, Acc=0.0993, Time=0.4min, Memory=15.6GB, Params=165.6M",
    "4. **medium_lora_small**: Loss=7.7888, Acc=0.1010, Time=0.4min, Memory=15.4GB, Params=162.6M",
    "5. **medium_bias_only**: Loss=7.7914, Acc=0.1042, Time=0.4min, Memory=15.4GB, Params=164.4M",
]
SEED_STATISTICS = [
    "- **Loss**: 7.8023 ± 0.0261 (range: 7.7571-7.8627)",
    "- **Accuracy**: 0.0996 ± 0.0020",
    "- **Time**: 0.4 ± 0.0 min",
    "- **Memory**: 15.6 ± 0.9 GB",
    "- **Parameters**: 162.6-177.8M",
]
SEED_FAMILY_RANKING = [  # the seed adds prose (good, decent, surprising); the numbers are these
    "1. **RoPE variants**: 7.7571-7.8046 loss", "2. **Enhanced variants**: 7.7807-7.8627 loss",
    "3. **LoRA variants**: 7.7888-7.8121 loss", "4. **Bias-only**: 7.7914 loss", "5. **Baseline**: 7.8146 loss",
]
SEED_EFFICIENCY = [
    "- **Most Efficient**: RoPE-only (165.6M params, 7.7881 loss)",
    "- **Best Performance**: RoPE-small (162.6M params, 7.7571 loss)",
    "- **Worst Efficiency**: Enhanced-XL (177.8M params, 7.8627 loss)",
]
SEED_MEMORY = [
    "- **Most Efficient**: Enhanced-small (15.2GB memory)",
    "- **Highest Usage**: Enhanced-XL (17.0GB memory)",
    "- **Range**: 15.2-17.0GB",
]


def test_fixture_is_consistent_with_the_seed_report_by_independent_arithmetic():
    """The fixture's own numbers, through statistics.pstdev and plain formatting, give the seed's
    lines: so matching them below tests the code, not the fixture."""
    entries = json.loads(SEED_FIXTURE.read_text()).values()

    def line(key, spec):
        values = [e[key] for e in entries]
        return f"{statistics.fmean(values):{spec}} ± {statistics.pstdev(values):{spec}}"

    assert line("val_loss", ".4f") == "7.8023 ± 0.0261"
    assert line("val_accuracy", ".4f") == "0.0996 ± 0.0020"
    assert line("training_time_minutes", ".1f") == "0.4 ± 0.0"
    assert line("memory_used_gb", ".1f") == "15.6 ± 0.9"
    # The seed's memory std (0.9) cannot come from values in its Memory Usage range (15.2-17.0 GB):
    # with mean 15.6 the largest population std there is sqrt(0.4 * 1.4) < 0.75. That section is
    # peak memory; the statistics line is memory_used_gb, as the seed's code printed it.
    peaks = [e["peak_memory_gb"] for e in entries]
    assert (f"{min(peaks):.1f}", f"{max(peaks):.1f}") == ("15.2", "17.0")
    assert math.sqrt((15.6 - 15.2) * (17.0 - 15.6)) < 0.75


def test_seed_schema_reproduces_every_seed_table_to_the_printed_digit():
    runs = load_path(SEED_FIXTURE)
    assert section(runs, "success_rate").lines == ["**Success Rate**: 13/13 (100%)"]
    assert section(runs, "top5").lines == SEED_TOP5
    assert section(runs, "statistics").lines == SEED_STATISTICS
    ranking = section(runs, "family_ranking").lines
    assert [line.split(" (")[0] for line in ranking] == SEED_FAMILY_RANKING
    assert section(runs, "parameter_efficiency").lines[:3] == SEED_EFFICIENCY
    assert section(runs, "memory_usage").lines == SEED_MEMORY
    one_seed = section(runs, "seed_statistics").lines
    assert "not statistically supported" in one_seed[0]


def test_failed_entry_lowers_success_rate_and_breaks_no_table(tmp_path):
    data = json.loads(SEED_FIXTURE.read_text())
    data["medium_rope_small"] = {"error": "CUDA out of memory", "experiment_name": "medium_rope_small"}
    data["medium_extra"] = {"error": "boom"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    runs = load_path(path)
    assert section(runs, "success_rate").lines[0] == "**Success Rate**: 12/14 (86%)"
    assert "- medium_rope_small: failed (CUDA out of memory)" in section(runs, "success_rate").lines
    ok = [e for e in data.values() if "error" not in e]
    losses = [e["val_loss"] for e in ok]
    expected = (f"- **Loss**: {statistics.fmean(losses):.4f} ± {statistics.pstdev(losses):.4f} "
                f"(range: {min(losses):.4f}-{max(losses):.4f})")
    assert section(runs, "statistics").lines[0] == expected
    assert section(runs, "top5").lines[0].startswith("1. **medium_enhanced_medium**: Loss=7.7807")
    assert section(runs, "parameter_efficiency").lines[1].startswith("- **Best Performance**: Enhanced-medium")
    all_runs = "\n".join(section(runs, "all_runs").lines)
    assert "| medium_rope_small | rope_small | rope | n/a | failed |" in all_runs and "CUDA out of memory" in all_runs
    rep = report.build(runs, tmp_path / "out", str(path), path)
    exported = json.loads((tmp_path / "out" / report.RESULTS_JSON).read_text())
    assert exported["medium_rope_small"]["error"] == "CUDA out of memory"
    assert rep.path.read_text().count("medium_rope_small") >= 2


def test_no_successful_run_still_gives_a_report(tmp_path):
    records = [make_record(v, 0, 7.8, status=status) for v, status in
               (("baseline", "failed"), ("rope_small", "diverged"), ("lora_small", "interrupted"))]
    path = report.write_report(write_records(tmp_path / "results", records), tmp_path / "out")
    text = path.read_text()
    assert "**Success Rate**: 0/3 (0%)" in text and "- rope_small-s0: diverged (RuntimeError: boom)" in text
    assert not (tmp_path / "out" / report.COMPREHENSIVE_PNG).exists()  # nothing to plot, and it says so
    assert text.count(tables.NOTHING_TO_RANK) == 5


# --- 2. export to the seed schema, import, same tables ----------------------------------------

def _markdown_of(runs):
    return [s.markdown() for s in tables.build_sections(runs, audit(runs))]


@pytest.mark.parametrize("source", ["seed", "records"])
def test_export_then_import_gives_the_same_tables(tmp_path, source):
    if source == "seed":
        runs = load_path(SEED_FIXTURE)
    else:
        records = three_seed_records() + [make_record("rope_only", 0, 7.9, status="failed")]
        runs = load_path(write_records(tmp_path / "results", records))
    exported = tmp_path / "exported.json"
    exported.write_text(json.dumps(to_seed_schema(runs)))
    again = load_path(exported)
    assert _markdown_of(again) == _markdown_of(runs)
    if source == "seed":  # the seed's own names survive
        assert list(json.loads(exported.read_text())) == list(json.loads(SEED_FIXTURE.read_text()))
    else:  # several seeds: one entry per run, seed in the key; records lose nothing
        assert "medium_rope_small_s1" not in json.loads(exported.read_text())
        assert "d64l2_rope_small_s1" in json.loads(exported.read_text())
        # records lose nothing the report shows; of the per-step history, the train loss is kept
        def shown(run):
            return dataclasses.replace(run, train_history=[(r["step"], r["train/loss"]) for r in run.train_history])
        assert sorted(map(shown, again), key=lambda r: r.name) == sorted(map(shown, runs), key=lambda r: r.name)


# --- 3. W&B runs map to the same Run as the local record --------------------------------------

class FakeWandbRun:
    """Behaves like wandb.apis.public.Run for what the analysis reads."""

    def __init__(self, record, state, summary=None):
        self.id, self.name, self.state = record["run_id"], record["run_name"], state
        self.group, self.tags = record["group"], [record["family"]]
        self.config = dict(record["config"], _wandb={"cli_version": "0.31.0"})
        self.summary = dict(summary if summary is not None else record["summary"])
        self._rows = [{"_step": row["step"], "_runtime": 1.0, **{k: v for k, v in row.items() if k != "step"}}
                      for row in record["history"]]
        self.scans = []

    def scan_history(self, keys=None, page_size=1000):
        self.scans.append(keys)
        wanted = keys or []
        return iter([{k: row[k] for k in wanted} if keys else dict(row)
                     for row in self._rows if all(k in row for k in wanted)])


@pytest.mark.parametrize("status,state", [("finished", "finished"), ("failed", "failed"),
                                          ("failed", "crashed"), ("diverged", "failed"),
                                          ("stopped", "finished")])  # record.WANDB_STATE: exit 0
def test_wandb_run_maps_to_the_same_run_as_the_local_record(status, state):
    record = make_record("rope_small", 1, 7.77, status=status)
    fake = FakeWandbRun(record, state)
    assert run_from_wandb(fake) == run_from_record(record)
    # train and eval keys are read in separate scans (a row holds every requested key)
    assert any("train/loss" in keys and "val/loss" not in keys for keys in fake.scans)
    assert any("val/loss" in keys and "train/loss" not in keys for keys in fake.scans)


def test_wandb_summary_min_aggregate_and_states():
    record = make_record("baseline", 0, 7.81)
    # runs from before val/loss_min used define_metric(summary="min"): the summary holds {"min": ...};
    # the final value then comes from the last evaluation
    summary = dict(record["summary"], **{"val/loss": {"min": 7.5}})
    assert run_from_wandb(FakeWandbRun(record, "finished", summary)).val_loss == 7.81
    # a run that stopped early has no final value, even where W&B's summary kept its last logged one
    failed = make_record("baseline", 0, 7.81, status="failed")
    logged = dict(failed["summary"], **{"val/loss": 7.9, "val/loss_min": 7.9})
    assert run_from_wandb(FakeWandbRun(failed, "failed", logged)) == run_from_record(failed)
    assert run_from_record(failed).val_loss is None
    no_status = {k: v for k, v in record["summary"].items() if k not in ("status", "error")}
    assert run_from_wandb(FakeWandbRun(record, "killed", no_status)).status == "interrupted"
    assert run_from_wandb(FakeWandbRun(record, "crashed", no_status)).status == "failed"
    assert run_from_wandb(FakeWandbRun(record, "running", no_status)).status == "running"
    diverged = dict(record["summary"], status="diverged")
    assert run_from_wandb(FakeWandbRun(record, "finished", diverged)).status == "diverged"


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None, lazy=True, **kwargs):
        self.calls.append((path, filters, lazy))
        return iter(self._runs)


def test_sweep_cli_reads_wandb_and_writes_the_report(tmp_path, monkeypatch, capsys):
    import wandb

    records = three_seed_records()
    analysis_run = FakeWandbRun(records[0], "finished")
    analysis_run.config = {"source": "x"}  # an earlier analysis run: not a training run
    api = FakeApi([FakeWandbRun(r, "finished") for r in records] + [analysis_run])
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: api)
    assert report.main(["--sweep", "me/attn/abc123", "--out", str(tmp_path / "out")]) == 0
    assert api.calls == [("me/attn", {"sweep": "abc123"}, False)]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Success Rate**: 12/12 (100%)" in text
    assert report.main(["--project", "me/attn", "--filters", '{"group": "g1"}', "--out", str(tmp_path / "p")]) == 0
    assert api.calls[-1] == ("me/attn", {"group": "g1"}, False)
    # a synced local_sweep: its runs carry no sweep id; their group is the local sweep's id
    assert report.main(["--project", "me/attn", "--group", "g1", "--out", str(tmp_path / "g")]) == 0
    assert api.calls[-1] == ("me/attn", {"group": "g1"}, False)
    assert "group g1 of project me/attn" in (tmp_path / "g" / "report.md").read_text()
    assert report.main(["--project", "me/attn", "--group", "g1", "--filters", '{"config.steps": 50}',
                        "--out", str(tmp_path / "gf")]) == 0
    assert api.calls[-1] == ("me/attn", {"config.steps": 50, "group": "g1"}, False)

    def by_name(runs):
        return sorted(runs, key=lambda r: r.name)
    assert by_name(load_wandb("me/attn", {"sweep": "abc123"}, api=api)) == by_name(
        load_path(write_records(tmp_path / "r", records)))


# --- 4. several seeds: verdicts, p-values, Holm, effect sizes ---------------------------------

def test_known_effects_give_the_right_verdicts_and_scipy_p_values(tmp_path):
    runs = load_path(write_records(tmp_path, three_seed_records()))
    comparisons = {c.variant: c for c in stats.compare_to_baseline(runs)}
    assert {v: c.verdict for v, c in comparisons.items()} == {
        "rope_small": "better", "lora_small": "indistinguishable", "enhanced_xl": "worse"}
    loss = {(v, s): 7.80 + SEED_OFFSET[s] + d for v, per_seed in EFFECTS.items() for s, d in per_seed.items()}
    raw = {}
    for variant in ("rope_small", "lora_small", "enhanced_xl"):
        ours, base = [loss[variant, s] for s in range(3)], [loss["baseline", s] for s in range(3)]
        raw[variant] = sps.ttest_rel(ours, base).pvalue
        c = comparisons[variant]
        assert c.p == pytest.approx(raw[variant], rel=1e-9)
        diffs = [a - b for a, b in zip(ours, base)]
        assert c.mean_diff == pytest.approx(statistics.fmean(diffs))
        assert c.d_z == pytest.approx(statistics.fmean(diffs) / statistics.stdev(diffs))
        half = sps.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
        assert (c.ci_low, c.ci_high) == pytest.approx((statistics.fmean(diffs) - half, statistics.fmean(diffs) + half))
    # Holm by hand: sorted p times (m - rank), made monotone, capped at 1
    order = sorted(raw, key=raw.get)
    expected, running = {}, 0.0
    for rank, variant in enumerate(order):
        running = max(running, (3 - rank) * raw[variant])
        expected[variant] = min(1.0, running)
    for variant, p_holm in expected.items():
        assert comparisons[variant].p_holm == pytest.approx(p_holm)
    # the per-variant summary: mean, sample std, 95% t interval
    summary = {s.variant: s for s in stats.summarize_variants(runs)}
    values = [loss["rope_small", s] for s in range(3)]
    assert summary["rope_small"].std == pytest.approx(statistics.stdev(values))
    # pooled noise, equal seeds per variant: the root mean of the variances
    variances = [statistics.variance([loss[v, s] for s in range(3)]) for v in EFFECTS]
    assert stats.seed_noise(runs, list(comparisons.values())).pooled_std == pytest.approx(
        math.sqrt(statistics.fmean(variances)))
    lines = section(runs, "seed_statistics").lines
    assert any("| rope_small |" in line and "**better**" in line for line in lines)
    for each in tables.build_sections(runs, audit(runs)):  # every table fits its columns (wandb.Table)
        assert all(len(row) == len(each.columns) for row in each.rows), each.key
    assert not any("not statistically supported" in line for line in lines)


def test_a_sweep_over_a_setting_gives_one_row_per_configuration_paired_within_it(tmp_path):
    """The 12 runs again at lr 1e-3, and the same grid at lr 3e-3 where every loss is 0.05 higher
    and rope_small's a further 0.10 higher: at lr 3e-3 rope_small is worse than the baseline of lr
    3e-3. Collapsing lr would keep one run per (variant, seed) and report one of the two effects."""
    low = three_seed_records()
    high = []
    for v, per_seed in EFFECTS.items():
        for s, d in per_seed.items():
            rec = make_record(v, s, 7.85 + SEED_OFFSET[s] + d + (0.10 if v == "rope_small" else 0.0),
                              config={"lr": 3e-3})
            rec.update(run_name=f"{v}-s{s}-lr3", run_id=f"id-{v}-{s}-lr3")
            high.append(rec)
    runs = load_path(write_records(tmp_path, low + high))
    assert varying_settings(runs) == ["lr"]
    summaries = {s.configuration: s for s in stats.summarize_variants(runs)}
    assert set(summaries) == {f"{v} lr={lr}" for v in EFFECTS for lr in (0.001, 0.003)}
    assert all(s.n == 3 for s in summaries.values())
    comparisons = {c.configuration: c for c in stats.compare_to_baseline(runs)}
    for v in EFFECTS:
        if v == "baseline":
            continue
        by_hand = statistics.fmean(EFFECTS[v].values())
        assert comparisons[f"{v} lr=0.001"].mean_diff == pytest.approx(by_hand)
        assert comparisons[f"{v} lr=0.003"].mean_diff == pytest.approx(by_hand + (0.10 if v == "rope_small" else 0))
    assert comparisons["rope_small lr=0.001"].verdict == "better"
    assert comparisons["rope_small lr=0.003"].verdict == "worse"
    lines = section(runs, "seed_statistics").lines
    assert "| configuration | family |" in lines[0]
    assert sum(line.startswith("| rope_small lr=") for line in lines) == 2
    assert any(line.startswith("Settings that vary within these runs: lr.") for line in lines)
    every_run = section(runs, "all_runs").lines  # each run names its configuration
    assert sum("| rope_small-s1-lr3 | rope_small lr=0.003 |" in line for line in every_run) == 1
    assert sum("| rope_small-s1 | rope_small lr=0.001 |" in line for line in every_run) == 1
    result = audit(runs)  # a setting every variant ran at both values is swept, not an unfairness
    assert result.verdict == "fair", result.findings
    assert ("swept settings", "one configuration per value", "lr: 0.001, 0.003") in result.checks
    assert not result.notes


def test_holm_and_seeds_to_resolve_against_hand_and_textbook_values():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 2 x 0.5 = 1, and kept monotone
    assert stats.holm([0.001, 0.2, 0.04]) == pytest.approx([0.003, 0.2, 0.08])
    # Paired t-test sample sizes at alpha 0.05 (two-sided), power 0.8 (Cohen's tables, G*Power):
    # d = 1.0 -> 10 pairs, d = 0.5 -> 34 pairs.
    assert stats.seeds_to_resolve(1.0, 0.05) == 10
    assert stats.seeds_to_resolve(-0.5, 0.05) == 34
    assert stats.seeds_to_resolve(0.0, 0.05) is None


def test_one_seed_says_the_ranking_is_not_supported(tmp_path):
    runs = load_path(write_records(tmp_path, [make_record(v, 0, 7.8 + i / 100) for i, v in enumerate(EFFECTS)]))
    assert section(runs, "seed_statistics").lines == [tables.ONE_SEED]
    assert stats.compare_to_baseline(runs)[0].verdict.startswith("n/a")


# --- 5. the fairness audit --------------------------------------------------------------------

def test_fairness_audit_passes_fair_runs_and_names_the_odd_one(tmp_path):
    records = three_seed_records()
    assert audit(load_path(write_records(tmp_path / "fair", records))).verdict == "fair"

    unfair = copy.deepcopy(records)
    odd = next(r for r in unfair if r["run_name"] == "lora_small-s1")
    odd["summary"]["data/fingerprint"] = "data-something-else"
    result = audit(load_path(write_records(tmp_path / "unfair", unfair)))
    assert result.verdict == "NOT fair"
    assert len(result.findings) == 1
    assert "seed 1" in result.findings[0] and "data/fingerprint" in result.findings[0]
    assert "data-1 in 3 runs; lora_small-s1 has data-somethi" in result.findings[0]


def test_fairness_audit_flags_a_different_setting_and_init(tmp_path):
    records = three_seed_records()
    records[4]["config"]["steps"] = 100  # rope_small-s1
    records[5]["summary"]["init/shared_fingerprint"] = "init-other"  # rope_small-s2
    runs = load_path(write_records(tmp_path, records))
    findings = audit(runs).findings
    assert any(f.startswith("steps differs: 6 in 11 runs; rope_small-s1 has 100") for f in findings)
    assert any("init/shared_fingerprint" in f and "rope_small-s2" in f for f in findings)
    text = "\n".join(section(runs, "fairness").lines)
    assert "**Fairness: NOT fair**" in text and "rope_small-s1" in text


def test_fairness_audit_flags_runs_measured_on_other_hardware(tmp_path):
    """Time and memory are compared too: a run on 8 processes or another GPU model is flagged by
    name; a failed run (not compared) is not; records without the keys leave the check undone."""
    h100, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"
    records = three_seed_records()
    for record in records:
        record["summary"].update({"hardware/processes": 1, "hardware/device": h100})
    crashed = make_record("rope_only", 0, 7.9, status="failed")
    crashed["summary"].update({"hardware/processes": 2, "hardware/device": "cpu"})
    same = audit(load_path(write_records(tmp_path / "same", records + [crashed])))
    assert same.verdict == "fair" and ("hardware", "same", "12 runs on the same processes and device") in same.checks

    records[4]["summary"]["hardware/processes"] = 8  # rope_small-s1
    records[7]["summary"]["hardware/device"] = a100
    runs = load_path(write_records(tmp_path / "mixed", records))
    assert {(r.name, r.processes, r.device) for r in runs if r.processes != 1 or r.device != h100} == {
        (records[4]["run_name"], 8, h100), (records[7]["run_name"], 1, a100)}
    result = audit(runs)
    assert result.verdict == "NOT fair"
    assert (f"processes differs: 1 in 11 runs; {records[4]['run_name']} has 8: "
            f"their time and memory are not comparable") in result.findings
    assert (f"device differs: {h100} in 11 runs; {records[7]['run_name']} has {a100}: "
            f"their time and memory are not comparable") in result.findings
    assert "hardware | differs" in "\n".join(section(runs, "fairness").lines)

    unrecorded = audit(load_path(write_records(tmp_path / "old", three_seed_records())))
    assert unrecorded.verdict == "fair" and ("hardware", "not checked",
                                             "processes and device not recorded") in unrecorded.checks


@pytest.mark.parametrize("rerun_ended_later", [True, False])
def test_of_a_variant_and_seed_run_twice_the_one_that_ended_later_counts(tmp_path, rerun_ended_later):
    """train.py names a second run's record <name>-<run id>.json, which sorts before <name>.json:
    the file order must not decide, the runs' own end times do."""
    records = three_seed_records()
    first = next(r for r in records if r["run_name"] == "baseline-s0")
    rerun = make_record("baseline", 0, 7.5)
    rerun.update(run_name="baseline-s0-idrerun", run_id="idrerun")
    first["summary"]["time/ended_at"] = 1_800_000_000.0
    rerun["summary"]["time/ended_at"] = 1_800_000_000.0 + (60.0 if rerun_ended_later else -60.0)
    runs = load_path(write_records(tmp_path, records + [rerun]))
    later = rerun if rerun_ended_later else first
    assert stats.losses_by_variant(runs)["baseline"][0] == later["summary"]["val/loss"]
    (note,) = audit(runs).notes
    assert note == (f"baseline seed 0 ran 2 times (baseline-s0, baseline-s0-idrerun): "
                    f"the statistics count {later['run_name']} (it ended last)")


def test_two_runs_of_a_variant_and_seed_without_end_times_are_not_pooled(tmp_path):
    rerun = make_record("baseline", 0, 7.5)
    rerun.update(run_name="baseline-s0-idrerun", run_id="idrerun")
    results = write_records(tmp_path / "results", three_seed_records() + [rerun])
    with pytest.raises(SourceError, match="baseline seed 0 ran 2 times .* not every run says when it ended"):
        stats.losses_by_variant(load_path(results))
    assert report.main(["--results", str(results), "--out", str(tmp_path / "out")]) == 2


# --- the command line and write_report --------------------------------------------------------

def _digest(directory: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_write_report_writes_every_file_and_leaves_results_alone(tmp_path, capsys):
    results = write_records(tmp_path / "results", three_seed_records() + [make_record("rope_only", 0, 7.9, status="failed")])
    (tmp_path / "results" / "g1" / "wandb-summary.json").write_text('{"not": "a record"}')
    (tmp_path / "results" / "g1" / "old.json").write_text(json.dumps(dict(make_record("baseline", 9, 7.0), schema=2)))
    before = _digest(results)
    path = report.write_report(results, results / "g1" / "report")
    assert path == results / "g1" / "report" / "report.md"
    assert "old.json: record schema 2" in capsys.readouterr().err  # skipped, said once, not misread
    for name in (report.RESULTS_JSON, report.COMPREHENSIVE_PNG, report.CURVES_PNG, report.DIFFERENCES_PNG,
                 report.COSTS_PNG):
        assert (path.parent / name).stat().st_size > 1000
    assert {k: v for k, v in _digest(results).items() if "/report/" not in k} == before
    text = path.read_text()
    assert "**Success Rate**: 12/13 (92%)" in text and "rope_only-s0" in text
    # a second report over the same directory skips the first report's files
    again = report.write_report(results, tmp_path / "again")
    assert "**Success Rate**: 12/13 (92%)" in again.read_text()


@pytest.mark.parametrize("argv,needle", [
    (["--results", "{missing}"], "no such file"),
    (["--results", "{neither}"], "neither a run record nor"),
    (["--results", "{empty}"], "no run records"),
    (["--results", "{seed_dir}"], "pass it as --results"),
    (["--sweep", "only/two"], "ENTITY/PROJECT/SWEEP_ID"),
    (["--results", "{seed_dir}", "--filters", "[]"], "--filters: only used with --project"),
    (["--sweep", "a/b/c", "--group", "g1"], "--group: only used with --project"),
    (["--project", "a/b", "--group", "g1", "--filters", '{{"group": "g2"}}'], "disagree"),
    (["--out", "{tmp}/o"], "one of the arguments"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, argv, needle):
    (tmp_path / "neither.json").write_text('{"a": 1}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "seed_dir").mkdir()
    (tmp_path / "seed_dir" / "r.json").write_text(SEED_FIXTURE.read_text())
    names = {"missing": tmp_path / "nope", "neither": tmp_path / "neither.json", "empty": tmp_path / "empty",
             "seed_dir": tmp_path / "seed_dir", "tmp": tmp_path}
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert report.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    if argv[0] == "--results" and "--filters" not in argv:
        assert argv[1] in err[0]


def test_out_that_would_overwrite_the_input_is_refused(tmp_path, capsys):
    source = tmp_path / report.RESULTS_JSON
    source.write_text(SEED_FIXTURE.read_text())
    assert report.main(["--results", str(source), "--out", str(tmp_path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert source.read_text() == SEED_FIXTURE.read_text()


def test_log_to_wandb_offline(tmp_path, monkeypatch, capsys):
    """--log: one offline W&B run of job_type analysis in the runs' group, read back from its own
    .wandb file: the results table, the verdict tables (paired, fairness) as wandb.Tables of the
    report's rows, every figure as an image, and the files as an artifact."""
    from localsweep.wandb_file import history_rows, parsed_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb
    wandb.teardown()  # an earlier in-process run's wandb settings (its dir) must not carry over
    records = three_seed_records()
    results = write_records(tmp_path / "results", records)
    assert report.main(["--results", str(results), "--out", str(tmp_path / "out"), "--log"]) == 0
    assert "job_type analysis" in capsys.readouterr().out
    wandb.teardown()  # wandb-core writes the offline log asynchronously; a CLI's exit waits for it
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    kinds = list(parsed_records(log))
    (run,) = [r.run for kind, r in kinds if kind == "run"]
    assert (run.job_type, run.run_group) == ("analysis", "g1")
    logged = {}
    for kind, r in kinds:
        if kind == "history":
            logged.update(history_rows(r))
    variants = {rec["attention"] for rec in records}
    for key, rows in (("all_runs", len(records)), ("seed_statistics", len(variants)), ("fairness", None)):
        assert logged[f"tables/{key}/_type"] == "table-file"
        table = json.loads((run_dir / "files" / logged[f"tables/{key}/path"]).read_text())
        section_ = {s.key: s for s in tables.build_sections(load_path(results), audit(load_path(results)))}[key]
        assert table["columns"] == section_.columns and len(table["data"]) == (rows or len(section_.rows))
    verdicts = json.loads((run_dir / "files" / logged["tables/seed_statistics/path"]).read_text())
    assert {row[0] for row in verdicts["data"]} == variants  # one paired row per variant
    figures = {p.stem for p in (tmp_path / "out").glob("*.png")}
    assert figures and {k.split("/")[1] for k in logged if k.startswith("figures/") and k.endswith("/_type")} == figures
    assert all(logged[f"figures/{name}/_type"] == "image-file" for name in figures)
    artifacts = {(r.artifact.name, r.artifact.type) for kind, r in kinds if kind == "artifact"}
    assert ("analysis-g1", "analysis-report") in artifacts


# --- the registry's families and the KV cache (issue 12) -------------------------------------------

def test_zoo_families_come_from_the_registry():
    from analysis.plots import FAMILY_COLORS

    assert family_of("qknorm_gqa") == "qknorm" and family_of("mqa") == "gqa"
    assert tables.FAMILY_LABELS["gqa"] == "GQA" and tables.FAMILY_LABELS["lora"] == "LoRA"
    assert FAMILY_COLORS["gqa"] != FAMILY_COLORS["other"]


def test_kv_cache_per_token_reaches_the_table_and_the_round_trip(tmp_path):
    records = [make_record("baseline", 0, 7.8), make_record("gqa", 0, 7.85)]
    records[0]["summary"]["kv_cache/bytes_per_token"] = 16384
    records[1]["summary"]["kv_cache/bytes_per_token"] = 4096
    runs = load_path(write_records(tmp_path / "results", records))
    assert {r.variant: r.kv_cache_bytes_per_token for r in runs} == {"baseline": 16384, "gqa": 4096}
    table = section(runs, "all_runs")
    column = table.columns.index("KV cache (B/token)")
    assert sorted(row[column] for row in table.rows) == [4096, 16384]
    assert any("| 16,384 |" in line for line in table.lines)
    again = load_path_from_seed_schema(tmp_path, to_seed_schema(runs))
    assert {r.variant: r.kv_cache_bytes_per_token for r in again} == {"baseline": 16384, "gqa": 4096}


def test_the_cost_figure_places_a_recurrent_state_at_the_runs_context(tmp_path):
    """gated_deltanet caches no token: its record's bytes per token are its fixed state over the
    run's context (train.py at seq_len 32, d_model 64, 2 layers: 2 x 1408 values x 2 bytes / 32 = 176),
    and the cost figure plots it there, in the linear family's colour."""
    from analysis.plots import FAMILY_COLORS, _per_variant, costs_figure
    from config import config_from_values
    from model import ModelConfig, kv_cache_bytes_per_token

    records = [make_record("baseline", 0, 7.8), make_record("gated_deltanet", 0, 7.9)]
    for record in records:
        cfg = config_from_values({k: v for k, v in record["config"].items()
                                  if k in ("attention", "d_model", "n_layers", "n_heads", "seq_len")})
        record["summary"]["kv_cache/bytes_per_token"] = kv_cache_bytes_per_token(ModelConfig.from_train_config(cfg, 512))
    assert [r["summary"]["kv_cache/bytes_per_token"] for r in records] == [2 * 2 * 64 * 2, 2 * (128 * 3 + 4 * 16 * 16) * 2 // 32]
    runs = load_path(write_records(tmp_path / "results", records))
    data = _per_variant(runs)
    assert data["gated_deltanet"]["kv_cache"] == (176.0, 0.0) and data["gated_deltanet"]["family"] == "linear"
    assert FAMILY_COLORS["linear"] not in (FAMILY_COLORS["other"], FAMILY_COLORS["baseline"])
    assert costs_figure(runs, tmp_path / "costs.png", "costs").stat().st_size > 0


def load_path_from_seed_schema(tmp_path, obj):
    path = tmp_path / "seed_schema.json"
    path.write_text(json.dumps(obj))
    return load_path(path)


def test_pareto_front_by_hand():
    from analysis.plots import pareto_front

    points = [(16384, 7.80), (4096, 7.85), (2048, 7.95), (4096, 7.90), (10240, 7.82), (16384, 7.79)]
    # (4096, 7.90) loses to (4096, 7.85); (16384, 7.80) to (16384, 7.79); (10240, 7.82) survives
    assert pareto_front(points) == [(2048, 7.95), (4096, 7.85), (10240, 7.82), (16384, 7.79)]


def test_top5_curves_and_probes_tell_two_lrs_of_one_variant_apart(tmp_path, monkeypatch):
    """A real sweep over lr names both runs of a variant and seed `rope_small-s1` (the record's file
    gets the run id): the top-5 list and the curves' legend must still say which lr each is, and
    the difference panel pairs each lr with the baseline at the same lr."""
    records = []
    for lr, shift in ((1e-3, 0.0), (3e-3, 0.5)):
        for v, per_seed in EFFECTS.items():
            for s, d in per_seed.items():
                rec = make_record(v, s, 7.80 + shift + SEED_OFFSET[s] + d, config={"lr": lr})
                rec["run_id"] += f"-{lr}"
                records.append(rec)
    for rec in records:  # a probe that differs by lr only: 1.0 at lr 1e-3, 2.0 at 3e-3
        rec["summary"]["probe/attn_entropy"] = 1.0 if rec["config"]["lr"] == 1e-3 else 2.0
    for rec in records:  # peak memory differs by lr too: 1.0 GB at 1e-3, 5.0 GB at 3e-3
        rec["summary"]["memory/peak_gb"] = 1.0 if rec["config"]["lr"] == 1e-3 else 5.0
    records[-1]["summary"]["memory/peak_gb"] = 6.0  # enhanced_xl-s2 at lr 3e-3 the most
    records[0]["summary"]["memory/peak_gb"] = 0.5  # baseline-s0 at lr 1e-3 the least
    failed = make_record("rope_small", 0, 7.8, status="failed", config={"lr": 3e-3})
    failed["run_id"] += "-failed"
    records.append(failed)
    for rec in records:  # same run name, two files, as write_record names them
        path = tmp_path / rec["group"] / f"{rec['run_name']}-{rec['run_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    runs = load_path(tmp_path)
    top = section(runs, "top5")
    assert top.lines[0].startswith("1. **rope_small-s2 lr=0.001**:"), top.lines[0]
    assert [row[1] for row in top.rows][:2] == ["rope_small-s2 lr=0.001", "rope_small-s0 lr=0.001"]

    memory = section(runs, "memory_usage")
    assert memory.rows == [["least", "baseline-s0 lr=0.001", 0.5], ["most", "enhanced_xl-s2 lr=0.003", 6.0]]
    assert memory.lines[0] == "- **Most Efficient**: Baseline lr=0.001 (seed 0) (0.5GB memory)"
    assert "- rope_small-s0 lr=0.003: failed (RuntimeError: boom)" in section(runs, "success_rate").lines
    efficiency = section(runs, "parameter_efficiency")
    assert efficiency.lines[1].startswith("- **Best Performance**: RoPE-small lr=0.001 (seed 2)")
    assert ["Best Performance", "rope_small-s2 lr=0.001"] == efficiency.rows[0][:2]

    from analysis import plots
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.curves_figure(runs, tmp_path / "curves.png", "t")
    (figure,) = figures
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert sorted(legend) == sorted(f"{v} lr={lr} (n=3)" for v in EFFECTS for lr in (0.001, 0.003))
    diff_panel = figure.axes[2]
    finals = {line.get_label(): line.get_ydata()[-1] for line in diff_panel.get_lines() if "lr=" in line.get_label()}
    for lr in (0.001, 0.003):  # the paired difference at the last step is the planted effect, per lr
        assert finals[f"rope_small lr={lr} (n=3)"] == pytest.approx(statistics.fmean(EFFECTS["rope_small"].values()))
    plots.plt.close(figure)
    plots.probes_figure(runs, tmp_path / "probes.png", "t")
    figure = figures[-1]
    (panel,) = [ax for ax in figure.axes if ax.get_visible()]
    rows = [tick.get_text() for tick in panel.get_yticklabels()]
    assert rows[:2] == ["baseline lr=0.001", "baseline lr=0.003"] and len(rows) == 8
    means = {rows[round(line.get_ydata().mean())]: line.get_xdata()[0] for line in panel.get_lines()}
    assert means == {row: 1.0 if row.endswith("lr=0.001") else 2.0 for row in rows}
    plots.plt.close(figure)


def with_spec(records):
    """The records as train.py writes them now: each with its variant's resolved knobs."""
    for rec in records:
        rec["attention_spec"] = {"n_kv_heads": 4} if rec["attention"] == "baseline" else \
            {"q_lora_rank": 4, "kv_lora_rank": 8, "qk_rope_head_dim": 16, "v_head_dim": 16}
    return records


def test_fairness_audit_flags_one_variant_run_at_two_sizes(tmp_path):
    """Sizes are relative to the model, so an old record of lora_small at d_model 64 (absolute
    ranks 32/64) and a new one (4/8) share a name and every setting: the audit must tell them apart."""
    fair = with_spec(three_seed_records())
    result = audit(load_path(write_records(tmp_path / "fair", fair)))
    assert result.verdict == "fair", result.findings
    assert ("attention sizes", "same per configuration", "4 configuration(s)") in result.checks

    other_size = copy.deepcopy(fair)
    next(r for r in other_size if r["run_name"] == "lora_small-s1")["attention_spec"]["kv_lora_rank"] = 64
    result = audit(load_path(write_records(tmp_path / "sizes", other_size)))
    assert result.verdict == "NOT fair"
    (finding,) = result.findings
    assert finding.startswith("lora_small: attention_spec differs:") and "lora_small-s1 has" in finding

    old_record = copy.deepcopy(fair)
    del next(r for r in old_record if r["run_name"] == "rope_small-s2")["attention_spec"]
    (finding,) = audit(load_path(write_records(tmp_path / "old", old_record))).findings
    assert finding.startswith("rope_small: no attention_spec in rope_small-s2")

    # records from before attention_spec: nothing to compare, said so, and no verdict changed
    result = audit(load_path(write_records(tmp_path / "before", three_seed_records())))
    assert result.verdict == "fair" and ("attention sizes", "not checked",
                                         "not recorded (records from before attention_spec)") in result.checks


def test_train_py_extras_in_the_wandb_config_are_bookkeeping_not_unfairness():
    """train.py adds vocab_size, processes, group and attention_spec to each run's W&B config;
    attention_spec differs between variants by design, the rest are equal: the audit of W&B runs
    is fair and reads the sizes."""
    fakes = []
    for rec in with_spec(three_seed_records()):
        fake = FakeWandbRun(rec, "finished")
        fake.config.update(vocab_size=512, processes=1, group="g1", attention_spec=rec["attention_spec"])
        fakes.append(fake)
    runs = [run_from_wandb(f) for f in fakes]
    assert {r.variant: r.attention_spec["kv_lora_rank"] for r in runs if r.variant == "lora_small"} == {"lora_small": 8}
    result = audit(runs)
    assert result.verdict == "fair", result.findings
    assert ("attention sizes", "same per configuration", "4 configuration(s)") in result.checks
