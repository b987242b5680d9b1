"""Train one attention variant of the MoE language model: the single entry point that
`wandb agent` (or local_sweep.py) launches, with Accelerate for devices and processes.

    python train.py --attention=rope_small --seed=1
    python train.py --attention=baseline --vocab_size=49152 --dry_run
"""
import json
import sys

import torch

from config import ConfigError, TrainConfig, config_from_values, help_text, parse_args
from model import ModelConfig, MoELM, count_parameters, flops_per_token


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        attention=cfg.attention_spec(), vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, d_ff=cfg.d_ff, n_experts=cfg.n_experts, top_k=cfg.top_k, seq_len=cfg.seq_len,
        dropout=cfg.dropout, router_noise_std=cfg.router_noise_std, rope_theta=cfg.rope_theta,
    )


def describe_model(cfg: TrainConfig, vocab_size: int) -> dict:
    """Sizes and FLOPs of the configured model, built on the meta device (no memory, no data)."""
    with torch.device("meta"):
        model = MoELM(model_config(cfg, vocab_size))
    params = count_parameters(model)
    return {"attention": cfg.attention, "family": cfg.family, "params_total": params["total"],
            "params_attention": params["attention"], "flops_per_token": flops_per_token(model)}


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
        raise ConfigError("training is not implemented yet; only --dry_run works")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
