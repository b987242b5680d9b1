"""analysis.dashboard: the saved workspace and the Report, built with the real wandb-workspaces
objects, offline. The specs are read back as the library itself serialises them."""
import json

import pytest
import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces.reports.v2 import internal as report_internal
from wandb_workspaces.workspaces import internal as workspace_internal

from analysis import dashboard, report
from analysis.runs import load_path
from test_analysis import EFFECTS, SEED_OFFSET, make_record, three_seed_records, write_records


def panels_of(spec: dict) -> dict:
    """{viewType: [panel config, ...]} over every section of a workspace spec."""
    out = {}
    for section in spec["section"]["panelBankConfig"]["sections"]:
        for panel in section["panels"]:
            out.setdefault(panel["viewType"], []).append(panel["config"])
    return out


def lr_sweep_records():
    """Two learning rates for every variant and seed: lr varies, so it is a grouping setting."""
    return [make_record(v, s, 7.80 + SEED_OFFSET[s] + d + (0.01 if lr == 0.01 else 0.0), config={"lr": lr})
            | {"run_name": f"{v}-s{s}-lr{lr}"}
            for v, per_seed in EFFECTS.items() for s, d in per_seed.items() for lr in (0.003, 0.01)]


def dry_run(tmp_path, records, *target):
    results = write_records(tmp_path / "results", records)
    out = tmp_path / "specs"
    assert dashboard.main([*target, "--results", str(results), "--dry-run", "--out", str(out)]) == 0
    return results, json.loads((out / "workspace.json").read_text()), json.loads((out / "report.json").read_text())


def test_workspace_spec_filters_groups_pins_and_lays_out_the_panels(tmp_path):
    _, spec, _ = dry_run(tmp_path, lr_sweep_records(), "--sweep", "ent/proj/sw123")
    (runset,) = spec["section"]["runSets"]
    assert runset["filters"]["filters"] == [{"key": {"section": "run", "name": "sweep"}, "op": "=",
                                             "value": "sw123", "disabled": False}]
    # grouped by the variant, then by lr, the one setting that varies (make_record's others do not)
    assert runset["grouping"] == [{"section": "config", "name": "attention.value"},
                                  {"section": "config", "name": "lr.value"}]
    pinned = [k for k, on in runset["runFeed"]["columnPinned"].items() if on]
    for column in ("config:attention.value", "config:seed.value", "config:lr.value", "summary:val/loss",
                   "summary:params/total", "summary:kv_cache/bytes_per_token"):
        assert column in pinned
    names = [s["name"] for s in spec["section"]["panelBankConfig"]["sections"]]
    assert names == ["overview", "sweep", "details"]  # no probes logged: no mechanism section
    panels = panels_of(spec)
    (bar,) = panels["Bar Chart"]
    assert (bar["metrics"], bar["groupBy"], bar["groupAgg"], bar["groupArea"]) == \
        (["summary_metrics.val/loss"], "attention.value", "mean", "stddev")
    assert sorted(p["metrics"][0] for p in panels["Run History Line Plot"]) == ["train/loss", "val/loss"]
    assert all(p["groupBy"] == "attention.value" for p in panels["Run History Line Plot"])
    (parallel,) = panels["Parallel Coordinates Plot"]
    assert [c["accessor"] for c in parallel["columns"]] == ["config:attention.value", "config:lr.value", "summary:val/loss"]
    assert panels["Parameter Importance"][0]["targetKey"] == "val/loss"
    assert sorted(p["xAxis"] for p in panels["Scatter Plot"]) == ["summary:kv_cache/bytes_per_token", "summary:params/total"]
    assert all(p["yAxis"] == "summary:val/loss" for p in panels["Scatter Plot"])
    assert "Run Comparer" in panels


def test_group_target_and_probe_panels(tmp_path):
    records = three_seed_records()
    for rec in records:
        rec["summary"]["probe/attn_entropy"] = 1.5
    _, spec, report_spec = dry_run(tmp_path, records, "--project", "ent/proj", "--group", "g1")
    (runset,) = spec["section"]["runSets"]
    assert runset["filters"]["filters"][0]["key"] == {"section": "run", "name": "group"}
    assert runset["filters"]["filters"][0]["value"] == "g1"
    assert [g["name"] for g in runset["grouping"]] == ["attention.value"]  # nothing else varies
    (mechanism,) = [s for s in spec["section"]["panelBankConfig"]["sections"] if s["name"] == "mechanism"]
    assert [p["config"]["metrics"] for p in mechanism["panels"]] == [["probe/attn_entropy"]]
    grids = [b for b in report_spec["spec"]["blocks"] if b["type"] == "panel-grid"]
    assert len(grids) == 4  # overview, sweep, mechanism, details
    for grid in grids:
        (rs,) = grid["metadata"]["runSets"]
        assert rs["filters"]["filters"][0]["value"] == "g1" and rs["grouping"][0]["name"] == "attention.value"


def test_report_says_what_the_local_report_says(tmp_path):
    results, _, spec = dry_run(tmp_path, three_seed_records(), "--project", "ent/proj", "--group", "g1")
    local = report.build(load_path(results), tmp_path / "local", str(results)).path.read_text()
    texts = [b["content"] for b in spec["spec"]["blocks"] if b["type"] == "markdown-block"]
    assert len(texts) == 2
    for heading in ("paired against the baseline", "Same data, same initialisation, same settings?"):
        (text,) = [t for t in texts if heading in t]
        assert text.strip() in local  # the verdict tables, word for word as in report.md


