"""Running runs: each one's params file, environment, command line and thread count, its output
into its log, the signals passed on to the runs in flight, and each one's status from its record or
exit code."""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import record
from record import find_record, number, one_line

from .common import Stop
from .forked import ForkedRun, can_fork, preload
from .macros import DEFAULT_COMMAND, expand_command, params_file_text, sweep_command_args
from .state import Sweep
from .table import swept_names, swept_text
from .validate import resolve_program

POLL_S = 1.0  # how often a running run's W&B history is read when the sweep has early_terminate
# W&B flushes an offline run's .wandb file every 15 s by default (x_transaction_log_flush_interval);
# hyperband reads a running run's history from there, so its runs flush every second (a forked run
# too: wandb reads the environment at its wandb.init, after forked.py has set the run's); how a
# check that comes up to ~2 s after an evaluation still judges it at its band: engine.early_stopper
FLUSH_INTERVAL_ENV = "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL"


def last_error_line(log: Path) -> str | None:
    """The last `error: ...` line a run printed, else its last line."""
    try:
        lines = [line.strip() for line in re.split(r"[\r\n]+", log.read_text(errors="replace")) if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1][:300] if lines else None


# One writer at a time on the terminal: the main thread's lines and each run's status line (with
# --parallel N, N output pumps write at once)
SCREEN = threading.Lock()


def say(text: str, live: bool) -> None:
    """A line for the user; on a terminal, over whatever status line a run's pump left there."""
    with SCREEN:
        if live:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)


