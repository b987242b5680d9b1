"""The sweep loop: W&B's engine hands out each next run, given the runs so far; its hyperband
stopping (`early_terminate`) decides, while a run runs, whether to stop it; a run reaching
`metric.target` ends the hand-out of new runs."""
import sys

from record import number, one_line

from .common import import_engine, new_id, plain
from .runner import Runner
from .state import Sweep
from .wandb_file import run_history

# our run statuses -> W&B's run states, as the engine sees them
ENGINE_STATES = {"finished": "finished", "failed": "failed", "diverged": "failed", "interrupted": "preempted",
                 "stopped": "killed", "running": "running", "pending": "pending"}

def engine_runs(sweep: Sweep, metric: str) -> list:
    """The runs so far, as W&B's engine sees them: state, config and the metric."""
    sweeps = import_engine()
    runs = []
    for entry in sweep.runs:
        summary = {k: v for k, v in entry.get("metrics", {}).items() if k == metric and number(v) is not None}
        runs.append(sweeps.SweepRun(
            name=entry["id"], state=ENGINE_STATES.get(entry["status"], "failed"),
            config={k: {"value": v} for k, v in entry["params"].items()},
            summary_metrics=summary, history=entry.get("metric_history") or []))
    return runs


def early_stop_check(sweep: Sweep, config: dict, entry: dict, metric: str):
    """For a sweep with `early_terminate`: a function that says whether the running `entry` should
    stop now, by W&B's own hyperband (`sweeps.stop_runs`) over every run's metric history -- the
    running one's read from its offline W&B run, as the server reads it online. None without
    early_terminate."""
    if not config.get("early_terminate"):
        return None
    sweeps = import_engine()

    def should_stop() -> bool:
        rows = run_history(sweep.dir / "wandb", entry["id"])
        entry["metric_history"] = [{"step": row.get("_step"), metric: row[metric]} for row in rows
                                   if number(row.get(metric)) is not None]
        try:
            runs = engine_runs(sweep, metric)
            stop = [run for run in sweeps.stop_runs(config, runs, validate=False) if run.name == entry["id"]]
        except Exception as err:  # the engine failing on odd histories must not cost the running run
            print(f"warning: early_terminate check failed ({one_line(err)[:200]}); the run goes on",
                  file=sys.stderr)
            return False
        if stop:
            # the engine's line for this run: "Run: <id> Step: n  (Band: b Metric: m Threshold: t)  STOP"
            lines = [line for line in (stop[0].early_terminate_info or {}).get("lines") or []
                     if line.startswith(f"Run: {entry['id']} ")]
            detail = " ".join(lines[-1].replace("STOP", "").split()[2:]) if lines else ""
            entry["stop_reason"] = f"stopped early by hyperband ({detail})" if detail else "stopped early by hyperband"
        return bool(stop)

    return should_stop


def best_value(entry: dict, metric: str, goal: str) -> float | None:
    values = [row.get(metric) for row in entry.get("metric_history") or []] + [entry.get("metrics", {}).get(metric)]
    values = [v for v in values if number(v) is not None]
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def target_reached_by(sweep: Sweep, config: dict) -> dict | None:
    """The first run that reached `metric.target` (W&B: "the sweep will finish once any run reaches
    the goal for this value": no new runs; runs already going finish): its best value of the
    metric, <= target when minimizing, >= when maximizing."""
    metric = config.get("metric") or {}
    target = number(metric.get("target"))
    if target is None:
        return None
    goal = metric.get("goal", "minimize")
    for entry in sweep.runs:
        value = best_value(entry, metric.get("name"), goal)
        if value is not None and (value >= target if goal == "maximize" else value <= target):
            return entry
    return None


def run_name_of(params: dict, fallback: str) -> str:
    from config import ConfigError, config_from_values

    try:
        return config_from_values(params).run_name
    except (ConfigError, TypeError, ValueError):
        return fallback


def run_sweep(sweep: Sweep, config: dict, runner: Runner, count: int | None, redo: list[dict]) -> int | None:
    """Re-run `redo` (interrupted, or failed with --retry-failed), then ask the engine for new runs
    until the grid is done or `count` runs exist. Returns the signal that stopped it, or None."""
    sweeps = import_engine()
    metric = runner.metric_name()
    for entry in redo:
        if entry["status"] in ("failed", "diverged"):  # a failed run starts afresh, as a new W&B run;
            # an interrupted one keeps its id, so train.py continues it from its checkpoint
            entry.setdefault("previous_ids", []).append(entry["id"])
            entry["id"] = new_id()
        stopped = runner.execute(entry, early_stop_check(sweep, config, entry, metric))
        if stopped:
            return stopped
    while count is None or len(sweep.runs) < count:
        reached = target_reached_by(sweep, config)
        if reached:
            sweep.state["target_reached_by"] = reached["id"]
            print(f"{reached['name']} ({reached['id']}) reached the metric target "
                  f"{metric}={config['metric']['target']}: the sweep hands out no new runs", flush=True)
            break
        suggestion = sweeps.next_run(config, engine_runs(sweep, metric), validate=True)
        if suggestion is None:
            break
        params = plain({k: v["value"] for k, v in suggestion.config.items()})
        run_id = new_id()
        args = runner.run_args(params)
        entry = {"index": len(sweep.runs) + 1, "id": run_id, "name": run_name_of(args, f"run-{run_id}"),
                 "params": params, "args": args, "status": "pending", "metrics": {}}
        sweep.runs.append(entry)
        sweep.save()
        stopped = runner.execute(entry, early_stop_check(sweep, config, entry, metric))
        if stopped:
            return stopped
    return None
