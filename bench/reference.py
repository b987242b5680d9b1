"""A seed-style implementation of the same model, for benchmarks and as the fast path's check:
what the seed's code did, at the same dims, with the same parameter names, so it loads our state
dict unchanged.

- attention: eager, explicit softmax over a materialised (T, T) causal mask, RoPE tables
  recomputed on every call; the zoo's options written out the plain way, without the model's
  helpers (attention/kernels.py, modulated.py, positions.py), so a bug there shows: keys and
  values repeat_interleave'd for grouped-query, RMSNorm on q and k, the tanh soft-cap, the window as a
  second triangle of the mask, ALiBi's slopes as the paper's code computes them, the sink logit
  concatenated before the softmax, the sigmoid output gate (which layers of a local/global pattern
  get the window is the kind's own schedule, attention.modules.layer_window, checked against
  transformers' layer_types in tests/test_attention_zoo_combined.py);
  a kind without a twin here (any kind after the seed's two) is compared with its reference
  implementation instead, the transformers class its module's `reference_attention` builds, our
  weights copied in;
- MoE: a Python loop over experts, each computing on the tokens whose top-k includes it, found with
  a boolean mask (a host sync per expert on GPU), outputs accumulated by masked assignment;
- RMSNorm written out (mean of squares, rsqrt);
- the optimizer: torch.optim.AdamW with its defaults (no fused kernel).

Everything else -- embedding, blocks, LM head, router, loss -- is the model's own code, so the
comparison isolates the fast path. `tests/test_perf.py` checks that both compute the same loss and
gradients for every variant.
"""
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from attention import KINDS, VARIANTS, AttentionSpec, attention_class
from attention.modules import layer_window
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


def press_alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's head slopes as the paper's code writes them (Press et al., ofirpress/attention_with_linear_biases):
    a geometric sequence starting at 2^(-8/n) for a power of two n; otherwise the closest power of
    two's slopes, then every other slope of twice as many heads."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][:n_heads - closest]


def seed_attention(q, k, v, scale: float, dropout: float, training: bool, window: int = 0, softcap: float = 0.0,
                   bias=None, sinks=None):
    """Explicit softmax over a materialised causal mask: O(T^2) memory per head. Options, each
    written out: soft-capped logits (cap * tanh(s / cap), before the mask), a sliding window (query
    t sees keys t-window+1..t), an additive bias (ALiBi), a sink logit per head as one more softmax
    column that is dropped afterwards."""
    length = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    mask = torch.triu(torch.ones(length, length, device=q.device), diagonal=1).bool()
    if window:
        mask = mask | torch.tril(torch.ones(length, length, device=q.device), diagonal=-window).bool()
    scores = scores.masked_fill(mask, float("-inf"))
    if sinks is not None:
        sink_column = sinks.view(1, -1, 1, 1).expand(scores.shape[0], -1, length, 1).to(scores.dtype)
        probs = F.softmax(torch.cat((scores, sink_column), dim=-1).float(), dim=-1)[..., :length].to(q.dtype)
    else:
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    out = probs @ v
    batch, heads, _, v_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * v_dim)


class SeedMHA(nn.Module):
    """Multi-head attention and every option the model's has: grouped-query (keys and values
    repeat_interleave'd to the query heads), QK-norm, RoPE / none / ALiBi, a window, a soft-cap,
    sinks, a head-wise or element-wise output gate (Qwen3-Next's layout: each head's slice of
    q_proj is [query, gate])."""

    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, dropout: float, rope_theta: float):
        super().__init__()
        self.spec, self.n_heads, self.head_dim = spec, n_heads, d_model // n_heads
        self.n_kv_heads = spec.n_kv_heads
        self.dropout, self.rope_theta = dropout, rope_theta
        self.qk_head_dim = self.v_head_dim = self.head_dim
        self.gate_dim = {"none": 0, "headwise": 1, "elementwise": self.head_dim}[spec.output_gate]
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, n_heads * (self.head_dim + self.gate_dim), bias=spec.attention_bias)
        self.k_proj = nn.Linear(d_model, kv_dim, bias=spec.attention_bias)
        self.v_proj = nn.Linear(d_model, kv_dim, bias=spec.attention_bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=spec.attention_bias)
        if spec.qk_norm:
            self.q_norm, self.k_norm = SeedRMSNorm(self.head_dim), SeedRMSNorm(self.head_dim)
        if spec.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(n_heads))

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim + self.gate_dim)
        q, gate = q[..., :self.head_dim], q[..., self.head_dim:]
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.spec.positions == "rope":
            q, k = seed_rope(q, self.rope_theta, self.spec), seed_rope(k, self.rope_theta, self.spec)
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        bias = None
        if self.spec.positions == "alibi":  # Bloom's form: slope x key position (softmax ignores a row constant)
            slopes = torch.tensor(press_alibi_slopes(self.n_heads), device=x.device)
            bias = slopes.view(-1, 1, 1) * torch.arange(length, device=x.device, dtype=torch.float32).view(1, 1, -1)
        out = seed_attention(q, k, v, self.head_dim ** -0.5, self.dropout, self.training, self.spec.window,
                             self.spec.attn_softcap, bias, getattr(self, "sinks", None))
        if self.gate_dim:
            out = (out.view(batch, length, self.n_heads, self.head_dim) * torch.sigmoid(gate)).flatten(2)
        return self.o_proj(out)


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
        if self.rope:  # 0: no decoupled rotary key (mla_norope), the scores use the latent's dims only
            q_rot = seed_rope(q_rot, self.rope_theta, self.spec)
            k_rot = seed_rope(k_rot.unsqueeze(1), self.rope_theta, self.spec).expand(-1, self.n_heads, -1, -1)
            q, k = torch.cat((q_nope, q_rot), dim=-1), torch.cat((k_nope, k_rot), dim=-1)
        else:
            q, k = q_nope, k_nope
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


