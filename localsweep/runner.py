"""Running one run: its params file, environment and command line, its output into a log, the
signals passed on to it, and its status from its record or exit code."""
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
# hyperband reads a running run's history from there, so its runs flush every second
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
                    sys.stdout.write("\r\033[K" + text)
                    sys.stdout.flush()
        if self.live:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(proc: subprocess.Popen, run_name: str, should_stop=None, stop_file: Path | None = None
             ) -> tuple[int, int | None, bool]:
    """Wait for the run; a Ctrl-C (or SIGTERM/SIGHUP) is passed on to it -- it saves a checkpoint
    and stops at the next step -- a second one stops it at once, a third kills it. With
    `should_stop` (early termination), it is asked every POLL_S seconds, and when it says so the
    run gets SIGTERM, as wandb's agent stops a run, after `stop_file` is created: it tells train.py
    that this SIGTERM is the sweep's stop (the run ends `stopped`, exit 0), not a preemption. Returns (exit code, the signal that stopped
    the sweep or None, whether should_stop stopped the run)."""
    stopped_by, asked, early = None, 0, False
    while True:
        try:
            # Never a bare blocking wait: a signal the kernel hands to another thread (torch's or
            # wandb's, preloaded for forked runs) does not interrupt the main thread's waitpid, so
            # Ctrl-C was lost and the run trained on (the Ctrl-C tests hung so in a full suite run);
            # a timed wait returns to Python between polls, where the handler raises.
            try:
                return proc.wait(timeout=POLL_S), stopped_by, early
            except subprocess.TimeoutExpired:
                if should_stop is not None and not early and stopped_by is None and should_stop():
                    early = True
                    if stop_file is not None:
                        stop_file.touch()
                    signal_group(proc, signal.SIGTERM)
        except (KeyboardInterrupt, Stop) as err:
            sig = err.signum if isinstance(err, Stop) else signal.SIGINT
            stopped_by = stopped_by or sig
            asked += 1
            if asked == 1:
                print(f"\n{signal.Signals(sig).name}: stopping {run_name} (it saves a checkpoint and stops at "
                      f"the next step; press Ctrl-C again to stop it at once)", flush=True)
                signal_group(proc, sig)
            elif asked == 2:
                print(f"stopping {run_name} at once (Ctrl-C again kills it)", flush=True)
                signal_group(proc, signal.SIGINT)
            else:
                print(f"killing {run_name}", flush=True)
                signal_group(proc, signal.SIGKILL)


class Runner:
    def __init__(self, sweep: Sweep, config: dict, results_dir: Path, total: int | None, live: bool,
                 fork: bool = True):
        self.sweep, self.config, self.results_dir = sweep, config, results_dir
        self.total, self.live = total, live
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
        a tag instead, so the synced runs can be found together."""
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SWEEP_ID"}
        if env.get("WANDB_MODE") != "disabled":
            env["WANDB_MODE"] = "offline"  # a local sweep exists on no server
        tags = [t for t in env.get("WANDB_TAGS", "").split(",") if t] + [f"local-sweep-{self.sweep.id}"]
        env.update({
            "WANDB_SWEEP_PARAM_PATH": str(param_path), "WANDB_RUN_ID": run_id, "WANDB_RUN_GROUP": group,
            "WANDB_TAGS": ",".join(dict.fromkeys(tags)),
            "WANDB_PROJECT": str(self.config.get("project") or "attnsweep"), "WANDB_DIR": str(self.sweep.dir),
        })
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

    def execute(self, entry: dict, should_stop=None) -> int | None:
        """Run one entry of the state to its end; returns the signal that stopped the sweep, if any.
        `should_stop`, when given, is asked while the run runs (see wait_for)."""
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
        sweep.save()
        values = swept_text(entry, swept_names(self.config))
        prefix = f"[{entry['index']}/{self.total or '?'}] {name}" + (f" {values}" if values else "")
        started_wall, started = time.time(), time.perf_counter()
        stopped_by, early = None, False
        with open(log, "ab") as log_file:
            log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {entry['attempts']}: "
                           f"{' '.join(argv)}\n".encode())
            log_file.flush()
            try:
                run_env = self.env(run_id, param_path, str(entry["args"].get("group") or sweep.id), stop_file)
                if self.fork:
                    lock = getattr(sweep, "_lock", None)
                    proc = ForkedRun(argv, run_env, close_fds=(lock.fileno(),) if lock else ())
                else:
                    proc = subprocess.Popen(argv, env=run_env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
            except OSError as err:
                rc, reason = None, f"cannot start {argv[0]!r}: {err.strerror or err}"
                log_file.write(f"error: {reason}\n".encode())
            else:
                pump = OutputPump(proc.stdout, log_file, prefix, self.live)
                pump.start()
                try:
                    rc, stopped_by, early = wait_for(proc, name, should_stop, stop_file)
                finally:
                    pump.join()
                    proc.stdout.close()
                reason = None
        elapsed = time.perf_counter() - started
        self.settle(entry, rc, reason, stopped_by, started_wall, elapsed, log, early)
        sweep.save()
        print(self.progress_line(entry, prefix), flush=True)
        return stopped_by

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
