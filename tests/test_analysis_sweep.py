"""Issue 4, test 6: the report of a real offline sweep, end to end.

A tiny grid (2 variants x 2 seeds, 4 steps of a 32-wide model on the embedded corpus) runs through
local_sweep.py and train.py; local_sweep writes the report, and the report must show every run,
pair the seeds, and find the runs fair from the fingerprints train.py really logged. Slow next to
the rest of the analysis tests (four real trainings: about 40 s of CPU), so it lives in its own file.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

import processes
from analysis import stats, tables
from analysis.fairness import audit
from analysis.runs import load_path, run_from_wandb
from test_analysis import FakeWandbRun
from train_helpers import offline_run_contents

ROOT = Path(__file__).resolve().parent.parent

SWEEP = """
name: analysis-e2e
program: train.py
method: grid
metric: {name: val/loss, goal: minimize}
parameters:
  attention: {values: [baseline, rope_small]}
  seed: {values: [0, 1]}
  d_model: {value: 32}
  n_layers: {value: 1}
  n_heads: {value: 2}
  d_ff: {value: 32}
  n_experts: {value: 2}
  top_k: {value: 1}
  seq_len: {value: 32}
  batch_size: {value: 4}
  steps: {value: 4}
  eval_every: {value: 2}
  eval_batches: {value: 1}
