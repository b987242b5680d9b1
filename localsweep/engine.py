"""The sweep loop: W&B's engine hands out each next run, given the runs so far (those in flight
too, with --parallel N); its hyperband stopping (`early_terminate`) decides, while runs run, which
to stop; a run reaching `metric.target` ends the hand-out of new runs."""
import signal
import sys

from record import number, one_line

from .common import Stop, import_engine, new_id, plain
from .runner import Flight, Runner, signals_held
from .state import Sweep
from .wandb_file import run_history

# our run statuses -> W&B's run states, as the engine sees them
ENGINE_STATES = {"finished": "finished", "failed": "failed", "diverged": "failed", "interrupted": "preempted",
                 "stopped": "killed", "running": "running", "pending": "pending"}

def engine_runs(sweep: Sweep, metric: str, cut: dict[str, int] | None = None) -> list:
    """The runs so far, as W&B's engine sees them: state, config and the metric. `cut`: run id ->
    how many of that run's evaluations to show (its history as it was then)."""
    sweeps = import_engine()
    runs = []
    for entry in sweep.runs:
        summary = {k: v for k, v in entry.get("metrics", {}).items() if k == metric and number(v) is not None}
        history = entry.get("metric_history") or []
        if cut and entry["id"] in cut:
            history = history[:cut[entry["id"]]]
        runs.append(sweeps.SweepRun(
            name=entry["id"], state=ENGINE_STATES.get(entry["status"], "failed"),
            config={k: {"value": v} for k, v in entry["params"].items()},
            summary_metrics=summary, history=history))
    return runs


