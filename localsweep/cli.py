"""The command line of local_sweep.py: options, preparing (or resuming) a sweep, and the exit codes."""
import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from record import one_line

from .common import ROOT, Stop, SweepError, new_id
from .engine import run_sweep
from .macros import DEFAULT_COMMAND
from .runner import Runner, cores, threads_per_run
from .state import STATE_FILE, STATE_SCHEMA, Sweep
from .table import continue_hint, runs_text, summarize
from .validate import (bad_values, check_early_terminate, check_engine, check_schema, grid_size_and_runs, load_sweep,
                       resolve_program)

EXIT_OK, EXIT_BAD_INPUT = 0, 2
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}



class Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, like every other bad input
        print(f"error: {message} (usage: {one_line(self.format_usage().split(':', 1)[1])})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parse_args(argv):
    parser = Parser(prog="local_sweep.py", description="Run a W&B sweep YAML offline on this machine.")
    parser.add_argument("sweep", nargs="*", help="the sweep YAML (optional with --resume: the sweep's saved copy is "
                        "used); several run one after another, each its own sweep, results and report (all are "
                        "checked before the first starts)")
    parser.add_argument("--count", type=int, help="at most this many runs in the sweep in all (required for "
                        "random and bayes; a grid stops at its end)")
    parser.add_argument("--results-dir", help="where sweeps and records go (default: the sweep's results_dir, "
                        "else ./results)")
    parser.add_argument("--resume", metavar="SWEEP_DIR_OR_ID", help="continue that sweep: finished runs are "
                        "kept, interrupted ones re-run from their checkpoint")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: also re-run failed and "
                        "diverged runs")
    parser.add_argument("--report-dir", help="where the report goes (default: <sweep dir>/report)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    parser.add_argument("--then-stage2", action="store_true", help="the sweep is stage 1 of the tuning protocol "
                        "(variant x lr): afterwards write stage 2 (each variant at its best lr, fresh seeds, "
                        "scored on test) to <sweep dir>/stage2.yaml, run it, and write the tuning report")
    parser.add_argument("--stage2-seeds", type=int, default=3, help="with --then-stage2: fresh seeds in stage 2")
    parser.add_argument("--subprocess", action="store_true", help="start every run as a fresh process, as wandb "
                        "agent does (otherwise train.py under the default command is forked from this process "
                        "after importing torch and wandb once)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="run N runs at once, as N agents on "
                        "one machine would (default 1: one after another, with the threads the environment gives); "
                        "each is still its own process, W&B run, record and log, with max(1, cores // N) torch "
                        "threads, because a step of a small model (d_model 64) gets more done per core on one "
                        "thread than on two, so a sweep of small runs ends sooner (docs/PERF.md); a run's numbers "
                        "are those it gives one by one at the same thread count")
    args = parser.parse_args(argv)
    args.sweeps, args.sweep = args.sweep, (args.sweep[0] if args.sweep else None)
    if len(args.sweeps) > 1:
        for option, given in (("--resume", args.resume), ("--then-stage2", args.then_stage2),
                              ("--report-dir", args.report_dir), ("--count", args.count)):
            if given:
                parser.error(f"{option} goes with one sweep YAML, not {len(args.sweeps)}")
    if args.parallel < 1:
        parser.error(f"--parallel={args.parallel}: must be at least 1")
    if args.sweep is None and args.resume is None:
        parser.error("give a sweep YAML (or --resume SWEEP_ID)")
    if args.count is not None and args.count < 1:
        parser.error(f"--count={args.count}: must be at least 1")
    if args.retry_failed and not args.resume:
        parser.error("--retry-failed goes with --resume")
    if args.then_stage2 and args.stage2_seeds < 2:
        parser.error(f"--stage2-seeds={args.stage2_seeds}: a paired test needs at least 2")
    return args


