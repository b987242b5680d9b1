"""The GPU run in one command, made for a short-lived, offline GPU machine: one command of at most
10 minutes, no network, no wandb / datasets / sweeps installed, and only 8 files (at most two
folders deep) brought back from its output folder.

    bash bench/gpu.sh [OUTDIR]                  # = python3 -m bench.gpu [OUTDIR]; OUTDIR: $OUT, else bench/results/
    python -m bench.gpu --dry_run OUTDIR        # on a CPU: tiny sizes, every section (minutes)
    python -m bench.gpu --prepare               # here, before: warm the token cache, print what to carry

Everything is written to a scratch folder; OUTDIR gets five files: results.tar.gz (all of it: every
section's printed table, log, JSON and CSV, and the training run's record), summary.txt (what is
printed at the end, under 10,000 characters) and the headline tables check.txt, train.txt and
main.txt.

The sections, in order of value, each with a budget in seconds (SECTIONS). A section that runs past
its budget + GRACE_S gets SIGINT (bench.step and train.py stop and keep what they measured), and
KILL_AFTER_S later SIGKILL; no section starts past the deadline, and none is given a budget that
would end past it, so the whole ends by --deadline (default 400 s, with the archive: < 7 minutes).
A section that fails is recorded with its one-line reason and the next one runs; inside a section
a failing case (an Inductor error, one variant's kernel error) is recorded as failed and the other
cases run (bench.step, bench.check). Needs torch, accelerate and this repository; the training run
needs the embedded corpus's token cache (.cache/tokens-*.{npy,json}, see docs/PERF.md) to run
without `datasets`, and WANDB_MODE=disabled (set here) to run without wandb.
"""
import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 400
GRACE_S = 20  # past its budget a section gets SIGINT ...
KILL_AFTER_S = 10  # ... and this much later SIGKILL
MIN_SECTION_S = 15  # a section left less than this (or than its own budget, if smaller) is skipped
SUMMARY_CHARS = 9500
HEADLINE = ("check", "train", "main")  # their tables are copied beside the archive

# (name, budget in seconds, what it is) in order of value: correctness first (a wrong kernel makes
# every timing moot), then what the seed reported (a real training run at its size), then the
# comparison with the seed-style reference, then the rest.
SECTIONS = [
    ("env", 15, "the machine: GPU, driver, torch, CUDA, which optional packages are missing"),
    ("check", 45, "ours == reference on this device (logits path), the chunked LM-head loss, an empty expert"),
    ("train", 75, "train.py at the seed's recipe: tokens/s, peak memory (allocated, reserved), losses"),
    ("main", 90, "the seed's fast setup (batch 16 x 512, vocab 49152, bf16): every variant, ours vs reference"),
    ("compile", 60, "torch.compile on for baseline and enhanced_medium (their eager rows: main)"),
    ("scan", 40, "sequence-length scan, batch 4, 512 to 16384: time, memory, where the reference runs out"),
    ("choices", 20, "the fast path's switches (pad for flash, grouped experts) on unequal head dims"),
    ("peak", 10, "the bf16 matmul peak, n = 4096, 8192, 16384"),
    ("zoo", 40, "the zoo's variants (sweeps/zoo.yaml) at the seed's fast setup, ours vs reference, where time is left"),
    ("kernels", 40, "one attention layer on each attention kernel (sdpa, explicit, flex), train and eval, 1k to 8k"),
    ("decode", 90, "bench.decode: prefill and cached decode, batch 1 and 16, contexts 2k to 32k, beside the "
                   "memory-bandwidth limit"),
]
# Printed characters per section in the summary (all of it is in the archive).
SUMMARY_SHARE = {"env": 400, "check": 1800, "train": 1000, "main": 3000, "compile": 600, "scan": 1000,
                 "choices": 500, "kernels": 900, "peak": 300, "zoo": 900, "decode": 1500}
# bench.step and bench.decode take --time_budget (no case starts past it) and --out
BUDGETED = (["-m", "bench.step"], ["-m", "bench.decode"], ["-m", "bench.kernels"])
# the decode section's variants: one of each cache design (softcap/sinks' explicit softmax would
# materialise batch x heads x context^2 scores in the prefill, 64 GiB at 16 x 32k)
DECODE_VARIANTS = "baseline,gqa,mqa,swa,local_global,mla_v3,lora_small,enhanced_medium"

SEED_TRAIN_ARGS = "--recipe=seed --attention=baseline --seed=0 --group=gpu"
TINY_TRAIN_ARGS = ("--d_model=64 --n_layers=1 --n_heads=2 --d_ff=64 --n_experts=2 --top_k=1 --seq_len=32 "
                   "--batch_size=4 --steps=4 --eval_every=2 --eval_batches=2 --mixed_precision=bf16")
