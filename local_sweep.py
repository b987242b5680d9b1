#!/usr/bin/env python
"""Run a W&B sweep YAML on this machine, offline: the stand-in for `wandb agent` (DESIGN.md section 7).

    python local_sweep.py sweeps/smoke.yaml
    python local_sweep.py my_random_search.yaml --count 20      (random and bayes need --count)
    python local_sweep.py sweeps/smoke.yaml --resume SWEEP_ID [--retry-failed]

What it does, in the order `wandb sweep` + `wandb agent` would:
  1. reads the YAML (safe_load) and checks it with W&B's own schema
     (`sweeps.schema_violations_from_proposed_config`), then checks every value the sweep can hand
     out through train.py's config validation, so a bad sweep is refused before any run starts,
     with one `error:` line that lists every bad value;
  2. asks W&B's sweep engine (`sweeps.next_run`, grid / random / bayes) for each next run, given the
     runs so far with their states and, for bayes, their metric from each run's results record;
  3. for each run: writes the params file exactly as wandb's agent does
     (`<sweep_dir>/wandb/sweep-<id>/config-<run_id>.yaml`), sets WANDB_MODE=offline,
     WANDB_SWEEP_ID, WANDB_SWEEP_PARAM_PATH, WANDB_RUN_ID, WANDB_PROJECT and WANDB_DIR, expands the
     YAML's `command:` macros the way wandb's agent does (default `${env} ${interpreter} ${program}
     ${args}`), runs it with its output in `<sweep_dir>/logs/<run_name>-<run_id>.log`, and records
     finished / failed / diverged / interrupted from the exit code and the run's record;
  4. prints one line per run and, at the end, a results table sorted by validation loss, then
     writes the report (analysis.report) when that module is available.

Where things go (results dir R: --results-dir, else the sweep's fixed `results_dir` value, else
`results`): the sweep dir R/<sweep_id>/ holds sweep.yaml (a copy), sweep_state.json (the runs so
far), logs/ and wandb/ (the offline W&B runs: upload them later with `wandb sync`). Each run gets
`--results_dir=R` and `--group=<sweep_id>` added to its arguments unless the sweep sets them, so
train.py writes its record to R/<group>/<attention>-s<seed>.json, next to the sweep's state.
The report goes to --report-dir (default R/<sweep_id>/report/; the analysis reads records only,
so the report's own JSON there is never mistaken for a run).

Differences from `wandb agent`, on purpose: `${interpreter}` is this Python (sys.executable)
rather than whatever `python` is first on PATH, and this interpreter's bin directory is put first
on the runs' PATH (so `accelerate`/`torchrun` come from the same environment); runs are started
in their own process group, so Ctrl-C reaches a run once, through this script.

Exit codes: 0 when the sweep ran to its end, even if some runs failed (they are recorded as
failed, with the reason, and the report counts them: a failed variant is a result, not an error
of the sweep); 2 on bad input (unreadable or malformed YAML, a schema violation, a bad value,
a bad option, an unknown sweep to resume); 130 after Ctrl-C (143 after SIGTERM, 129 after SIGHUP):
the current run is stopped cleanly (it checkpoints), and the sweep continues with --resume.
"""
import argparse
import json
import math
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ENVVAR_MACRO = re.compile(r"\$\{envvar\:([A-Z0-9_]*)\}")  # as wandb's agent: ${envvar:NAME}
METHODS = ("grid", "random", "bayes")
ID_ALPHABET = string.ascii_lowercase + string.digits
STATE_FILE = "sweep_state.json"
STATE_SCHEMA = 1
EXIT_OK, EXIT_BAD_INPUT = 0, 2
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
GRID_CHECK_LIMIT = 20000  # grids larger than this are checked value by value, not combination by combination
# our run statuses -> W&B's run states, as the engine sees them
ENGINE_STATES = {"finished": "finished", "failed": "failed", "diverged": "failed", "interrupted": "preempted",
                 "running": "running", "pending": "pending"}


class SweepError(Exception):
    """Bad input: one line for the user, exit 2."""


class Stop(BaseException):
    """SIGTERM / SIGHUP to this script, handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def new_id(n: int = 8) -> str:
    """Eight lowercase letters and digits, like W&B's sweep and run ids."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(n))