def cores() -> int:
    """The CPUs this process may run on (its affinity: taskset, a cgroup's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_run(parallel: int, available: int) -> int | None:
    """Torch threads for each of `parallel` runs in flight on `available` cores; None for one run at
    a time, which keeps whatever the environment gives (OMP_NUM_THREADS, else torch's default)."""
    return None if parallel == 1 else max(1, available // parallel)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then act as they would have: a run
    cut off between its fork and joining the runs in flight would train on unseen, and a run cut
    off while being settled would stay `running` in the state and be run again."""
    held, saved = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if handler not in (signal.SIG_IGN, None):
            saved[sig] = handler
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])  # the restored handler acts on it now


class OutputPump(threading.Thread):
    """Copies a run's output into its log file; on a terminal, also shows its latest line
    (train.py's progress bar) as a transient status line."""

    def __init__(self, stream, log_file, prefix: str, live: bool):
        super().__init__(daemon=True)
        self.stream, self.log_file, self.prefix, self.live = stream, log_file, prefix, live
        self.last_shown = 0.0
        self.width = shutil.get_terminal_size((100, 20)).columns

    def run(self):
        # Ctrl-C / SIGTERM / SIGHUP must wake the main thread, which waits for the run: a signal the
        # kernel hands to this thread instead only interrupts its read(), and the main thread slept
        # on until the run ended (the Ctrl-C test hung this way when run after other test files)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        pending = ""
        while True:
            chunk = self.stream.read1(65536) if hasattr(self.stream, "read1") else self.stream.read(65536)
            if not chunk:
                break
            self.log_file.write(chunk)
            self.log_file.flush()
            if self.live:
                pending = (pending + chunk.decode("utf-8", "replace"))[-4096:]
                parts = [p for p in re.split(r"[\r\n]+", pending) if p.strip()]
                now = time.monotonic()
                if parts and now - self.last_shown > 0.3:
                    self.last_shown = now
                    text = f"{self.prefix} {parts[-1].strip()}"[: self.width - 1]
                    with SCREEN:
                        sys.stdout.write("\r\033[K" + text)
                        sys.stdout.flush()
        if self.live:
            with SCREEN:
                sys.stdout.write("\r\033[K")
                sys.stdout.flush()


def signal_group(proc, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Launch:
    """A run in flight: its state entry, its process (None when it could not start: `reason` says
    why), the thread copying its output into its log, and how it is being stopped."""

    def __init__(self, entry: dict, prefix: str, log_file, stop_file: Path):
        self.entry, self.prefix, self.log_file, self.stop_file = entry, prefix, log_file, stop_file
        self.proc = self.pump = self.rc = self.reason = None
        self.stopped_by = None  # the signal that stopped the sweep, when it was passed on to this run
        self.early = False  # whether early termination stopped it
        self.started_wall, self.started = time.time(), time.perf_counter()

    def ended(self) -> bool:
        if self.proc is None:
            return True
        self.rc = self.proc.poll()
        return self.rc is not None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            signal_group(self.proc, sig)

    def stop_early(self) -> None:
        """As wandb's agent stops a run: SIGTERM, after creating the stop file, which tells train.py
        that this SIGTERM is the sweep's stop (the run ends `stopped`, exit 0), not a preemption."""
        self.early = True
        self.stop_file.touch()
        self.signal(signal.SIGTERM)


class Flight:
    """The runs in flight, and the sweep's stop. A Ctrl-C (or SIGTERM/SIGHUP) is passed on to every
    run in flight -- each saves a checkpoint and stops at its next step --, a second one stops them
    at once, a third kills them; after the first, no run starts (`stopped_by`)."""

    def __init__(self):
        self.runs: list[Launch] = []
        self.stopped_by, self.asked = None, 0

    def stop(self, sig: int) -> None:
        self.stopped_by = self.stopped_by or sig
        self.asked += 1
        if not self.runs:
            return
        names = ", ".join(launch.entry["name"] for launch in self.runs)
        one = len(self.runs) == 1
        if self.asked == 1:
            print(f"\n{signal.Signals(sig).name}: stopping {names} ({'it saves' if one else 'each saves'} a "
                  f"checkpoint and stops at the next step; press Ctrl-C again to stop {'it' if one else 'them'} "
                  f"at once)", flush=True)
        elif self.asked == 2:
            print(f"stopping {names} at once (Ctrl-C again kills {'it' if one else 'them'})", flush=True)
        else:
            print(f"killing {names}", flush=True)
        for launch in self.runs:
            launch.stopped_by = launch.stopped_by or self.stopped_by
            launch.signal(sig if self.asked == 1 else signal.SIGINT if self.asked == 2 else signal.SIGKILL)

    def wait(self, early_stops=None) -> list[Launch]:
        """Wait until a run in flight ends; the runs that ended. A signal to this script is handled
        by `stop`. `early_stops(entries)` (early termination) is asked every POLL_S, until a signal
        stops the sweep, which of the running entries to stop now (a set of their ids)."""
        next_check = time.monotonic() + POLL_S
        while True:
            # Never a bare blocking wait: a signal the kernel hands to another thread (torch's or
            # wandb's, preloaded for forked runs) does not interrupt the main thread's waitpid, so
            # Ctrl-C was lost and the run trained on (the Ctrl-C tests hung so in a full suite run);
            # a short sleep returns to Python between polls, where the handler raises.
            try:
                ended = [launch for launch in self.runs if launch.ended()]
                if ended:
                    return ended
                if early_stops is not None and self.stopped_by is None and time.monotonic() >= next_check:
                    going = [launch for launch in self.runs if not launch.early]
                    stop_ids = early_stops([launch.entry for launch in going]) if going else set()
                    for launch in going:
                        if launch.entry["id"] in stop_ids:
                            launch.stop_early()
                    next_check = time.monotonic() + POLL_S
                time.sleep(0.05)
            except (KeyboardInterrupt, Stop) as err:
                self.stop(err.signum if isinstance(err, Stop) else signal.SIGINT)


class Runner:
    def __init__(self, sweep: Sweep, config: dict, results_dir: Path, total: int | None, live: bool,
                 fork: bool = True, parallel: int = 1):
        self.sweep, self.config, self.results_dir = sweep, config, results_dir
        self.total, self.live = total, live
        self.parallel, self.threads = parallel, threads_per_run(parallel, cores())
        self.program = resolve_program(str(config.get("program", "")))
        # train.py under the default command: fork each run after importing it once (forked.py)
        self.fork = fork and can_fork(config.get("command"), self.program) and preload(self.program)

    def run_args(self, engine_params: dict) -> dict:
        """The engine's values plus where the record goes, unless the sweep sets that itself."""
        params = dict(engine_params)
        params.setdefault("results_dir", str(self.results_dir))
        params.setdefault("group", self.sweep.id)
        return params

    def records_dir(self, entry: dict) -> Path:
        params = entry["args"]
        return Path(params.get("results_dir", self.results_dir)) / str(params.get("group") or self.sweep.id)

    def env(self, run_id: str, param_path: Path, group: str, stop_file: Path | None = None) -> dict:
        """The run's environment. No WANDB_SWEEP_ID: the server has never seen this local sweep's
        id, and `wandb sync` of runs carrying it fails (wandb#8115); wandb loads and locks the
        sweep's values from WANDB_SWEEP_PARAM_PATH alone. The sweep id is the run's W&B group and
        a tag instead, so the synced runs can be found together. With --parallel N, the run's
        threads (OMP_NUM_THREADS, MKL_NUM_THREADS: what torch reads when it starts)."""
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SWEEP_ID"}
        if env.get("WANDB_MODE") != "disabled":
            env["WANDB_MODE"] = "offline"  # a local sweep exists on no server
        tags = [t for t in env.get("WANDB_TAGS", "").split(",") if t] + [f"local-sweep-{self.sweep.id}"]
        env.update({
            "WANDB_SWEEP_PARAM_PATH": str(param_path), "WANDB_RUN_ID": run_id, "WANDB_RUN_GROUP": group,
            "WANDB_TAGS": ",".join(dict.fromkeys(tags)),
            "WANDB_PROJECT": str(self.config.get("project") or "attnsweep"), "WANDB_DIR": str(self.sweep.dir),
        })
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        if self.config.get("early_terminate"):
            env.setdefault(FLUSH_INTERVAL_ENV, "1")
        if stop_file is not None:
            env[record.STOP_FILE_ENV] = str(stop_file)
        if self.config.get("entity"):
            env["WANDB_ENTITY"] = str(self.config["entity"])
        env.setdefault("PYTHONUNBUFFERED", "1")
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "") if env.get("PATH") else bindir
        return env

    def start(self, entry: dict, others: list[Launch] = ()) -> Launch:
        """Start one entry of the state: its params file, log, environment and process, its output
        pumped into its log. `others`: the runs in flight, whose pipes and logs a forked run must
        not hold (nor its own log: this process writes it)."""
        sweep, run_id, name = self.sweep, entry["id"], entry["name"]
        base = sweep.dir / "wandb" / f"sweep-{sweep.id}"
        param_path, json_path = base / f"config-{run_id}.yaml", base / f"config-{run_id}.json"
        stop_file = base / f"stop-{run_id}"  # created when early termination stops the run
        base.mkdir(parents=True, exist_ok=True)
        stop_file.unlink(missing_ok=True)
        param_path.write_text(params_file_text(entry["args"]))
        command = self.config.get("command") or DEFAULT_COMMAND
        if "${args_json_file}" in [str(c) for c in command]:
            json_path.write_text(sweep_command_args(entry["args"])["args_json"][0])
        argv = expand_command(command, entry["args"], program=self.program, interpreter=sys.executable,
                              args_json_file=str(json_path))
        log = sweep.dir / "logs" / f"{name}-{run_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        entry.update({"status": "running", "log": str(log), "command": argv,
                      "started_as": "fork" if self.fork else "subprocess",
                      "attempts": entry.get("attempts", 0) + 1, "exit_code": None, "error": None})
        if self.threads is not None:
            entry["threads"] = self.threads
        sweep.save()
        values = swept_text(entry, swept_names(self.config))
        prefix = f"[{entry['index']}/{self.total or '?'}] {name}" + (f" {values}" if values else "")
        launch = Launch(entry, prefix, open(log, "ab"), stop_file)
        launch.log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {entry['attempts']}: "
                              f"{' '.join(argv)}\n".encode())
        launch.log_file.flush()
        try:
            run_env = self.env(run_id, param_path, str(entry["args"].get("group") or sweep.id), stop_file)
            if self.fork:
                lock = getattr(sweep, "_lock", None)
                held = [lock.fileno(), launch.log_file.fileno()] if lock else [launch.log_file.fileno()]
                for other in others:
                    held.append(other.log_file.fileno())
                    if other.proc is not None:
                        held.append(other.proc.stdout.fileno())
                launch.proc = ForkedRun(argv, run_env, close_fds=tuple(held), threads=self.threads)
            else:
                launch.proc = subprocess.Popen(argv, env=run_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, process_group=0)
        except OSError as err:
            launch.reason = f"cannot start {argv[0]!r}: {err.strerror or err}"
            launch.log_file.write(f"error: {launch.reason}\n".encode())
        else:
            launch.pump = OutputPump(launch.proc.stdout, launch.log_file, prefix, self.live)
            launch.pump.start()
            if self.parallel > 1:
                say(f"{prefix}  started ({self.threads} thread{'s' if self.threads > 1 else ''}, log {log})",
                    self.live)
        return launch

    def finish(self, launch: Launch) -> None:
        """A run that ended: the rest of its output, its status into the state, its progress line."""
        if launch.pump is not None:
            launch.pump.join()
            launch.proc.stdout.close()
        launch.log_file.close()
        elapsed = time.perf_counter() - launch.started
        entry = launch.entry
        self.settle(entry, launch.rc, launch.reason, launch.stopped_by, launch.started_wall, elapsed,
                    Path(entry["log"]), launch.early)
        self.sweep.save()
        say(self.progress_line(entry, launch.prefix), self.live)

    def settle(self, entry, rc, reason, stopped_by, started_wall, elapsed, log, early=False) -> None:
        """The run's status: its record's, when this attempt wrote one, else the exit code's; a run
        that early termination stopped is `stopped` (W&B: killed), not interrupted or failed."""
        found, path = find_record(self.records_dir(entry), entry["name"], entry["id"], started_wall)
        status = found.get("status") if found else None
        if status not in record.STATUSES:
            if rc == 0:
                status = "finished"
            elif stopped_by is not None:
                status = "interrupted"
            else:
                status = "failed"
        if status == "finished" and rc not in (0, None):
            status = "failed"  # the process crashed after its record said finished
        if early and status != "finished":
            status, reason = "stopped", entry.get("stop_reason") or "stopped early by early_terminate"
        error = None
        if status == "stopped":
            error = reason
        elif status != "finished":
            error = (found or {}).get("error") or reason or last_error_line(log)
            if rc is not None and rc < 0:
                error = f"killed by {signal.Signals(-rc).name}" + (f": {error}" if error else "")
            elif not error:
                error = f"exit code {rc}"
        summary = (found or {}).get("summary") or {}
        metric = self.metric_name()
        history = [{"step": row.get("step"), metric: row[metric]} for row in (found or {}).get("history") or []
                   if isinstance(row, dict) and metric in row]
        entry.update({
            "status": status, "exit_code": rc, "error": one_line(error)[:500] if error else None,
            "record": str(path) if path else None, "elapsed_s": round(elapsed, 2),
            "metrics": {k: summary.get(k) for k in (record.VAL_LOSS, record.VAL_ACCURACY, record.PARAMS_TOTAL,
                                                    record.TIME_TOTAL, record.MEMORY_PEAK, metric) if k in summary},
            # the record's history; without one, what early termination read from W&B's history
            "metric_history": history or (entry.get("metric_history") if early else None) or [],
        })

    def metric_name(self) -> str:
        return (self.config.get("metric") or {}).get("name", record.VAL_LOSS)

    def progress_line(self, entry: dict, prefix: str) -> str:
        line = f"{prefix}  {entry['status']}"
        loss = number(entry["metrics"].get(record.VAL_LOSS))
        if loss is not None:
            line += f"  val_loss={loss:.3f}"
        line += f"  {entry['elapsed_s']:.1f}s"
        if entry["status"] != "finished" and entry.get("error"):
            line += f"  ({entry['error'][:200]})"
        return line
