"""The report: tables to the terminal and report.md, the seed-schema JSON, the figures, and
optionally all of it to a W&B run of job_type "analysis".

    python -m analysis.report --results results/<group> --out reports/<group>
    python -m analysis.report --results architecture_search_results_fast.json --out reports/seed
    python -m analysis.report --sweep ENTITY/PROJECT/SWEEP_ID --out reports/<sweep> [--log]
    python -m analysis.report --project ENTITY/PROJECT --group SWEEP_ID --out reports/<sweep>  (a synced local_sweep)
    python -m analysis.report --project ENTITY/PROJECT --filters '{"config.steps": 50}' --out DIR

A report only reads its input: it never deletes or changes results, and refuses an --out that
would overwrite the file it reads.
"""
import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from analysis import decode as decode_speeds, plots, seedplan, stats, tables
from analysis.fairness import audit
from analysis.runs import Run, SourceError, load_path, load_wandb, to_seed_schema

REPORT = "report.md"
RESULTS_JSON = "architecture_search_results.json"
COMPREHENSIVE_PNG = "architecture_search_comprehensive.png"
CURVES_PNG = "learning_curves.png"
DIFFERENCES_PNG = "baseline_differences.png"
COSTS_PNG = "costs.png"
PROBES_PNG = "probes.png"
LENGTHS_PNG = "lengths.png"

# The report's parts, in order: (heading, the section keys under it).
LAYOUT = [
    ("Results summary", ["regime", "success_rate", "top5", "statistics"]),
    ("Architecture insights", ["family_ranking", "parameter_efficiency", "memory_usage"]),
    ("Is the difference real?", ["seed_statistics", "length_statistics", "seed_plan"]),
    ("Fairness audit", ["fairness"]),
]


@dataclass
class Report:
    source: str  # what was analysed, in words
    runs: list
    sections: list  # tables.Section
    files: dict  # name -> path of everything written

    @property
    def path(self) -> Path:
        return self.files[REPORT]


def _markdown(source: str, runs: list[Run], sections: dict, figures: dict, decode=None) -> str:
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    variants = sorted({r.variant for r in runs})
    parts = ["# Attention architecture search: report", "",
             f"Source: `{source}`. {len(runs)} runs of {len(variants)} variants"
             + (f", seeds {', '.join(map(str, seeds))}." if seeds else " (seeds not recorded)."), ""]
    for heading, keys in LAYOUT:
        parts += [f"## {heading}", ""]
        for key in keys:
            if sections[key].lines:  # the regime says nothing when attention can matter
                parts.append(sections[key].markdown())
            if key == "parameter_efficiency":
                parts += [tables.EFFICIENCY_RULES, ""]
    parts += ["## Figures", ""]
    for name, caption in ((CURVES_PNG, "Learning curves"), (DIFFERENCES_PNG, "Differences to baseline"),
                          (COSTS_PNG, "Loss against parameters and KV cache per token"),
                          (LENGTHS_PNG, "Loss and accuracy by context length"),
                          (PROBES_PNG, "Mechanism probes per variant"),
                          (COMPREHENSIVE_PNG, "Comprehensive comparison (the seed's six panels)")):
        if name in figures:
            parts += [f"### {caption}", "", f"![{caption}]({name})", ""]
            if name == COSTS_PNG and decode is not None:
                parts += [f"The third panel: {decode.caption()}.", ""]
    parts += ["## All runs", "", sections["all_runs"].markdown(),
              f"Every run is also in `{RESULTS_JSON}` (the seed's schema, one entry per run).", ""]
    return "\n".join(parts)


def refuse_overwriting(out_dir: Path, input_path: Path | None) -> None:
    if input_path is not None and input_path.is_file() and \
            (Path(out_dir) / RESULTS_JSON).resolve() == input_path.resolve():
        raise SourceError(f"--out {out_dir}: writing {RESULTS_JSON} there would overwrite the input "
                          f"{input_path}; choose another --out")


