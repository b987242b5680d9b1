"""One run type, and the three sources that normalise into it.

Every table, statistic and figure reads `Run` objects only, so a W&B sweep, a local results
directory (the records train.py writes, DESIGN.md section 6) and the seed's own JSON
(DESIGN.md section 8) are analysed by exactly the same code. The W&B part is kept thin: the
mapping from a W&B run is a pure function of the run's attributes, so tests drive it with fakes.
"""
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import record
from attention.registry import FAMILIES as FAMILY_REGISTRY, KNOBS, VARIANTS
from record import EVAL_KEYS, RUNNING, STATUSES, TRAIN_KEYS, VAL_LOSS_MIN, number
# The schema, the statuses and the metric names are the run's contract: record.py.

FAMILIES = tuple(FAMILY_REGISTRY)  # attention/registry.py, in its order
# Config keys that are bookkeeping, not settings: they do not change what a run computes (or, for
# attention and seed, are what every comparison is about), so they never tell configurations apart.
BOOKKEEPING = {"attention", "family", "seed", "results_dir", "group", "project", "run_name", "cache_dir",
               "checkpoint_every", "checkpoint_artifact", "resume", "dry_run", "compile", "trust_remote_code",
               "attention_kernel",  # how attention is computed (attention/kernels.py), not what: like compile
               "processes",  # how many GPUs shared each (global) batch; train.py adds it to the W&B config
               "attention_spec",  # the variant's resolved knobs, which train.py adds to the W&B config
               # tuning's stage 2: variant_lr is attention + lr in one value (both are in the config),
               # eval_test adds a test evaluation after training without changing it
               "variant_lr", "eval_test", "eval_lengths",  # eval_lengths: evaluations after training
               "probes"}  # measures at evaluations only: training is the same with it on or off
# The attention knobs (attention/registry.py): what is compared, like the attention itself.
ATTENTION_KNOBS = frozenset(KNOBS)
# Records and W&B runs carry their family. Only the seed's JSON does not, so the registry's map is
# the fallback for it; an unknown name falls back to its prefix, else "other".
VARIANT_FAMILIES = {name: spec.family for name, spec in VARIANTS.items()}

# W&B run states -> record status. A crash is a failure; a killed run was interrupted.
WANDB_STATES = {"finished": "finished", "failed": "failed", "crashed": "failed",
                "killed": "interrupted", "preempted": "interrupted",
                "running": RUNNING, "pending": RUNNING, "preempting": RUNNING}


class SourceError(Exception):
    """Bad input (a missing path, a JSON of neither schema, no runs): one line for the user."""


