"""W&B dashboards for a sweep, built with W&B's own `wandb-workspaces`: a saved workspace and a Report.

    python -m analysis.dashboard --sweep ENTITY/PROJECT/SWEEP_ID
    python -m analysis.dashboard --project ENTITY/PROJECT --group SWEEP_ID   (a synced local_sweep)
    python -m analysis.dashboard --project ENTITY/PROJECT --group SWEEP_ID --results results/SWEEP_ID \
        --dry-run --out DIR                                                (no server, no login)

A renderer only: the runs come from analysis.runs, the settings that vary from
runs.varying_settings, the verdicts (the paired table, the fairness audit) from analysis.tables as
the local report computes them. W&B cannot point a workspace at a sweep's page, so both the
workspace and the Report's run set are the project's runs filtered to the sweep (or the group).
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import record
from analysis import tables
from analysis.fairness import audit
from analysis.report import _Parser, error_exit, wandb_path  # one command-line contract for the analysis
from analysis.runs import Run, SourceError, load_path, load_wandb, varying_settings

WORKSPACE_JSON, REPORT_JSON = "workspace.json", "report.json"
# The verdict sections of the local report the W&B Report carries as text, in order. A section the
# analysis does not build (yet) is passed over: a regime statement joins by its key here.
VERDICT_KEYS = ("regime", "seed_statistics", "fairness")  # the regime, where it applies, opens them
# What the panels read: the summary W&B keeps of each run (train.py's final values) and its history.
HEADLINE = (record.VAL_LOSS, record.VAL_LOSS_MIN, record.VAL_ACCURACY, record.PARAMS_TOTAL,
            record.KV_CACHE_BYTES_PER_TOKEN, record.TIME_TOTAL)
CURVES = (record.VAL_LOSS, "train/loss")


def _sweep_filter(kind: str, value: str):
    """The run filter for a W&B sweep (`Sweep`) or a synced local sweep (`Group`), as the library's
    own filter expression."""
    from wandb_workspaces import expr
    return expr.And(expr.Metric("Sweep" if kind == "sweep" else "Group") == value)


def _grouping(runs: list[Run]) -> list[str]:
    """config.attention, then the settings that vary, as the report groups configurations."""
    return ["attention", *varying_settings(runs)]


def _probe_metrics(runs: list[Run]) -> list[str]:
    """The mean-over-layers probes the runs have, in record.PROBE_KEYS order."""
    present = {key for run in runs for key in run.probes}
    return [key for key in record.PROBE_KEYS if key in present]


def sections(runs: list[Run]) -> list[tuple[str, list]]:
    """(section name, its panels): the same panels for the workspace and the Report."""
    import wandb_workspaces.reports.v2 as wr

    group_by = wr.Config("attention")
    swept = varying_settings(runs)
    overview = [
        wr.BarPlot(title="Final val/loss by variant (mean, std over seeds)", metrics=[wr.SummaryMetric(record.VAL_LOSS)],
                   groupby=group_by, groupby_aggfunc="mean", groupby_rangefunc="stddev", orientation="v"),
        *[wr.LinePlot(title=f"{key} by variant", x="Step", y=[key], groupby=group_by,
                      groupby_aggfunc="mean", groupby_rangefunc="stddev") for key in CURVES],
    ]
    sweep = [
        wr.ParallelCoordinatesPlot(title="Swept settings to val/loss", columns=[
            wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key)) for key in ["attention", *swept]]
            + [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(record.VAL_LOSS))]),
        wr.ParameterImportancePlot(with_respect_to=record.VAL_LOSS),
        wr.ScatterPlot(title="val/loss against parameters", x=wr.SummaryMetric(record.PARAMS_TOTAL),
                       y=wr.SummaryMetric(record.VAL_LOSS)),
        wr.ScatterPlot(title="val/loss against KV cache bytes per token",
                       x=wr.SummaryMetric(record.KV_CACHE_BYTES_PER_TOKEN), y=wr.SummaryMetric(record.VAL_LOSS)),
    ]
    mechanism = [wr.LinePlot(title=f"{key} by variant", x="Step", y=[key], groupby=group_by,
                             groupby_aggfunc="mean", groupby_rangefunc="stddev") for key in _probe_metrics(runs)]
    details = [wr.RunComparer()]
    return [(name, panels) for name, panels in
            (("overview", overview), ("sweep", sweep), ("mechanism", mechanism), ("details", details)) if panels]


def pinned_columns(runs: list[Run]) -> list[str]:
    """The runs table's pinned columns: variant, seed, the varying settings, the headline metrics."""
    return ([f"config:{key}.value" for key in ["attention", "seed", *varying_settings(runs)]]
            + [f"summary:{key}" for key in HEADLINE])


def build_workspace(runs: list[Run], entity: str, project: str, kind: str, value: str):
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    return ws.Workspace(
        entity=entity, project=project, name=f"attnsweep {kind} {value}",
        sections=[ws.Section(name=name, panels=panels, is_open=True) for name, panels in sections(runs)],
        runset_settings=ws.RunsetSettings(filters=_sweep_filter(kind, value),
                                          groupby=[expr.Config(key) for key in _grouping(runs)],
                                          pinned_columns=pinned_columns(runs)))


