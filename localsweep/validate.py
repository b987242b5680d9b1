"""Reading and checking a sweep before any run starts: YAML, W&B's schema, the engine, and every
value through train.py's own config validation."""
import math
import os
import re
from pathlib import Path

import yaml

from record import one_line

from .common import ROOT, SweepError, import_engine, plain
from .macros import DEFAULT_COMMAND

METHODS = ("grid", "random", "bayes")

GRID_CHECK_LIMIT = 20000  # grids larger than this are checked value by value, not combination by combination



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


def check_early_terminate(config: dict, label) -> None:
    """`early_terminate` runs W&B's own hyperband (sweeps.stop_runs) over each run's W&B history,
    read from its offline run: refused when W&B rejects its settings, or when runs keep no W&B
    history (WANDB_MODE=disabled) -- rather than a sweep that silently never stops a run."""
    if not config.get("early_terminate"):
        return
    try:
        import_engine().stop_runs(config, [], validate=True)
    except Exception as err:
        raise SweepError(f"{label}: W&B's sweep engine refuses its early_terminate: {one_line(err)}") from None
    if os.environ.get("WANDB_MODE") == "disabled":
        raise SweepError(f"{label}: early_terminate reads each run's W&B history, and WANDB_MODE=disabled "
                         f"keeps none; unset WANDB_MODE (runs are offline) or drop early_terminate")


def resolve_program(program: str) -> str:
    """The program as the agent would run it (relative to the current directory); a relative
    path that is not there but is next to this script (train.py) is taken from here."""
    if Path(program).exists() or Path(program).is_absolute():
        return program
    if (ROOT / program).exists():
        return str(ROOT / program)
    return program
