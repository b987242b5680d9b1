"""Time one attention layer alone, ours against its reference, forward + backward, interleaved.

    python -m bench.layer --variants diff,gated_deltanet --d_model 512 --n_heads 8 --seq_len 256 --batch_size 2
    python -m bench.layer --variants baseline,diff --seq_lens 256,512 --repeats 20 --out layer.json

The whole-model step (bench.step) mixes a kind's cost with the MoE, the norms and the head, and
its reference model swaps those for the seed-style modules too; this isolates the attention layer.
The reference is the one bench.step and bench.check use (bench.reference.reference_attention): the
seed-style twin for the seed's kinds, the transformers class the module's `reference_attention`
builds for a later kind, our weights loaded into it. Before timing, the two are checked to agree
(output and input gradient to 1e-4 relative, fp32): a ratio between two layers that compute
different things would mean nothing.

A timed step is module(x).sum().backward() on a fresh leaf x. The two modules alternate step by
step (ours, reference, ours, ..) so both see the same load; ours/ref is the ratio of the medians
(below 1: ours is faster) and of the best steps. Dropout 0, fp32, CPU unless --device cuda.
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

from attention import VARIANTS  # noqa: E402
from bench.reference import has_reference, reference_attention  # noqa: E402
from bench.step import _sync, cpu_model  # noqa: E402

AGREE_RTOL = 1e-4


def layer_pair(variant: str, d_model: int, n_heads: int, seq_len: int, layer: int, n_layers: int, seed: int):
    """Layer `layer` of the variant's model (init_weights' draw) and its reference, our weights loaded."""
    from config import TrainConfig
    from model import ModelConfig, MoELM, init_weights

    cfg = ModelConfig.from_train_config(
        TrainConfig(attention=variant, d_model=d_model, n_heads=n_heads, n_layers=n_layers, seq_len=seq_len,
                    d_ff=4 * d_model, dropout=0.0), vocab_size=256)
    model = MoELM(cfg)
    init_weights(model, seed)
    ours = model.layers[layer].self_attn
    reference = reference_attention(cfg, layer)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours.train(), reference.train()


def forward_backward(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_(True)
    out = module(leaf)
    out.sum().backward()
    return out.detach(), leaf.grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_agreement(ours, reference, x: torch.Tensor, variant: str) -> None:
    """Raise ValueError unless ours and the reference give the same output and input gradient."""
    out_ours, grad_ours = forward_backward(ours, x)
    out_ref, grad_ref = forward_backward(reference, x)
    errors = relative_error(out_ours, out_ref), relative_error(grad_ours, grad_ref)
    if max(errors) > AGREE_RTOL:
        raise ValueError(f"{variant}: ours and its reference disagree (output rel {errors[0]:.1e}, input "
                         f"gradient rel {errors[1]:.1e}; allowed {AGREE_RTOL:.0e}): no timing of different layers")


def time_pair(ours, reference, x: torch.Tensor, warmup: int, repeats: int, device: torch.device) -> dict:
    times = {"ours": [], "reference": []}
    for step in range(warmup + repeats):
        for name, module in (("ours", ours), ("reference", reference)):
            module.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            forward_backward(module, x)
            _sync(device)
            if step >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    ours_ms, ref_ms = statistics.median(times["ours"]), statistics.median(times["reference"])
    return {"ours_ms": ours_ms, "reference_ms": ref_ms, "median_ratio": ours_ms / ref_ms,
            "best_ratio": min(times["ours"]) / min(times["reference"])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="diff,gated_deltanet", help="comma-separated variant names")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--seq_lens", default="256", help="comma-separated sequence lengths")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--layer", type=int, default=1, help="which layer (0-based) of --n_layers: its schedule")
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed steps of each module")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (python train.py --list_attention lists them)")
    without = [v for v in args.variants if not has_reference(VARIANTS[v])]
    if without:
        p.error(f"--variants: {', '.join(without)} have no reference to compare with")
    try:
        args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    except ValueError:
        p.error(f"--seq_lens: {args.seq_lens!r} is not a comma-separated list of integers")
    if not 0 <= args.layer < args.n_layers:
        p.error(f"--layer={args.layer}: must be in 0..{args.n_layers - 1}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"# one attention layer (layer {args.layer} of {args.n_layers}), d{args.d_model}/{args.n_heads}H, "
          f"batch {args.batch_size}, fp32, forward + backward; {where}")
    print(f"{'variant':<16} {'seq':>5} {'ours ms':>9} {'ref ms':>9} {'median ours/ref':>16} {'best ours/ref':>14}")
    rows = []
    for variant in args.variants:
        for seq_len in args.seq_lens:
            ours, reference = layer_pair(variant, args.d_model, args.n_heads, seq_len, args.layer, args.n_layers,
                                         args.seed)
            ours, reference = ours.to(device), reference.to(device)
            x = torch.randn(args.batch_size, seq_len, args.d_model, generator=torch.Generator().manual_seed(args.seed))
            x = x.to(device)
            try:
                check_agreement(ours, reference, x, variant)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            row = {"variant": variant, "seq_len": seq_len, "batch_size": args.batch_size, "d_model": args.d_model,
                   "n_heads": args.n_heads, **time_pair(ours, reference, x, args.warmup, args.repeats, device)}
            rows.append(row)
            print(f"{variant:<16} {seq_len:>5} {row['ours_ms']:>9.2f} {row['reference_ms']:>9.2f} "
                  f"{row['median_ratio']:>16.2f} {row['best_ratio']:>14.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"where": where, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