def has_twin(spec: AttentionSpec) -> bool:
    """Whether the seed-style twin covers this spec's kind and every knob that kind has. It reads the
    kind only, so a variant's unresolved spec (VARIANTS[name]) answers the same as the resolved one."""
    covered = REFERENCE_KNOBS.get(spec.kind)
    return covered is not None and set(KINDS[spec.kind].knobs) <= covered


def has_reference(spec: AttentionSpec) -> bool:
    """Whether bench/ can compare this spec's kind: its seed-style twin (the seed's kinds), or else
    the reference implementation its module builds (`reference_attention`). A kind with neither, or
    a seed kind given a knob its twin lacks, makes it False (and tests/test_perf.py fail)."""
    if spec.full_attention and not has_reference(VARIANTS[spec.full_attention]):
        return False
    if spec.kind in REFERENCE_KNOBS:
        return has_twin(spec)
    return hasattr(attention_class(spec.kind), "reference_attention")


class KindReference(nn.Module):
    """A kind's reference implementation as a layer of the model: the module `reference_attention`
    built (its submodules and parameters, under the names it gives them, which are the kind's, so
    our state dict loads), called through the forward it came with."""

    def __init__(self, module: nn.Module, forward):
        super().__init__()
        if list(module.named_buffers(recurse=False)):  # .to() would move our copy of them, not its
            raise ValueError(f"{type(module).__name__}: a reference with buffers of its own is not supported")
        self.reference = [module]  # not a child: its children and parameters are registered as ours
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.call = forward

    def forward(self, x):
        return self.call(x)


# The knobs each reference module implements (a new knob of a kind needs its plain form here).
REFERENCE_KNOBS = {
    "mha": {"n_kv_heads", "qk_norm", "attention_bias", "rope_scaling", "rope_scaling_factor", "output_gate",
            "attention_sinks", "attn_softcap", "positions", "window", "global_every"},
    "mla": {"q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "attention_bias",
            "rope_scaling", "rope_scaling_factor"},
}
SEED_MODULES = {"mha": SeedMHA, "mla": SeedMLA}


def reference_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s reference attention: the seed-style twin of the kind, or the kind's reference
    implementation (KindReference). A hybrid's full layers: their variant's."""
    spec = cfg.attention.layer_spec(layer, cfg.n_layers).resolved(cfg.d_model, cfg.n_heads, cfg.seq_len)
    if spec.kind in SEED_MODULES:
        layer_spec = replace(spec, window=layer_window(spec, layer))  # the kind's schedule
        return SEED_MODULES[spec.kind](layer_spec, cfg.d_model, cfg.n_heads, cfg.dropout, cfg.rope_theta)
    module, forward = attention_class(spec.kind).reference_attention(spec, cfg.d_model, cfg.n_heads, cfg.dropout,
                                                                     cfg.rope_theta, layer, cfg.n_layers)
    return KindReference(module, forward)


def build_reference(cfg: ModelConfig) -> MoELM:
    """The model with its attention, MoE and norms swapped for the seed-style modules (attention: a
    new kind's reference implementation). The module tree (and so every parameter name, shape and
    order) is unchanged: it loads our state dict."""
    spec = cfg.attention
    if not has_reference(spec):
        raise ValueError(f"{spec.name}: the seed-style reference has no {spec.kind!r} attention (or not all "
                         "of its knobs): add it to bench/reference.py, or give the kind's module a "
                         "reference_attention (attention/registry.py)")
    model = MoELM(cfg)
    for i, layer in enumerate(model.layers):
        layer.input_layernorm = SeedRMSNorm(cfg.d_model)
        layer.self_attn = reference_attention(cfg, i)
        layer.post_attention_layernorm = SeedRMSNorm(cfg.d_model)
        layer.mlp = SeedMoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.router_noise_std)
    model.norm = SeedRMSNorm(cfg.d_model)
    return model