@dataclass
class Run:
    name: str  # the run's name: `rope_small-s0` for a record, `medium_rope_small` in the seed's JSON
    variant: str  # the attention variant, e.g. rope_small
    family: str
    seed: int | None  # None where the source does not say (the seed's JSON)
    status: str  # one of STATUSES, or RUNNING
    error: str | None = None
    run_id: str | None = None
    group: str | None = None  # the sweep id
    config: dict = field(default_factory=dict)
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_perplexity: float | None = None
    val_loss_min: float | None = None  # the lowest evaluation's; val_loss is the final one
    test_loss: float | None = None  # the held-out test set's, only from runs with eval_test (tuning's stage 2)
    test_accuracy: float | None = None
    params_total: int | None = None
    params_attention: int | None = None
    flops_per_token: float | None = None
    kv_cache_bytes_per_token: int | None = None  # what a decoder caches per token, all layers, 2 bytes a value
    time_s: float | None = None
    ended_at: float | None = None  # unix time the run ended (train.py's time/ended_at)
    # The seed report's "Memory": the memory the run itself used. The seed's JSON has it as
    # memory_used_gb (peak minus what was allocated before the run); train.py resets the peak at
    # the start of a run, so for records and W&B runs it is memory/peak_gb.
    memory_gb: float | None = None
    peak_memory_gb: float | None = None
    data_fingerprint: str | None = None
    init_fingerprint: str | None = None
    # What the time and memory were measured on: data-parallel processes and the device's name
    # (a GPU model, or "cpu"); the fairness audit flags compared runs where they differ.
    processes: int | None = None
    device: str | None = None
    # The variant's knobs with its sizes resolved for the run's model (train.py's attention_spec):
    # what the run really computed. None in records from before sizes became relative.
    attention_spec: dict | None = None
    # lm: the validation tokens' cross-entropy under the training split's own unigram and bigram
    # counts (what frequencies alone predict), and the final evaluation's context gain
    unigram_loss: float | None = None
    bigram_loss: float | None = None
    context_gain: float | None = None
    # --eval_lengths: {length: {"loss": ..., "accuracy": ...}} at contexts other than seq_len
    length_metrics: dict = field(default_factory=dict)
    # --probes runs: the final evaluation's mechanism probes, {"probe/attn_entropy": ..., per layer too}
    probes: dict = field(default_factory=dict)
    train_history: list = field(default_factory=list)  # [{"step": n, "train/loss": ..., ...}]
    eval_history: list = field(default_factory=list)  # [{"step": n, "val/loss": ..., ...}]
    origin: str = field(default="", compare=False)  # where it was read from (a path, a W&B path)

    @property
    def succeeded(self) -> bool:
        """Finished with a usable validation loss: the runs the seed's tables are computed on."""
        return self.status == "finished" and number(self.val_loss) is not None

    @property
    def time_min(self) -> float | None:
        return None if self.time_s is None else self.time_s / 60

    @property
    def params_m(self) -> float | None:
        return None if self.params_total is None else self.params_total / 1e6


def varying_settings(runs: list[Run]) -> list[str]:
    """The settings (bookkeeping aside) that take two or more values among the successful runs of
    one variant, e.g. lr in a sweep over lr: each value is its own configuration."""
    by_variant: dict = {}
    for run in (r for r in runs if r.succeeded):
        for key, value in run.config.items():
            if key not in BOOKKEEPING:
                by_variant.setdefault((run.variant, key), set()).add(json.dumps(value, sort_keys=True))
    return sorted({key for (_, key), values in by_variant.items() if len(values) > 1})


def setting_values(run: Run, varying: list[str]) -> list[str]:
    """The run's values of the varying settings it has, as `key=value` words."""
    return [f"{key}={run.config[key]}" for key in varying if run.config.get(key) is not None]


def configuration(run: Run, varying: list[str]) -> str:
    """What a run is an instance of: its variant plus its values of the varying settings (those it
    has), e.g. `rope_small lr=0.003`; just the variant when nothing varies."""
    return " ".join([run.variant, *setting_values(run, varying)])


def by_configuration(runs: list[Run]) -> dict[str, list[Run]]:
    """{configuration: its runs}, the settings that vary read from these runs."""
    varying, groups = varying_settings(runs), {}
    for run in runs:
        groups.setdefault(configuration(run, varying), []).append(run)
    return groups


def run_label(run: Run, varying: list[str]) -> str:
    """A run by name, with its values of the varying settings (`rope_small-s0 lr=0.01`): two runs
    of one variant and seed at two learning rates are two lines, not one name twice."""
    return " ".join([run.name, *setting_values(run, varying)])


def family_of(variant: str) -> str:
    if variant in VARIANT_FAMILIES:
        return VARIANT_FAMILIES[variant]
    prefix = variant.split("_")[0]
    return prefix if prefix in FAMILIES else "other"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _rows(history: list, keys: tuple) -> list:
    """The rows of a history that carry keys[0], each reduced to its step and those keys."""
    rows = []
    for index, row in enumerate(history):
        if keys[0] not in row:
            continue
        step = row.get("step", row.get("_step", index))
        rows.append({"step": step, **{k: row[k] for k in keys if k in row}})
    return rows


