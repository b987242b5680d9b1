"""Train one attention variant of the MoE language model: the single entry point that
`wandb agent` (or local_sweep.py) launches, with Accelerate for devices and processes.

    python train.py --attention=rope_small --seed=1
    python train.py --attention=baseline --vocab_size=49152 --dry_run
    torchrun --nproc_per_node=2 train.py ...        (or `accelerate launch` on GPUs)

Every run ends with one results record, <results_dir>/<group>/<attention>-s<seed>.json (with
-<run_id> before .json when another run's record holds that name), whose status is finished,
failed, diverged or interrupted, and an exit code that says the same.
"""
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from config import FIELD_TYPES, ConfigError, TrainConfig, config_from_values, help_text, parse_args, parse_value
from model import (ModelConfig, MoELM, count_parameters, flops_per_token, init_weights,
                   shared_parameters_fingerprint)

RECORD_SCHEMA = 1
EXIT_CODES = {"finished": 0, "failed": 1, "config": 2, "diverged": 3, "interrupted": 130}
GB = 1024 ** 3


class Diverged(Exception):
    pass


class Interrupted(Exception):
    pass


# --- the model ---------------------------------------------------------------------------------

def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        attention=cfg.attention_spec(), vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, d_ff=cfg.d_ff, n_experts=cfg.n_experts, top_k=cfg.top_k, seq_len=cfg.seq_len,
        dropout=cfg.dropout, router_noise_std=cfg.router_noise_std, rope_theta=cfg.rope_theta,
        embed_scale=cfg.embed_scale, aux_loss_reduction=cfg.aux_loss_reduction, expert_dropout=cfg.expert_dropout,
        final_dropout=cfg.final_dropout, init_residual_scaling=cfg.init_residual_scaling,
    )


def describe_model(cfg: TrainConfig, vocab_size: int) -> dict:
    """Sizes and FLOPs of the configured model, built on the meta device (no memory, no data)."""
    with torch.device("meta"):
        model = MoELM(model_config(cfg, vocab_size))
    params = count_parameters(model)
    return {"attention": cfg.attention, "family": cfg.family, "params_total": params["total"],
            "params_attention": params["attention"], "flops_per_token": flops_per_token(model)}


# --- results records ---------------------------------------------------------------------------