# appended to every bench.step call in a dry run (later flags win)
DRY_STEP_ARGS = ["--preset", "tiny", "--dtype", "bf16", "--isolate", "no", "--threads", "2", "--peak_n", "256",
                 "--warmup", "1", "--repeats", "1"]


def section_commands(args, scratch: Path) -> dict[str, list[str]]:
    py, dev = sys.executable, args.device
    extra = DRY_STEP_ARGS if args.dry_run else []
    step = [py, "-m", "bench.step", "--device", dev]
    scan_lens = "32,64" if args.dry_run else "512,1024,2048,4096,8192,16384"
    zoo = (",".join(v for v in sweep_variants("zoo.yaml").split(",") if v != "baseline")
           if args.zoo_variants == "zoo" else args.zoo_variants)
    train_args = shlex.split(args.train_args if args.train_args is not None else
                             SEED_TRAIN_ARGS + (" " + TINY_TRAIN_ARGS if args.dry_run else ""))
    env_probe = (
        "import importlib.util, torch\n"
        "print('torch', torch.__version__, 'cuda', torch.version.cuda,"
        " torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')\n"
        "missing = [m for m in ('wandb', 'datasets', 'sweeps', 'accelerate', 'transformers')"
        " if importlib.util.find_spec(m) is None]\n"
        "print('not installed:', ', '.join(missing) or 'none')\n")
    return {
        "env": ["bash", "-c", "if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,"
                              "driver_version,clocks.max.sm --format=csv 2>&1 | head -5; else echo no nvidia-smi; fi; "
                              "\"$0\" -c \"$1\"; date -Is", py, env_probe],
        "check": [py, "-m", "bench.check", "--device", dev, "--variants", args.variants]
                 + (["--preset", "tiny"] if args.dry_run else []),
        "train": [py, "train.py", *train_args, f"--results_dir={scratch / 'train'}"],
        "main": step + ["--preset", "gpu", "--variants", sweep_variants("fast.yaml") if args.variants == "all" else
                        args.variants,
                        "--title", "main: the seed's fast setup, every variant, ours vs reference"] + extra,
        "compile": step + ["--preset", "gpu", "--variants", "baseline,enhanced_medium", "--impls", "ours",
                           "--compile", "on", "--title", "compile: torch.compile (eager rows: main)"] + extra,
        "scan": step + ["--preset", "gpu", "--variants", "baseline,enhanced_medium", "--batch_size", "4",
                        "--warmup", "1", "--repeats", "3", "--seq_lens", scan_lens,
                        "--title", "scan: sequence-length scan, batch 4"] + extra,
        "choices": step + ["--preset", "gpu", "--variants", "rope_large,enhanced_small", "--impls", "ours",
                           "--sdpa_pad", "auto,never", "--moe_matmul", "auto,loop",
                           "--title", "choices: fast-path switches (auto = pad + grouped on CUDA bf16)"] + extra,
        # FlexAttention's fused kernel (compiled by attention/kernels.py on CUDA) against SDPA and the
        # materialised scores, with sinks and a soft-cap and without; flex's `runs` column says flex
        "kernels": [py, "-m", "bench.kernels", "--device", dev, "--variants", "baseline,sinks,softcap,gptoss",
                    "--kernels", "sdpa,explicit,flex"]
                   + (["--d_model", "64", "--n_heads", "4", "--seq_lens", "32", "--batch", "2", "--warmup", "1",
                       "--repeats", "1", "--threads", "2"] if args.dry_run else
                      ["--dtype", "bf16", "--seq_lens", "1024,4096,8192", "--batch", "4", "--repeats", "10"]),
        "peak": step + ["--preset", "gpu", "--peak_only"] + extra,
        # fewer timed steps than main, so more of the zoo fits in its budget (the cases that do not
        # are recorded as skipped); the baseline it is compared with is main's
        "zoo": step + ["--preset", "gpu", "--variants", zoo, "--warmup", "2", "--repeats", "5",
                       "--title", "zoo: the zoo's variants, the seed's fast setup, ours vs reference"] + extra,
        "decode": [py, "-m", "bench.decode", "--device", dev, "--variants", DECODE_VARIANTS, "--batch", "1,16"]
                  + (["--preset", "tiny", "--contexts", "24,40", "--copy_mb", "8", "--isolate", "no", "--threads", "2"]
                     if args.dry_run else ["--preset", "gpu", "--dtype", "bf16", "--contexts", "2048,8192,32768"]),
    }


def sweep_variants(name: str) -> str:
    """The attention values of sweeps/<name>, comma-joined: one home for which variants a section
    times (fast.yaml: the seed's 13; zoo.yaml: the baseline and the zoo)."""
    import yaml

    return ",".join(yaml.safe_load((ROOT / "sweeps" / name).read_text())["parameters"]["attention"]["values"])