def _run_from_parts(*, name, variant, family, seed, status, error, run_id, group, config, summary,
                    history, origin, attention_spec=None) -> Run:
    """The one place a record-shaped run (summary + history) becomes a Run, for records and W&B."""
    train, evals = _rows(history, TRAIN_KEYS), _rows(history, EVAL_KEYS)
    last_eval = evals[-1] if evals else {}

    def final(key):
        """A finished run's summary value, else its last evaluation's (W&B runs from before
        val/loss_min kept only {"min": ...} for val/loss). A run that stopped early has no final
        value, whatever W&B's summary kept of its last logged one."""
        if status != "finished":
            return None
        value = number(summary.get(key))
        return number(last_eval.get(key)) if value is None else value

    val_loss_min = number(summary.get(VAL_LOSS_MIN)) if status == "finished" else None
    if val_loss_min is None and status == "finished" and any(record.VAL_LOSS in row for row in evals):
        val_loss_min = min(row[record.VAL_LOSS] for row in evals if record.VAL_LOSS in row)

    peak = number(summary.get(record.MEMORY_PEAK))
    return Run(
        name=name, variant=variant, family=family, seed=seed, status=status, error=error,
        run_id=run_id, group=group, config=config, attention_spec=attention_spec,
        val_loss=final(record.VAL_LOSS), val_accuracy=final(record.VAL_ACCURACY),
        val_perplexity=final(record.VAL_PERPLEXITY), val_loss_min=val_loss_min,
        params_total=number(summary.get(record.PARAMS_TOTAL)),
        params_attention=number(summary.get(record.PARAMS_ATTENTION)),
        flops_per_token=number(summary.get(record.FLOPS_PER_TOKEN)),
        test_loss=number(summary.get(record.TEST_LOSS)) if status == "finished" else None,
        test_accuracy=number(summary.get(record.TEST_ACCURACY)) if status == "finished" else None,
        kv_cache_bytes_per_token=number(summary.get(record.KV_CACHE_BYTES_PER_TOKEN)),
        time_s=number(summary.get(record.TIME_TOTAL)),
        ended_at=number(summary.get(record.TIME_ENDED_AT)),
        memory_gb=peak, peak_memory_gb=peak,
        data_fingerprint=summary.get(record.DATA_FINGERPRINT),
        init_fingerprint=summary.get(record.INIT_FINGERPRINT),
        processes=number(summary.get(record.HARDWARE_PROCESSES, config.get("processes"))),  # config: W&B's
        device=summary.get(record.HARDWARE_DEVICE),
        probes={k: number(v) for k, v in summary.items()
                if k.startswith(record.PROBE_PREFIX) and number(v) is not None} if status == "finished" else {},
        unigram_loss=number(summary.get(record.DATA_UNIGRAM_LOSS)),
        bigram_loss=number(summary.get(record.DATA_BIGRAM_LOSS)),
        context_gain=final(record.VAL_CONTEXT_GAIN),
        length_metrics=_length_metrics(summary) if status == "finished" else {},
        train_history=train, eval_history=evals, origin=origin,
    )


def _length_metrics(summary: dict) -> dict:
    """{length: {"loss": .., "accuracy": ..}} from a summary's val_len{L}/* keys (record.length_keys)."""
    out: dict = {}
    for key, value in summary.items():
        parsed = record.parse_length_key(key)
        if parsed is not None and number(value) is not None:
            out.setdefault(parsed[0], {})[parsed[1]] = value
    return dict(sorted(out.items()))


# --- local records ----------------------------------------------------------------------------

def is_record(obj) -> bool:
    return isinstance(obj, dict) and "schema" in obj and "summary" in obj and "config" in obj


def run_from_record(record: dict, origin: str = "") -> Run:
    config = record.get("config") or {}
    variant = record.get("attention") or config.get("attention") or "unknown"
    return _run_from_parts(
        name=record.get("run_name") or Path(origin).stem, variant=variant,
        family=record.get("family") or family_of(variant),
        seed=record.get("seed", config.get("seed")), status=record.get("status") or "failed",
        error=record.get("error"), run_id=record.get("run_id"), group=record.get("group"),
        config=config, summary=record.get("summary") or {}, history=record.get("history") or [],
        origin=origin, attention_spec=record.get("attention_spec"),
    )