def write_json_atomic(path: Path, obj) -> None:
    """temp file + rename in the same directory: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def write_record(results_dir: Path, group: str, run_name: str, run_id: str, record: dict) -> Path:
    """<group>/<run_name>.json, unless another run's record (finished or not: a failed run's reason
    is a result too) holds that name: then the run id goes into the name, so two agents sharing a
    results directory never clobber each other. The name is claimed with a hard link, which fails
    if it exists, so two runs ending at the same moment cannot both take it."""
    path = results_dir / group / f"{run_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
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
        path = path.with_name(f"{run_name}-{run_id}.json")
    os.replace(tmp, path)
    return path


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


class Tracker:
    """A thin wrapper over one wandb run (or nothing: off the main process, or with
    WANDB_MODE=disabled, where wandb is not even imported -- a GPU image without it can train)."""

    def __init__(self, enabled: bool, project: str, group: str, name: str, tags: list, config: dict,
                 run_id: str, directory: Path):
        self.run = None
        if not enabled or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        self.wandb = wandb
        directory.mkdir(parents=True, exist_ok=True)
        # init(tags=) replaces WANDB_TAGS: keep a launcher's (local_sweep.py tags its sweep's runs)
        tags = list(dict.fromkeys([*tags, *(t for t in os.environ.get("WANDB_TAGS", "").split(",") if t)]))
        self.run = wandb.init(project=project, group=group, name=name, tags=tags, job_type="train",
                              config=config, id=run_id, resume="allow", dir=os.environ.get("WANDB_DIR", directory))
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

    def finish(self, summary: dict, exit_code: int) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)


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
RESUME_MAY_CHANGE = ("resume", "checkpoint_every", "results_dir", "cache_dir", "dry_run")


def checkpoint_dir(checkpoints: Path, run_name: str, run_id: str) -> Path:
    return checkpoints / f"{run_name}-{run_id}"


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """`name=saved there, current here` for every setting (but RESUME_MAY_CHANGE) that differs."""
    current = cfg.to_dict()
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


def chain_fingerprint(previous: str, batch: torch.Tensor) -> str:
    """sha256 over all training tokens so far, in order, as a chain so it can be checkpointed."""
    return hashlib.sha256(previous.encode() + batch.numpy().tobytes()).hexdigest()


class StopSignals:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop at the next step boundary; a second
    SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --- the run -----------------------------------------------------------------------------------

class Run:
    """One training run: set up, train, evaluate, checkpoint, and always leave a record."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator, DataLoaderConfiguration

        self.cfg = cfg
        self.started = time.perf_counter()
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
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
        self.group = cfg.group or os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_RUN_GROUP") or "local"
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
                              cfg.to_dict(), self.run_id, self.results_dir)
            check_sweep_agrees(cfg, tracker.sweep_values())
            self.train(tracker)
            self.status = "finished"
        except ConfigError as err:
            self.status, self.error, bad_input = "failed", str(err), True
        except Diverged as err:
            self.status, self.error = "diverged", str(err)
        except Interrupted as err:
            self.status, self.error = "interrupted", str(err)
        except KeyboardInterrupt:
            self.status, self.error = "interrupted", "stopped by a second Ctrl-C, without a new checkpoint"
        except torch.OutOfMemoryError:
            self.status = "failed"
            self.error = (f"out of memory with --batch_size={cfg.batch_size} --seq_len={cfg.seq_len} "
                          f"({cfg.attention}); lower the batch size or sequence length")
        except Exception as err:  # any crash still ends as a failed run with its reason recorded
            self.status, self.error = "failed", f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
            self._save_traceback()
        finally:
            self.signals.restore()
        exit_code = EXIT_CODES["config"] if bad_input else EXIT_CODES[self.status]
        self._finish(tracker, exit_code)
        return exit_code

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
                             "time/total_s": round(self.progress.get("elapsed", 0.0) + self.elapsed(), 3),
                             "time/ended_at": round(time.time(), 3)})  # which of two reruns is the later
        if self.error:
            print(f"error: {self.error}", file=sys.stderr)
        if not self.is_main:
            return
        record = {
            "schema": RECORD_SCHEMA, "run_id": self.run_id, "run_name": self.cfg.run_name, "group": self.group,
            "attention": self.cfg.attention, "family": self.cfg.family, "seed": self.cfg.seed,
            "status": self.status, "error": self.error, "config": self.cfg.to_dict(), "summary": self.summary,
            "history": self.history,
        }
        try:
            write_record(self.results_dir, self.group, self.cfg.run_name, self.run_id, record)
        except OSError as err:  # already reported as the error when the directory is unwritable
            print(f"warning: cannot write the results record ({err})", file=sys.stderr)
        if self.status == "finished":  # a checkpoint is only for finishing; it can be GBs
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        if tracker is not None:
            tracker.finish(self.summary, exit_code)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # --- training ---

    def train(self, tracker: Tracker) -> None:
        from data import load_tokens, make_batches

        cfg, accelerator = self.cfg, self.accelerator
        with accelerator.main_process_first():  # the main process tokenizes; the others read its cache
            tokens, tokenizer_vocab = load_tokens(cfg)
        vocab_size = cfg.vocab_size or tokenizer_vocab
        if vocab_size < tokenizer_vocab:
            raise ConfigError(f"--vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")
        batches = make_batches(tokens, cfg)
        world, rank = accelerator.num_processes, accelerator.process_index
        if cfg.batch_size % world:
            raise ConfigError(f"--batch_size={cfg.batch_size} does not split over {world} processes")
        tracker.update_config({"vocab_size": vocab_size, "processes": world, "group": self.group})
        # what time and memory are measured on; the report's audit flags compared runs where it differs
        self.summary.update({"hardware/processes": world, "hardware/device": device_name(accelerator.device)})

        model = MoELM(model_config(cfg, vocab_size))
        init_weights(model, cfg.seed)
        params = count_parameters(model)
        self.summary.update({
            "params/total": params["total"], "params/attention": params["attention"],
            "flops/per_token": flops_per_token(model),
            "init/shared_fingerprint": shared_parameters_fingerprint(model),
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
        self.summary["time/startup_s"] = round(time.time() - process_start_time(), 3)
        for step in range(start_step, cfg.steps):
            begun = time.perf_counter()
            batch = batches.train_batch(step)
            fingerprint = chain_fingerprint(fingerprint, batch)
            local = batch.chunk(world)[rank].to(device, non_blocking=True)
            inputs, targets = local[:, :-1], local[:, 1:]
            with accelerator.autocast():
                ce, aux_loss, accuracy = model(inputs, targets)  # the logits are never materialised
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
            row = {"step": step + 1, "train/loss": loss, "train/accuracy": accuracy, "train/lr": lr,
                   "train/grad_norm": grad_norm, "train/aux_loss": aux, "perf/step_time_ms": step_time * 1000,
                   "perf/tokens_per_sec": tokens_per_step / step_time, "memory/allocated_gb": now_gb,
                   "memory/peak_gb": peak_gb}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                row.update(self.evaluate(model, batches, world, rank, device))
                model.train()
            self.history.append(row)
            tracker.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['perf/tokens_per_sec']:,.0f}", refresh=False)

            last = step + 1 == cfg.steps
            if stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last):
                self.save_checkpoint(step + 1, fingerprint)
            if stop:
                raise Interrupted(f"stopped by a signal after step {step + 1}; checkpoint saved, "
                                  f"continue with --resume")
        bar.close()
        final = self.history[-1]
        _, peak_gb = memory_gb(device)
        self.summary.update({k: final[k] for k in ("val/loss", "val/accuracy", "val/perplexity")})
        self.summary["val/loss_min"] = min(row["val/loss"] for row in self.history if "val/loss" in row)
        if cfg.eval_test:  # once, after training: nothing that chose this run's settings saw these blocks
            self.summary.update(self.evaluate(model, batches, world, rank, device, split="test"))
        self.summary.update({"memory/peak_gb": peak_gb, "data/fingerprint": fingerprint})
        if device.type == "cuda":  # what the allocator held from the driver, beside what tensors used
            self.summary["memory/peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB

    @torch.no_grad()
    def evaluate(self, model, batches, world, rank, device, split: str = "val") -> dict:
        """Mean next-token loss and accuracy over the first eval_batches validation (or test)
        batches, the same for every run, each split over the processes like training batches.
        (Every test block instead: 80-145 s a run at seq_len 32 on the embedded corpus, 2 cores.)"""
        model.eval()
        totals = torch.zeros(3, device=device)
        batch = batches.val_batch if split == "val" else batches.test_batch
        for index in range(self.cfg.eval_batches):
            local = batch(index).chunk(world)[rank].to(device, non_blocking=True)
            inputs, targets = local[:, :-1], local[:, 1:]
            with self.accelerator.autocast():
                ce, _, accuracy = model(inputs, targets)
            totals += torch.stack([ce.float(), accuracy.float(), torch.ones((), device=device)]) * targets.numel()
        loss_sum, correct, count = self.accelerator.reduce(totals, "sum").tolist()
        loss = loss_sum / count
        return {f"{split}/loss": loss, f"{split}/accuracy": correct / count,
                f"{split}/perplexity": math.exp(min(loss, 700))}

    def save_checkpoint(self, step: int, fingerprint: str) -> None:
        """Model, optimizer, scheduler and RNG states (Accelerate) plus our progress, written to a
        temp directory and renamed into place, so a kill mid-save leaves the previous checkpoint."""
        tmp = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".tmp")
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp / "state"))
        if self.is_main:
            progress = {"step": step, "fingerprint": fingerprint, "run_id": self.run_id, "config": self.cfg.to_dict(),
                        "elapsed": self.progress.get("elapsed", 0.0) + self.elapsed(), "history": self.history}
            write_json_atomic(tmp / "progress.json", progress)
            old = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")
            if self.checkpoint_dir.exists():
                os.replace(self.checkpoint_dir, old)
            os.replace(tmp, self.checkpoint_dir)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()


# --- the command line --------------------------------------------------------------------------

def refuse(err: ConfigError, argv: list[str]) -> int:
    """Bad input: one `error:` line and exit 2. Under a W&B agent the run is also opened and marked
    failed with the reason, so the dashboard shows it instead of the agent handing it out again."""
    print(f"error: {err}", file=sys.stderr)
    if under_agent():
        raw = dict(arg[2:].partition("=")[::2] for arg in argv if arg.startswith("--"))
        try:
            import wandb

            run = wandb.init(config={"args": argv}, job_type="train",
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
            if cfg.vocab_size is None:
                raise ConfigError("--dry_run needs --vocab_size (it loads no tokenizer)")
            print(json.dumps(describe_model(cfg, cfg.vocab_size)))
            return 0
        run = Run(cfg)  # finds the checkpoint to resume, and refuses one of another config
    except ConfigError as err:
        return refuse(err, argv)
    return run.execute()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
