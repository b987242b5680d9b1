"""Time training steps of our model and of the seed-style reference, side by side with the
hardware's limit measured in the same process.

    python -m bench.step                                    # preset cpu (or gpu when CUDA is there)
    python -m bench.step --variants baseline,rope_small --batch_size 8 --out results.json
    python -m bench.step --seq_lens 256,512,1024,2048,4096 --variants baseline,enhanced_medium
    python -m bench.step --preset tiny --device cpu         # a smoke run in seconds

A step is what train.py does: forward (bf16 autocast when --dtype bf16), cross-entropy + 0.01 x the
balance loss, backward, gradient clipping at 1.0, AdamW step, zero_grad. Ours computes the
cross-entropy with model(ids, targets) (chunked, no materialised logits) and steps a fused AdamW;
the reference takes F.cross_entropy of the float32 logits and torch's default AdamW, as the seed.
Warm-up steps are excluded; ms/step is the median of --repeats timed steps.

Columns: FLOPs/token is model.flops_per_token (6 x active matmul weights + attention scores and
values, the PaLM convention); TFLOP/s = FLOPs/token x tokens/s; MFU = that / the matmul peak: the
best of several large square matmuls in the run's dtype, measured in the same process just before
and just after the case's steps, the higher of the two (on a shared machine the load drifts). Peak memory: the CUDA allocator's peak
on GPU; on CPU each case runs in a fresh process and reports the growth of its peak resident set
(ru_maxrss) over the resident set before the model was built -- weights, gradients, optimizer
state and activations, like the CUDA number -- in a second process with glibc's mmap threshold
pinned so that freed memory leaves the resident set (see PINNED_MALLOC). ours/ref is ours divided by the seed-style reference
(time: below 1 is faster; memory: below 1 is smaller).

Only torch and this repository are needed (no W&B, no datasets).
"""
import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attention import VARIANTS  # noqa: E402
from bench.reference import has_reference  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
AUX_LOSS_WEIGHT, LR, WEIGHT_DECAY, GRAD_CLIP = 0.01, 1e-4, 0.01, 1.0
MB = 1024 ** 2

# Sizes. cpu: the fast-size model (512d / 8L / 8H / 2048ff, 8 experts top-2) with a smaller vocab
# and seq 256, so a CPU step takes seconds. gpu: the seed's fast setup (batch 16 x 512, vocab
# 49152, bf16). tiny: a smoke test.
PRESETS = {
    "cpu": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, n_experts=8, top_k=2, vocab_size=8192,
                seq_len=256, batch_size=4, dtype="fp32", warmup=2, repeats=5),
    "gpu": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, n_experts=8, top_k=2, vocab_size=49152,
                seq_len=512, batch_size=16, dtype="bf16", warmup=3, repeats=10),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, n_experts=4, top_k=2, vocab_size=256,
                 seq_len=32, batch_size=2, dtype="fp32", warmup=1, repeats=2),
}
SIZE_FIELDS = list(PRESETS["cpu"])
# ModelConfig's switches of how the same arithmetic runs, each a --option here (a comma list sweeps)
FAST_PATHS = ("attention_kernel", "sdpa_pad", "moe_matmul")

# BENCH_FAIL=name,...: the cases so named raise (a variant, "variant:impl", or "variant:check" in
# bench.check). It exercises the failure path -- one case fails, the others' results are kept --
# in tests/test_gpu_script.py, where no kernel fails by itself.
FAIL_ENV = "BENCH_FAIL"


def forced_failure(*names: str) -> None:
    wanted = set(filter(None, os.environ.get(FAIL_ENV, "").split(",")))
    hit = wanted.intersection(names)
    if hit:
        raise RuntimeError(f"forced failure ({FAIL_ENV}={','.join(sorted(hit))})")


def failure_reason(err: BaseException) -> str:
    """An exception as the one-line reason a failed case records."""
    from data import one_line

    return f"{type(err).__name__}: {one_line(err)}"