def load_records(results_dir: Path) -> list[Run]:
    """Every record under results_dir, recursively. Other JSON files (W&B's own, a report's
    seed-schema export) are not records and are passed over; a record of another schema is
    skipped with a warning rather than misread."""
    runs = []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not is_record(obj):
            continue
        if obj["schema"] != record.SCHEMA:
            warn(f"{path}: record schema {obj['schema']!r}, this analysis reads schema {record.SCHEMA}; skipped")
            continue
        runs.append(run_from_record(obj, origin=str(path)))
    return runs


# --- the seed's JSON --------------------------------------------------------------------------

def is_seed_results(obj) -> bool:
    """An object mapping experiment names to results ({"val_loss": ...}) or failures ({"error": ...})."""
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(v, dict) and ("val_loss" in v or "error" in v) for v in obj.values()))


def parse_seed_name(name: str) -> tuple[str, int | None]:
    """`medium_rope_small` -> ("rope_small", None); `medium_rope_small_s2` -> ("rope_small", 2).
    The first token is the seed's size prefix (small/medium/large, or ours, e.g. d64l2)."""
    rest = name.split("_", 1)[1] if "_" in name and name not in VARIANT_FAMILIES else name
    match = re.fullmatch(r"(.+)_s(\d+)", rest)
    if match:
        return match.group(1), int(match.group(2))
    return rest, None


