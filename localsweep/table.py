"""The end of a sweep: the results table, the summary and the report."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import record
from record import number, one_line

from .state import Sweep

if TYPE_CHECKING:
    from .runner import Runner  # the runner shows swept_text in its progress lines: no import cycle at run time


def runs_text(n) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def continue_hint(sweep: Sweep, results_dir: Path) -> str:
    default = Path("results").resolve() == results_dir.resolve()
    where = "" if default else f" --results-dir {results_dir}"
    parallel = f" --parallel {sweep.state['parallel']}" if sweep.state.get("parallel", 1) > 1 else ""
    return f"python local_sweep.py {sweep.state['sweep_file']} --resume {sweep.id}{where}{parallel}"


def swept_names(config: dict) -> list[str]:
    """The parameters that vary between runs, beyond the variant and seed already in a run's name."""
    return [name for name, spec in config.get("parameters", {}).items()
            if not (isinstance(spec, dict) and "value" in spec) and name not in ("attention", "seed")]


def swept_text(entry: dict, names: list[str]) -> str:
    def show(value):
        return format(value, ".4g") if isinstance(value, float) else str(value)

    return " ".join(f"{n}={show(entry['params'][n])}" for n in names if n in entry["params"])


def results_table(sweep: Sweep, swept: list[str] = ()) -> str:
    def fmt(value, spec, scale=1.0):
        value = number(value)
        return "-" if value is None else format(value * scale, spec)

    rows = []
    for entry in sweep.runs:
        m = entry.get("metrics", {})
        loss = number(m.get(record.VAL_LOSS))
        order = (entry["status"] != "finished" or loss is None, loss if loss is not None else math.inf, entry["index"])
        seconds = m.get(record.TIME_TOTAL) if number(m.get(record.TIME_TOTAL)) is not None else entry.get("elapsed_s")
        rows.append((order, [entry["name"]] + ([swept_text(entry, swept)] if swept else []) + [entry["status"], fmt(loss, ".4f"), fmt(m.get(record.VAL_ACCURACY), ".4f"),
                             fmt(m.get(record.PARAMS_TOTAL), ".3f", 1e-6), fmt(seconds, ".1f"),
                             fmt(m.get(record.MEMORY_PEAK), ".3f")]))
    header = ["run"] + (["values"] if swept else []) + ["status", "val loss", "accuracy", "params (M)", "time (s)",
                                                          "peak mem (GB)"]
    left = 3 if swept else 2
    body = [cells for _, cells in sorted(rows, key=lambda r: r[0])]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(records_dir: Path, out_dir: Path) -> Path | None:
    """The report of records_dir into out_dir: its path, or None (with a warning) if it failed."""
    from analysis import report

    try:
        written = report.write_report(records_dir, out_dir)
    except Exception as err:  # a failing report must not cost the sweep: its results stand
        print(f"warning: the report failed ({type(err).__name__}: {one_line(err)[:300]}); "
              f"the results are in {records_dir}", file=sys.stderr)
        return None
    path = Path(written)
    print(f"report: {path}")
    return path


def summarize(sweep: Sweep, runner: Runner, args) -> None:
    counts = {}
    for entry in sweep.runs:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    print()
    print(results_table(sweep, swept_names(runner.config)))
    print()
    print(f"{runs_text(len(sweep.runs))}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    failed = [e for e in sweep.runs if e["status"] != "finished"]
    for entry in failed:
        print(f"  {entry['name']} ({entry['id']}) {entry['status']}: {entry.get('error')}  [log: {entry.get('log')}]")
    records = {runner.records_dir(e) for e in sweep.runs} or {runner.results_dir / sweep.id}
    print(f"results: {', '.join(str(r) for r in sorted(records))}   logs: {sweep.dir / 'logs'}")
    if (sweep.dir / "wandb").is_dir() and any((sweep.dir / "wandb").glob("offline-run-*")):
        print(f"offline W&B runs: wandb sync {sweep.dir / 'wandb'}/offline-run-*")
    if failed and any(e["status"] in ("failed", "diverged") for e in failed):
        print(f"re-run the failed ones: {continue_hint(sweep, runner.results_dir)} --retry-failed")
    if not args.no_report:
        out_dir = Path(args.report_dir) if args.report_dir else sweep.dir / "report"
        written = (write_report(records_dir, out_dir) for records_dir in sorted(records))
        sweep.reports = [path for path in written if path is not None]
