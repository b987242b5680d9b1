"""A seed-style implementation of the same model, for benchmarks only: what the seed's code did,
at the same dims, with the same parameter names, so it loads our state dict unchanged.

- attention: eager, explicit softmax over a materialised (T, T) causal mask, RoPE tables
  recomputed on every call;
- MoE: a Python loop over experts, each computing on the tokens whose top-k includes it, found with
  a boolean mask (a host sync per expert on GPU), outputs accumulated by masked assignment;
- RMSNorm written out (mean of squares, rsqrt);
- the optimizer: torch.optim.AdamW with its defaults (no fused kernel).

Everything else -- embedding, blocks, LM head, router, loss -- is the model's own code, so the
comparison isolates the fast path. `tests/test_perf.py` checks that both compute the same loss and
gradients.
"""
import torch
import torch.nn.functional as F
from torch import nn

from attention import AttentionSpec
from attention.rope import ROPE_SCALINGS
from model import MoE, ModelConfig, MoELM


class SeedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def seed_rope(x, theta: float, spec: AttentionSpec):
    """Rotate x (B, H, T, d) by position, tables built on the spot (rotate-half layout)."""
    length, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    positions = torch.arange(length, device=x.device, dtype=torch.float32)
    if spec.rope_scaling is not None:
        positions = ROPE_SCALINGS[spec.rope_scaling](positions, spec.rope_scaling_factor)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def seed_attention(q, k, v, scale: float, dropout: float, training: bool):
    """Explicit softmax over a materialised causal mask: O(T^2) memory per head."""
    length = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = torch.triu(torch.ones(length, length, device=q.device), diagonal=1).bool()
    scores = scores.masked_fill(mask, float("-inf"))
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    out = probs @ v
    batch, heads, _, v_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * v_dim)


class SeedMHA(nn.Module):
    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, dropout: float, rope_theta: float):
        super().__init__()
        self.spec, self.n_heads, self.head_dim = spec, n_heads, d_model // n_heads
        self.dropout, self.rope_theta = dropout, rope_theta
        self.qk_head_dim = self.v_head_dim = self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=spec.attention_bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=spec.attention_bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=spec.attention_bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=spec.attention_bias)

    def forward(self, x):
        batch, length, _ = x.shape
        heads = (batch, length, self.n_heads, self.head_dim)
        q = seed_rope(self.q_proj(x).view(heads).transpose(1, 2), self.rope_theta, self.spec)
        k = seed_rope(self.k_proj(x).view(heads).transpose(1, 2), self.rope_theta, self.spec)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        return self.o_proj(seed_attention(q, k, v, self.head_dim ** -0.5, self.dropout, self.training))


class SeedMLA(nn.Module):
    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, dropout: float, rope_theta: float):
        super().__init__()
        self.spec, self.n_heads, self.dropout, self.rope_theta = spec, n_heads, dropout, rope_theta
        self.kv_lora_rank, self.nope, self.rope = spec.kv_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = self.nope + self.rope, spec.v_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, spec.q_lora_rank, bias=spec.attention_bias)
            self.q_a_layernorm = SeedRMSNorm(spec.q_lora_rank)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, self.kv_lora_rank + self.rope, bias=spec.attention_bias)
        self.kv_a_layernorm = SeedRMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n_heads * (self.nope + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_head_dim, d_model, bias=spec.attention_bias)

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.q_proj(x) if self.spec.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, length, self.n_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))
        kv = kv.view(batch, length, self.n_heads, self.nope + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_head_dim], dim=-1)
        q_rot = seed_rope(q_rot, self.rope_theta, self.spec)
        k_rot = seed_rope(k_rot.unsqueeze(1), self.rope_theta, self.spec).expand(-1, self.n_heads, -1, -1)
        q, k = torch.cat((q_nope, q_rot), dim=-1), torch.cat((k_nope, k_rot), dim=-1)
        return self.o_proj(seed_attention(q, k, v, self.qk_head_dim ** -0.5, self.dropout, self.training))


class SeedMoE(MoE):
    """Same parameters and router as model.MoE (route() is inherited); the experts run in a loop."""

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        top_experts, top_weights, aux_loss = self.route(tokens)
        out = torch.zeros_like(tokens)
        for e in range(self.n_experts):
            chosen = top_experts == e  # (N, k)
            rows = chosen.any(dim=-1)  # the tokens whose top-k includes expert e
            if not rows.any():  # a host sync per expert
                continue
            gate = (top_weights * chosen).sum(dim=-1)[rows].to(tokens.dtype)
            hidden = F.silu(tokens[rows] @ self.up_proj[e].T) @ self.down_proj[e].T
            out[rows] += gate[:, None] * hidden
        return out.view_as(x), aux_loss


def has_reference(spec: AttentionSpec) -> bool:
    """The seed-style twins cover the seed's kinds only: MLA, and MHA with a key/value head per
    query head, RoPE on every key, and no QK-norm, output gate, sinks, soft-cap or window (the
    zoo's kinds have none here yet)."""
    return spec.kind == "mla" or (spec.n_kv_heads is None and not spec.qk_norm and not _modulated(spec))


def _modulated(spec: AttentionSpec) -> bool:
    return (spec.output_gate != "none" or spec.attention_sinks or bool(spec.attn_softcap)
            or spec.positions != "rope" or bool(spec.window))


def build_reference(cfg: ModelConfig) -> MoELM:
    """The model with its attention, MoE and norms swapped for the seed-style modules. The module
    tree (and so every parameter name, shape and order) is unchanged: it loads our state dict."""
    spec = cfg.attention.resolved(cfg.d_model, cfg.n_heads, cfg.seq_len)
    if spec.kind == "mha" and (spec.n_kv_heads != cfg.n_heads or spec.qk_norm or _modulated(spec)):
        raise ValueError(f"{spec.name}: the seed-style reference has no grouped-query, QK-norm, gated, sink, "
                         "soft-capped, windowed, ALiBi or NoPE attention")
    model = MoELM(cfg)
    attention = SeedMLA if spec.is_latent else SeedMHA
    for layer in model.layers:
        layer.input_layernorm = SeedRMSNorm(cfg.d_model)
        layer.self_attn = attention(spec, cfg.d_model, cfg.n_heads, cfg.dropout, cfg.rope_theta)
        layer.post_attention_layernorm = SeedRMSNorm(cfg.d_model)
        layer.mlp = SeedMoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.router_noise_std)
    model.norm = SeedRMSNorm(cfg.d_model)
    return model
