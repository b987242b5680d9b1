"""The run's contract, in one place: what train.py writes when a run ends, and what local_sweep.py
and analysis/ read back. Plain Python (no torch), so every reader can import it.

A run ends with one results record, <results_dir>/<group>/<run_name>.json (or
<run_name>-<run_id>.json when another run's record holds that name), whose status is one of
STATUSES, and an exit code that says the same (EXIT_CODES).
"""
import json
import math
import os
from pathlib import Path

SCHEMA = 1  # the record's "schema"; analysis skips records of another one

# How a run ended, and the exit code train.py returns for it. "stopped": the sweep stopped it
# (hyperband early termination, or W&B asked the run to stop) -- a result, not a failure, so it
# exits 0 like a finished run and does not count toward `wandb agent`'s give-up rule.
# "interrupted": a signal without a stop request (Ctrl-C, preemption); its checkpoint is kept.
STATUSES = ("finished", "failed", "diverged", "interrupted", "stopped")
EXIT_CODES = {"finished": 0, "failed": 1, "config": 2, "diverged": 3, "interrupted": 130, "stopped": 0}
RUNNING = "running"  # only from W&B or a sweep's state: neither a success nor a failure yet
# How a sweep tells a run that its SIGTERM is the sweep stopping it (a result: "stopped"), not a
# preemption ("interrupted"): local_sweep.py names a file in this variable and creates it before
# the SIGTERM. (Online, W&B's SDK calls the run's stop_fn when the server asks the run to stop.)
STOP_FILE_ENV = "ATTNSWEEP_STOP_FILE"

# The W&B run state each status ends in (what the dashboard shows once the run is synced):
# W&B's state is the exit code's (0 finished, else failed); the record's status is also in the
# W&B summary as "status", which analysis reads before the state.
WANDB_STATE = {"finished": "finished", "failed": "failed", "diverged": "failed",
               "interrupted": "failed",  # under `wandb agent`: marked preempting first, so W&B requeues it
               "stopped": "finished"}

# The metric names (DESIGN.md section 6). Logged every step:
TRAIN_KEYS = ("train/loss", "train/accuracy", "train/lr", "train/grad_norm", "train/aux_loss",
              "perf/step_time_ms", "perf/tokens_per_sec", "memory/allocated_gb", "memory/peak_gb")
# logged at each evaluation:
EVAL_KEYS = ("val/loss", "val/accuracy", "val/perplexity")
# and in the summary (the record's and W&B's). val/loss there is the final evaluation's (the
# headline, as the seed reports it); the lowest evaluation is val/loss_min.
VAL_LOSS, VAL_ACCURACY, VAL_PERPLEXITY = EVAL_KEYS
VAL_LOSS_MIN = "val/loss_min"
# The first evaluation step at which val/accuracy reached 0.9 and 0.99 (sample efficiency, for a
# task's answer accuracy above all); None when the run never did.
VAL_STEP_AT = {0.9: "val/step_at_0.9", 0.99: "val/step_at_0.99"}
# Only in the summary of a run with --eval_test: one evaluation on the held-out test blocks, after
# training (tuning never reads them).
TEST_KEYS = ("test/loss", "test/accuracy", "test/perplexity")
TEST_LOSS, TEST_ACCURACY, TEST_PERPLEXITY = TEST_KEYS
# Only with --probes: the mechanism probes (probes.py), measured at each evaluation on its batches
# and logged with it; the summary holds the last evaluation's. Each is logged as the mean over layers
# (these names) and per layer (probe_key(name, layer): "probe/attn_entropy/layer0", ...). A probe a
# model cannot measure is absent: gate openness without a gated attention kind, the attention probes
# for a kind without `attention_scores`.
PROBE_KEYS = ("probe/attn_entropy", "probe/attn_sink", "probe/attn_logit_max", "probe/act_max", "probe/act_kurtosis",
              "probe/expert_load_max", "probe/expert_load_min", "probe/routing_entropy", "probe/gate_open")
PROBE_PREFIX = "probe/"
(PROBE_ATTN_ENTROPY, PROBE_ATTN_SINK, PROBE_ATTN_LOGIT_MAX, PROBE_ACT_MAX, PROBE_ACT_KURTOSIS, PROBE_EXPERT_LOAD_MAX,
 PROBE_EXPERT_LOAD_MIN, PROBE_ROUTING_ENTROPY, PROBE_GATE_OPEN) = PROBE_KEYS


