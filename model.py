"""The decoder-only mixture-of-experts language model of the seed report, with a pluggable
attention layer. Everything except the attention is identical across variants, down to the
initial values of the shared parameters (see `init_weights`).

    ids -> embed_tokens -> dropout -> n_layers x Block -> norm -> tied LM head -> logits
    Block: x + dropout(self_attn(input_layernorm(x))), then x + dropout(mlp(post_attention_layernorm(x)))
"""
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attention import AttentionSpec, RMSNorm, build_attention


@dataclass(frozen=True)
class ModelConfig:
    attention: AttentionSpec
    vocab_size: int = 49152
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int = 2048
    n_experts: int = 8
    top_k: int = 2
    seq_len: int = 512
    dropout: float = 0.1
    router_noise_std: float = 0.1
    rope_theta: float = 10000.0


class MoE(nn.Module):
    """Top-k mixture of SiLU experts (Linear(d, d_ff) -> SiLU -> Linear(d_ff, d), no biases).

    The router picks k experts per token from (noisy, while training) logits and weights them by a
    softmax over those k logits. Tokens are sorted by expert so each expert runs one matmul over
    exactly the tokens routed to it. Expert weights are stacked, (n_experts, out, in), so the
    per-expert matmuls can become one grouped matmul where the hardware has it.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, noise_std: float):
        super().__init__()
        self.n_experts, self.top_k, self.noise_std = n_experts, top_k, noise_std
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def route(self, tokens: torch.Tensor):
        """-> (expert index, gate weight) of shape (N, k) each, and the load-balancing loss."""
        logits = self.gate(tokens).float()
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        top_weights = top_logits.softmax(dim=-1)
        # Switch-Transformer balance loss: n_experts * sum_e (share of assignments to e) * (mean
        # router probability of e). It is 1 when routing is uniform and grows as it collapses.
        assigned = torch.bincount(top_experts.flatten(), minlength=self.n_experts).float()
        share = assigned / top_experts.numel()
        mean_prob = logits.softmax(dim=-1).mean(dim=0)
        aux_loss = self.n_experts * (share * mean_prob).sum()
        return top_experts, top_weights, aux_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        top_experts, top_weights, aux_loss = self.route(tokens)
        order = top_experts.flatten().argsort(stable=True)
        token_of_slot = order // self.top_k  # which token each expert-sorted slot belongs to
        per_expert = torch.bincount(top_experts.flatten(), minlength=self.n_experts).tolist()
        routed = tokens[token_of_slot].split(per_expert)
        outputs = [
            F.silu(chunk @ self.up_proj[e].T) @ self.down_proj[e].T for e, chunk in enumerate(routed)
        ]
        weighted = torch.cat(outputs) * top_weights.flatten()[order, None].to(tokens.dtype)
        combined = torch.zeros_like(tokens).index_add_(0, token_of_slot, weighted)
        return combined.view_as(x), aux_loss


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model)
        self.self_attn = build_attention(cfg.attention, cfg.d_model, cfg.n_heads, cfg.dropout, cfg.rope_theta)
        self.post_attention_layernorm = RMSNorm(cfg.d_model)
        self.mlp = MoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.router_noise_std)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x)))
        moe_out, aux_loss = self.mlp(self.post_attention_layernorm(x))
        return x + self.dropout(moe_out), aux_loss


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) -> logits (B, T, vocab), and the balance loss averaged over layers."""
        x = self.dropout(self.embed_tokens(ids))
        aux_losses = []
        for layer in self.layers:
            x, aux_loss = layer(x)
            aux_losses.append(aux_loss)
        logits = F.linear(self.norm(x), self.embed_tokens.weight)  # LM head tied to the embedding
        return logits, torch.stack(aux_losses).mean()


# --- initialisation: fair by construction ------------------------------------------------------

# Projections that write into the residual stream start smaller (GPT-2), so depth does not grow
# the residual's variance.
RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj")
INIT_STD = 0.02


def is_attention_parameter(name: str) -> bool:
    return ".self_attn." in name


def init_weights(model: MoELM, seed: int) -> None:
    """Each parameter from its own generator seeded by (seed, parameter name), drawn on the CPU.

    So a parameter that exists in two variants (embedding, experts, router, norms) starts from the
    same values in both, whatever the other parameters are, and on any device.
    """
    residual_std = INIT_STD / math.sqrt(2 * model.cfg.n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                values = torch.ones(param.shape)
            elif name.endswith(".bias"):
                values = torch.zeros(param.shape)
            else:
                digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
                generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
                std = residual_std if name.endswith(RESIDUAL_OUTPUTS) else INIT_STD
                values = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            param.copy_(values)


def shared_parameters_fingerprint(model: MoELM) -> str:
    """sha256 of every non-attention parameter, by name, in name order: equal across the variants
    of one seed exactly when the shared initialisation is equal."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if not is_attention_parameter(name):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- accounting ----------------------------------------------------------------------------------

def count_parameters(model: MoELM) -> dict[str, int]:
    """Total (the tied head counted once) and attention-only parameter counts."""
    named = dict(model.named_parameters())
    return {
        "total": sum(p.numel() for p in named.values()),
        "attention": sum(p.numel() for n, p in named.items() if is_attention_parameter(n)),
    }


def flops_per_token(model: MoELM) -> int:
    """Training FLOPs per token: 6 x (matmul weights a token actually passes through) for forward
    and backward, plus 6 x n_layers x seq_len x n_heads x (qk_head_dim + v_head_dim) for the
    attention scores and the weighted sum of values (the PaLM/nanoGPT convention: the full
    seq_len x seq_len products, no discount for the causal mask).

    Matmul weights per token: every attention projection, the router, top_k of the n_experts
    experts, and the tied LM head (vocab x d_model). Embedding lookups, norms and biases are not
    matmuls and are left out.
    """
    cfg = model.cfg
    active = 0
    for name, param in model.named_parameters():
        if name.endswith(("up_proj", "down_proj")):
            active += param.numel() // cfg.n_experts * cfg.top_k
        elif param.dim() == 2:  # every Linear weight, and the embedding as the LM head
            active += param.numel()
    attn = model.layers[0].self_attn
    scores_and_values = cfg.n_layers * cfg.seq_len * cfg.n_heads * (attn.qk_head_dim + attn.v_head_dim)
    return 6 * active + 6 * scores_and_values