def build(runs: list[Run], out_dir, source: str, input_path: Path | None = None,
          min_effect: float = stats.MIN_EFFECT, decode=None, figures: bool = True) -> Report:
    """Compute every table and write every file. input_path: the file read, never overwritten.
    min_effect: the smallest difference worth resolving, in nats (the seeds-where-needed plan).
    decode: measured decode speeds (analysis.decode.DecodeSpeeds) for the cost figure, or None.
    figures: False writes no figures (the tables, report.md and the JSON only)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SourceError(f"--out {out_dir}: exists and is not a directory")
    refuse_overwriting(out_dir, input_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = tables.build_sections(runs, audit(runs))
    files = {RESULTS_JSON: out_dir / RESULTS_JSON}
    sections.append(_seed_plan(runs, out_dir, min_effect, files))
    by_key = {s.key: s for s in sections}
    title = f"Attention architecture search ({len(runs)} runs)"
    files[RESULTS_JSON].write_text(json.dumps(to_seed_schema(runs), indent=2) + "\n")
    if figures and any(r.succeeded for r in runs):  # matplotlib is most of a report's time
        files[COMPREHENSIVE_PNG] = plots.comprehensive_figure(runs, out_dir / COMPREHENSIVE_PNG, title)
        files[CURVES_PNG] = plots.curves_figure(runs, out_dir / CURVES_PNG, "Learning curves")
        files[COSTS_PNG] = plots.costs_figure(runs, out_dir / COSTS_PNG, "What each design costs", decode)
        differences = plots.differences_figure(runs, out_dir / DIFFERENCES_PNG,
                                               "Difference to baseline, paired by seed")
        if differences is not None:
            files[DIFFERENCES_PNG] = differences
        lengths = plots.lengths_figure(runs, out_dir / LENGTHS_PNG,
                                       "Longer contexts than trained on (--eval_lengths)")
        if lengths is not None:
            files[LENGTHS_PNG] = lengths
        probes = plots.probes_figure(runs, out_dir / PROBES_PNG,
                                     "Mechanism probes at the final evaluation (mean over layers; a point per seed)")
        if probes is not None:
            files[PROBES_PNG] = probes
    files[REPORT] = out_dir / REPORT
    files[REPORT].write_text(_markdown(source, runs, by_key, files, decode))
    return Report(source, runs, sections, files)


def _seed_plan(runs: list[Run], out_dir: Path, min_effect: float, files: dict) -> tables.Section:
    """The seeds-where-needed section, and its sweep YAML in out_dir when some comparison needs seeds."""
    comparisons = stats.compare_to_baseline(runs, tables.BASELINE)
    needs = stats.seeds_where_needed(comparisons, stats.seed_noise(runs, comparisons), min_effect)
    try:
        sweep = seedplan.plan_sweep(runs, needs, min_effect)
    except seedplan.PlanError as exc:
        section = tables.seeds_where_needed(runs, min_effect)
        section.lines += ["", f"No sweep written: {exc}."]
        return section
    if sweep is None:
        return tables.seeds_where_needed(runs, min_effect)
    files[seedplan.PLAN_YAML] = out_dir / seedplan.PLAN_YAML
    seedplan.write_plan(sweep, files[seedplan.PLAN_YAML])
    return tables.seeds_where_needed(runs, min_effect, seedplan.PLAN_YAML)


def terminal_text(report: Report) -> str:
    by_key = {s.key: s for s in report.sections}
    order = [key for _, keys in LAYOUT for key in keys] + ["all_runs"]
    return "\n".join(by_key[key].markdown() for key in order if by_key[key].lines).replace("**", "")


def write_report(source, out_dir) -> Path:
    """The report of a results directory (or a seed-schema JSON) into out_dir; returns report.md's
    path. This is what local_sweep.py calls at the end of a sweep."""
    return build(load_path(source), out_dir, str(source), Path(source)).path


# --- W&B ----------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "local"


def log_to_wandb(report: Report, project_path: str, group: str | None, wandb_dir=None):
    """One run of job_type "analysis": a wandb.Table per table, a wandb.Image per figure, and an
    Artifact holding every file. Works offline (WANDB_MODE=offline). Returns the run's id."""
    import wandb

    entity, _, project = project_path.rpartition("/")
    run = wandb.init(project=project, entity=entity or None, job_type="analysis", group=group,
                     name=f"analysis-{group or 'local'}", dir=wandb_dir,
                     config={"source": report.source, "runs": len(report.runs)})
    try:
        for section in report.sections:
            if section.columns:
                run.log({f"tables/{section.key}": wandb.Table(columns=section.columns, data=section.rows,
                                                               allow_mixed_types=True)})
        for name, path in report.files.items():
            if name.endswith(".png"):
                run.log({f"figures/{Path(name).stem}": wandb.Image(str(path))})
        artifact = wandb.Artifact(f"analysis-{_slug(group or 'local')}", type="analysis-report",
                                  description=f"attnsweep report of {report.source}")
        for path in report.files.values():
            artifact.add_file(str(path))
        run.log_artifact(artifact)
        return run.id
    finally:
        run.finish()