def test_the_report_opens_with_the_regime_where_the_runs_learned_no_context(tmp_path):
    """Runs at their unigram loss with no context gain: the shared Report's first verdict text is
    the local report's regime sentence; where the regime does not apply there is no empty block
    (the test above: two texts)."""
    records = three_seed_records()
    for rec in records:
        rec["summary"].update({"data/unigram_loss": rec["summary"]["val/loss"] - 0.01, "val/context_gain": 0.0})
    results, _, spec = dry_run(tmp_path, records, "--project", "ent/proj", "--group", "g1")
    local = report.build(load_path(results), tmp_path / "local", str(results)).path.read_text()
    texts = [b["content"] for b in spec["spec"]["blocks"] if b["type"] == "markdown-block"]
    assert len(texts) == 3 and "attention cannot matter in these runs yet" in texts[0]
    assert texts[0].strip() in local


def test_specs_round_trip_through_the_library_models(tmp_path):
    runs = load_path(write_records(tmp_path / "results", lr_sweep_records()))
    workspace = dashboard.build_workspace(runs, "ent", "proj", "sweep", "sw1")
    spec = dashboard.workspace_spec(workspace)
    view = workspace_internal.View(entity="ent", project="proj", display_name=workspace.name, name="", id="",
                                   spec=workspace_internal.WorkspaceViewspec.model_validate_json(json.dumps(spec)))
    again = ws.Workspace._from_model(view)
    assert again.runset_settings.pinned_columns == workspace.runset_settings.pinned_columns
    assert [s.name for s in again.sections] == [s.name for s in workspace.sections]
    assert dashboard.workspace_spec(again) == spec
    with dashboard.offline_project_ids():
        built = dashboard.build_report(runs, "ent", "proj", "sweep", "sw1", "test")
        spec = dashboard.report_spec(built)
        loaded = wr.Report._from_model(report_internal.ReportViewspec.model_validate_json(json.dumps(spec)))
        assert dashboard.report_spec(loaded) == spec
    assert loaded.title == built.title and len(loaded.blocks) == len(built.blocks)


class FakeAPI:
    """wandb.Api as the library uses it: an app URL and the entity's projects."""
    class client:
        app_url = "http://127.0.0.1:1"

    def projects(self, entity):
        return [type("P", (), {"name": "proj"})()]

    def create_project(self, *_):
        raise AssertionError("the project exists")


def test_save_sends_the_view_and_report_mutations(tmp_path, monkeypatch, capsys):
    sent = []

    def execute_graphql(_api, query, variables=None):
        sent.append((query, dict(variables or {})))
        if "ProjectInternalId" in query:
            return {"project": {"id": "UHJvamVjdDox", "internalId": "pid-1"}}
        if "UpsertView2" in query:
            return {"upsertView": {"view": {"id": "view-1", "name": variables["name"]}, "inserted": True}}
        spec = json.loads(variables["spec"])
        return {"upsertView": {"view": {"id": "report-1", "name": variables["name"], "displayName": variables["displayName"],
                                        "description": variables["description"], "spec": spec,
                                        "project": {"name": "proj", "entityName": "ent"}}}}

    import wandb
    monkeypatch.setattr(wandb, "Api", FakeAPI)
    monkeypatch.setattr(workspace_internal, "execute_graphql", execute_graphql)
    monkeypatch.setattr(wr.interface, "execute_graphql", execute_graphql)
    results = write_records(tmp_path / "results", three_seed_records())
    assert dashboard.main(["--sweep", "ent/proj/sw9", "--results", str(results)]) == 0
    assert "http://127.0.0.1:1/ent/proj" in capsys.readouterr().out
    ((_, view),) = [(q, v) for q, v in sent if "UpsertView2" in q]
    assert (view["entityName"], view["projectName"], view["type"]) == ("ent", "proj", "project-view")
    spec = workspace_internal.WorkspaceViewspec.model_validate_json(view["spec"])  # the library's own schema
    runset = json.loads(view["spec"])["section"]["runSets"][0]
    assert runset["filters"]["filters"][0]["value"] == "sw9"
    assert spec.section.panel_bank_config.sections[0].name == "overview"
    ((_, saved),) = [(q, v) for q, v in sent if "UpsertView2" not in q and "ProjectInternalId" not in q]
    assert saved["type"] == "runs" and saved["projectName"] == "proj"
    report_spec = report_internal.Spec.model_validate_json(saved["spec"])
    assert any(b.type == "panel-grid" for b in report_spec.blocks)
    assert json.loads(saved["spec"])["blocks"][3]["metadata"]["runSets"][0]["project"]["id"] == "pid-1"


@pytest.mark.parametrize("argv, needle", [
    (["--sweep", "ent/proj"], "expected ENTITY/PROJECT/SWEEP_ID"),
    (["--project", "ent/proj"], "needs --group"),
    (["--sweep", "e/p/s", "--dry-run"], "needs --out"),
    (["--sweep", "e/p/s", "--results", "/nonexistent", "--dry-run", "--out", "x"], "no such file"),
])
def test_bad_input_is_one_error_line(argv, needle, capsys):
    assert dashboard.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
