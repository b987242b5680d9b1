"""The analysis of issue 18's new metrics: the n-gram baselines, the context gain and the
val_len{L}/* metrics flow from records, W&B runs and the seed-schema export into Run; the report
opens its verdicts (and the seed's tables) with the regime sentence exactly when no run can show an
attention effect; runs with --eval_lengths get the loss/accuracy-by-length figure."""
import math

import pytest

import record
from analysis import report, tables
from analysis.runs import load_path, run_from_record, run_from_wandb, to_seed_schema, load_seed_results
from test_analysis import EFFECTS, SEED_OFFSET, FakeWandbRun, make_record, write_records


def learned_record(variant, seed, loss, *, unigram=6.65, gain=0.02, lengths=None):
    rec = make_record(variant, seed, loss)
    rec["summary"].update({record.DATA_UNIGRAM_LOSS: unigram, record.DATA_BIGRAM_LOSS: unigram - 1.75,
                           record.VAL_CONTEXT_GAIN: gain})
    for length, (l_loss, l_acc) in (lengths or {}).items():
        rec["summary"].update(dict(zip(record.length_keys(length), (l_loss, l_acc))))
    return rec


def test_new_keys_flow_from_records_wandb_and_the_seed_export():
    rec = learned_record("rope_small", 1, 6.7, gain=0.3, lengths={64: (6.8, 0.05), 128: (7.2, 0.04)})
    run = run_from_record(rec)
    assert (run.unigram_loss, run.bigram_loss, run.context_gain) == (6.65, 6.65 - 1.75, 0.3)
    assert run.length_metrics == {64: {"loss": 6.8, "accuracy": 0.05}, 128: {"loss": 7.2, "accuracy": 0.04}}
    assert run_from_wandb(FakeWandbRun(rec, "finished")) == run
    (back,) = load_seed_results(to_seed_schema([run]))
    assert (back.unigram_loss, back.bigram_loss, back.context_gain, back.length_metrics) == \
        (run.unigram_loss, run.bigram_loss, run.context_gain, run.length_metrics)


def test_length_keys_parse_back():
    assert record.parse_length_key(record.length_keys(256)[1]) == (256, "accuracy")
    assert [record.parse_length_key(k) for k in ("val/loss", "val_lenx/loss", "val_len64/perplexity")] == [None] * 3


def _runs(tmp_path, loss_base, gain, unigram=6.65):
    records = [learned_record(v, s, loss_base + SEED_OFFSET[s] + d, unigram=unigram, gain=gain)
               for v, per_seed in EFFECTS.items() for s, d in per_seed.items()]
    return load_path(write_records(tmp_path, records))


@pytest.mark.parametrize("loss_base,gain", [(6.72, 0.4), (5.9, 0.02)], ids=["near-unigram", "no-context-gain"])
def test_regime_statement_where_attention_cannot_matter(tmp_path, loss_base, gain):
    """Runs at the unigram loss (even with a gain), or well below it without context gain: one
    sentence says so, and it opens the verdicts (the seed-statistics section)."""
    runs = _runs(tmp_path, loss_base, gain)
    text = tables.regime(runs)
    assert text.startswith("**Regime: attention cannot matter in these runs yet.**")
    assert text.count(". ") == 0 and text.endswith("the verdicts below are about noise.")  # one sentence
    assert "unigram 6.650" in text and f"context gain {gain:+.3f}" in text
    assert tables.seed_statistics(runs).lines[0] == text
    assert tables.regime_section(runs).lines == [text]


def test_report_opens_the_seed_tables_and_the_verdicts_with_the_regime(tmp_path):
    runs = _runs(tmp_path, 6.72, 0.02)
    text = tables.regime(runs)
    built = report.build(runs, tmp_path / "report", "test", figures=False)
    markdown = built.path.read_text()
    summary_part = markdown.split("## Results summary", 1)[1].split("## Architecture insights")[0]
    verdicts = markdown.split("## Is the difference real?", 1)[1].split("### ", 2)[1]
    assert summary_part.lstrip().startswith("### Regime") and text in summary_part
    assert verdicts.split("\n", 1)[1].lstrip().startswith(text)  # right under the verdicts' title
    assert "Regime: attention cannot matter" in report.terminal_text(built)