def run_section(name: str, cmd: list[str], budget: int, scratch: Path, env: dict) -> dict:
    """Run one section with its output in scratch/<name>.txt and .log; -> its status line's facts."""
    if cmd[1:3] in BUDGETED:
        cmd = cmd + ["--time_budget", str(budget), "--out", str(scratch / f"{name}.json")]
        limit = budget + GRACE_S  # bench.step stops starting cases at its budget; one may run over
    else:
        limit = budget
    started = time.monotonic()
    with open(scratch / f"{name}.txt", "w") as out, open(scratch / f"{name}.log", "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=log, env=env, start_new_session=True)
        except OSError as err:
            return dict(status="failed", seconds=0.0, reason=f"cannot start: {err}")
        timed_out = False
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGINT)  # bench.step and train.py keep what they have
            try:
                code = proc.wait(timeout=KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
    seconds = time.monotonic() - started
    if timed_out:
        return dict(status="timed out", seconds=seconds, reason=f"stopped after {limit} s (exit {code}); "
                    "what it measured before is kept")
    if code == 0:
        return dict(status="ok", seconds=seconds, reason="")
    # exit 1 from bench.step / bench.check / bench.decode: some case failed, the others' rows are in its table
    lines = (scratch / f"{name}.log").read_text(errors="replace").strip().splitlines()
    return dict(status=f"exit {code}", seconds=seconds, reason=(lines[-1] if lines else "")[:300])


def case_counts(path: Path) -> str:
    """'24 ok, 1 failed, 1 skipped' from a bench.step JSON, or bench.decode's list of rows ('' if
    there is none)."""
    try:
        results = json.loads(path.read_text())
        results = results if isinstance(results, list) else results["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def train_table(scratch: Path, section: dict) -> str:
    """The training run's numbers, from its results record, beside what the seed reported."""
    records = [p for p in sorted((scratch / "train").rglob("*.json")) if "checkpoints" not in p.parts]
    lines = ["train: train.py at the seed's recipe (WANDB_MODE=disabled)"]
    if not records:
        return "\n".join(lines + [f"no results record: {section['status']} ({section['reason']})"])
    record = json.loads(records[-1].read_text())
    summary, history = record.get("summary", {}), record.get("history", [])
    config = record.get("config", {})
    lines.append(f"status {record.get('status')}" + (f": {record['error']}" if record.get("error") else ""))
    lines.append(f"{record.get('attention')} seed {record.get('seed')}: {summary.get('params/total', 0) / 1e6:.1f}M "
                 f"parameters, batch {config.get('batch_size')} x {config.get('seq_len')}, "
                 f"{len(history)}/{config.get('steps')} steps, mixed precision {config.get('mixed_precision')}")
    if history:
        later = history[1:] or history  # the first step carries one-off costs (kernels, allocator)
        step_ms = statistics.median(r["perf/step_time_ms"] for r in later)
        tokens = statistics.median(r["perf/tokens_per_sec"] for r in later)
        evals = [r for r in history if "val/loss" in r]
        lines.append(f"step {step_ms:.1f} ms (median after the first; first {history[0]['perf/step_time_ms']:.0f} ms), "
                     f"{tokens:,.0f} tokens/s")
        lines.append(f"train loss {history[0]['train/loss']:.4f} (step 1) -> {history[-1]['train/loss']:.4f} "
                     f"(step {history[-1]['step']})")
        for r in evals:
            lines.append(f"  step {r['step']:>3}: val loss {r['val/loss']:.4f}, accuracy {r['val/accuracy']:.4f}")
    reserved = summary.get("memory/peak_reserved_gb")
    lines.append(f"peak memory {summary.get('memory/peak_gb', float('nan')):.2f} GiB allocated"
                 + (f", {reserved:.2f} GiB reserved" if reserved is not None else " (reserved: CUDA only)")
                 + f"; startup {summary.get('time/startup_s', float('nan')):.1f} s, "
                 f"total {summary.get('time/total_s', float('nan')):.1f} s")
    lines.append("seed (RTX 4090, its report): 50 steps in 0.4 min, val loss 7.76-7.86, accuracy ~0.10, "
                 "memory 15.2-17.0 GB")
    return "\n".join(lines)


def cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit("\n", 1)[0] + f"\n[... {len(text) - limit:,} more characters in the archive]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", nargs="?", default=None,
                   help="where the archive and headline tables go (default: $OUT, else bench/results/gpu-<date>)")
    p.add_argument("--dry_run", action="store_true", help="on the CPU with tiny sizes: every section, in minutes")
    p.add_argument("--device", default=None, help="cuda (default), or cpu (the default with --dry_run)")
    p.add_argument("--variants", default="all", help="variants for check and main (comma list, or all: check "
                   "every variant, main sweeps/fast.yaml's 13)")
    p.add_argument("--zoo_variants", default="zoo", help="variants for the zoo section (comma list, or zoo: "
                   "sweeps/zoo.yaml's, less the baseline that main times)")
    p.add_argument("--sections", default=",".join(name for name, _, _ in SECTIONS),
                   help="which sections to run (comma list; they run in the order of SECTIONS)")
    p.add_argument("--train_args", default=None,
                   help=f"train.py's arguments (default {SEED_TRAIN_ARGS!r}; a dry run adds tiny sizes)")
    p.add_argument("--deadline", type=int, default=DEADLINE_S, help="seconds for all sections together")
    p.add_argument("--prepare", action="store_true",
                   help="on this machine, before: tokenize the embedded corpus if it is not cached (needs "
                        "`datasets`), and print the token cache's two files: the device tool's `carry`")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.outdir or os.environ.get("OUT") or ROOT / "bench" / "results" / f"gpu-{stamp}")
    wanted = args.sections.split(",")
    unknown = set(wanted) - {name for name, _, _ in SECTIONS}
    if unknown:
        print(f"error: --sections: unknown {', '.join(sorted(unknown))}; allowed: "
              f"{', '.join(name for name, _, _ in SECTIONS)}", file=sys.stderr)
        return 2
    outdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="attnsweep-gpu-"))

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    commands = section_commands(args, scratch)
    started, status = time.monotonic(), {}
    try:
        for name, nominal, what in SECTIONS:
            if name not in wanted:
                continue
            left = args.deadline - (time.monotonic() - started)
            overrun = GRACE_S + KILL_AFTER_S if commands[name][1:3] in BUDGETED else KILL_AFTER_S
            budget = int(min(nominal, left - overrun))
            if budget < min(MIN_SECTION_S, nominal):
                status[name] = dict(status="skipped", seconds=0.0, reason=f"out of time ({left:.0f} s left)")
                (scratch / f"{name}.txt").write_text(f"{name}: skipped, out of time\n")
                continue
            print(f"== {name} (budget {budget} s, {left:.0f} s left): {what}", file=sys.stderr, flush=True)
            status[name] = run_section(name, commands[name], budget, scratch, env)
            counts = case_counts(scratch / f"{name}.json")
            if counts:
                status[name]["reason"] = f"cases: {counts}; {status[name]['reason']}".rstrip("; ")
            print(f"   {status[name]['status']} after {status[name]['seconds']:.0f} s {status[name]['reason']}",
                  file=sys.stderr, flush=True)
            if name == "train":
                train_txt = scratch / "train.txt"
                (scratch / "train.out").write_text(train_txt.read_text(errors="replace"))
                train_txt.write_text(train_table(scratch, status[name]) + "\n")
    finally:
        total = time.monotonic() - started
        summary = write_outputs(outdir, scratch, status, total, args)
    print(summary)
    return 0 if status and all(s["status"] in ("ok", "skipped") for s in status.values()) else 1


