"""Train one attention variant of the MoE language model: the single entry point that
`wandb agent` (or local_sweep.py) launches, with Accelerate for devices and processes.

    python train.py --attention=rope_small --seed=1
    python train.py --attention=baseline --vocab_size=49152 --dry_run
    torchrun --nproc_per_node=2 train.py ...        (or `accelerate launch` on GPUs)

Every run ends with one results record, <results_dir>/<group>/<attention>-s<seed>.json (with
-<run_id> before .json when another run's record holds that name), whose status is finished,
failed, diverged, interrupted or stopped, and an exit code that says the same (record.py).
"""
import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from config import FIELD_TYPES, ConfigError, TrainConfig, config_from_values, help_text, parse_args, parse_value
import record
from record import EXIT_CODES, one_line, write_json_atomic, write_record
from probes import Probes, with_layer_means
from model import (IGNORE_INDEX, ModelConfig, MoELM, count_parameters, flops_per_token, init_weights, kv_cache_bytes,
                   kv_cache_bytes_per_token, shared_parameters_fingerprint)

GB = 1024 ** 3
STOP_REQUEST_WAIT_S = 15.0  # W&B's SDK polls the server's stop request this often (run_stopping.py)


class Diverged(Exception):
    pass


class Interrupted(Exception):
    pass


class Stopped(Exception):
    """The sweep stopped the run (early termination, or W&B's stop): a result, not a failure."""


# --- the model ---------------------------------------------------------------------------------

def describe_model(cfg: TrainConfig, vocab_size: int) -> dict:
    """Sizes, FLOPs and KV cache of the configured model, built on the meta device (no memory, no
    data). The KV cache is per generated token, at a context of seq_len (kv_cache_context), and
    whole, for one sequence at that context (kv_cache_bytes: a recurrent kind's fixed state);
    attention_spec: the variant's knobs with its sizes resolved for this model."""
    with torch.device("meta"):
        model = MoELM(ModelConfig.from_train_config(cfg, vocab_size))
    params = count_parameters(model)
    return {"attention": cfg.attention, "family": cfg.family, "attention_spec": cfg.attention_spec().knob_values(),
            "params_total": params["total"],
            "params_attention": params["attention"], "flops_per_token": flops_per_token(model),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model.cfg), "kv_cache_context": cfg.seq_len,
            "kv_cache_bytes": kv_cache_bytes(model.cfg, cfg.seq_len)}


# --- results records (their contract: record.py) -------------------------------------------

def check_writable(results_dir: Path) -> None:
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        probe = results_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--results_dir={results_dir}: not writable ({err.strerror or err})") from None


# --- W&B: only the main process talks to it -----------------------------------------------------