def test_no_regime_statement_when_runs_learned_context(tmp_path):
    """Runs well below the unigram loss with a context gain: no statement anywhere."""
    runs = _runs(tmp_path, 4.5, 0.5)
    assert tables.regime(runs) is None
    markdown = report.build(runs, tmp_path / "report", "test", figures=False).path.read_text()
    assert "Regime" not in markdown


def test_regime_thresholds_at_their_edges(tmp_path):
    """One run just clearing both thresholds is enough to lift the statement; without the unigram
    loss (a task, an old record) runs are not judged."""
    runs = _runs(tmp_path / "a", 6.72, 0.02)
    lucky = runs[0]
    lucky.val_loss, lucky.context_gain = lucky.unigram_loss - tables.UNIGRAM_MARGIN, tables.MIN_CONTEXT_GAIN
    assert tables.regime(runs) is None
    lucky.context_gain = tables.MIN_CONTEXT_GAIN - 1e-6
    assert tables.regime(runs) is not None
    for run in runs:
        run.unigram_loss = None
    assert tables.regime(runs) is None


def test_lengths_figure_appears_with_eval_lengths(tmp_path):
    from analysis import plots

    plain = load_path(write_records(tmp_path / "plain", [make_record(v, s, 7.8) for v in ("baseline", "alibi")
                                                           for s in (0, 1)]))
    assert plots.lengths_figure(plain, tmp_path / "none.png", "t") is None
    records = [learned_record(v, s, 7.8, lengths={64: (7.9 + (v == "baseline"), 0.05), 128: (8.5, 0.04)})
               for v in ("baseline", "alibi") for s in (0, 1)]
    built = report.build(load_path(write_records(tmp_path / "long", records)), tmp_path / "r2", "test")
    assert built.files[report.LENGTHS_PNG].stat().st_size > 10_000
    assert f"]({report.LENGTHS_PNG})" in built.path.read_text()


def test_length_statistics_pair_each_length_against_the_baseline_at_that_length(tmp_path):
    """At each --eval_lengths length, a configuration's loss there is paired by seed with the
    baseline's there: the Δ, its t-test and Holm (within the length) checked against scipy on the same
    numbers; the trained-length loss plays no part, and a run without that length is left out."""
    from scipy import stats as sps
    at_32 = {"baseline": [1.0, 1.1, 1.2], "nope": [1.5, 1.62, 1.71], "alibi": [0.9, 1.02, 1.1]}
    at_64 = {"baseline": [2.0, 2.2, 2.1], "nope": [2.0, 2.21, 2.12], "alibi": [1.0, 1.25, 1.1]}
    records = []
    for variant in at_32:
        for seed in range(3):
            records.append(learned_record(variant, seed, 0.5 + 0.01 * seed,  # the trained length: all alike
                                          lengths={32: (at_32[variant][seed], 0.5), 64: (at_64[variant][seed], 0.25)}))
    records.append(learned_record("alibi", 3, 0.5))  # no --eval_lengths: not in the length tables
    runs = load_path(write_records(tmp_path, records))
    section = tables.length_statistics(runs)
    rows = {(row[0], row[1]): row for row in section.rows}
    for length, table in ((32, at_32), (64, at_64)):
        p = {v: sps.ttest_rel(table[v], table["baseline"]).pvalue for v in ("nope", "alibi")}
        ordered = sorted(p.values())
        holm = {v: min(1.0, max(2 * ordered[0], ordered[1]) if p[v] == ordered[1] else 2 * ordered[0]) for v in p}
        for variant in ("nope", "alibi"):
            row = rows[(variant, length)]
            diffs = [a - b for a, b in zip(table[variant], table["baseline"])]
            assert row[2] == 3 and row[5] == pytest.approx(sum(diffs) / 3)
            assert row[8] == pytest.approx(holm[variant])
        assert rows[("baseline", length)][-1] == "reference"
    assert rows[("nope", 32)][-1] == "worse" and rows[("alibi", 64)][-1] == "better"
    assert rows[("nope", 64)][-1] == "indistinguishable"
    markdown = report.build(runs, tmp_path / "report", "test", figures=False).path.read_text()
    assert "### Longer contexts than trained on, paired against the baseline" in markdown


