"""Time one attention layer on each attention kernel (attention/kernels.py): the variant's module
built with --attention_kernel sdpa / explicit / flex, forward + backward (train) and forward
without gradients (eval), eager and under torch.compile.

    python -m bench.kernels                                          # sinks, softcap; seed size; seq 512, 1024
    python -m bench.kernels --d_model 64 --n_heads 2 --seq_lens 16 --batch 64   # the smoke size
    python -m bench.kernels --device cuda --seq_lens 1024,4096,8192 --compile both

Each row says which kernel really computed the attention (`runs`): flex takes the explicit path
where FlexAttention cannot run (attention/kernels.py: a CPU backward, sinks under torch.compile on
the CPU), so such a row times the explicit kernel, and says so. A kernel that cannot compute the
variant at all (sdpa with sinks or a soft-cap) is left out. ms is the median of --repeats calls
after one call and --warmup more, best ms the fastest of them (on a shared machine the least
disturbed), first ms the first call (a compiled one compiles).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attention import VARIANTS, build_attention, kernels  # noqa: E402
from attention.kernels import AttentionKernel  # noqa: E402
from bench.layer import forward_backward  # noqa: E402
from bench.step import _sync, cpu_model  # noqa: E402


def time_kernels(variant: str, names: list[str], mode: str, compiled: bool, seq_len: int, args) -> list[dict]:
    """One row per kernel: the variant's layer 0 (the same weights and input on each), `mode` train
    (forward + backward) or eval. The timed calls are interleaved, one call on each kernel per
    round, so that a shared machine's load falls on every kernel alike."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    x = torch.randn(args.batch, seq_len, args.d_model, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    rows, calls = {}, {}
    for name in names:
        torch.manual_seed(0)
        module = build_attention(VARIANTS[variant], args.d_model, args.n_heads, 0.0, max_len=seq_len,
                                 kernel=AttentionKernel(name)).to(device=device, dtype=dtype)
        calls[name] = torch.compile(module) if compiled else module
        rows[name] = dict(variant=variant, kernel=name, mode=mode, compile=compiled, seq_len=seq_len,
                          batch=args.batch, d_model=args.d_model, n_heads=args.n_heads, dtype=args.dtype,
                          device=args.device, status="ok", times=[])
    # Which kernels call flex_attend, seen in the first round only: the counting wrapper is then
    # taken out, and a second untimed call per kernel recompiles without it (under torch.compile a
    # wrapper that mutates a set recompiles on every call)
    ran_flex, current = set(), [None]
    flex_attend = kernels.flex_attend
    kernels.flex_attend = lambda *a, **k: ran_flex.add(current[0]) or flex_attend(*a, **k)

    def call(name):
        current[0] = name
        _sync(device)
        start = time.perf_counter()
        if mode == "train":  # bench.layer's step: module(x).sum().backward() on a fresh leaf x
            forward_backward(calls[name], x)
        else:
            with torch.no_grad():
                calls[name](x)
        _sync(device)
        return time.perf_counter() - start

    try:
        for round_ in range(1 + args.warmup + args.repeats):
            if round_ == 1:
                kernels.flex_attend = flex_attend
            for name, row in rows.items():
                if row["status"] != "ok":
                    continue
                try:
                    row["times"].append(call(name))
                except Exception as err:  # noqa: BLE001 -- a kernel torch cannot build here is a row, not a crash
                    row.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    finally:
        kernels.flex_attend = flex_attend
        torch._dynamo.reset()
    for name, row in rows.items():
        times = row.pop("times")
        if row["status"] == "ok":
            timed = times[1 + args.warmup:]
            # flex without a call of flex_attend: its explicit fallback ran
            row.update(runs="flex" if name in ran_flex else ("explicit" if name == "flex" else name),
                       ms=1000 * statistics.median(timed), best_ms=1000 * min(timed), first_ms=1000 * times[0])
    return list(rows.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="sinks,softcap")
    p.add_argument("--kernels", default="sdpa,explicit,flex")
    p.add_argument("--modes", default="train,eval")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"])
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--seq_lens", default="512,1024")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--time_budget", type=float, default=None, help="seconds; later rows are skipped")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; allowed: {', '.join(VARIANTS)}")
    for name in args.kernels.split(","):
        if name not in kernels.ATTENTION_KERNELS:
            raise SystemExit(f"error: --kernels: unknown {name!r}; allowed: {', '.join(kernels.ATTENTION_KERNELS)}")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    started, rows = time.perf_counter(), []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for variant in args.variants.split(","):
            spec = VARIANTS[variant]
            # sdpa cannot compute sinks or a soft-cap (attention/kernels.py): left out
            names = [k for k in args.kernels.split(",") if k != "sdpa" or not (spec.attention_sinks or spec.attn_softcap)]
            for mode in args.modes.split(","):
                for compiled in compiles:
                    if args.time_budget and time.perf_counter() - started > args.time_budget:
                        rows += [dict(variant=variant, kernel=name, mode=mode, compile=compiled, seq_len=seq_len,
                                      status="skipped") for name in names]
                        continue
                    rows += time_kernels(variant, names, mode, compiled, seq_len, args)
                    print("\n".join(json.dumps(r) for r in rows[-len(names):]), file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"one attention layer, d_model {args.d_model}, {args.n_heads} heads, batch {args.batch}, {args.dtype}, "
          f"{where}, torch {torch.__version__}")
    print(f"{'variant':8} {'kernel':8} {'runs':8} {'mode':5} {'compile':7} {'seq':>5} {'ms':>9} {'best ms':>9} "
          f"{'first ms':>9}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['variant']:8} {r['kernel']:8} {r['runs']:8} {r['mode']:5} {'on' if r['compile'] else 'off':7} "
                  f"{r['seq_len']:>5} {r['ms']:>9.2f} {r['best_ms']:>9.2f} {r['first_ms']:>9.0f}")
        else:
            print(f"{r['variant']:8} {r['kernel']:8} {'-':8} {r['mode']:5} {'on' if r['compile'] else 'off':7} "
                  f"{r['seq_len']:>5} {r['status'].upper()}: {r.get('error', '')}")
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