def early_stopper(sweep: Sweep, config: dict, metric: str):
    """For a sweep with `early_terminate`: a function of the running entries that says which of them
    to stop now (their ids), by W&B's own hyperband (`sweeps.stop_runs`) over every run's metric
    history -- each running one's read from its offline W&B run, as the server reads it online, so
    with runs in flight side by side each is judged against the others' histories so far, as
    under N agents. None without early_terminate.

    W&B's engine judges a run at the latest band it has reached. A check comes every POLL_S and
    sees a run's history as of W&B's last flush of its file (every second), so a run logging
    evaluations faster than that can pass a band between two checks, and at the next band there may
    be no other run yet: its threshold is then its own value and it runs on (what failed the
    two-at-once test, traced). So a run is also judged at each band it passed since the last check,
    its history cut there, as a check at each evaluation would have judged it, each such band once
    (its latest band W&B's engine judges at every check). Live history stays W&B's file, not a stream of our own: it is what `wandb
    sync` uploads (the server's view) for any program that logs to W&B, it is flushed in both
    launch modes (2026-12-02, loaded 2 cores, --parallel 2: a forked train.py run's file grew
    7 -> 3587 -> 34502 -> 80029 bytes a second apart, a subprocess's ~1.3 KB a second), a read of 150
    evaluations costs 9 ms, and fresher history would not have saved the missed band: a check
    every second misses a band a run passes within 0.8 s however fresh its history."""
    if not config.get("early_terminate"):
        return None
    sweeps = import_engine()
    judged: dict[str, int] = {}  # run id -> how many of its evaluations a check has judged

    def engine_stops(cut: dict[str, int] | None = None) -> tuple[dict, list]:
        """(the runs the engine stops, by id; its bands, from what it says of each running run)"""
        runs = engine_runs(sweep, metric, cut)
        stopped = {run.name: run for run in sweeps.stop_runs(config, runs, validate=False)}
        bands = next((run.early_terminate_info["bands"] for run in runs
                      if "bands" in (run.early_terminate_info or {})), [])
        return stopped, bands

    def stops(running: list[dict]) -> set[str]:
        for entry in running:
            rows = run_history(sweep.dir / "wandb", entry["id"])
            entry["metric_history"] = [{"step": row.get("_step"), metric: row[metric]} for row in rows
                                       if number(row.get(metric)) is not None]
        try:
            stopped, bands = engine_stops()
            for entry in running:
                seen, now = judged.get(entry["id"], 0), len(entry["metric_history"])
                for band in (b for b in bands if seen < b < now):  # (cut at `now`: the check just made)
                    at_band = engine_stops({entry["id"]: band})[0].get(entry["id"])
                    if at_band is not None:  # the first band it fell behind at is its reason
                        stopped[entry["id"]] = at_band
                        break
                judged[entry["id"]] = now
        except Exception as err:  # the engine failing on odd histories must not cost the running runs
            print(f"warning: early_terminate check failed ({one_line(err)[:200]}); the runs go on",
                  file=sys.stderr)
            return set()
        ids = {entry["id"]: entry for entry in running}
        for run in stopped.values():
            entry = ids.get(run.name)
            if entry is None:
                continue
            # the engine's line for this run: "Run: <id> Step: n  (Band: b Metric: m Threshold: t)  STOP"
            lines = [line for line in (run.early_terminate_info or {}).get("lines") or []
                     if line.startswith(f"Run: {run.name} ")]
            detail = " ".join(lines[-1].replace("STOP", "").split()[2:]) if lines else ""
            entry["stop_reason"] = f"stopped early by hyperband ({detail})" if detail else "stopped early by hyperband"
        return {name for name in stopped if name in ids}

    return stops


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
    until the grid is done or `count` runs exist, with up to runner.parallel runs in flight. The
    engine is asked for a run when a slot is free, given every run so far, those in flight among
    them (`running`): a grid never hands out a point twice, bayes treats them as W&B's engine
    treats runs in flight under several agents. Returns the signal that stopped it, or None."""
    sweeps = import_engine()
    metric = runner.metric_name()
    redo, flight, early_stops = list(redo), Flight(), early_stopper(sweep, config, metric)
    handing_out = True

    def next_entry() -> dict | None:
        nonlocal handing_out
        if redo:
            entry = redo.pop(0)
            if entry["status"] in ("failed", "diverged"):  # a failed run starts afresh, as a new W&B run;
                # an interrupted one keeps its id, so train.py continues it from its checkpoint
                entry.setdefault("previous_ids", []).append(entry["id"])
                entry["id"] = new_id()
            return entry
        if not handing_out or (count is not None and len(sweep.runs) >= count):
            return None
        reached = target_reached_by(sweep, config)
        if reached:
            sweep.state["target_reached_by"] = reached["id"]
            print(f"{reached['name']} ({reached['id']}) reached the metric target "
                  f"{metric}={config['metric']['target']}: the sweep hands out no new runs", flush=True)
            handing_out = False
            return None
        suggestion = sweeps.next_run(config, engine_runs(sweep, metric), validate=True)
        if suggestion is None:
            handing_out = False
            return None
        params = plain({k: v["value"] for k, v in suggestion.config.items()})
        run_id = new_id()
        args = runner.run_args(params)
        entry = {"index": len(sweep.runs) + 1, "id": run_id, "name": run_name_of(args, f"run-{run_id}"),
                 "params": params, "args": args, "status": "pending", "metrics": {}}
        sweep.runs.append(entry)
        sweep.save()
        return entry

    while True:
        try:
            while flight.stopped_by is None and len(flight.runs) < runner.parallel:
                entry = next_entry()
                if entry is None:
                    break
                with signals_held():  # a run forked but not yet in flight would be left running
                    flight.runs.append(runner.start(entry, flight.runs))
            if not flight.runs:
                return flight.stopped_by
            for launch in flight.wait(early_stops):
                with signals_held():  # half settled, it would stay `running` and be run again
                    flight.runs.remove(launch)
                    runner.finish(launch)
        except (KeyboardInterrupt, Stop) as err:  # between waits: asking the engine, starting, settling
            flight.stop(err.signum if isinstance(err, Stop) else signal.SIGINT)
