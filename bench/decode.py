"""Time serving: prefill a prompt, then decode one token at a time with each kind's own cache
(MoELM.new_cache / decode), beside the memory-bandwidth limit measured in the same process.

    python -m bench.decode --variants baseline,gqa,mla_v3 --contexts 512,2048 --batch 1,16 --out decode.json
    python -m bench.decode --preset tiny --device cpu           # a smoke run in seconds
    python -m bench.decode --generate --checkpoint results/<group>/checkpoints/<run>   # greedy tokens

A row is one (variant, MLA decode mode, context, batch): a prompt of context - (warmup + steps)
tokens is prefilled, then warmup + steps tokens are decoded greedily, so the timed steps read a
cache of about `context` tokens. decode_tokens_per_s = batch / the median step time.

The limit: a decode step must at least read every weight it uses once (the experts: the most a
step can route to, min(n_experts, batch x top_k) per layer; the tied LM head: all of it) and the
whole filled cache of every sequence. At the bandwidth of a large tensor copy (2 x its bytes /
the best time, measured in this process before and after the row; the higher) that takes
limit_s_per_step; limit_ratio = limit_s_per_step / the measured step time = decode_tokens_per_s /
limit_decode_tokens_per_s (1: at the limit). cache_bytes is the cache's actual tensor bytes at the
context (batch x model.kv_cache_bytes at the run's dtype). Peak memory as bench.step measures it
(CUDA: max_memory_allocated; CPU: the growth of ru_maxrss in a fresh process per row).
Model sizes: bench.step's presets and flags; eval mode (no dropout, no router noise).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attention import VARIANTS  # noqa: E402
from bench.step import (PRESETS, SIZE_FIELDS, _child, _max_rss_bytes, _rss_bytes, _sync, build_model,  # noqa: E402
                        case_device, failure_reason, forced_failure, machine_info)

MLA_DECODE_MODES = ("absorbed", "naive")
GENERATE_TOKENS = 8


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` copies of an nbytes tensor (read + write: 2 x nbytes moved)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes_per_step(model, batch: int) -> int:
    """The parameter bytes one decode step reads: all of them, but of each layer's experts only the
    most a step of `batch` tokens can route to."""
    cfg, total = model.cfg, 0
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if name.endswith(("up_proj", "down_proj")):
            nbytes = nbytes * min(cfg.n_experts, batch * cfg.top_k) // cfg.n_experts
        total += nbytes
    return total


def set_mla_decode(model, mode: str) -> None:
    for module in model.modules():
        if hasattr(module, "decode_mode"):
            module.decode_mode = mode


def run_case(case: dict) -> dict:
    """Build the model, measure the bandwidth, prefill, decode and time one row in this process."""
    device, dtype = case_device(case)
    result = dict(case, status="ok")
    forced_failure(case["variant"])
    copy_bytes = case["copy_mb"] * 2 ** 20
    bandwidth_before = copy_bandwidth(device, copy_bytes)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_bytes()
    batch, context, steps = case["batch"], case["context"], case["warmup"] + case["repeats"]
    prompt = context - steps
    if prompt < 1:
        raise ValueError(f"context {context}: must be more than warmup + repeats = {steps}")
    try:
        model = build_model(case, device)[0].eval().to(dtype)
        if case["mla_decode"] != "n/a":
            set_mla_decode(model, case["mla_decode"])
        gen = torch.Generator().manual_seed(case["seed"])
        ids = torch.randint(0, case["vocab_size"], (batch, prompt), generator=gen).to(device)
        with torch.inference_mode():
            cache = model.new_cache(batch, context, dtype, device)
            _sync(device)
            start = time.perf_counter()
            logits = model.decode(ids, cache)
            _sync(device)
            result["prefill_s"] = time.perf_counter() - start
            times, cache_read = [], []
            for _ in range(steps):
                token = logits[:, -1:].argmax(dim=-1)
                _sync(device)
                start = time.perf_counter()
                logits = model.decode(token, cache)
                _sync(device)
                times.append(time.perf_counter() - start)
                cache_read.append(sum(c.read(name).numel() * c.read(name).element_size()
                                      for c in cache for name in c.buffers))
        result["cache_bytes"] = sum(c.nbytes for c in cache)
        result["weight_bytes_per_step"] = weight_bytes_per_step(model, batch)
        result["cache_bytes_read_per_step"] = statistics.mean(cache_read[case["warmup"]:])
        if device.type == "cuda":
            result["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            result["peak_mem_source"] = "cuda max_memory_allocated"
        elif case["isolated"]:
            result["peak_mem_bytes"] = _max_rss_bytes() - rss_before
            result["peak_mem_source"] = "ru_maxrss growth over the RSS before the model was built"
        else:
            result["peak_mem_bytes"] = None
            result["peak_mem_source"] = "not measured: run isolated (the default on CPU) for RSS"
        del model, cache, logits
    except getattr(torch, "OutOfMemoryError", RuntimeError) as err:
        return dict(result, status="oom", error=str(err).splitlines()[0][:200])
    bandwidth_after = copy_bandwidth(device, copy_bytes)
    result["bandwidth_bytes_per_s_before_after"] = [bandwidth_before, bandwidth_after]
    result["bandwidth_bytes_per_s"] = bandwidth = max(bandwidth_before, bandwidth_after)
    timed = times[case["warmup"]:]
    result["decode_step_times_s"] = timed
    result["decode_s_per_step"] = step_s = statistics.median(timed)
    result["decode_tokens_per_s"] = batch / step_s
    result["prefill_tokens_per_s"] = batch * prompt / result["prefill_s"]
    result["prompt_tokens"] = prompt
    result["limit_s_per_step"] = limit_s = (result["weight_bytes_per_step"]
                                            + result["cache_bytes_read_per_step"]) / bandwidth
    result["limit_decode_tokens_per_s"] = batch / limit_s
    result["limit_ratio"] = limit_s / step_s
    return result


# --- greedy generation from a trained run's checkpoint -----------------------------------------

def load_checkpoint(path: Path):
    """The model of a train.py checkpoint folder (progress.json + Accelerate's state/), eval mode."""
    from config import TrainConfig
    from model import ModelConfig, MoELM

    progress = json.loads((path / "progress.json").read_text())
    saved = progress["config"]
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    state_dir = path / "state"
    if (state_dir / "model.safetensors").exists():
        from safetensors.torch import load_file
        state = load_file(str(state_dir / "model.safetensors"))
    else:
        state = torch.load(state_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    vocab = state["embed_tokens.weight"].shape[0]
    model = MoELM(ModelConfig.from_train_config(cfg, vocab))
    model.load_state_dict(state)
    return model.eval(), cfg


def greedy(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> list[int]:
    """Greedy continuation of prompt (1, T): with the cache, or re-running the full forward each step."""
    ids = prompt
    with torch.inference_mode():
        if use_cache:
            cache = model.new_cache(1, prompt.shape[1] + new_tokens)
            logits = model.decode(prompt, cache)
        for _ in range(new_tokens):
            if not use_cache:
                logits = model(ids).logits
            token = logits[:, -1:].argmax(dim=-1)
            ids = torch.cat((ids, token), dim=1)
            if use_cache:
                logits = model.decode(token, cache)
    return ids[0, prompt.shape[1]:].tolist()


def generate(args) -> int:
    path = Path(args.checkpoint or "")
    if not args.checkpoint or not (path / "progress.json").is_file():
        print(f"error: --checkpoint={args.checkpoint}: needs a train.py checkpoint folder (with progress.json "
              "and state/)", file=sys.stderr)
        return 2
    model, cfg = load_checkpoint(path)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, min(16, cfg.seq_len)), generator=gen)
    cached = greedy(model, prompt, args.tokens, use_cache=True)
    uncached = greedy(model, prompt, args.tokens, use_cache=False)
    assert cached == uncached, f"decoding with the cache gave {cached}, without it {uncached}"
    print(f"{cfg.attention} (step {json.loads((path / 'progress.json').read_text())['step']}): prompt "
          f"{prompt[0].tolist()}")
    print(f"greedy, with the cache: {cached} (the same as without it)")
    return 0


# --- the run -----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="model sizes (default: gpu on CUDA, else cpu)")
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k", "vocab_size", "seq_len", "dtype"):
        p.add_argument(f"--{name}", type=str if name == "dtype" else int, help=f"overrides the preset's {name}"
                       + (" (a relative window resolves at it)" if name == "seq_len" else ""))
    p.add_argument("--variants", default="baseline,gqa,mqa,swa,mla_v3,lora_small", help="comma list")
    p.add_argument("--contexts", default="512,2048", help="comma list of cache lengths")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--mla_decode", default="absorbed,naive", help="MLA decode modes (comma list)")
    p.add_argument("--warmup", type=int, default=2, help="decode steps before the timed ones")
    p.add_argument("--repeats", type=int, default=8, help="timed decode steps")
    p.add_argument("--copy_mb", type=int, default=None, help="the bandwidth copy's size (cpu 256, cuda 1024)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="a fresh process per row (auto: on CPU, for its peak RSS)")
    p.add_argument("--time_budget", type=float, default=None, help="seconds; later rows are skipped")
    p.add_argument("--out", default=None, help="write the rows: a JSON list")
    p.add_argument("--generate", action="store_true", help="greedy tokens from --checkpoint, with and without the cache")
    p.add_argument("--checkpoint", default=None, help="with --generate: a train.py checkpoint folder")
    p.add_argument("--tokens", type=int, default=GENERATE_TOKENS, help="with --generate: how many")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _integers(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"error: --{flag}={text}: allowed: a comma list of positive integers")
    return values


def resolve(args) -> list[dict]:
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device={args.device}: allowed: auto, cpu, cuda")
    sizes = dict(PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")])
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k", "vocab_size", "seq_len", "dtype"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if sizes["dtype"] not in ("fp32", "bf16"):
        raise SystemExit(f"error: --dtype={sizes['dtype']}: allowed: fp32, bf16")
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; allowed: {', '.join(VARIANTS)}")
    modes = args.mla_decode.split(",")
    if not set(modes) <= set(MLA_DECODE_MODES):
        raise SystemExit(f"error: --mla_decode={args.mla_decode}: allowed: {', '.join(MLA_DECODE_MODES)}")
    contexts, batches = _integers("contexts", args.contexts), _integers("batch", args.batch)
    if min(contexts) <= args.warmup + args.repeats:
        raise SystemExit(f"error: --contexts={args.contexts}: each must exceed warmup + repeats "
                         f"({args.warmup + args.repeats})")
    sizes.pop("batch_size")  # --batch: a list
    base = dict(sizes, warmup=args.warmup, repeats=args.repeats, device=device, dropout=0.0, seed=args.seed,
                threads=args.threads or os.cpu_count(), impl="ours", attention_kernel="auto", sdpa_pad="auto", moe_matmul="auto",
                copy_mb=args.copy_mb or (1024 if device == "cuda" else 256),
                isolated=args.isolate == "yes" or (args.isolate == "auto" and device == "cpu"))
    return [dict(base, variant=v, mla_decode=mode, context=c, batch=b)
            for v in variants for mode in (modes if VARIANTS[v].kind == "mla" else ["n/a"])
            for c in contexts for b in batches]


def table(rows: list[dict]) -> str:
    header = ["variant", "mla", "context", "batch", "cache MB", "prefill tok/s", "decode tok/s", "limit tok/s",
              "ratio", "peak MB"]
    lines = []
    for r in rows:
        cells = [r["variant"], r["mla_decode"], str(r["context"]), str(r["batch"])]
        if r["status"] != "ok":
            cells += [r["status"].upper() + ": " + r.get("error", "")[:60]] + [""] * 5
        else:
            peak = r.get("peak_mem_bytes")
            cells += [f"{r['cache_bytes'] / 2 ** 20:,.2f}", f"{r['prefill_tokens_per_s']:,.0f}",
                      f"{r['decode_tokens_per_s']:,.1f}", f"{r['limit_decode_tokens_per_s']:,.1f}",
                      f"{r['limit_ratio']:.2f}", "-" if peak is None else f"{peak / 2 ** 20:,.0f}"]
        lines.append(cells)
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._case:  # a child of an isolated run
        from bench.step import RESULT_TAG
        case = json.loads(args._case)
        try:
            result = run_case(case)
        except Exception as err:  # noqa: BLE001 -- one row's failure, reported to the parent
            result = dict(case, status="failed", error=failure_reason(err))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    if args.generate:
        return generate(args)
    cases = resolve(args)
    if cases[0]["device"] == "cpu":
        torch.set_num_threads(cases[0]["threads"])
    meta = machine_info(cases[0]["device"])
    started, rows = time.perf_counter(), []
    try:
        for i, case in enumerate(cases, 1):
            label = f"[{i}/{len(cases)}] {case['variant']} {case['mla_decode']} context={case['context']} batch={case['batch']}"
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                rows.append(dict(case, status="skipped", error="over --time_budget"))
                continue
            try:
                row = _child(case, module="bench.decode") if case["isolated"] else run_case(case)
            except Exception as err:  # noqa: BLE001 -- this row only
                row = dict(case, status="failed", error=failure_reason(err))
            rows.append(dict(row, machine=meta["cpu"] if case["device"] == "cpu" else meta.get("gpu")))
            print(f"{label}: {row['status']}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C, or gpu.sh's hard timeout: keep what was measured
        rows += [dict(case, status="interrupted") for case in cases[len(rows):]]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    sizes = {k: cases[0][k] for k in SIZE_FIELDS if k not in ("batch_size", "warmup", "repeats")}
    print(f"bench.decode -- {meta.get('gpu') or meta['cpu']}, {cases[0]['threads']} threads, torch {torch.__version__}, "
          f"{sizes}; load average {meta['loadavg_start'][0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print("limit: (weights + cache bytes a step reads) / the copy bandwidth; ratio = limit time / step time")
    print(table(rows))
    return 0 if all(r["status"] in ("ok", "skipped", "interrupted") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