def probe_key(name: str, layer: int | None = None) -> str:
    """A probe's metric name: the mean over layers (layer None), or one layer's."""
    return name if layer is None else f"{name}/layer{layer}"


# Language modelling only (--task=lm): what the models learned. The validation tokens' cross-entropy
# under the training split's own smoothed unigram and bigram counts (data.ngram_losses; the same
# for every run of one token cache and split), and the final evaluation's context gain: mean loss
# over early positions of each validation block minus over late ones (train.context_windows).
DATA_UNIGRAM_LOSS, DATA_BIGRAM_LOSS = "data/unigram_loss", "data/bigram_loss"
VAL_CONTEXT_GAIN = "val/context_gain"
# --eval_lengths: the validation loss and accuracy at a context of L tokens, after training.
LENGTH_PREFIX = "val_len"


def length_keys(length: int) -> tuple[str, str]:
    """(loss, accuracy) metric names at a context of `length` tokens: val_len128/loss, ..."""
    return f"{LENGTH_PREFIX}{length}/loss", f"{LENGTH_PREFIX}{length}/accuracy"


def parse_length_key(key: str) -> tuple[int, str] | None:
    """"val_len128/loss" -> (128, "loss"); None for any other key."""
    head, _, metric = key.partition("/")
    digits = head.removeprefix(LENGTH_PREFIX)
    if head == digits or not digits.isdigit() or metric not in ("loss", "accuracy"):
        return None
    return int(digits), metric


PARAMS_TOTAL, PARAMS_ATTENTION, FLOPS_PER_TOKEN = "params/total", "params/attention", "flops/per_token"
KV_CACHE_BYTES_PER_TOKEN = "kv_cache/bytes_per_token"  # at 2 bytes a value, over all layers
INIT_FINGERPRINT, DATA_FINGERPRINT = "init/shared_fingerprint", "data/fingerprint"
TIME_TOTAL, TIME_STARTUP, TIME_ENDED_AT = "time/total_s", "time/startup_s", "time/ended_at"
MEMORY_PEAK, MEMORY_PEAK_RESERVED = "memory/peak_gb", "memory/peak_reserved_gb"
HARDWARE_PROCESSES, HARDWARE_DEVICE = "hardware/processes", "hardware/device"


# --- small helpers every reader and writer shares ------------------------------------------------

def one_line(text, limit: int | None = None) -> str:
    """Text (an exception's, a message) on one line, cut at `limit` characters."""
    line = " ".join(str(text).split())
    return line if limit is None else line[:limit]


def number(value):
    """A finite int or float, else None (missing, a string, a bool, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _write_temp_json(path: Path, obj) -> Path:
    """obj written to a hidden temp file next to `path` (same filesystem, so a rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    return tmp


def write_json_atomic(path: Path, obj) -> None:
    """temp file + rename in the same directory: readers see the old file or the new, never half."""
    os.replace(_write_temp_json(path, obj), path)


# --- the record's file ----------------------------------------------------------------------------

def record_names(run_name: str, run_id: str) -> tuple[str, str]:
    """The two names a run's record may have: its own, and with its run id when that is taken."""
    return f"{run_name}.json", f"{run_name}-{run_id}.json"


def write_record(results_dir: Path, group: str, run_name: str, run_id: str, record: dict) -> Path:
    """<group>/<run_name>.json, unless another run's record (finished or not: a failed run's reason
    is a result too) holds that name: then the run id goes into the name, so two agents sharing a
    results directory never clobber each other. The name is claimed with a hard link, which fails
    if it exists, so two runs ending at the same moment cannot both take it."""
    own, with_id = record_names(run_name, run_id)
    path = results_dir / group / own
    tmp = _write_temp_json(path, record)
    try:
        os.link(tmp, path)
        tmp.unlink()
        return path
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: claim by rename, as before
        if not path.exists():
            os.replace(tmp, path)
            return path
    try:
        owner = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner not in (run_id, None):
        path = path.with_name(with_id)
    os.replace(tmp, path)
    return path


def find_record(records_dir: Path, run_name: str, run_id: str, since: float) -> tuple[dict | None, Path | None]:
    """The record run `run_id` wrote at `since` or later, wherever write_record put it (its two
    names first, then any record in the directory), with its path; (None, None) if none."""
    own, with_id = record_names(run_name, run_id)
    candidates = [records_dir / with_id, records_dir / own]
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