def one_line(text) -> str:
    return " ".join(str(text).split())


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def import_engine():
    """W&B's sweep engine, without the pydantic deprecation warning it prints on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


# --- the W&B agent's contract: params file and command macros ----------------------------------

def sweep_command_args(params: dict) -> dict:
    """The argument forms wandb's agent offers as macros, from {name: value}; mirrors
    wandb.sdk.launch.sweeps.utils.create_sweep_command_args (a test holds them equal)."""
    flags, no_hyphens, no_booleans, no_equals, append_hydra, override_hydra = [], [], [], [], [], []
    for name, value in params.items():
        flag = f"{name}={value}"
        flags.append("--" + flag)
        no_hyphens.append(flag)
        no_equals += [f"--{name}", str(value)]
        append_hydra.append("+" + flag)
        override_hydra.append("++" + flag)
        if isinstance(value, bool):
            if value:
                no_booleans.append("--" + name)
        else:
            no_booleans.append("--" + flag)
    return {
        "args": flags, "args_no_equals": no_equals, "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans, "args_json": [json.dumps(dict(params))],
        "args_append_hydra": append_hydra, "args_override_hydra": override_hydra,
    }


def expand_command(command: list | None, params: dict, *, program: str, interpreter: str,
                   args_json_file: str, environ: dict | None = None) -> list[str]:
    """The command line wandb's agent would run: `${envvar:NAME}` replaced inside any item, and
    an item that is exactly `${macro}` replaced by that macro's list (an unknown one by nothing)."""
    environ = os.environ if environ is None else environ
    items = []
    for item in list(command or DEFAULT_COMMAND):
        if isinstance(item, str):
            for match in list(ENVVAR_MACRO.finditer(item))[::-1]:
                item = item[:match.start()] + environ.get(match.group(1), match.group(1)) + item[match.end():]
        items.append(item)
    macros = sweep_command_args(params)
    macros.update({"interpreter": [interpreter], "program": [program], "args_json_file": [args_json_file]})
    if os.name != "nt":
        macros["env"] = ["/usr/bin/env"]
    expanded = []
    for item in items:
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            expanded += macros.get(item[2:-1]) or []
        else:
            expanded.append(item)
    return expanded


def params_file_text(params: dict) -> str:
    """What wandb's agent writes to WANDB_SWEEP_PARAM_PATH (wandb.sdk.lib.config_util.
    save_config_file_from_dict of the run's {name: {"value": v}}), byte for byte."""
    text = b"wandb_version: 1"
    if params:
        text += b"\n\n" + yaml.dump({k: {"value": v} for k, v in params.items()}, Dumper=yaml.SafeDumper,
                                    default_flow_style=False, allow_unicode=True, encoding="utf-8",
                                    sort_keys=False)
    return text.decode("utf-8")


# --- reading and checking a sweep ---------------------------------------------------------------

def load_sweep(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except UnicodeDecodeError:
        raise SweepError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise SweepError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SweepError(f"{path}: malformed YAML: {one_line(err.problem or err.context or err)}{where}") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: malformed YAML: {one_line(err)}") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path}: a sweep YAML is a mapping (method:, parameters:, ...), "
                         f"not {type(config).__name__}")
    return config


def check_schema(config: dict, label) -> None:
    """W&B's own schema check, then what this agent needs on top of it."""
    try:
        violations = import_engine().schema_violations_from_proposed_config(config)
    except Exception as err:  # the engine raising on odd input is a rejection too
        violations = [one_line(err)]
    if violations:
        raise SweepError(f"{label}: W&B's sweep schema rejects it: " + "; ".join(one_line(v) for v in violations))
    if config.get("method") not in METHODS:
        raise SweepError(f"{label}: method {config.get('method')!r}: this local agent runs "
                         f"{', '.join(METHODS)}")
    if not isinstance(config.get("parameters"), dict) or not config["parameters"]:
        raise SweepError(f"{label}: `parameters` must name at least one parameter")
    command = config.get("command")
    if command is not None and (not isinstance(command, list) or not command):
        raise SweepError(f"{label}: `command` must be a non-empty list of items")
    if "${program}" in [str(c) for c in (command or DEFAULT_COMMAND)] and not config.get("program"):
        raise SweepError(f"{label}: the command runs ${{program}} but the sweep names no `program:`")


# Distributions whose min/max are values a run can get (the log_* ones have exponents there).
VALUE_BOUNDED = {None, "int_uniform", "uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values",
                 "inv_log_uniform_values"}