def verdicts(runs: list[Run]) -> list[tables.Section]:
    """The local report's verdict sections, computed by analysis.tables as report.build does
    (a section with nothing to say, as the regime where it does not apply, is left out)."""
    by_key = {s.key: s for s in tables.build_sections(runs, audit(runs))}
    return [by_key[key] for key in VERDICT_KEYS if key in by_key and by_key[key].lines]


def build_report(runs: list[Run], entity: str, project: str, kind: str, value: str, source: str):
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=entity, project=project, name=f"{kind} {value}",
                       filters=_sweep_filter(kind, value), groupby=[f"config.{key}" for key in _grouping(runs)],
                       pinned_columns=pinned_columns(runs))
    blocks = [wr.P(f"Source: {source}. {len(runs)} runs of {len({r.variant for r in runs})} variants; "
                   "the verdicts below are the local report's (python -m analysis.report).")]
    for name, panels in sections(runs):
        blocks += [wr.H2(name), wr.PanelGrid(runsets=[runset], panels=panels)]
    for section in verdicts(runs):
        blocks.append(wr.MarkdownBlock(text=section.markdown()))
    return wr.Report(entity=entity, project=project, title=f"Attention comparison: {kind} {value}",
                     description="Built by python -m analysis.dashboard", blocks=blocks)


def workspace_spec(workspace) -> dict:
    """The workspace as the library sends it to the server (upsert_view2's spec)."""
    return json.loads(workspace._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))


def report_spec(report) -> dict:
    """The Report as the library's own model (ReportViewspec) serialises it."""
    return json.loads(report._to_model().model_dump_json(by_alias=True, exclude_none=True))


@contextlib.contextmanager
def offline_project_ids():
    """A Report's run set asks the server for its project's internal id when serialised; with
    --dry-run there is no server, so that one query is answered with a placeholder (anything else
    the library asks is refused). The id is the server's to fill in on save."""
    from wandb_workspaces.reports.v2 import interface

    def answer(_api, query, variables=None):
        if "ProjectInternalId" not in query:
            raise RuntimeError("--dry-run: the W&B library asked the server for more than a project id")
        return {"project": {"id": "dry-run", "internalId": "dry-run"}}

    saved = interface.execute_graphql, interface._get_api
    interface.execute_graphql, interface._get_api = answer, lambda: None
    try:
        yield
    finally:
        interface.execute_graphql, interface._get_api = saved


# --- the command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis.dashboard", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--sweep", metavar="ENTITY/PROJECT/SWEEP_ID", help="a W&B sweep's runs")
    target.add_argument("--project", metavar="ENTITY/PROJECT", help="with --group: a synced local sweep's runs")
    parser.add_argument("--group", metavar="GROUP", help="with --project: the W&B group (a local sweep's id)")
    parser.add_argument("--results", metavar="PATH", action="append",
                        help="read the runs from a results directory instead of W&B (e.g. with --dry-run offline)")
    parser.add_argument("--dry-run", action="store_true", help="write the specs as JSON to --out; save nothing")
    parser.add_argument("--out", metavar="DIR", help=f"with --dry-run: where {WORKSPACE_JSON} and {REPORT_JSON} go")
    return parser


def _target(args) -> tuple[str, str, str, str]:
    """(entity, project, "sweep" or "group", its id)."""
    if args.sweep:
        parts = wandb_path("--sweep", args.sweep, "ENTITY/PROJECT/SWEEP_ID")
        if args.group:
            raise SourceError("--group: only used with --project")
        return parts[0], parts[1], "sweep", parts[2]
    parts = wandb_path("--project", args.project, "ENTITY/PROJECT")
    if not args.group:
        raise SourceError("--project: needs --group GROUP (the synced local sweep's id)")
    return parts[0], parts[1], "group", args.group


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        entity, project, kind, value = _target(args)
        if args.dry_run and not args.out:
            raise SourceError("--dry-run: needs --out DIR for the specs")
        if args.out and not args.dry_run:
            raise SourceError("--out: only used with --dry-run")
        if args.results:
            runs, source = [run for path in args.results for run in load_path(path)], " + ".join(args.results)
        else:
            try:
                runs = load_wandb(f"{entity}/{project}", {kind: value})
            except Exception as exc:  # network, auth, a missing project: say which, without a traceback
                raise RuntimeError(f"could not read the runs of {kind} {value} from W&B: {exc}") from None
            source = f"{kind} {entity}/{project}/{value}"
        if not runs:
            raise SourceError(f"{kind} {value}: no training runs found (runs with an 'attention' config)")
        workspace = build_workspace(runs, entity, project, kind, value)
        report = build_report(runs, entity, project, kind, value, source)
        if args.dry_run:
            out = Path(args.out)
            if out.exists() and not out.is_dir():
                raise SourceError(f"--out {out}: exists and is not a directory")
            out.mkdir(parents=True, exist_ok=True)
            with offline_project_ids():
                specs = {WORKSPACE_JSON: workspace_spec(workspace), REPORT_JSON: report_spec(report)}
            for name, spec in specs.items():
                (out / name).write_text(json.dumps(spec, indent=1) + "\n")
                print(f"wrote {out / name}")
            return 0
        try:
            workspace.save()
            report.save()
        except Exception as exc:
            raise RuntimeError(f"saving the dashboards to W&B failed: {exc}") from None
        print(f"workspace: {workspace.url}\nreport: {report.url}")
        return 0
    except (SourceError, RuntimeError) as exc:
        return error_exit(exc)


if __name__ == "__main__":
    sys.exit(main())