# --- the command line ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the contract for bad input
        raise SourceError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", metavar="ENTITY/PROJECT/SWEEP_ID", help="the runs of a W&B sweep")
    source.add_argument("--project", metavar="ENTITY/PROJECT", help="the runs of a W&B project (see --filters)")
    source.add_argument("--results", metavar="PATH", action="append", help="a results directory of run records "
                        "(searched below), or a seed-schema JSON; repeat it to pool several sweeps' records")
    parser.add_argument("--group", metavar="GROUP", help="with --project: the runs of that W&B group (a synced "
                        "local_sweep.py sweep's runs have its sweep id as their group)")
    parser.add_argument("--filters", metavar="JSON", help='W&B run filters for --project, e.g. \'{"group": "abc"}\'')
    parser.add_argument("--out", required=True, metavar="DIR", help="where the report and figures go")
    parser.add_argument("--min-effect", type=float, default=stats.MIN_EFFECT, metavar="NATS",
                        help=f"the smallest difference in val loss worth resolving (default {stats.MIN_EFFECT}): "
                        "a comparison whose 95%% interval still holds one this large is unresolved, and the "
                        "report writes a sweep YAML with more seeds for it")
    parser.add_argument("--decode", metavar="FILE", help="bench.decode's --out JSON: the cost figure adds loss "
                        "against measured decode tokens/s")
    parser.add_argument("--decode-context", type=int, metavar="N", help="with --decode: the context of the speeds "
                        "(default: the longest every variant in the file has)")
    parser.add_argument("--decode-batch", type=int, metavar="N", help="with --decode: the batch (default: the smallest)")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="the tables, report.md and the seed-schema JSON only: no figures (drawing them is "
                        "most of the report's time)")
    parser.add_argument("--log", "--log-to-wandb", dest="log_to_wandb", action="store_true",
                        help="also log the tables, figures and files to a W&B run of job_type 'analysis'")
    return parser


def wandb_path(option: str, text: str, shape: str) -> list[str]:
    """ENTITY/PROJECT[/SWEEP_ID] split into its parts, or one error line naming the option."""
    parts = text.split("/")
    if len(parts) != shape.count("/") + 1 or not all(parts):
        raise SourceError(f"{option} {text!r}: expected {shape}")
    return parts


def _load(args) -> tuple[list[Run], str, str, str | None]:
    """(runs, source in words, the W&B project for --log, the group)."""
    if args.filters and not args.project:
        raise SourceError("--filters: only used with --project")
    if args.group and not args.project:
        raise SourceError("--group: only used with --project")
    if args.min_effect <= 0 or not math.isfinite(args.min_effect):
        raise SourceError(f"--min-effect {args.min_effect}: must be a positive number of nats")
    if args.results:
        runs = [run for path in args.results for run in load_path(path)]
        project = Counter(r.config.get("project") or "attnsweep" for r in runs).most_common(1)[0][0]
        groups = {r.group for r in runs if r.group}
        return runs, " + ".join(args.results), project, groups.pop() if len(groups) == 1 else None
    if args.sweep:
        parts = wandb_path("--sweep", args.sweep, "ENTITY/PROJECT/SWEEP_ID")
        project_path, filters, group, what = "/".join(parts[:2]), {"sweep": parts[2]}, parts[2], f"sweep {args.sweep}"
    else:
        wandb_path("--project", args.project, "ENTITY/PROJECT")
        try:
            filters = json.loads(args.filters) if args.filters else {}
        except json.JSONDecodeError as exc:
            raise SourceError(f"--filters {args.filters!r}: not valid JSON ({exc})") from None
        if not isinstance(filters, dict):
            raise SourceError(f"--filters {args.filters!r}: must be a JSON object")
        project_path, group, what = args.project, None, f"project {args.project}"
        if args.group:
            if filters.get("group", args.group) != args.group:
                raise SourceError(f"--group {args.group} and --filters' group {filters['group']!r} disagree")
            filters, group, what = {**filters, "group": args.group}, args.group, f"group {args.group} of {what}"
    try:
        runs = load_wandb(project_path, filters)
    except Exception as exc:  # network, auth, a missing project: say which, without a traceback
        raise RuntimeError(f"could not read the runs of {what} from W&B: {exc}") from None
    if not runs:
        raise SourceError(f"--{'sweep' if args.sweep else 'project'} {args.sweep or args.project}: "
                          "no training runs found (runs with an 'attention' config)")
    return runs, what, project_path, group


def error_exit(exc: Exception) -> int:
    """One `error:` line; exit 2 for bad input (SourceError), 1 for what failed (W&B, ...)."""
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, SourceError) else 1


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        runs, source, project, group = _load(args)
        inputs = [Path(p) for p in args.results or []]
        for path in inputs[1:]:  # build checks the first
            refuse_overwriting(Path(args.out), path)
        if (args.decode_context or args.decode_batch) and not args.decode:
            raise SourceError("--decode-context/--decode-batch: only used with --decode")
        decode = (decode_speeds.speeds(decode_speeds.load(args.decode), args.decode, args.decode_context,
                                       args.decode_batch) if args.decode else None)
        report = build(runs, args.out, source, inputs[0] if inputs else None, args.min_effect, decode, args.figures)
    except (SourceError, RuntimeError) as exc:
        return error_exit(exc)
    print(terminal_text(report))
    for path in report.files.values():
        print(f"wrote {path}")
    if args.log_to_wandb:
        try:
            run_id = log_to_wandb(report, project, group)
        except Exception as exc:  # the files are written; say what failed and exit non-zero
            print(f"error: logging the report to W&B failed: {exc}", file=sys.stderr)
            return 1
        print(f"logged to W&B: project {project}, run {run_id} (job_type analysis)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