def sweep_values(parameters: dict) -> tuple[dict, dict]:
    """(fixed {name: value}, listed {name: [values to check]}) of a sweep's parameters."""
    fixed, listed = {}, {}
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            listed[name] = [spec]
        elif "value" in spec:
            fixed[name] = spec["value"]
        elif "values" in spec:
            listed[name] = list(spec["values"])
        elif "parameters" in spec:  # a nested parameter: train.py has none, so the name is what is wrong
            listed[name] = [{k: v.get("value", v.get("values")) if isinstance(v, dict) else v
                             for k, v in spec["parameters"].items()}]
        elif spec.get("distribution") in VALUE_BOUNDED and ("min" in spec or "max" in spec):
            listed[name] = [spec[k] for k in ("min", "max") if k in spec]
        else:  # a distribution over exponents (log_uniform, normal, ...): only the name can be checked
            listed[name] = [None]
    return fixed, listed


def _check(values: dict) -> str | None:
    from config import ConfigError, config_from_values

    try:
        config_from_values(values)
    except ConfigError as err:
        return one_line(err)
    return None


def _named(message: str, candidates) -> list[str]:
    """The parameters an error message names (`--name=`, or the unknown variant)."""
    names = [n for n in re.findall(r"--(\w+)", message) if n in candidates]
    if message.startswith("unknown attention variant") and "attention" in candidates:
        names.insert(0, "attention")
    return list(dict.fromkeys(names))


def bad_values(config: dict, grid_runs: list[dict] | None) -> list[str]:
    """Every bad value the sweep could hand out, as `name=value (why)`, checked by train.py's own
    config validation: first each value alone (type, range, unknown names or variants), then, for
    what only fails together (d_model vs n_heads, latent-only knobs on baseline), every
    combination the grid produces (grid_runs), or, for random/bayes, each listed value together
    with the fixed ones."""
    from config import FIELD_TYPES

    fixed, listed = sweep_values(config["parameters"])
    singles = [(n, v) for n, v in fixed.items()] + [(n, v) for n, vs in listed.items() for v in vs]
    problems, bad = {}, set()
    for name, value in singles:
        if value is None and name in FIELD_TYPES and config["parameters"][name].get("distribution"):
            continue  # an exponent-range distribution over a real field: nothing to check
        message = _check({name: value})
        if message and _named(message, set(FIELD_TYPES) | {name}) == [name]:  # its own fault, not a combination's
            problems.setdefault(f"{name}={value}", message)
            bad.add((name, repr(value)))
    if grid_runs is not None:
        contexts = grid_runs
    else:
        contexts = [dict(fixed)] + [{**fixed, name: v} for name, vs in listed.items() for v in vs if v is not None]
    swept = set(listed)
    for values in contexts:
        if any((n, repr(v)) in bad for n, v in values.items()):
            continue  # already explained by a value that is bad on its own
        message = _check(values)
        if not message:
            continue
        names = _named(message, set(values)) or [n for n in values if n in swept] or list(values)
        label = ", ".join(f"{n}={values[n]}" for n in names)
        problems.setdefault(label, message)
    return [f"{label} ({message})" for label, message in problems.items()]


def grid_size_and_runs(config: dict) -> tuple[int, list[dict] | None]:
    """How many runs the grid has, and their values (None when too many to check one by one),
    as W&B's engine enumerates them."""
    sweeps = import_engine()
    sizes = 1
    for spec in config["parameters"].values():
        if isinstance(spec, dict) and "values" in spec:
            sizes *= max(1, len(spec["values"]))
        elif isinstance(spec, dict) and spec.get("distribution") == "int_uniform":
            sizes *= max(1, spec["max"] - spec["min"] + 1)
        elif isinstance(spec, dict) and spec.get("distribution") == "q_uniform":
            sizes *= max(1, math.ceil((spec["max"] - spec["min"]) / spec["q"]))
    if sizes > GRID_CHECK_LIMIT:
        return sizes, None
    suggestions = sweeps.next_runs(config, [], validate=True, n=GRID_CHECK_LIMIT + 1)
    runs = [r for r in suggestions if r is not None]
    if len(runs) > GRID_CHECK_LIMIT:
        return len(runs), None
    return len(runs), [plain({k: v["value"] for k, v in r.config.items()}) for r in runs]


def check_engine(config: dict, label) -> None:
    """Ask the engine for a first run now, so what only it refuses (bayes without a metric, a
    continuous parameter in a grid) is bad input, not a crash after some runs."""
    try:
        import_engine().next_run(config, [], validate=True)
    except Exception as err:
        raise SweepError(f"{label}: W&B's sweep engine refuses it: {one_line(err)}") from None