def run_from_seed_entry(name: str, entry: dict, origin: str = "") -> Run:
    # Our own export adds attention/family/seed/status/config... so that a round trip loses
    # nothing; the seed's JSON has none of them, and they are read off the name.
    parsed_variant, parsed_seed = parse_seed_name(name)
    variant = entry.get("attention") or parsed_variant
    val_loss = number(entry.get("val_loss"))
    if entry.get("status") in STATUSES:
        status = entry["status"]
    elif "error" in entry:
        status = "failed"
    else:
        status = "finished" if number(val_loss) is not None else "diverged"
    params = number(entry.get("parameter_count"))
    if params is None and number(entry.get("parameters_millions")) is not None:
        params = round(entry["parameters_millions"] * 1e6)
    minutes = number(entry.get("training_time_minutes"))
    losses = entry.get("loss_curve") or []
    train_steps = entry.get("loss_curve_steps") or range(1, len(losses) + 1)
    val_losses = entry.get("val_losses") or []
    # The seed evaluated every eval_every steps but did not store the steps; spread them evenly.
    val_steps = entry.get("val_steps") or [
        (i + 1) * len(losses) // len(val_losses) if losses else i + 1 for i in range(len(val_losses))]
    eval_history = []
    for i, (step, loss) in enumerate(zip(val_steps, val_losses)):
        row = {"step": step, "val/loss": loss}
        for key, column in (("val/accuracy", "val_accuracies"), ("val/perplexity", "val_perplexities")):
            if i < len(entry.get(column) or []) and entry[column][i] is not None:
                row[key] = entry[column][i]
        eval_history.append(row)
    return Run(
        name=entry.get("run_name") or name, variant=variant,
        family=entry.get("family") or family_of(variant), seed=entry.get("seed", parsed_seed),
        status=status, error=None if entry.get("error") is None else str(entry["error"]),
        run_id=entry.get("run_id"), group=entry.get("group"), config=entry.get("config") or {},
        val_loss=val_loss, val_accuracy=number(entry.get("val_accuracy")),
        val_perplexity=number(entry.get("val_perplexity")), val_loss_min=number(entry.get("val_loss_min")),
        params_total=params, params_attention=number(entry.get("params_attention")),
        flops_per_token=number(entry.get("flops_per_token")),
        kv_cache_bytes_per_token=number(entry.get("kv_cache_bytes_per_token")),
        time_s=None if minutes is None else minutes * 60,
        memory_gb=number(entry.get("memory_used_gb")),
        peak_memory_gb=number(entry.get("peak_memory_gb")),
        data_fingerprint=entry.get("data_fingerprint"), init_fingerprint=entry.get("init_fingerprint"),
        processes=number(entry.get("processes")), device=entry.get("device"),
        unigram_loss=number(entry.get("unigram_loss")), bigram_loss=number(entry.get("bigram_loss")),
        context_gain=number(entry.get("context_gain")),
        length_metrics={int(length): metrics for length, metrics in (entry.get("length_metrics") or {}).items()},
        train_history=[{"step": s, "train/loss": v} for s, v in zip(train_steps, losses)],
        eval_history=eval_history, origin=origin,
    )


def load_seed_results(obj: dict, origin: str = "") -> list[Run]:
    return [run_from_seed_entry(name, entry, origin) for name, entry in obj.items()]


def size_prefix(run: Run) -> str:
    """The seed's names start with a model size; 512d/8L/8H is its "medium"."""
    dims = tuple(run.config.get(k) for k in ("d_model", "n_layers", "n_heads"))
    if dims in ((512, 8, 8), (None, None, None)):
        return "medium"
    return f"d{dims[0]}l{dims[1]}"


def seed_schema_keys(runs: list[Run]) -> list[str]:
    """One unique seed-style key per run: the seed's own name where the run came from its JSON,
    else `<size>_<variant>`, with `_s<seed>` once a variant has several runs."""
    if all(r.name.startswith(f"{size_prefix(r)}_") for r in runs) and len({r.name for r in runs}) == len(runs):
        return [r.name for r in runs]
    per_variant = {}
    for r in runs:
        per_variant[r.variant] = per_variant.get(r.variant, 0) + 1
    keys, taken = [], set()
    for r in runs:
        key = f"{size_prefix(r)}_{r.variant}"
        if per_variant[r.variant] > 1 and r.seed is not None:
            key += f"_s{r.seed}"
        unique, n = key, 2
        while unique in taken:
            unique, n = f"{key}_{n}", n + 1
        taken.add(unique)
        keys.append(unique)
    return keys


def to_seed_schema(runs: list[Run]) -> dict:
    """The seed's results JSON, one entry per run, so its own readers keep working: a run that did
    not finish carries "error", which is how the seed's readers tell failures apart. The extra keys
    (attention, family, seed, status, steps, fingerprints, config) make a round trip lossless for
    everything the report shows; of the per-step history only the train loss is kept."""
    out = {}
    for key, run in zip(seed_schema_keys(runs), runs):
        entry = {
            "val_loss": run.val_loss, "val_accuracy": run.val_accuracy, "val_perplexity": run.val_perplexity,
            "val_loss_min": run.val_loss_min,
            "training_time_minutes": run.time_min, "memory_used_gb": run.memory_gb,
            "peak_memory_gb": run.peak_memory_gb, "parameter_count": run.params_total,
            "parameters_millions": run.params_m, "params_attention": run.params_attention,
            "flops_per_token": run.flops_per_token, "kv_cache_bytes_per_token": run.kv_cache_bytes_per_token,
            "loss_curve": [row["train/loss"] for row in run.train_history],
            "loss_curve_steps": [row["step"] for row in run.train_history],
            "val_losses": [row["val/loss"] for row in run.eval_history],
            "val_accuracies": [row.get("val/accuracy") for row in run.eval_history],
            "val_perplexities": [row.get("val/perplexity") for row in run.eval_history],
            "val_steps": [row["step"] for row in run.eval_history],
            "experiment_name": key, "run_name": run.name, "attention": run.variant, "family": run.family,
            "seed": run.seed, "status": run.status, "run_id": run.run_id, "group": run.group,
            "data_fingerprint": run.data_fingerprint, "init_fingerprint": run.init_fingerprint,
            "processes": run.processes, "device": run.device, "config": run.config,
            "unigram_loss": run.unigram_loss, "bigram_loss": run.bigram_loss, "context_gain": run.context_gain,
            "length_metrics": {str(length): metrics for length, metrics in run.length_metrics.items()},
        }
        if run.status != "finished":
            entry = {"error": run.error or run.status, **entry}
        out[key] = entry
    return out


# --- W&B --------------------------------------------------------------------------------------

def _summary_dict(summary) -> dict:
    """A W&B summary as plain values. A metric with define_metric(summary=...) is stored as a
    dict of aggregates; its final value is "last" where kept (else the history's last eval)."""
    out = {}
    for key, value in summary.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict) and "last" in value:
            value = value["last"]
        out[key] = value
    return out