def prepare() -> int:
    sys.path.insert(0, str(ROOT))
    from config import TrainConfig
    from data import load_tokens, token_cache_paths

    cfg = TrainConfig()  # the embedded corpus and tokenizer, as the seed recipe trains on
    load_tokens(cfg)
    print(json.dumps([str(path.relative_to(ROOT)) for path in token_cache_paths(cfg)]))
    return 0


def write_outputs(outdir: Path, scratch: Path, status: dict, total: float, args) -> str:
    """The summary, the archive of the scratch folder and the headline tables, into outdir."""
    head = [f"bench/gpu.sh on {args.device}{' (dry run)' if args.dry_run else ''}: {total:.0f} s in all, "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]
    for name, s in status.items():
        head.append(f"  {name:8s} {s['status']:9s} {s['seconds']:5.0f} s  {s['reason']}"[:160])
    parts = ["\n".join(head)]
    for name, _, _ in SECTIONS:
        path = scratch / f"{name}.txt"
        if name in status and path.exists():
            parts.append(f"== {name}\n" + cap(path.read_text(errors="replace").strip(), SUMMARY_SHARE[name]))
    parts.append(f"full results: {outdir / 'results.tar.gz'}")
    summary = cap("\n\n".join(parts), SUMMARY_CHARS)
    (scratch / "summary.txt").write_text(summary + "\n")
    (scratch / "status.json").write_text(json.dumps({"status": status, "total_s": total}, indent=1))
    with tarfile.open(outdir / "results.tar.gz", "w:gz") as tar:
        tar.add(scratch, arcname="gpu-results",
                filter=lambda info: None if "/checkpoints" in info.name else info)  # GBs, of no use here
    shutil.copy(scratch / "summary.txt", outdir / "summary.txt")
    for name in HEADLINE:
        if (scratch / f"{name}.txt").exists():
            shutil.copy(scratch / f"{name}.txt", outdir / f"{name}.txt")
    shutil.rmtree(scratch, ignore_errors=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