def resolve_program(program: str) -> str:
    """The program as the agent would run it (relative to the current directory); a relative
    path that is not there but is next to this script (train.py) is taken from here."""
    if Path(program).exists() or Path(program).is_absolute():
        return program
    if (ROOT / program).exists():
        return str(ROOT / program)
    return program


# --- records, state --------------------------------------------------------------------------

def find_record(records_dir: Path, run_name: str, run_id: str, since: float) -> tuple[dict | None, Path | None]:
    """This attempt's results record: train.py writes <run_name>.json, or <run_name>-<run_id>.json
    when another run's finished record already holds that name."""
    candidates = [records_dir / f"{run_name}-{run_id}.json", records_dir / f"{run_name}.json"]
    if records_dir.is_dir():
        candidates += sorted(records_dir.glob("*.json"))
    for path in dict.fromkeys(candidates):
        try:
            if path.stat().st_mtime < since - 1:
                continue
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("run_id") == run_id:
            return record, path
    return None, None


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


def number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


class Sweep:
    """One sweep on disk: <results_dir>/<sweep_id>/ with sweep.yaml, sweep_state.json, logs/, wandb/."""

    def __init__(self, sweep_dir: Path, state: dict):
        self.dir = sweep_dir
        self.state = state

    @property
    def id(self) -> str:
        return self.state["sweep_id"]

    @property
    def runs(self) -> list[dict]:
        return self.state["runs"]

    def save(self) -> None:
        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json_atomic(self.dir / STATE_FILE, self.state)

    def lock(self) -> None:
        """One local_sweep per sweep at a time: a second one (a --resume while the first still
        runs) is refused rather than running the same runs twice. Held until this process ends."""
        import fcntl

        self._lock = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            raise SweepError(f"sweep {self.id} is being run by another local_sweep.py (pid {holder}); "
                             f"wait for it or stop it first") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    @classmethod
    def load(cls, sweep_dir: Path) -> "Sweep":
        try:
            state = json.loads((sweep_dir / STATE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise SweepError(f"{sweep_dir / STATE_FILE}: cannot read the sweep's state ({one_line(err)})") from None
        if not isinstance(state, dict) or state.get("state_schema") != STATE_SCHEMA or "runs" not in state:
            raise SweepError(f"{sweep_dir / STATE_FILE}: not a local_sweep state file")
        return cls(sweep_dir, state)


# --- running one run --------------------------------------------------------------------------

class OutputPump(threading.Thread):
    """Copies a run's output into its log file; on a terminal, also shows its latest line
    (train.py's progress bar) as a transient status line."""

    def __init__(self, stream, log_file, prefix: str, live: bool):
        super().__init__(daemon=True)
        self.stream, self.log_file, self.prefix, self.live = stream, log_file, prefix, live
        self.last_shown = 0.0
        self.width = shutil.get_terminal_size((100, 20)).columns

    def run(self):
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


def wait_for(proc: subprocess.Popen, run_name: str) -> tuple[int, int | None]:
    """Wait for the run; a Ctrl-C (or SIGTERM/SIGHUP) is passed on to it -- it saves a checkpoint
    and stops at the next step -- a second one stops it at once, a third kills it. Returns
    (exit code, the signal that stopped the sweep or None)."""
    stopped_by, asked = None, 0
    while True:
        try:
            return proc.wait(), stopped_by
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
    def __init__(self, sweep: Sweep, config: dict, results_dir: Path, total: int | None, live: bool):
        self.sweep, self.config, self.results_dir = sweep, config, results_dir
        self.total, self.live = total, live
        self.program = resolve_program(str(config.get("program", "")))

    def run_args(self, engine_params: dict) -> dict:
        """The engine's values plus where the record goes, unless the sweep sets that itself."""
        params = dict(engine_params)
        params.setdefault("results_dir", str(self.results_dir))
        params.setdefault("group", self.sweep.id)
        return params

    def records_dir(self, entry: dict) -> Path:
        params = entry["args"]
        return Path(params.get("results_dir", self.results_dir)) / str(params.get("group") or self.sweep.id)

    def env(self, run_id: str, param_path: Path) -> dict:
        env = dict(os.environ)
        if env.get("WANDB_MODE") != "disabled":
            env["WANDB_MODE"] = "offline"  # a local sweep id does not exist on any server
        env.update({
            "WANDB_SWEEP_ID": self.sweep.id, "WANDB_SWEEP_PARAM_PATH": str(param_path), "WANDB_RUN_ID": run_id,
            "WANDB_PROJECT": str(self.config.get("project") or "attnsweep"), "WANDB_DIR": str(self.sweep.dir),
        })
        if self.config.get("entity"):
            env["WANDB_ENTITY"] = str(self.config["entity"])
        env.setdefault("PYTHONUNBUFFERED", "1")
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "") if env.get("PATH") else bindir
        return env

    def execute(self, entry: dict) -> int | None:
        """Run one entry of the state to its end; returns the signal that stopped the sweep, if any."""
        sweep, run_id, name = self.sweep, entry["id"], entry["name"]
        base = sweep.dir / "wandb" / f"sweep-{sweep.id}"
        param_path, json_path = base / f"config-{run_id}.yaml", base / f"config-{run_id}.json"
        base.mkdir(parents=True, exist_ok=True)
        param_path.write_text(params_file_text(entry["args"]))
        command = self.config.get("command") or DEFAULT_COMMAND
        if "${args_json_file}" in [str(c) for c in command]:
            json_path.write_text(sweep_command_args(entry["args"])["args_json"][0])
        argv = expand_command(command, entry["args"], program=self.program, interpreter=sys.executable,
                              args_json_file=str(json_path))
        log = sweep.dir / "logs" / f"{name}-{run_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        entry.update({"status": "running", "log": str(log), "command": argv,
                      "attempts": entry.get("attempts", 0) + 1, "exit_code": None, "error": None})
        sweep.save()
        values = swept_text(entry, swept_names(self.config))
        prefix = f"[{entry['index']}/{self.total or '?'}] {name}" + (f" {values}" if values else "")
        started_wall, started = time.time(), time.perf_counter()
        stopped_by = None
        with open(log, "ab") as log_file:
            log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {entry['attempts']}: "
                           f"{' '.join(argv)}\n".encode())
            log_file.flush()
            try:
                proc = subprocess.Popen(argv, env=self.env(run_id, param_path), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
            except OSError as err:
                rc, reason = None, f"cannot start {argv[0]!r}: {err.strerror or err}"
                log_file.write(f"error: {reason}\n".encode())
            else:
                pump = OutputPump(proc.stdout, log_file, prefix, self.live)
                pump.start()
                try:
                    rc, stopped_by = wait_for(proc, name)
                finally:
                    pump.join()
                    proc.stdout.close()
                reason = None
        elapsed = time.perf_counter() - started
        self.settle(entry, rc, reason, stopped_by, started_wall, elapsed, log)
        sweep.save()
        print(self.progress_line(entry, prefix), flush=True)
        return stopped_by

    def settle(self, entry, rc, reason, stopped_by, started_wall, elapsed, log) -> None:
        """The run's status: its record's, when this attempt wrote one, else the exit code's."""
        record, path = find_record(self.records_dir(entry), entry["name"], entry["id"], started_wall)
        status = record.get("status") if record else None
        if status not in ("finished", "failed", "diverged", "interrupted"):
            if rc == 0:
                status = "finished"
            elif stopped_by is not None:
                status = "interrupted"
            else:
                status = "failed"
        if status == "finished" and rc not in (0, None):
            status = "failed"  # the process crashed after its record said finished
        error = None
        if status != "finished":
            error = (record or {}).get("error") or reason or last_error_line(log)
            if rc is not None and rc < 0:
                error = f"killed by {signal.Signals(-rc).name}" + (f": {error}" if error else "")
            elif not error:
                error = f"exit code {rc}"
        summary = (record or {}).get("summary") or {}
        entry.update({
            "status": status, "exit_code": rc, "error": one_line(error)[:500] if error else None,
            "record": str(path) if path else None, "elapsed_s": round(elapsed, 2),
            "metrics": {k: summary.get(k) for k in ("val/loss", "val/accuracy", "params/total", "time/total_s",
                                                    "memory/peak_gb") if k in summary},
            "metric_history": [{"step": row.get("step"), self.metric_name(): row[self.metric_name()]}
                               for row in (record or {}).get("history") or []
                               if isinstance(row, dict) and self.metric_name() in row],
        })

    def metric_name(self) -> str:
        return (self.config.get("metric") or {}).get("name", "val/loss")

    def progress_line(self, entry: dict, prefix: str) -> str:
        line = f"{prefix}  {entry['status']}"
        loss = number(entry["metrics"].get("val/loss"))
        if loss is not None:
            line += f"  val_loss={loss:.3f}"
        line += f"  {entry['elapsed_s']:.1f}s"
        if entry["status"] != "finished" and entry.get("error"):
            line += f"  ({entry['error'][:200]})"
        return line


# --- the sweep loop ---------------------------------------------------------------------------

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


def plain(values: dict) -> dict:
    """The engine's values as the W&B server hands them to an agent: through JSON (numpy
    scalars become Python numbers)."""
    return json.loads(json.dumps(values, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def runs_text(n) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def run_name_of(params: dict, fallback: str) -> str:
    from config import ConfigError, config_from_values

    try:
        return config_from_values(params).run_name
    except (ConfigError, TypeError, ValueError):
        return fallback


def continue_hint(sweep: Sweep, results_dir: Path) -> str:
    default = Path("results").resolve() == results_dir.resolve()
    where = "" if default else f" --results-dir {results_dir}"
    return f"python local_sweep.py {sweep.state['sweep_file']} --resume {sweep.id}{where}"


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


# --- the end: table and report ------------------------------------------------------------------

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
        loss = number(m.get("val/loss"))
        order = (entry["status"] != "finished" or loss is None, loss if loss is not None else math.inf, entry["index"])
        seconds = m.get("time/total_s") if number(m.get("time/total_s")) is not None else entry.get("elapsed_s")
        rows.append((order, [entry["name"]] + ([swept_text(entry, swept)] if swept else []) + [entry["status"], fmt(loss, ".4f"), fmt(m.get("val/accuracy"), ".4f"),
                             fmt(m.get("params/total"), ".3f", 1e-6), fmt(seconds, ".1f"),
                             fmt(m.get("memory/peak_gb"), ".3f")]))
    header = ["run"] + (["values"] if swept else []) + ["status", "val loss", "accuracy", "params (M)", "time (s)",
                                                          "peak mem (GB)"]
    left = 3 if swept else 2
    body = [cells for _, cells in sorted(rows, key=lambda r: r[0])]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(records_dir: Path, out_dir: Path) -> None:
    from analysis import report

    try:
        written = report.write_report(records_dir, out_dir)
    except Exception as err:  # a failing report must not cost the sweep: its results stand
        print(f"warning: the report failed ({type(err).__name__}: {one_line(err)[:300]}); "
              f"the results are in {records_dir}", file=sys.stderr)
        return
    path = Path(written) if isinstance(written, (str, Path)) else out_dir / "report.md"
    print(f"report: {path}")


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
        for records_dir in sorted(records):
            write_report(records_dir, out_dir)


# --- the command line -------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, like every other bad input
        print(f"error: {message} (usage: {one_line(self.format_usage().split(':', 1)[1])})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parse_args(argv):
    parser = Parser(prog="local_sweep.py", description="Run a W&B sweep YAML offline on this machine.")
    parser.add_argument("sweep", nargs="?", help="the sweep YAML (optional with --resume: the sweep's saved copy is used)")
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
    args = parser.parse_args(argv)
    if args.sweep is None and args.resume is None:
        parser.error("give a sweep YAML (or --resume SWEEP_ID)")
    if args.count is not None and args.count < 1:
        parser.error(f"--count={args.count}: must be at least 1")
    if args.retry_failed and not args.resume:
        parser.error("--retry-failed goes with --resume")
    return args


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
    check_schema(config, label)
    check_engine(config, label)
    method = config["method"]
    count = args.count or (sweep.state.get("count") if sweep else None)
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
    try:
        sweep, config, results_dir, redo, count, total = prepare(args)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return SIGNAL_EXIT[signal.SIGINT]
    install_stop_handlers()
    runner = Runner(sweep, config, results_dir, total, live=sys.stdout.isatty())
    done = sum(e["status"] == "finished" for e in sweep.runs)
    verb = "resuming" if args.resume else "sweep"
    print(f"{verb} {sweep.id}: {sweep.state['sweep_file']} ({config['method']}, {runs_text(total)}"
          f"{f', {done} finished already, {len(redo)} to re-run' if args.resume else ''}) -> {sweep.dir}", flush=True)
    try:
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
        return SIGNAL_EXIT.get(stopped, 130)
    sweep.state["complete"] = True
    sweep.save()
    summarize(sweep, runner, args)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