def check(config: dict, label: str, count: int | None) -> tuple[str, int | None, int | None]:
    """Refuse a sweep config that cannot run (SweepError); else (method, count, total runs)."""
    check_schema(config, label)
    check_engine(config, label)
    check_early_terminate(config, label)
    method = config["method"]
    if isinstance(config.get("run_cap"), int) and config["run_cap"] > 0:
        count = min(count or config["run_cap"], config["run_cap"])
    if method != "grid" and count is None:
        raise SweepError(f"{label}: method {method} never runs out of suggestions: give --count N")
    total, grid_runs = (grid_size_and_runs(config) if method == "grid" else (count, None))
    if method == "grid" and count:
        total = min(total, count)
    problems = bad_values(config, grid_runs)
    if problems:
        raise SweepError(f"{label}: bad values: " + "; ".join(problems))
    program = config.get("program")
    command = [str(c) for c in (config.get("command") or DEFAULT_COMMAND)]
    if "${program}" in command and not Path(resolve_program(str(program))).exists():
        raise SweepError(f"{label}: program {program!r} not found (looked in {Path.cwd()} and {ROOT})")
    return method, count, total


def prepare(args) -> tuple[Sweep, dict, Path, list[dict], int | None, int | None]:
    """Everything that can refuse the sweep, before anything is written or run."""
    config = load_sweep(Path(args.sweep)) if args.sweep else None
    fixed_results = ((config or {}).get("parameters") or {}).get("results_dir")
    fixed_results = fixed_results.get("value") if isinstance(fixed_results, dict) else None
    results_dir = Path(args.results_dir or fixed_results or "results").resolve()
    sweep, redo = None, []
    if args.resume:
        candidate = Path(args.resume)
        sweep_dir = candidate if (candidate / STATE_FILE).exists() else results_dir / args.resume
        if not (sweep_dir / STATE_FILE).exists():
            raise SweepError(f"--resume {args.resume}: no sweep there (looked for {candidate / STATE_FILE} "
                             f"and {results_dir / args.resume / STATE_FILE})")
        sweep = Sweep.load(sweep_dir.resolve())
        sweep.lock()
        sweep.state = Sweep.load(sweep.dir).state  # re-read: the state as a previous holder left it
        saved = load_sweep(sweep.dir / "sweep.yaml")
        if config is not None and config != saved:
            print(f"warning: {args.sweep} differs from the sweep's saved copy; continuing with "
                  f"{sweep.dir / 'sweep.yaml'}", file=sys.stderr)
        config, results_dir = saved, Path(sweep.state["results_dir"])
    label = args.sweep or str(sweep.dir / "sweep.yaml")
    method, count, total = check(config, label, args.count or (sweep.state.get("count") if sweep else None))
    if sweep is None:
        sweep_id = new_id()
        while (results_dir / sweep_id).exists():
            sweep_id = new_id()
        try:
            (results_dir / sweep_id / "logs").mkdir(parents=True)
        except OSError as err:
            raise SweepError(f"--results-dir {results_dir}: cannot create the sweep there "
                             f"({err.strerror or err})") from None
        shutil.copyfile(args.sweep, results_dir / sweep_id / "sweep.yaml")
        sweep = Sweep(results_dir / sweep_id, {
            "state_schema": STATE_SCHEMA, "sweep_id": sweep_id, "sweep_file": args.sweep,
            "results_dir": str(results_dir), "method": method, "count": count, "total": total,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False, "runs": []})
        sweep.lock()
        sweep.save()
    else:
        sweep.state.update({"count": count, "total": total, "complete": False})
        wanted = {"interrupted", "running", "pending"} | ({"failed", "diverged"} if args.retry_failed else set())
        redo = [e for e in sweep.runs if e["status"] in wanted]
        sweep.save()
    return sweep, config, results_dir, redo, count, total


def install_stop_handlers() -> None:
    """SIGTERM and SIGHUP stop the sweep like Ctrl-C; a signal ignored by whoever started us
    (nohup ignores SIGHUP) stays ignored."""
    def handler(signum, frame):
        raise Stop(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, handler)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.sweeps) > 1:
        return run_in_turn(args)
    code, sweep, runner = run_one(args)
    if code != EXIT_OK or not args.then_stage2:
        return code
    return run_stage2(args, sweep, runner)


def run_in_turn(args) -> int:
    """Several sweep YAMLs, one after another, each an ordinary sweep: every one is checked first (a
    bad second file must not cost the first's runs), then each runs; a stop or a refusal ends the
    turn with its exit code. The reports' paths come last, together."""
    try:
        for path in args.sweeps:
            check(load_sweep(Path(path)), path, None)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    reports = []
    for path in args.sweeps:
        code, sweep, _ = run_one(argparse.Namespace(**{**vars(args), "sweep": path}))
        if code != EXIT_OK:
            return code
        reports += [path for path in sweep.reports if path not in reports]
        print(flush=True)
    if reports:
        print("reports:\n" + "\n".join(f"  {path}" for path in reports), flush=True)
    return EXIT_OK


