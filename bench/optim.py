"""How long one AdamW step takes for the model's parameters: torch's default (a for-loop on CPU,
foreach on CUDA), foreach, and fused -- the optimizer's share of a training step.

    python -m bench.optim                       # the CPU preset's model (vocab 8192)
    python -m bench.optim --vocab_size 49152 --device cuda
"""
import argparse
import statistics
import sys
import time

import torch

from attention import VARIANTS
from model import ModelConfig, MoELM


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.optim", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = MoELM(ModelConfig(attention=VARIANTS["baseline"], vocab_size=args.vocab_size)).to(device)
    params = list(model.parameters())
    for param in params:
        param.grad = torch.randn_like(param)
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters on {device}, {torch.get_num_threads()} threads")
    for label, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kwargs)
        times = []
        for _ in range(args.repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"AdamW {label:8s} {1000 * statistics.median(times[1:]):8.1f} ms/step (median of {args.repeats})")
        del optimizer
    return 0


if __name__ == "__main__":
    sys.exit(main())