# --- one case --------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n x n matmuls (after one warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def build_model(case: dict, device: torch.device):
    from config import TrainConfig
    from model import ModelConfig, MoELM, flops_per_token, init_weights

    sizes = {k: case[k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k", "seq_len", "dropout")}
    train_cfg = TrainConfig(attention=case["variant"], **sizes)
    cfg = ModelConfig.from_train_config(train_cfg, case["vocab_size"], **{k: case[k] for k in FAST_PATHS})
    # The same weights for both implementations: ours initialised (each kind declares its init),
    # the reference given ours. init_weights draws ~1 s per model on the CPU, so an in-process run
    # (GPU) keeps the last two variants' initial weights for the next case.
    model = MoELM(cfg)
    key = (case["variant"], case["seed"], *(case[k] for k in SIZE_FIELDS if k not in ("seq_len", "batch_size")))
    if key in _INITIAL_WEIGHTS:
        model.load_state_dict(_INITIAL_WEIGHTS[key])
    else:
        init_weights(model, case["seed"])
        if not case["isolated"]:
            _INITIAL_WEIGHTS[key] = {k: v.clone() for k, v in model.state_dict().items()}
            while len(_INITIAL_WEIGHTS) > 2:
                del _INITIAL_WEIGHTS[next(iter(_INITIAL_WEIGHTS))]
    flops = flops_per_token(model)  # the design's count (its kinds'), the same for both
    if case["impl"] != "ours":
        from bench.reference import build_reference
        reference = build_reference(cfg)
        reference.load_state_dict(model.state_dict(), strict=True)
        model = reference
    return model.to(device).train(), flops


_INITIAL_WEIGHTS: dict = {}


def make_optimizer(model, case: dict, device: torch.device):
    params = list(model.parameters())
    if case["impl"] == "ours":
        # The fused kernel: one pass over each parameter, on CPU as on CUDA (torch >= 2.4).
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)  # torch's default, as the seed


def case_device(case: dict) -> tuple[torch.device, torch.dtype]:
    """A case's device (its CPU threads set) and dtype (bench.decode's too)."""
    device = torch.device(case["device"])
    if device.type == "cpu":
        torch.set_num_threads(case["threads"])
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]