def _scan(wandb_run, keys: tuple) -> list:
    """All rows with every one of keys (scan_history returns only rows containing all of them,
    so train and eval keys, logged at different steps, are read in separate scans). A run that
    lacks one of the optional keys is read again with the first key alone."""
    rows = list(wandb_run.scan_history(keys=["_step", *keys]))
    if not rows and len(keys) > 1:
        rows = list(wandb_run.scan_history(keys=["_step", keys[0]]))
    return rows


def run_from_wandb(wandb_run) -> Run:
    """A W&B public-API run (or anything with id, name, state, config, summary, scan_history)
    as a Run. tags and group are read where present."""
    config = {k: v for k, v in dict(wandb_run.config).items() if not k.startswith("_")}
    summary = _summary_dict(wandb_run.summary)
    variant = config.get("attention") or "unknown"
    tags = list(getattr(wandb_run, "tags", None) or [])
    family = next((t for t in tags if t in FAMILIES), None) or family_of(variant)
    state = WANDB_STATES.get(wandb_run.state, "failed")
    if state == RUNNING:
        status = RUNNING
    elif summary.get("status") in STATUSES:  # train.py knows best (e.g. "diverged")
        status = summary["status"]
    else:
        status = state
    error = summary.get("error")
    if error is None and status in ("failed", "interrupted"):
        error = f"W&B run state: {wandb_run.state}"
    history = _scan(wandb_run, TRAIN_KEYS) + _scan(wandb_run, EVAL_KEYS)
    return _run_from_parts(
        name=wandb_run.name or wandb_run.id, variant=variant, family=family,
        seed=config.get("seed"), status=status, error=error, run_id=wandb_run.id,
        group=getattr(wandb_run, "group", None) or getattr(wandb_run, "sweep_name", None),
        config=config, summary=summary, history=history,
        origin="/".join(getattr(wandb_run, "path", None) or [wandb_run.id]),
        attention_spec=config.get("attention_spec"),
    )


def load_wandb(project_path: str, filters: dict | None = None, api=None) -> list[Run]:
    """The training runs of a W&B project (optionally filtered, e.g. {"sweep": id}). Runs
    without an attention config (e.g. an earlier analysis run) are not training runs."""
    if api is None:
        import wandb
        api = wandb.Api()
    runs = []
    for wandb_run in api.runs(project_path, filters=filters or {}, lazy=False):
        if "attention" not in wandb_run.config:
            continue
        runs.append(run_from_wandb(wandb_run))
    return runs


# --- one entry point for paths ----------------------------------------------------------------

def load_path(path) -> list[Run]:
    """A results directory of records, one record, or a JSON file in the seed's schema."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"--results {path}: no such file or directory")
    if path.is_dir():
        runs = load_records(path)
        if not runs:
            raise SourceError(f"--results {path}: no run records (JSON files with \"schema\": "
                              f"{record.SCHEMA}) found in this directory or below{_seed_hint(path)}")
        return runs
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"--results {path}: not a readable JSON file ({exc})") from None
    if is_record(obj):
        if obj["schema"] != record.SCHEMA:
            raise SourceError(f"--results {path}: record schema {obj['schema']!r}; "
                              f"this analysis reads schema {record.SCHEMA}")
        return [run_from_record(obj, origin=str(path))]
    if is_seed_results(obj):
        return load_seed_results(obj, origin=str(path))
    raise SourceError(f"--results {path}: neither a run record nor a results JSON in the seed's "
                      f"schema (an object mapping names to {{val_loss, ...}} or {{error}})")


def _seed_hint(directory: Path) -> str:
    for path in sorted(directory.rglob("*.json")):
        try:
            if is_seed_results(json.loads(path.read_text())):
                return f" (but {path} is a seed-schema results file: pass it as --results)"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
    return ""