def run_stage2(args, stage1: Sweep, runner: Runner) -> int:
    """Stage 2 of the tuning protocol after stage 1 ran to its end: its YAML from stage 1's
    records, then an ordinary sweep of it, then the tuning report beside its own."""
    from analysis import tuning

    records = sorted({runner.records_dir(e) for e in stage1.runs})
    yaml_path = stage1.dir / tuning.STAGE2_NAME
    try:
        if len(records) != 1:
            raise SweepError(f"stage 1's records are in {len(records)} directories; expected one")
        tuning.write_stage2(str(records[0]), yaml_path, args.stage2_seeds, template=stage1.dir / "sweep.yaml")
    except (tuning.SourceError, SweepError) as err:
        print(f"error: cannot build stage 2: {one_line(err)}", file=sys.stderr)
        return 1
    print(f"\nstage 2: {yaml_path}", flush=True)
    stage2_args = argparse.Namespace(**{**vars(args), "sweep": str(yaml_path), "resume": None, "count": None,
                                        "report_dir": None, "then_stage2": False,
                                        "results_dir": args.results_dir or stage1.state["results_dir"]})
    code, sweep, runner2 = run_one(stage2_args)
    if code != EXIT_OK:
        return code
    try:
        path = tuning.write_report(tuning.load_source(str(records[0])),
                                   tuning.load_source(str(runner2.records_dir(sweep.runs[0]))),
                                   sweep.dir / "tuning_report", f"stage 1 {stage1.id}, stage 2 {sweep.id}")
    except Exception as err:  # the runs stand; say what failed
        print(f"warning: the tuning report failed ({type(err).__name__}: {one_line(err)[:300]})", file=sys.stderr)
        return EXIT_OK
    print(f"tuning report: {path}")
    return EXIT_OK


def run_one(args) -> tuple[int, Sweep | None, Runner | None]:
    """Prepare (or resume) one sweep and run it; (exit code, the sweep, its runner)."""
    try:
        sweep, config, results_dir, redo, count, total = prepare(args)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT, None, None
    except KeyboardInterrupt:
        return SIGNAL_EXIT[signal.SIGINT], None, None
    install_stop_handlers()
    done = sum(e["status"] == "finished" for e in sweep.runs)
    verb = "resuming" if args.resume else "sweep"
    if args.parallel > 1:
        sweep.state["parallel"] = args.parallel  # for the hint to continue it
        sweep.save()
    else:
        sweep.state.pop("parallel", None)
    threads = threads_per_run(args.parallel, cores())
    at_once = f", {args.parallel} at once, {threads} thread{'s' if threads > 1 else ''} each" if threads else ""
    print(f"{verb} {sweep.id}: {sweep.state['sweep_file']} ({config['method']}, {runs_text(total)}{at_once}"
          f"{f', {done} finished already, {len(redo)} to re-run' if args.resume else ''}) -> {sweep.dir}", flush=True)
    runner = None
    try:  # the runner imports train.py's modules once (forked.py): seconds, so after the line above
        runner = Runner(sweep, config, results_dir, total, live=sys.stdout.isatty(), fork=not args.subprocess,
                        parallel=args.parallel)
        stopped = run_sweep(sweep, config, runner, count, redo)
    except KeyboardInterrupt:
        stopped = signal.SIGINT
    except Stop as err:
        stopped = err.signum
    if stopped:
        for entry in sweep.runs:  # a run this script was waiting on when it was stopped
            if entry["status"] in ("running", "pending"):
                entry["status"] = "interrupted"
        sweep.save()
        print(f"\nsweep {sweep.id} stopped by {signal.Signals(stopped).name}; its state is in {sweep.dir / STATE_FILE}.")
        print(f"continue with: {continue_hint(sweep, results_dir)}", flush=True)
        return SIGNAL_EXIT.get(stopped, 130), sweep, runner
    sweep.state["complete"] = True
    sweep.save()
    summarize(sweep, runner, args)
    return EXIT_OK, sweep, runner


if __name__ == "__main__":
    sys.exit(main())