def run_case(case: dict) -> dict:
    """Build, warm up and time one (variant, implementation, options) case in this process."""
    device, dtype = case_device(case)
    result = dict(case, status="ok")
    forced_failure(case["variant"], f"{case['variant']}:{case['impl']}")

    import bench.reference  # noqa: F401 -- imported before the RSS baseline, like model
    peak_n = case["peak_n"] or (8192 if device.type == "cuda" else 2048)
    peak_before = 0.0 if case.get("memory_only") else matmul_peak(device, dtype, peak_n)
    result["peak_n"] = peak_n
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_bytes()

    try:
        model, fpt = build_model(case, device)
        result["flops_per_token"] = fpt
        result["params"] = sum(p.numel() for p in model.parameters())
        optimizer = make_optimizer(model, case, device)
        forward = torch.compile(model) if case["compile"] else model
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(case["seed"])
        batch = torch.randint(0, case["vocab_size"], (case["batch_size"], case["seq_len"] + 1), generator=gen)
        inputs, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                    else contextlib.nullcontext())
        torch.manual_seed(case["seed"])

        def step():
            if case["impl"] == "ours":  # the loss without materialised logits (model._LMHeadLoss)
                with autocast:
                    out = forward(inputs, targets)
                ce, aux_loss = out.loss, out.aux_loss
            else:
                with autocast:
                    out = forward(inputs)
                logits, aux_loss = out.logits, out.aux_loss
                ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss = ce + AUX_LOSS_WEIGHT * aux_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        times = []
        for i in range(case["warmup"] + case["repeats"]):
            _sync(device)
            start = time.perf_counter()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - start)
        result["loss"] = loss.item()
        if device.type == "cuda":
            result["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            result["peak_mem_source"] = "cuda max_memory_allocated"
            # what the caching allocator took from the driver: what nvidia-smi shows, minus the context
            result["peak_mem_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        elif case["isolated"]:
            result["peak_mem_bytes"] = _max_rss_bytes() - rss_before
            result["peak_mem_source"] = "ru_maxrss growth over the RSS before the model was built"
            if case.get("memory_only"):
                return result
        else:
            result["peak_mem_bytes"] = None
            result["peak_mem_source"] = "not measured: run isolated (the default on CPU) for RSS"
    except getattr(torch, "OutOfMemoryError", RuntimeError) as err:
        result.update(status="oom", error=str(err).splitlines()[0][:200], peak_flops=peak_before)
        return result

    # The peak again, after the steps (and after the memory was read): on a shared machine the load
    # can change during a case, and the higher of the two is the conservative denominator for MFU.
    del model, optimizer, forward, params
    peak_after = matmul_peak(device, dtype, peak_n)
    result["peak_flops_before_after"] = [peak_before, peak_after]
    result["peak_flops"] = max(peak_before, peak_after)
    result["first_step_s"] = times[0]  # includes torch.compile's compilation when on
    timed = times[case["warmup"]:]
    result["step_times_s"] = timed
    result["ms_per_step"] = 1000 * statistics.median(timed)
    tokens = case["batch_size"] * case["seq_len"]
    result["tokens_per_s"] = tokens / (result["ms_per_step"] / 1000)
    result["achieved_flops"] = fpt * result["tokens_per_s"]
    return result


def _child(case: dict, env: dict | None = None, module: str = "bench.step") -> dict:
    """The case run by `python -m <module> --_case` in a fresh interpreter (bench.decode's too)."""
    cmd = [sys.executable, "-m", module, "--_case", json.dumps(dict(case, isolated=True))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(case, status="failed", error=f"exit {proc.returncode}: {tail[:300]}")


# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed tensors
# stay in the heap and the resident set keeps memory that is no longer in use. With the threshold
# pinned at its initial 128 KiB, every tensor-sized block is returned on free and the peak RSS
# tracks the peak of live memory, like the CUDA allocator's peak. Pinning it also costs page
# faults (about 10% of a CPU step), so time and memory are measured in two processes.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_isolated(case: dict) -> dict:
    """The case in fresh interpreters: one times it; one, with malloc pinned, measures its peak RSS
    over one warm-up and one step."""
    result = _child(case)
    if result["status"] == "ok" and case["device"] == "cpu":  # on CUDA the allocator's peak is exact
        memory = _child(dict(case, warmup=1, repeats=1, memory_only=True), env={**os.environ, **PINNED_MALLOC})
        result["peak_mem_bytes_default_malloc"] = result["peak_mem_bytes"]
        result["peak_mem_bytes"] = memory.get("peak_mem_bytes")
        result["peak_mem_source"] = ("ru_maxrss growth over the RSS before the model was built, "
                                     "in a second process with MALLOC_MMAP_THRESHOLD_=131072")
    return result


# --- the run ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="sizes (default: gpu on CUDA, else cpu)")
    for name in SIZE_FIELDS:
        kind = str if name == "dtype" else int
        p.add_argument(f"--{name}", type=kind, help=f"overrides the preset's {name}")
    p.add_argument("--variants", default="all", help="comma list of variants, or 'all' (default)")
    p.add_argument("--impls", default="ours,reference", help="ours, reference or both (default)")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="torch.compile our model (off, on, or both)")
    p.add_argument("--compile_variants", default=None,
                   help="with --compile on/both: only these variants get the compiled case")
    p.add_argument("--seq_lens", default=None, help="comma list: the sequence-length scan")
    p.add_argument("--attention_kernel", default="auto",
                   help="ModelConfig.attention_kernel for ours (auto, sdpa, explicit, flex); a comma list sweeps")
    p.add_argument("--sdpa_pad", default="auto", help="ModelConfig.sdpa_pad for ours; a comma list sweeps")
    p.add_argument("--moe_matmul", default="auto", help="ModelConfig.moe_matmul for ours; a comma list sweeps")
    p.add_argument("--dropout", type=float, default=0.1, help="the model's dropout (default 0.1, as trained)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--peak_n", type=int, default=None, help="matmul size for the peak (cpu 2048, cuda 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="a fresh process per case (auto: on CPU, for its peak RSS)")
    p.add_argument("--time_budget", type=float, default=None,
                   help="seconds; cases that would start after it are skipped (recorded as such)")
    p.add_argument("--quiet_wait", type=float, default=0,
                   help="before each case wait up to this many seconds for other processes to go idle "
                        "(a shared machine); the wait and the load are recorded with the case")
    p.add_argument("--out", default=None, help="write the full results: PATH.json and PATH.csv")
    p.add_argument("--title", default=None, help="a heading for the printed table")
    p.add_argument("--peak_only", action="store_true", help="only measure the matmul peak (n = 4096, 8192, 16384)")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    sizes = dict(PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")])
    for name in SIZE_FIELDS:
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if sizes["dtype"] not in ("fp32", "bf16"):
        raise SystemExit(f"error: --dtype={sizes['dtype']}: allowed: fp32, bf16")
    variants = ([n for n, spec in VARIANTS.items() if has_reference(spec)] if args.variants == "all"
                else args.variants.split(","))
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; allowed: {', '.join(VARIANTS)}")
    impls = args.impls.split(",")
    if not set(impls) <= {"ours", "reference"}:
        raise SystemExit(f"error: --impls={args.impls}: allowed: ours, reference")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    compile_variants = args.compile_variants.split(",") if args.compile_variants else variants
    seq_lens = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else [sizes["seq_len"]]
    threads = args.threads or os.cpu_count()
    isolated = args.isolate == "yes" or (args.isolate == "auto" and device == "cpu")
    base = dict(sizes, device=device, threads=threads, dropout=args.dropout, seed=args.seed,
                peak_n=args.peak_n, isolated=isolated)

    cases = []
    for seq_len in seq_lens:
        for variant in variants:
            for impl in impls:
                if impl == "reference":
                    options = [(False, "auto", "auto", "auto")]
                else:
                    options = [(c, kernel, pad, moe) for c in compiles for kernel in args.attention_kernel.split(",")
                               for pad in args.sdpa_pad.split(",") for moe in args.moe_matmul.split(",")
                               if not c or variant in compile_variants]
                for compiled, kernel, pad, moe in options:
                    cases.append(dict(base, seq_len=seq_len, variant=variant, impl=impl, compile=compiled,
                                      attention_kernel=kernel, sdpa_pad=pad, moe_matmul=moe,
                                      scan=args.seq_lens is not None))
    return base, cases


def machine_info(device: str) -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "command": " ".join(sys.argv),
            "loadavg_start": os.getloadavg()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_ratios(results: list[dict]) -> None:
    """ours/ref for every ours row: the reference eager case with the same variant and sizes."""
    key = lambda r: (r["variant"], r["seq_len"], r["batch_size"], r["dtype"])  # noqa: E731
    refs = {key(r): r for r in results if r["impl"] == "reference" and r["status"] == "ok"}
    for r in results:
        ref = refs.get(key(r))
        r["time_ratio"] = r["mem_ratio"] = None
        if r["impl"] == "ours" and r["status"] == "ok" and ref:
            r["time_ratio"] = r["ms_per_step"] / ref["ms_per_step"]
            if r.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
                r["mem_ratio"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    """The main table (one row per case), or the scan table when lengths vary."""
    rows = []
    scan = any(r.get("scan") for r in results)
    header = ["variant", "impl", "compile", "seq", "ms/step", "tokens/s", "MFLOP/tok", "TFLOP/s", "MFU",
              "peak MB", "reserved MB", "mem ours/ref", "time ours/ref"]
    if not scan:
        header.remove("seq")
    reserved = any(r.get("peak_mem_reserved_bytes") for r in results)
    if not reserved:
        header.remove("reserved MB")
    for r in results:
        impl = r["impl"] if r["impl"] == "reference" else "ours" + "".join(
            f" {k}={r[k]}" for k in FAST_PATHS if r[k] != "auto")
        row = [r["variant"], impl, "on" if r["compile"] else "off"]
        if scan:
            row.append(str(r["seq_len"]))
        if r["status"] != "ok":
            row += [r["status"].upper()] + [""] * (len(header) - len(row) - 1)
        else:
            achieved = r["achieved_flops"]
            row += [f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_token'] / 1e6:.1f}",
                    f"{achieved / 1e12:.3f}", f"{100 * achieved / r['peak_flops']:.1f}%",
                    fmt(r.get("peak_mem_bytes") and r["peak_mem_bytes"] / MB, ",.0f")]
            if reserved:
                row.append(fmt(r.get("peak_mem_reserved_bytes") and r["peak_mem_reserved_bytes"] / MB, ",.0f"))
            row += [fmt(r.get("mem_ratio"), ".2f"), fmt(r.get("time_ratio"), ".2f")]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i > 2 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    failures = [f"{r['variant']} {r['impl']}{' compiled' if r['compile'] else ''} seq={r['seq_len']}: "
                f"{r['status']}: {r.get('error', '')}" for r in results if r["status"] in ("failed", "oom")]
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows] + failures)


def write_out(path: str, meta: dict, results: list[dict]) -> None:
    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".csv") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    fields = ["variant", "impl", "compile", *FAST_PATHS, "seq_len", "batch_size", "dtype", "device",
              "status", "ms_per_step", "tokens_per_s", "flops_per_token", "achieved_flops", "peak_flops",
              "peak_mem_bytes", "peak_mem_reserved_bytes", "mem_ratio", "time_ratio", "first_step_s", "loss", "params",
              "error"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def print_peaks(base: dict, out: str | None) -> int:
    device, name = torch.device(base["device"]), base["dtype"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    sizes = [1024, 2048, 4096] if device.type == "cpu" else [4096, 8192, 16384]
    peaks = {n: matmul_peak(device, dtype, n, repeats=10) for n in sizes}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_model()}, {base['threads']} threads"
    for n, flops in peaks.items():
        print(f"matmul peak {name} n={n}: {flops / 1e12:.3f} TFLOP/s ({where}, best of 10)")
    if out:
        meta = machine_info(base["device"])
        Path(out).with_suffix(".json").write_text(json.dumps({"meta": meta, "dtype": name, "peaks": peaks}, indent=1))
    return 0


def device_usable(device: str) -> bool:
    """After a failed in-process case: can this process still compute on the device? A CUDA kernel
    error (an illegal address, a device-side assert) poisons the context for good; then the
    remaining cases run each in a fresh process."""
    torch._dynamo.reset()  # a failed compilation leaves nothing cached for the next case
    if device != "cuda":
        return True
    try:
        torch.cuda.empty_cache()
        torch.ones(1, device=device).add_(1).item()
        return True
    except Exception:  # noqa: BLE001 -- any error here means the context is gone
        return False


def others_running() -> int:
    """Runnable tasks on the machine other than this process (from /proc/loadavg), at the worst of
    ten samples over a second."""
    worst = 0
    for _ in range(10):
        with open("/proc/loadavg") as f:
            worst = max(worst, int(f.read().split()[3].split("/")[0]) - 1)
        time.sleep(0.1)
    return worst


def wait_for_quiet(max_wait: float) -> float:
    """Wait (up to max_wait seconds) until nothing else has been runnable for 3 s; -> seconds waited."""
    start, quiet_since = time.perf_counter(), None
    while time.perf_counter() - start < max_wait:
        if others_running() == 0:
            quiet_since = quiet_since or time.perf_counter()
            if time.perf_counter() - quiet_since >= 3:
                break
        else:
            quiet_since = None
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._case:  # a child of run_isolated
        print(RESULT_TAG + json.dumps(run_case(json.loads(args._case))), flush=True)
        return 0
    base, cases = resolve(args)
    if base["device"] == "cpu":
        torch.set_num_threads(base["threads"])
    if args.peak_only:
        if args.quiet_wait:
            wait_for_quiet(args.quiet_wait)
        return print_peaks(base, args.out)
    meta = machine_info(base["device"])
    meta.update(threads=base["threads"], sizes={k: base[k] for k in SIZE_FIELDS})
    started, results, device_broken = time.perf_counter(), [], False
    try:
        for i, case in enumerate(cases, 1):
            label = f"[{i}/{len(cases)}] {case['variant']} {case['impl']} seq={case['seq_len']}" + (
                " compiled" if case["compile"] else "") + "".join(
                f" {k}={case[k]}" for k in FAST_PATHS if case[k] != "auto")
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                results.append(dict(case, status="skipped", error="over --time_budget"))
                print(f"{label}: skipped (time budget)", file=sys.stderr, flush=True)
                continue
            waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait else 0.0
            load = os.getloadavg()[0]
            if device_broken:  # an earlier case left this process's CUDA context unusable
                case = dict(case, isolated=True)
            try:
                result = run_isolated(case) if case["isolated"] else run_case(case)
            except Exception as err:  # an Inductor failure, one variant's kernel error: this case only
                result = dict(case, status="failed", error=failure_reason(err))
                device_broken = not device_usable(base["device"])
            result.update(waited_for_quiet_s=round(waited, 1), loadavg_before=load,
                          loadavg_after=os.getloadavg()[0])
            if not case["isolated"] and base["device"] == "cuda" and not device_broken:
                torch.cuda.empty_cache()
            results.append(result)
            summary = (f"{result['ms_per_step']:.1f} ms/step" if result["status"] == "ok"
                       else f"{result['status']}: {result.get('error', '')}")
            print(f"{label}: {summary}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C, or gpu.sh's hard timeout: keep and report what was measured
        done = len(results)
        results += [dict(case, status="interrupted") for case in cases[done:]]
        print(f"interrupted: {done} of {len(cases)} cases measured", file=sys.stderr, flush=True)

    ok = [r for r in results if r["status"] == "ok"]
    peaks = [r["peak_flops"] for r in ok] or [float("nan")]
    add_ratios(results)
    meta.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - started,
                matmul_peak_flops_min=min(peaks), matmul_peak_flops_max=max(peaks))
    if args.out:
        write_out(args.out, meta, results)
    dtype = base["dtype"]
    where = meta.get("gpu") or f"{meta['cpu']}, {base['threads']} threads"
    print(f"\n{args.title or 'bench.step'} -- {where}, torch {torch.__version__}, {dtype}, "
          f"batch {base['batch_size']}, vocab {base['vocab_size']}, dropout {base['dropout']}")
    print(f"matmul peak ({dtype}, n={ok[0]['peak_n'] if ok else '?'}; per case, the better of before and after its "
          f"steps; MFU is against its case's): {min(peaks) / 1e12:.3f} to {max(peaks) / 1e12:.3f} TFLOP/s; "
          f"load average {meta['loadavg_start'][0]:.2f} -> {meta['loadavg_end'][0]:.2f}")
    print(table(results))
    ratios = [r["time_ratio"] for r in results if r.get("time_ratio") and not r["compile"]]
    if ratios:
        print(f"ours/reference step time (eager): {min(ratios):.2f} to {max(ratios):.2f}"
              f" (geometric mean {math.exp(statistics.mean(math.log(x) for x in ratios)):.2f})")
    return 0 if all(r["status"] in ("ok", "skipped", "interrupted") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