def under_agent() -> bool:
    """Started by a sweep agent: `wandb agent` sets WANDB_SWEEP_ID and WANDB_SWEEP_PARAM_PATH;
    local_sweep.py only the params file (its sweep id exists on no server; it is the run's group)."""
    return bool(os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_SWEEP_PARAM_PATH"))


def under_wandb_agent() -> bool:
    """Started by the real `wandb agent` (a server's sweep), not by local_sweep.py."""
    return bool(os.environ.get("WANDB_SWEEP_ID"))


def run_group(group: "str | None") -> str:
    """The W&B group and results subdirectory: --group, else the agent's sweep id, else the
    launcher's group (local_sweep.py), else local."""
    return group or os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_RUN_GROUP") or "local"


def wandb_dir(results_dir: Path, group: str) -> Path:
    """Where the run's W&B files (offline-run-*, run-*) go: <results_dir>/<group>, beside its
    records, under `wandb agent` too -- the agent sets WANDB_DIR to its own working directory
    (wandb_agent.py), which would put them in ./wandb of wherever it was started. local_sweep.py
    sets WANDB_DIR to its sweep's directory, the same place; a lone run honours WANDB_DIR, else
    <results_dir>."""
    if under_wandb_agent():
        return results_dir / group
    return Path(os.environ.get("WANDB_DIR") or results_dir)


# What the SDK polled as "the server asked this run to stop" for years (RunStoppedStatus)
RUN_STOPPED_QUERY = """
query RunStoppedStatus($projectName: String, $entityName: String, $runId: String!) {
    project(name: $projectName, entityName: $entityName) { run(name: $runId) { stopped } }
}
"""


def server_stopped(run_id: str, project: str, timeout_s: float = 10.0) -> "bool | None":
    """Ask the agent's W&B server whether it asked run `run_id` to stop: under `wandb agent` the
    agent's SIGTERM for the sweep's stop and a preemption's SIGTERM look the same to the run, but
    the server marked the run stopped before it told the agent to stop it. None when there is no
    answer (no server reachable, no such run on it). Through the same call `wandb agent` makes for
    its heartbeats (wandb 0.31: Api._service_api.execute_graphql); any failure is no answer, and so
    is none within timeout_s (wandb retries a lost network for minutes; a preempted machine has
    seconds, and the record is still to be written)."""
    answers = []

    def ask():
        try:
            import wandb

            api = wandb.Api(timeout=timeout_s)
            response = api._service_api.execute_graphql(
                RUN_STOPPED_QUERY, variables={"projectName": os.environ.get("WANDB_PROJECT") or project,
                                              "entityName": os.environ.get("WANDB_ENTITY"), "runId": run_id},
                timeout=timeout_s)
            run = ((response or {}).get("project") or {}).get("run")
            answers.append(None if run is None else bool(run.get("stopped")))
        except Exception as err:  # no answer: the caller decides without it
            print(f"warning: could not ask the W&B server whether it stopped this run ({one_line(err)[:200]})",
                  file=sys.stderr)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answers[0] if answers else None


class Tracker:
    """A thin wrapper over one wandb run (or nothing: off the main process, or with
    WANDB_MODE=disabled, where wandb is not even imported -- a GPU image without it can train)."""

    def __init__(self, enabled: bool, project: str, group: str, name: str, tags: list, config: dict,
                 run_id: str, directory: Path, on_stop=None):
        self.run = None
        if not enabled or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        self.wandb = wandb
        directory.mkdir(parents=True, exist_ok=True)
        # init(tags=) replaces WANDB_TAGS: keep a launcher's (local_sweep.py tags its sweep's runs)
        tags = list(dict.fromkeys([*tags, *(t for t in os.environ.get("WANDB_TAGS", "").split(",") if t)]))
        # stop_fn: what W&B's SDK calls when the server asks the run to stop (the UI's stop button, a
        # sweep's early termination); its default raises KeyboardInterrupt in the main thread
        self.run = wandb.init(project=project, group=group, name=name, tags=tags, job_type="train",
                              config=config, id=run_id, resume="allow", dir=directory,
                              settings=wandb.Settings(stop_fn=on_stop) if on_stop else None)
        # val/loss in the summary is the final value, as in the record (W&B's default "last"; no
        # define_metric(summary="min")); the minimum is val/loss_min in both.

    def sweep_values(self) -> dict:
        """What the sweep put in wandb.config (empty outside a sweep)."""
        if self.run is None or not under_agent():
            return {}
        return {k: v for k, v in dict(self.run.config).items() if k in FIELD_TYPES}

    def update_config(self, values: dict) -> None:
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    @property
    def online(self) -> bool:
        return self.run is not None and not self.run.offline

    def log_checkpoint(self, path: Path, run_id: str, step: int) -> None:
        """The checkpoint as a W&B Artifact, so the run can resume on another machine."""
        if self.run is not None:
            artifact = self.wandb.Artifact(checkpoint_artifact_name(run_id), type="checkpoint", metadata={"step": step})
            artifact.add_dir(str(path))
            self.run.log_artifact(artifact)

    def restore_checkpoint(self, run_id: str, path: Path) -> bool:
        """Download this run's latest checkpoint artifact into `path`; False when there is none (or
        offline: W&B cannot fetch artifacts there)."""
        if not self.online:
            return False
        try:
            artifact = self.run.use_artifact(f"{checkpoint_artifact_name(run_id)}:latest", type="checkpoint")
        except (ValueError, self.wandb.errors.CommError):  # no such artifact: this run never saved one
            return False
        tmp = path.with_name(path.name + ".download")
        shutil.rmtree(tmp, ignore_errors=True)
        artifact.download(root=str(tmp))
        os.replace(tmp, path)
        return True

    def finish(self, summary: dict, exit_code: int, preempting: bool = False) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            if preempting:  # W&B requeues a sweep's run only if it was marked preempting
                self.run.mark_preempting()
            self.run.finish(exit_code=exit_code)


def checkpoint_artifact_name(run_id: str) -> str:
    return f"checkpoint-{run_id}"


def check_sweep_agrees(cfg: TrainConfig, sweep_values: dict) -> None:
    """Sweep values are locked in wandb.config; if they differ from what the command line gave us
    (a launcher that drops ${args}, a bool parsed wrongly) the run would log one config and train
    another. Fail loudly instead."""
    for name, value in sweep_values.items():
        if parse_value(name, value) != getattr(cfg, name):
            raise ConfigError(f"sweep parameter {name}={value!r} disagrees with the command line "
                              f"(--{name}={getattr(cfg, name)}); pass the sweep's ${{args}} to train.py")


# --- checkpoints --------------------------------------------------------------------------------

# Settings a resumed run may change: where things are written and how often it checkpoints.
RESUME_MAY_CHANGE = ("resume", "checkpoint_every", "checkpoint_artifact", "results_dir", "cache_dir", "dry_run",
                     "probes", "eval_test", "eval_lengths")  # these only add measurements; training is the same


def checkpoint_dir(checkpoints: Path, run_name: str, run_id: str) -> Path:
    return checkpoints / f"{run_name}-{run_id}"


def checkpoint_config(cfg: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed: the settings, and the attention as resolved for
    this model (a variant's sizes are relative, so one name and one config could be two designs)."""
    return cfg.to_dict() | {"attention_spec": cfg.attention_spec().knob_values()}


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """`name=saved there, current here` for every setting (but RESUME_MAY_CHANGE) that differs."""
    current = checkpoint_config(cfg)
    return [f"{name}={saved.get(name, 'unset')!r} there, {current[name]!r} here" for name in current
            if name not in RESUME_MAY_CHANGE and saved.get(name, "unset") != current[name]]


# --- measuring ---------------------------------------------------------------------------------

def memory_gb(device: torch.device) -> tuple[float, float]:
    """(now, peak): the CUDA allocator on GPU; on CPU the process's resident set and its
    high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GB, torch.cuda.max_memory_allocated(device) / GB
    import psutil
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return psutil.Process().memory_info().rss / GB, peak / GB


def device_name(device: torch.device) -> str:
    """The GPU model (e.g. "NVIDIA H100 80GB HBM3"), or the device type ("cpu")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then constant or cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def chain_fingerprint(previous: str, batch: tuple[torch.Tensor, torch.Tensor]) -> str:
    """sha256 over all training inputs and targets so far, in order, as a chain so it can be
    checkpointed. A language-model pair (targets = inputs shifted by one) is hashed as its block of
    T + 1 tokens, which holds both (the value a batch of blocks always had); any other pair (a
    task's, with IGNORE_INDEX targets) as inputs then targets."""
    inputs, targets = batch
    if torch.equal(inputs[:, 1:], targets[:, :-1]):
        data = torch.cat([inputs, targets[:, -1:]], dim=1)
    else:
        data = torch.stack([inputs, targets])
    return hashlib.sha256(previous.encode() + data.numpy().tobytes()).hexdigest()


class StopSignals:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop at the next step boundary; a second
    SIGINT stops at once. The stop is the sweep's (the run ends `stopped`) when W&B asked the run to
    stop (request_stop, W&B's stop_fn) or local_sweep.py created the file named in
    $ATTNSWEEP_STOP_FILE; otherwise (Ctrl-C, a preempted machine) the run ends `interrupted`."""

    def __init__(self):
        self.requested = False
        self.sweep_request = threading.Event()
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def request_stop(self):  # W&B's SDK calls it from its own thread
        self.sweep_request.set()
        self.requested = True

    def by_sweep(self, wait_s: float = 0.0) -> bool:
        stop_file = os.environ.get(record.STOP_FILE_ENV)
        if stop_file and Path(stop_file).exists():
            return True
        return self.sweep_request.wait(wait_s) if wait_s > 0 else self.sweep_request.is_set()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# `accelerate launch --mixed_precision=...` and `accelerate config` hand their choice to the
# processes in this variable (accelerate/utils/launch.py); accelerate launch sets it to "no" when
# neither says anything
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"


def mixed_precision(option: str, cuda: bool) -> str:
    """--mixed_precision when given; with auto, the launcher's choice when there is one, else bf16
    on CUDA and fp32 ("no") on CPU."""
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV)
    if option != "auto":
        return option
    if launcher:
        if launcher not in ("no", "bf16", "fp16"):
            raise ConfigError(f"the launcher's mixed precision {launcher!r} ({LAUNCHER_PRECISION_ENV}) is not "
                              f"supported here; allowed: no, bf16, fp16")
        return launcher
    return "bf16" if cuda else "no"


def context_windows(length: int) -> tuple[range, range]:
    """The positions val/context_gain compares in a sequence of `length` predicted tokens
    (position t predicts token t + 1 from t + 1 tokens): early [length/8, length/4) and late
    [7 length/8, length), integer division; Olsson et al. (2022) compare the 50th and 500th of 512."""
    return range(length // 8, length // 4), range(7 * length // 8, length)


def context_gain(position_losses: list[float]) -> float | None:
    """Mean loss over the early positions minus over the late ones (context_windows): how much a
    longer context lowers the loss. None when a window is empty (fewer than 4 positions)."""
    early, late = context_windows(len(position_losses))
    if not early or not late:
        return None
    return (sum(position_losses[t] for t in early) / len(early)
            - sum(position_losses[t] for t in late) / len(late))


# --- the run -----------------------------------------------------------------------------------

class Run:
    """One training run: set up, train, evaluate, checkpoint, and always leave a record."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator, DataLoaderConfiguration

        self.cfg = cfg
        self.started = time.perf_counter()
        mixed = mixed_precision(cfg.mixed_precision, torch.cuda.is_available())
        # cpu=True is what lets Accelerate see a torchrun launch on CPU as multi-process (gloo).
        # split_batches=True says what we do: --batch_size is the global batch, split over the
        # processes (Run._loop), so one optimizer step is one step of the schedule. Without it,
        # Accelerate's prepared scheduler assumes per-process batches and steps num_processes
        # times per step (accelerate/scheduler.py): with 2 processes train/lr at step 2 of a
        # warmup read 0.00225 where one process read 0.0015. (step_scheduler_with_optimizer=False
        # would also step once, but would keep stepping when fp16's scaler skips an optimizer step.)
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(),
                                       dataloader_config=DataLoaderConfiguration(split_batches=True))
        self.is_main = self.accelerator.is_main_process
        launcher = os.environ.get(LAUNCHER_PRECISION_ENV)
        if self.is_main and launcher and cfg.mixed_precision not in ("auto", launcher):
            print(f"warning: --mixed_precision={cfg.mixed_precision} overrides the launcher's {launcher}", file=sys.stderr)
        self.tracker = None
        self.group = run_group(cfg.group)
        self.results_dir = Path(cfg.results_dir)
        self.progress = self._load_progress(self.results_dir / self.group / "checkpoints")
        self.run_id = (os.environ.get("WANDB_RUN_ID") or self.progress.get("run_id")
                       or secrets.token_hex(4))
        # Keyed by run id: two runs of one variant and seed that differ in another setting (a
        # sweep over lr) never share a checkpoint, its .tmp, or its deletion.
        self.checkpoint_dir = checkpoint_dir(self.results_dir / self.group / "checkpoints", cfg.run_name,
                                             self.run_id)
        self.status, self.error = "running", None
        self.history, self.summary = [], {}

    def _load_progress(self, checkpoints: Path) -> dict:
        """A checkpoint's progress, if this run should resume: an agent handing out the same run id
        again after the machine was lost, or --resume (the newest checkpoint of this variant and
        seed). Its config must be this run's; another config is refused, never loaded."""
        run_id = os.environ.get("WANDB_RUN_ID")
        if run_id:
            candidates = [checkpoint_dir(checkpoints, self.cfg.run_name, run_id)]
        elif self.cfg.resume:
            candidates = [path for path in checkpoints.glob(f"{self.cfg.run_name}-*") if "." not in path.name]
        else:
            return {}
        found = [path for path in candidates if (path / "progress.json").exists()]
        saved = [json.loads((path / "progress.json").read_text()) | {"path": str(path)}
                 for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]
        for progress in saved:
            if not config_differences(progress.get("config") or {}, self.cfg):
                return progress
        if saved:
            differences = config_differences(saved[0].get("config") or {}, self.cfg)
            raise ConfigError(f"the checkpoint {saved[0]['path']} was saved by a run with another config "
                              f"({'; '.join(differences[:3])}); resume with that run's settings")
        return {}

    # the whole life of a run; returns the exit code
    def execute(self) -> int:
        cfg = self.cfg
        tracker, bad_input = None, False
        self.signals = StopSignals()  # from here on, SIGTERM/SIGINT end in a checkpoint, not a kill
        try:
            if self.is_main:
                check_writable(self.results_dir)
            tracker = Tracker(self.is_main, cfg.project, self.group, cfg.run_name, [cfg.family],
                              cfg.to_dict(), self.run_id, wandb_dir(self.results_dir, self.group),
                              on_stop=self.signals.request_stop)
            self.tracker = tracker
            check_sweep_agrees(cfg, tracker.sweep_values())
            self._restore_checkpoint_artifact(tracker)
            self.train(tracker)
            self.status = "finished"
        except ConfigError as err:
            self.status, self.error, bad_input = "failed", str(err), True
        except Diverged as err:
            self.status, self.error = "diverged", str(err)
            if self.is_main and os.environ.get("WANDB_SWEEP_ID"):
                # `wandb agent` counts every exit code > 0 as a failure and gives up after 3 in its
                # first 60 s, or once failures reach 5 and the ended runs (wandb_agent.py), and says
                # why only as it stops. A grid with a diverging lr must not end that way unannounced.
                print(f"warning: wandb agent counts this diverged run (exit {EXIT_CODES['diverged']}) as a failure and "
                      f"stops after 3 in its first minute or 5 with no successes; for sweeps where runs may "
                      f"diverge start it with WANDB_AGENT_DISABLE_FLAPPING=true "
                      f"WANDB_AGENT_MAX_INITIAL_FAILURES=1000", file=sys.stderr)
        except Stopped as err:
            self.status, self.error = "stopped", str(err)
        except Interrupted as err:
            self.status, self.error = "interrupted", str(err)
        except KeyboardInterrupt:
            self.status, self.error = "interrupted", "stopped by a second Ctrl-C, without a new checkpoint"
        except torch.OutOfMemoryError:
            self.status = "failed"
            self.error = (f"out of memory with --batch_size={cfg.batch_size} --seq_len={cfg.seq_len} "
                          f"({cfg.attention}); lower the batch size or sequence length")
        except Exception as err:  # any crash still ends as a failed run with its reason recorded
            self.status, self.error = "failed", f"{type(err).__name__}: {one_line(err, 500)}"
            self._save_traceback()
        finally:
            self.signals.restore()
        exit_code = EXIT_CODES["config"] if bad_input else EXIT_CODES[self.status]
        self._finish(tracker, exit_code)
        return exit_code

    def _restore_checkpoint_artifact(self, tracker: Tracker) -> None:
        """--checkpoint_artifact: a run id W&B hands out again, on a machine without its checkpoint
        (a preempted run requeued elsewhere), continues from the checkpoint artifact it logged."""
        if not (self.cfg.checkpoint_artifact and os.environ.get("WANDB_RUN_ID")) or self.progress:
            return
        if self.is_main and tracker.restore_checkpoint(self.run_id, self.checkpoint_dir):
            print(f"restored the checkpoint of run {self.run_id} from its W&B artifact", file=sys.stderr)
        self.accelerator.wait_for_everyone()  # the other processes read what the main one downloaded
        self.progress = self._load_progress(self.checkpoint_dir.parent)

    def _save_traceback(self) -> None:
        if self.is_main:
            path = self.results_dir / self.group / f"{self.cfg.run_name}.traceback.txt"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(traceback.format_exc())
                self.error += f" (traceback: {path})"
            except OSError:
                pass

    def _finish(self, tracker: "Tracker | None", exit_code: int) -> None:
        self.summary.update({"status": self.status, "error": self.error,
                             record.TIME_TOTAL: round(self.progress.get("elapsed", 0.0) + self.elapsed(), 3),
                             record.TIME_ENDED_AT: round(time.time(), 3)})  # which of two reruns is the later
        if not self.is_main:  # one error line, not one per process
            return
        if self.error and self.status != "stopped":
            print(f"error: {self.error}", file=sys.stderr)
        results = {
            "schema": record.SCHEMA, "run_id": self.run_id, "run_name": self.cfg.run_name, "group": self.group,
            "attention": self.cfg.attention, "family": self.cfg.family, "seed": self.cfg.seed,
            # the variant's knobs resolved for this model size (its sizes may be relative)
            "attention_spec": self.cfg.attention_spec().knob_values(),
            "status": self.status, "error": self.error, "config": self.cfg.to_dict(), "summary": self.summary,
            "history": self.history,
        }
        try:
            write_record(self.results_dir, self.group, self.cfg.run_name, self.run_id, results)
        except OSError as err:  # already reported as the error when the directory is unwritable
            print(f"warning: cannot write the results record ({err})", file=sys.stderr)
        if self.status in ("finished", "stopped"):  # a checkpoint is only for finishing; it can be GBs
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        if tracker is not None:  # a real agent's interrupted run is a preempted one: W&B requeues it
            tracker.finish(self.summary, exit_code,
                           preempting=self.status == "interrupted" and bool(os.environ.get("WANDB_SWEEP_ID")))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # --- training ---

    def train(self, tracker: Tracker) -> None:
        from data import cached_ngram_losses, load_tokens, make_batches

        cfg, accelerator = self.cfg, self.accelerator
        if cfg.task == "lm":
            with accelerator.main_process_first():  # the main process tokenizes; the others read its cache
                tokens, tokenizer_vocab = load_tokens(cfg)
            vocab_size = cfg.vocab_size or tokenizer_vocab
            if vocab_size < tokenizer_vocab:
                raise ConfigError(f"--vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")
            batches = make_batches(tokens, cfg)
            if self.is_main:  # what token frequencies alone predict
                self.summary.update(cached_ngram_losses(
                    cfg, batches.blocks[batches.train_ids].numpy(),
                    [batches.val_batch(index) for index in range(cfg.eval_batches)], tokenizer_vocab))
        else:  # a synthetic task: no corpus, no tokenizer; its vocabulary is the model's
            from tasks import make_task_batches

            batches, vocab_size = make_task_batches(cfg), cfg.task_settings()["task_vocab"]
            tracker.update_config(cfg.task_settings())  # the knobs as resolved (None: the task's default)
        for length in cfg.lengths:  # a length the validation data cannot fill fails now, not after training
            batches.at_length(length, cfg.eval_batches - 1)
        world, rank = accelerator.num_processes, accelerator.process_index
        if cfg.batch_size % world:
            raise ConfigError(f"--batch_size={cfg.batch_size} does not split over {world} processes")
        tracker.update_config({"vocab_size": vocab_size, "processes": world, "group": self.group,
                               "attention_spec": cfg.attention_spec().knob_values()})
        # what time and memory are measured on; the report's audit flags compared runs where it differs
        self.summary.update({record.HARDWARE_PROCESSES: world, record.HARDWARE_DEVICE: device_name(accelerator.device)})

        model = MoELM(ModelConfig.from_train_config(cfg, vocab_size))
        init_weights(model, cfg.seed)
        params = count_parameters(model)
        self.summary.update({
            record.PARAMS_TOTAL: params["total"], record.PARAMS_ATTENTION: params["attention"],
            record.FLOPS_PER_TOKEN: flops_per_token(model),
            record.KV_CACHE_BYTES_PER_TOKEN: kv_cache_bytes_per_token(model.cfg),
            record.INIT_FINGERPRINT: shared_parameters_fingerprint(model),
        })
        device = accelerator.device
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=device.type in ("cuda", "cpu"))  # fused: 76 vs 522 ms/step on CPU
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
        compiled = torch.compile(model) if cfg.compile else model
        compiled, optimizer, scheduler = accelerator.prepare(compiled, optimizer, scheduler)
        torch.manual_seed(cfg.seed)  # dropout and router noise; init used its own generators
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        start_step, fingerprint = 0, ""
        if self.progress:
            accelerator.load_state(str(self.checkpoint_dir / "state"))
            start_step, fingerprint = self.progress["step"], self.progress["fingerprint"]
            self.history = self.progress["history"]
            print(f"resuming {cfg.run_name} from its checkpoint at step {start_step}", file=sys.stderr)

        self._loop(compiled, optimizer, scheduler, batches, tracker, start_step, fingerprint, world, rank, device)

    def _loop(self, model, optimizer, scheduler, batches, tracker, start_step, fingerprint, world, rank,
              device) -> None:
        from tqdm import tqdm

        cfg, accelerator = self.cfg, self.accelerator
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=start_step, disable=not self.is_main, desc=cfg.run_name,
                   file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        model.train()
        # the sweep's own overhead per run: imports, W&B init, cached data, model build
        self.summary[record.TIME_STARTUP] = round(time.time() - process_start_time(), 3)
        for step in range(start_step, cfg.steps):
            begun = time.perf_counter()
            batch = batches.train_batch(step)  # (inputs, targets): targets IGNORE_INDEX where not scored
            fingerprint = chain_fingerprint(fingerprint, batch)
            inputs, targets = (part.chunk(world)[rank].to(device, non_blocking=True) for part in batch)
            with accelerator.autocast():
                out = model(inputs, targets)  # the logits are never materialised
            ce, aux_loss, accuracy = out.loss, out.aux_loss, out.accuracy
            accelerator.backward(ce + cfg.aux_loss_weight * aux_loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            stop = torch.full((), float(self.signals.requested), device=device)  # no host-to-device sync
            stats = torch.stack([ce.detach(), accuracy, aux_loss.detach().float(), grad_norm.float(), stop])
            loss, accuracy, aux, grad_norm, stop = accelerator.reduce(stats, "mean").tolist()  # the one sync
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise Diverged(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step + 1}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_time = time.perf_counter() - begun
            now_gb, peak_gb = memory_gb(device)
            # train/loss, train/accuracy, train/lr, train/grad_norm, train/aux_loss,
            # perf/step_time_ms, perf/tokens_per_sec, memory/allocated_gb, memory/peak_gb
            row = {"step": step + 1, **dict(zip(record.TRAIN_KEYS, (
                loss, accuracy, lr, grad_norm, aux, step_time * 1000, tokens_per_step / step_time, now_gb, peak_gb)))}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                row.update(self.evaluate(model, batches, world, rank, device))
                if step + 1 == cfg.steps:  # after training only: at each evaluation it would cost more than training
                    row.update(self.evaluate_at_lengths(model, batches, world, rank, device))
                model.train()
            self.history.append(row)
            tracker.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / step_time:,.0f}", refresh=False)

            last = step + 1 == cfg.steps
            if stop and self.stopped_by_sweep(device):  # no checkpoint: it would only be deleted
                raise Stopped(f"stopped by the sweep after step {step + 1}")
            if stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last):
                self.save_checkpoint(step + 1, fingerprint)
            if stop and self.stopped_by_sweep(device, wait=True):  # the checkpoint is safe; a late request?
                raise Stopped(f"stopped by the sweep after step {step + 1}")
            if stop:
                raise Interrupted(f"stopped by a signal after step {step + 1}; checkpoint saved; {self.resume_hint()}")
        bar.close()
        final = self.history[-1]
        _, peak_gb = memory_gb(device)
        self.summary.update({k: final[k] for k in record.EVAL_KEYS})
        self.summary.update({k: v for k, v in final.items()
                             if k == record.VAL_CONTEXT_GAIN or record.parse_length_key(k)})
        self.summary.update({k: v for k, v in final.items() if k.startswith(record.PROBE_PREFIX)})
        self.summary[record.VAL_LOSS_MIN] = min(row[record.VAL_LOSS] for row in self.history if record.VAL_LOSS in row)
        for threshold, key in record.VAL_STEP_AT.items():  # sample efficiency: None when never reached
            self.summary[key] = next((row["step"] for row in self.history
                                      if row.get(record.VAL_ACCURACY, -1.0) >= threshold), None)
        if cfg.eval_test:  # once, after training: nothing that chose this run's settings saw these blocks
            self.summary.update(self.evaluate(model, batches, world, rank, device, split="test"))
        self.summary.update({record.MEMORY_PEAK: peak_gb, record.DATA_FINGERPRINT: fingerprint})
        if device.type == "cuda":  # what the allocator held from the driver, beside what tensors used
            self.summary[record.MEMORY_PEAK_RESERVED] = torch.cuda.max_memory_reserved(device) / GB

    @torch.no_grad()
    def evaluate(self, model, batches, world, rank, device, split: str = "val") -> dict:
        """Mean loss and accuracy over the scored targets (every next token for lm, the answers for
        a task) of the first eval_batches validation (or test) batches, the same for every run, each
        split over the processes like training batches; for lm on validation, the context gain too.
        (Every test block instead: 80-145 s a run at seq_len 32 on the embedded corpus, 2 cores.)"""
        model.eval()
        batch = batches.val_batch if split == "val" else batches.test_batch
        probing = self.cfg.probes and split == "val"
        if probing:  # hooks on the plain module (compiled graphs would break on them): evaluation only
            model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        with Probes(model) if probing else contextlib.nullcontext() as probes:
            loss, accuracy, position_losses = self._score(model, batch, world, rank, device)
        keys = record.EVAL_KEYS if split == "val" else record.TEST_KEYS  # {split}/loss, /accuracy, /perplexity
        results = dict(zip(keys, (loss, accuracy, math.exp(min(loss, 700)))))
        if split == "val" and self.cfg.task == "lm":
            gain = context_gain(position_losses)
            if gain is not None:
                results[record.VAL_CONTEXT_GAIN] = gain
        if probing:  # a mean over processes (of their maxima, for the maxima)
            names, values = probes.tensor()
            results.update(with_layer_means(dict(zip(names, self.accelerator.reduce(values, "mean").tolist()))))
        return results

    def resume_hint(self) -> str:
        """What continues an interrupted run, as it is true for whoever launched it."""
        if under_wandb_agent() and self.tracker is not None and self.tracker.online:
            where = ("on any machine (its checkpoint is a W&B artifact)" if self.cfg.checkpoint_artifact else
                     "on a machine with this results directory (elsewhere it starts again: --checkpoint_artifact=True)")
            return (f"marked preempting: W&B hands run {self.run_id} out again and the agent that gets it "
                    f"resumes from the checkpoint {where}")
        if under_wandb_agent():  # offline: the server never hears of the preemption, so nothing requeues it
            return (f"offline, so W&B does not hand it out again: continue with this run's options plus "
                    f"--resume --group={self.group}")
        if under_agent():
            return "`local_sweep.py --resume SWEEP_ID` re-runs it from the checkpoint"
        return "continue with --resume" + (f" --group={self.group}" if self.cfg.group else "")

    @torch.no_grad()
    def evaluate_at_lengths(self, model, batches, world, rank, device) -> dict:
        """--eval_lengths: loss and accuracy of eval_batches validation batches at each context
        length (batches.at_length), on the plain module: a compiled graph would recompile per length.
        Past seq_len the RoPE tables grow once (attention/rope.py); windows keep their trained size."""
        model.eval()
        plain = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        results = {}
        for length in self.cfg.lengths:
            loss, accuracy, _ = self._score(plain, lambda index: batches.at_length(length, index), world, rank, device)
            results.update(zip(record.length_keys(length), (loss, accuracy)))
        return results

    def _score(self, model, batch, world, rank, device) -> tuple[float, float, list[float]]:
        """(mean loss, accuracy, mean loss at each position) over the scored targets of batches
        batch(0) .. batch(eval_batches - 1), over all processes."""
        totals, positions = torch.zeros(3, device=device), None
        for index in range(self.cfg.eval_batches):
            inputs, targets = (part.chunk(world)[rank].to(device, non_blocking=True) for part in batch(index))
            with self.accelerator.autocast():
                out = model(inputs, targets)
            scored = targets != IGNORE_INDEX
            count = scored.sum()  # a mean over scored targets, weighted by their count
            totals += torch.stack([out.loss.float(), out.accuracy.float(), torch.ones((), device=device)]) * count
            # per position: the loss sum and the scored count (token_losses are 0 where not scored)
            here = torch.stack([out.token_losses.sum(0), scored.sum(0).float()])
            positions = here if positions is None else positions + here
        loss_sum, correct, count = self.accelerator.reduce(totals, "sum").tolist()
        position_sums, position_counts = self.accelerator.reduce(positions, "sum").tolist()
        per_position = [total / n if n else math.nan for total, n in zip(position_sums, position_counts)]
        return loss_sum / count, correct / count, per_position

    def stopped_by_sweep(self, device, wait: bool = False) -> bool:
        """Whether this stop is the sweep's, agreed by all processes (the main one decides). Under
        `wandb agent` the agent's SIGTERM for the sweep's stop can come before the SDK has polled
        the stop request (every 15 s, run_stopping.py), and an offline run never polls it: with
        `wait` (once the checkpoint is saved) the main process asks the server whether it stopped
        this run; without an answer, an online run waits STOP_REQUEST_WAIT_S for the SDK's request
        before taking the SIGTERM for a preemption (the agent sends SIGKILL only 30 s after its
        SIGTERM)."""
        mine = False
        if self.is_main:
            mine = self.signals.by_sweep()
            if not mine and wait and under_wandb_agent() and self.tracker is not None and self.tracker.run is not None:
                answer = server_stopped(self.run_id, self.cfg.project)
                if answer is None and self.tracker.online:
                    answer = self.signals.by_sweep(STOP_REQUEST_WAIT_S)
                mine = bool(answer)
        return self.accelerator.reduce(torch.full((), float(mine), device=device), "sum").item() > 0

    def save_checkpoint(self, step: int, fingerprint: str) -> None:
        """Model, optimizer, scheduler and RNG states (Accelerate) plus our progress, written to a
        temp directory and renamed into place, so a kill mid-save leaves the previous checkpoint."""
        tmp = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".tmp")
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp / "state"))
        if self.is_main:
            progress = {"step": step, "fingerprint": fingerprint, "run_id": self.run_id, "config": checkpoint_config(self.cfg),
                        "elapsed": self.progress.get("elapsed", 0.0) + self.elapsed(), "history": self.history}
            write_json_atomic(tmp / "progress.json", progress)
            old = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")
            if self.checkpoint_dir.exists():
                os.replace(self.checkpoint_dir, old)
            os.replace(tmp, self.checkpoint_dir)
            shutil.rmtree(old, ignore_errors=True)
            if self.cfg.checkpoint_artifact:
                self.tracker.log_checkpoint(self.checkpoint_dir, self.run_id, step)
        self.accelerator.wait_for_everyone()