"""


def test_report_of_a_real_offline_sweep(tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    done = processes.run([sys.executable, "local_sweep.py", str(tmp_path / "sweep.yaml"),
                          "--results-dir", str(tmp_path / "results")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    reports = list((tmp_path / "results").glob("*/report/report.md"))
    assert len(reports) == 1, done.stdout[-2000:]
    assert f"report: {reports[0]}" in done.stdout

    # the offline W&B runs can be synced: no sweep id in them (wandb#8115), the config is the params
    # file's (wandb locks it from WANDB_SWEEP_PARAM_PATH alone), the local sweep id is the group
    sweep_dir = reports[0].parent.parent
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    for entry in state["runs"]:
        (run_dir,) = (sweep_dir / "wandb").glob(f"offline-run-*-{entry['id']}")
        logged = offline_run_contents(run_dir)
        assert logged["sweep_id"] == "" and logged["group"] == sweep_dir.name
        assert f"local-sweep-{sweep_dir.name}" in logged["tags"]
        params_file = sweep_dir / "wandb" / f"sweep-{sweep_dir.name}" / f"config-{entry['id']}.yaml"
        params = {k: v["value"] for k, v in yaml.safe_load(params_file.read_text()).items() if k != "wandb_version"}
        assert {k: logged["config"][k] for k in params} == params
    out = reports[0].parent
    for figure in ("architecture_search_comprehensive.png", "learning_curves.png", "baseline_differences.png"):
        assert (out / figure).stat().st_size > 10_000, figure
    text = reports[0].read_text()
    assert "**Success Rate**: 4/4 (100%)" in text
    assert "**Fairness: fair**" in text  # same data and shared init per seed, from train.py's own hashes
    assert "| rope_small | rope | 2 |" in text  # the paired table, both seeds
    exported = json.loads((out / "architecture_search_results.json").read_text())
    assert sorted(exported) == ["d32l1_baseline_s0", "d32l1_baseline_s1", "d32l1_rope_small_s0", "d32l1_rope_small_s1"]

    # the command line over the same records, into another directory
    again = processes.run([sys.executable, "-m", "analysis.report", "--results", str(reports[0].parent.parent),
                           "--out", str(tmp_path / "again")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Success Rate: 4/4 (100%)" in again.stdout
    # same records, same tables (the report's own files in the sweep dir are not records)
    assert (tmp_path / "again" / "report.md").read_text().split("## Figures")[0] == text.split("## Figures")[0]

    # The W&B path: each run as W&B holds it (config, summary, history from its offline .wandb
    # file) gives the same runs, and so the same tables, as the records.
    local = sorted(load_path(reports[0].parent.parent), key=lambda r: r.name)
    from_wandb = sorted((run_from_wandb(wandb_view(d)) for d in (tmp_path / "results").glob("*/wandb/offline-run-*")),
                        key=lambda r: r.name)
    assert [r.name for r in from_wandb] == [r.name for r in local]
    for w, r in zip(from_wandb, local):
        assert w.val_loss == r.val_loss == r.eval_history[-1]["val/loss"]  # the final evaluation
        assert w.val_loss_min == r.val_loss_min == min(row["val/loss"] for row in r.eval_history)
        assert (w.status, w.seed, w.variant, w.data_fingerprint) == (r.status, r.seed, r.variant, r.data_fingerprint)
    for run_dir in (tmp_path / "results").glob("*/wandb/offline-run-*"):  # W&B's own summary: final, and min
        summary, history = offline_run_contents(run_dir)["summary"], offline_run_contents(run_dir)["history"]
        evals = [row["val/loss"] for row in history if "val/loss" in row]
        assert summary["val/loss"] == evals[-1] and summary["val/loss_min"] == min(evals), run_dir
    for key in ("top5", "statistics", "seed_statistics"):
        def lines(runs):
            return {s.key: s for s in tables.build_sections(runs, audit(runs))}[key].lines
        assert lines(from_wandb) == lines(local), key


def wandb_view(run_dir: Path) -> FakeWandbRun:
    """What wandb.Api() would return for an offline run once synced, from its own .wandb file."""
    contents = offline_run_contents(run_dir)
    record = {"run_id": run_dir.name.rsplit("-", 1)[1], "run_name": contents["config"]["attention"] + "-s"
              + str(contents["config"]["seed"]), "group": contents["group"], "family": (contents["tags"] or [""])[0],
              "config": contents["config"], "summary": contents["summary"],
              "history": [{"step": row["_step"], **row} for row in contents["history"]]}
    return FakeWandbRun(record, "finished")


def test_a_real_sweep_over_lr_reports_one_row_per_configuration(tmp_path):
    """Issue 9: a grid over a setting (lr, two values) is two configurations per variant, not one
    run per (variant, seed) picked at random: the report has a row for each, paired by seed within
    it, and says that lr varies."""
    grid = SWEEP.replace("name: analysis-e2e", "name: analysis-lr").replace("steps: {value: 4}", "steps: {value: 2}")
    (tmp_path / "sweep.yaml").write_text(grid + "  lr: {values: [0.001, 0.01]}\n")
    # the report is built from the records (the W&B side is the test above's): no W&B runs, ~2 s less each
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true")
    done = processes.run([sys.executable, "local_sweep.py", str(tmp_path / "sweep.yaml"),
                          "--results-dir", str(tmp_path / "results")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = load_path(tmp_path / "results")
    assert len(runs) == 8 and all(r.succeeded for r in runs)
    (text,) = [p.read_text() for p in (tmp_path / "results").glob("*/report/report.md")]
    assert "**Success Rate**: 8/8 (100%)" in text
    assert "Settings that vary within these runs: lr." in text
    for label in ("baseline lr=0.001", "baseline lr=0.01", "rope_small lr=0.001", "rope_small lr=0.01"):
        assert f"| {label} | " in text, label
    assert "| rope_small lr=0.001 | rope | 2 |" in text and "| rope_small lr=0.01 | rope | 2 |" in text
    # each configuration's mean is the mean of its own two runs, by hand
    mean = {}
    for r in runs:
        mean.setdefault((r.variant, r.config["lr"]), []).append(r.val_loss)
    summaries = {s.configuration: s for s in stats.summarize_variants(runs)}
    for (variant, lr), losses in mean.items():
        assert summaries[f"{variant} lr={lr}"].mean == pytest.approx(sum(losses) / 2)
    assert "**Fairness: fair**" in text
