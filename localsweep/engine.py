"""The sweep loop: W&B's engine hands out each next run, given the runs so far."""
from .common import import_engine, new_id, number, plain
from .runner import Runner
from .state import Sweep

# our run statuses -> W&B's run states, as the engine sees them
ENGINE_STATES = {"finished": "finished", "failed": "failed", "diverged": "failed", "interrupted": "preempted",
                 "running": "running", "pending": "pending"}



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
        stopped = runner.execute(entry)
        if stopped:
            return stopped
    while count is None or len(sweep.runs) < count:
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
        stopped = runner.execute(entry)
        if stopped:
            return stopped
    return None