# --- the command line --------------------------------------------------------------------------

def refuse(err: ConfigError, argv: list[str]) -> int:
    """Bad input: one `error:` line and exit 2. Under a W&B agent the run is also opened and marked
    failed with the reason, so the dashboard shows it instead of the agent handing it out again.
    Only the main process (RANK 0, or no launcher) says so: every process of a launch sees the
    same bad input."""
    if os.environ.get("RANK", "0") != "0":
        return EXIT_CODES["config"]
    print(f"error: {err}", file=sys.stderr)
    if under_agent():
        raw = dict(arg[2:].partition("=")[::2] for arg in argv if arg.startswith("--"))
        try:
            import wandb

            directory = wandb_dir(Path(raw.get("results_dir") or "results"), run_group(raw.get("group")))
            directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(config={"args": argv}, job_type="train", dir=directory,
                             name=f"{raw.get('attention', 'invalid')}-s{raw.get('seed', '0')}")
            run.summary.update({"status": "failed", "error": str(err)})
            run.finish(exit_code=EXIT_CODES["config"])
        except Exception as wandb_err:  # the refusal itself must not turn into a traceback
            print(f"warning: could not report the failure to W&B ({wandb_err})", file=sys.stderr)
    return EXIT_CODES["config"]


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        cfg = config_from_values(parse_args(argv))
        if cfg.dry_run:
            vocab_size = cfg.vocab_size if cfg.task == "lm" else cfg.task_settings()["task_vocab"]
            if vocab_size is None:
                raise ConfigError("--dry_run needs --vocab_size (it loads no tokenizer)")
            print(json.dumps(describe_model(cfg, vocab_size)))
            return 0
        run = Run(cfg)  # finds the checkpoint to resume, and refuses one of another config
    except ConfigError as err:
        return refuse(err, argv)
    return run.execute()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