def test_no_length_statistics_without_eval_lengths(tmp_path):
    runs = _runs(tmp_path, 4.5, 0.5)
    assert tables.length_statistics(runs).lines == []
    assert "Longer contexts than trained on, paired" not in report.build(runs, tmp_path / "r", "t", figures=False).path.read_text()


def _task_runs(tmp_path, accuracies):
    records = []
    for variant, per_seed in accuracies.items():
        for seed, accuracy in enumerate(per_seed):
            rec = make_record(variant, seed, 1.0 - accuracy, config={"task": "mqar", "task_vocab": 32})
            rec["summary"]["val/accuracy"] = accuracy
            records.append(rec)
    return load_path(write_records(tmp_path, records))


def test_task_regime_says_whether_any_configuration_learned_the_task(tmp_path):
    """A task's sentence: how many configurations reach a mean answer accuracy of 0.9, and the range
    of the means with who is at each end (hand numbers); below 0.9 everywhere, that none learned it.
    It opens the report beside the language model's (which does not judge task runs)."""
    runs = _task_runs(tmp_path / "a", {"baseline": [1.0, 0.98, 0.99], "lora_small": [0.28, 0.3, 0.29],
                                       "lora_xl": [0.95, 0.9, 0.91]})
    (text,) = tables.task_regime(runs)
    assert text.startswith("**Regime (mqar): the task is learned here.** 2 of 3 configurations")
    assert "from 0.290 (lora_small) to 0.990 (baseline)" in text
    assert tables.regime(runs) is None and tables.regime_section(runs).lines == [text]
    written = report.build(runs, tmp_path / "report", "test", figures=False).path.read_text()
    first_section = written.split("\n### ")[1]  # the report opens with it, before any table
    assert first_section.startswith("Regime: what these models learned") and text in first_section
    runs = _task_runs(tmp_path / "b", {"baseline": [0.3, 0.95, 0.3], "lora_small": [0.28, 0.3, 0.29]})
    (text,) = tables.task_regime(runs)
    assert text.startswith("**Regime (mqar): no configuration has learned the task yet** (mean answer accuracy "
                           "from 0.290 (lora_small) to 0.517 (baseline)")


def test_resolved_from_step_is_the_first_evaluation_from_which_the_final_verdict_holds(tmp_path):
    """Hand-made evaluation histories (steps 3 and 6 of make_record): a variant 1 nat worse at every
    evaluation resolves from step 3; one equal to the baseline at step 3 (indistinguishable there) and
    worse at step 6 resolves from 6; one whose step-3 verdict is the opposite of its final one also
    from 6; no verdict, no step."""
    shapes = {"baseline": (0.0, 0.0), "enhanced_xl": (1.0, 1.0), "lora_xl": (0.0, 1.0), "rope_small": (-1.0, 1.0),
              "lora_small": (0.0, 0.0)}
    noise = {0: 0.0, 1: 0.013, 2: -0.021}
    records = []
    for variant, (at_3, at_6) in shapes.items():
        for seed in range(3):
            wobble = 0.0 if variant == "baseline" else 0.01 * (seed - 1) ** 2  # a paired difference that varies
            rec = make_record(variant, seed, 2.0 + noise[seed] + at_6 + wobble)
            for row in rec["history"]:
                if row.get("step") == 3:
                    row["val/loss"] = 3.0 + noise[seed] + at_3 + wobble
            records.append(rec)
    runs = load_path(write_records(tmp_path, records))
    from analysis import stats
    assert stats.resolved_from_step(runs) == {"enhanced_xl": 3, "lora_xl": 6, "rope_small": 6}
    section = tables.seed_statistics(runs)
    steps = {row[0]: row[-1] for row in section.rows}
    assert steps["enhanced_xl"] == 3 and steps["lora_xl"] == 6 and steps["lora_small"] is None
