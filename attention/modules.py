"""The attention modules, one per kind (attention/registry.py's KINDS): standard multi-head
attention (the baseline, and its grouped-query / multi-query and QK-norm forms) and DeepSeek-style
multi-head latent attention (MLA). Parameter names follow `transformers`' LlamaAttention /
Qwen3Attention and DeepseekV3Attention, so a state dict loads into the reference unchanged.
Each module is one kind's side of the contract in attention/registry.py's docstring.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheSize, LayerCache
from .init import Constant, Normal
from .kernels import AttentionKernel, attention_weights, cached_attention, causal_scores, explicit_causal_attention
from .modulated import apply_output_gate, gate_width
from .positions import alibi_slopes, score_mask
from .rope import RotaryEmbedding, apply_rotary
from .registry import AttentionSpec


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the reference, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def layer_window(spec: AttentionSpec, layer: int) -> int:
    """The window of layer `layer` (0-based): with a window and global_every N, layers N-1, 2N-1, ..
    attend to every key (Gemma 2 and gpt-oss, N=2: local, global, local, ..; their layer_types),
    the others keep the window."""
    if spec.window and spec.global_every and (layer + 1) % spec.global_every == 0:
        return 0
    return spec.window


def _zero_biases(module: nn.Module) -> dict:
    """Every bias of the module's own projections starts at 0."""
    return {f"{name}.bias": Constant(0.0) for name, child in module.named_children()
            if isinstance(child, nn.Linear) and child.bias is not None}


class MultiHeadAttention(nn.Module):
    """The baseline: q, k, v, o projections, RoPE on the whole head. With n_kv_heads < n_heads,
    grouped-query attention (one key/value head per n_heads / n_kv_heads query heads; 1: multi-query);
    with qk_norm, an RMSNorm over each head's query and key before RoPE (Qwen3); positions "none"
    drops RoPE (NoPE), "alibi" replaces it with Bloom's per-head distance penalty; window > 0 lets
    each query see only its last `window` keys (Mistral), on the layers `layer_window` gives it; with
    an output gate, attention sinks or soft-capped logits, see attention/modulated.py."""

    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, dropout: float, rope_theta: float,
                 max_len: int = 0, kernel: AttentionKernel | None = None, layer: int = 0, n_layers: int = 1):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, spec.n_kv_heads or n_heads
        self.head_dim, self.dropout, self.kernel = d_model // n_heads, dropout, kernel or AttentionKernel()
        self.qk_head_dim = self.v_head_dim = self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.gate_dim = gate_width(spec.output_gate, self.head_dim)
        self.q_proj = nn.Linear(d_model, n_heads * (self.head_dim + self.gate_dim), bias=spec.attention_bias)
        self.k_proj = nn.Linear(d_model, kv_dim, bias=spec.attention_bias)
        self.v_proj = nn.Linear(d_model, kv_dim, bias=spec.attention_bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=spec.attention_bias)
        if spec.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        if spec.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(n_heads))  # gpt-oss's name; one logit per head
        self.softcap = spec.attn_softcap
        if spec.positions == "rope":
            self.rotary = RotaryEmbedding(self.head_dim, rope_theta, spec.rope_scaling, spec.rope_scaling_factor,
                                          max_len)
        self.window = layer_window(spec, layer)  # 0 on a global layer of a local/global pattern
        self.register_buffer("alibi_slopes", alibi_slopes(n_heads) if spec.positions == "alibi" else None,
                             persistent=False)

    def project(self, x: torch.Tensor, start: int = 0):
        """x (B, T, d_model) -> q (B, H, T, d), k and v (B, H_kv, T, d), RoPE applied (at positions
        start, ..), and the output gate's slice of q_proj (B, T, H, gate width; width 0 without a gate)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim + self.gate_dim)
        q, gate = q.split([self.head_dim, self.gate_dim], dim=-1)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if hasattr(self, "rotary"):
            cos, sin = self.rotary(length, x.device, start)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v, gate

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled (soft-capped), masked pre-softmax scores (B, H, T, T) forward's kernel uses
        (probes), with the window and ALiBi's bias where the spec has them. With sinks they miss the
        sink column: see attention_probabilities."""
        q, k, _, _ = self.project(x)
        mask = score_mask(q.shape[-2], self.window, self.alibi_slopes, x.device)
        return causal_scores(q, k, self.head_dim ** -0.5, self.softcap, mask)

    def attention_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T) attention weights on the keys (probes); with sinks they sum to less than 1."""
        return attention_weights(self.attention_scores(x), getattr(self, "sinks", None))

    def gate_values(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output gate's openness (B, T, H, gate width) in [0, 1] on input x (probes), None without a gate."""
        if not self.gate_dim:
            return None
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim + self.gate_dim)
        return torch.sigmoid(q[..., self.head_dim:])

    def parameter_init(self, std: float, residual_std: float) -> dict:
        """How each parameter starts (model.init_weights draws it): the projections N(0, std), o_proj --
        it writes into the residual stream -- N(0, residual_std), biases 0, QK-norm weights 1, the sink
        logits N(0, std)."""
        init = {f"{name}.weight": Normal(std) for name in ("q_proj", "k_proj", "v_proj")}
        init["o_proj.weight"] = Normal(residual_std)
        init.update(_zero_biases(self))
        if hasattr(self, "q_norm"):
            init["q_norm.weight"] = init["k_norm.weight"] = Constant(1.0)
        if hasattr(self, "sinks"):
            init["sinks"] = Normal(std)
        return init

    def cache_size(self, context: int) -> CacheSize:
        """What new_cache holds per sequence at `context` tokens: K and V of each key/value head per
        token, for the last min(window, context) tokens on a window layer."""
        return CacheSize(2 * self.n_kv_heads * self.head_dim, min(self.window, context) if self.window else context)

    def token_mixing_flops(self, context: int) -> int:
        """Forward FLOPs per token that are no weight matmul, at `context`: each head's scores and
        weighted sum of values over the keys a query sees (the full context -- no discount for the
        causal mask -- or min(window, context): what a kernel that skips the keys outside it does)."""
        keys = min(self.window, context) if self.window else context
        return 2 * keys * self.n_heads * (self.qk_head_dim + self.v_head_dim)

    def new_cache(self, batch: int, context: int, dtype=torch.float32, device=None) -> LayerCache:
        """An empty decode cache for `context` tokens: K and V of each key/value head (B, H_kv, slots,
        d), as many slots as the context, or the window's last `window` tokens."""
        shape = (batch, self.n_kv_heads, self.cache_size(context).tokens, self.head_dim)
        return LayerCache({"k": torch.zeros(shape, dtype=dtype, device=device),
                           "v": torch.zeros(shape, dtype=dtype, device=device)}, time_dim=2, window=self.window)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a cache (new_cache), x is the tokens after
        those it holds: a prompt into an empty cache (prefill: attention as without one), then one
        token at a time (decode: attention on the cached keys); their keys and values join it."""
        start = cache.length if cache is not None else 0
        q, k, v, gate = self.project(x, start)
        dropout = self.dropout if self.training else 0.0
        sinks = getattr(self, "sinks", None)
        if cache is not None and start:
            out = self.decode_step(q, k, v, cache)
        else:
            if cache is not None:
                cache.append(k=k, v=v)
            out = self.kernel(q, k, v, scale=self.head_dim ** -0.5, dropout=dropout, window=self.window,
                              alibi_slopes=self.alibi_slopes, sinks=sinks, softcap=self.softcap)
        if self.gate_dim:
            out = apply_output_gate(out, gate)
        return self.o_proj(out)

    def decode_step(self, q, k, v, cache: LayerCache) -> torch.Tensor:
        """One token's attention on the cache, with its own key and value written in first (a window
        keeps its last `window`: the keys this query may see)."""
        if q.shape[2] != 1:
            raise ValueError(f"a cache that holds tokens takes one token at a time, not {q.shape[2]}")
        cache.append(k=k, v=v)
        keys, values = cache.read("k"), cache.read("v")
        bias = None
        if self.alibi_slopes is not None:  # -slope x distance, as score_mask's
            distance = (cache.length - 1 - cache.positions(q.device)).float()
            bias = -self.alibi_slopes.to(q.device)[:, None, None] * distance
        if hasattr(self, "sinks") or self.softcap:
            mask = bias if bias is not None else torch.ones(1, keys.shape[2], dtype=torch.bool, device=q.device)
            return explicit_causal_attention(q, keys, values, self.head_dim ** -0.5, 0.0, getattr(self, "sinks", None),
                                             self.softcap, mask.to(q.dtype) if bias is not None else mask)
        return cached_attention(q, keys, values, self.head_dim ** -0.5, None if bias is None else bias.to(q.dtype))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA. Keys and values are rebuilt per head from a shared, normalised latent of
    kv_lora_rank dims; the rotary part of the key (qk_rope_head_dim) is one shared head; the query
    is full rank or itself low rank. Scores use qk_nope_head_dim + qk_rope_head_dim dims per head,
    values v_head_dim.
    """

    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, dropout: float, rope_theta: float,
                 max_len: int = 0, kernel: AttentionKernel | None = None, layer: int = 0, n_layers: int = 1):
        super().__init__()  # layer, n_layers: every MLA layer is alike
        self.n_heads, self.dropout, self.kernel = n_heads, dropout, kernel or AttentionKernel()
        self.kv_lora_rank = spec.kv_lora_rank
        self.qk_nope_head_dim = spec.qk_nope_head_dim
        self.qk_rope_head_dim = spec.qk_rope_head_dim
        self.qk_head_dim = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        self.v_head_dim = spec.v_head_dim
        q_out = n_heads * self.qk_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, spec.q_lora_rank, bias=spec.attention_bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, self.kv_lora_rank + self.qk_rope_head_dim, bias=spec.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_head_dim, d_model, bias=spec.attention_bias)
        if self.qk_rope_head_dim:  # 0: no decoupled rotary key, no positions
            self.rotary = RotaryEmbedding(self.qk_rope_head_dim, rope_theta, spec.rope_scaling,
                                          spec.rope_scaling_factor, max_len)

    def query(self, x: torch.Tensor, start: int = 0):
        """x (B, T, d_model) -> the non-rotary and rotary query parts (B, H, T, dims), RoPE applied at
        positions start, .."""
        batch, length, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, length, self.n_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        if hasattr(self, "rotary"):
            cos, sin = self.rotary(length, x.device, start)
            q_rot = apply_rotary(q_rot, cos, sin)
        return q_nope, q_rot

    def latent(self, x: torch.Tensor, start: int = 0):
        """x (B, T, d_model) -> what the cache keeps: the normalised latent (B, T, kv_lora_rank) and
        the rotary key shared by all heads (B, T, qk_rope_head_dim), RoPE applied."""
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if hasattr(self, "rotary"):
            cos, sin = self.rotary(x.shape[1], x.device, start)
            k_rot = apply_rotary(k_rot, cos, sin)
        return self.kv_a_layernorm(latent), k_rot

    def keys_and_values(self, latent: torch.Tensor, k_rot: torch.Tensor, q_nope, q_rot):
        """Rebuild every head's keys and values from the latent (B, n, rank) and the shared rotary
        key (B, n, rope): -> q, k (B, H, n or T, qk_head_dim) and v (B, H, n, v_head_dim)."""
        batch, length, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, length, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rot = k_rot.unsqueeze(1).expand(-1, self.n_heads, -1, -1)
        if not self.qk_rope_head_dim:
            return q_nope, k_nope, v
        if self.qk_nope_head_dim:
            return torch.cat((q_nope, q_rot), dim=-1), torch.cat((k_nope, k_rot), dim=-1), v
        return q_rot, k_rot, v

    def project(self, x: torch.Tensor):
        """x (B, T, d_model) -> q, k (B, H, T, qk_head_dim) and v (B, H, T, v_head_dim), RoPE applied."""
        return self.keys_and_values(*self.latent(x), *self.query(x))

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled, causally masked pre-softmax scores (B, H, T, T) forward's kernel uses (probes)."""
        q, k, _ = self.project(x)
        return causal_scores(q, k, self.qk_head_dim ** -0.5)

    # How a decode step uses the cache: "absorbed" (DeepSeek-V2 section 2.1.2: W_UK folded into the
    # query, W_UV applied to the latent-space output, so no per-head key or value is ever rebuilt)
    # or "naive" (every step rebuilds all keys and values from the cached latent). Same arithmetic.
    decode_mode = "absorbed"

    def parameter_init(self, std: float, residual_std: float) -> dict:
        """How each parameter starts (model.init_weights draws it): the projections N(0, std), o_proj --
        it writes into the residual stream -- N(0, residual_std), biases 0, the latents' norm weights 1."""
        names = ["kv_a_proj_with_mqa", "kv_b_proj"] + (["q_proj"] if hasattr(self, "q_proj") else ["q_a_proj", "q_b_proj"])
        init = {f"{name}.weight": Normal(std) for name in names}
        init["o_proj.weight"] = Normal(residual_std)
        init.update(_zero_biases(self))
        for norm in ("kv_a_layernorm", "q_a_layernorm"):
            if hasattr(self, norm):
                init[f"{norm}.weight"] = Constant(1.0)
        return init

    def cache_size(self, context: int) -> CacheSize:
        """What new_cache holds per sequence at `context` tokens: per token the latent and the shared rotary key."""
        return CacheSize(self.kv_lora_rank + self.qk_rope_head_dim, context)

    def token_mixing_flops(self, context: int) -> int:
        """Forward FLOPs per token that are no weight matmul, at `context`: each head's scores
        (qk_nope + qk_rope dims) and weighted sum of values (v_head_dim) over the whole context, as
        training computes them (keys and values rebuilt per head; no discount for the causal mask)."""
        return 2 * context * self.n_heads * (self.qk_head_dim + self.v_head_dim)

    def new_cache(self, batch: int, context: int, dtype=torch.float32, device=None) -> LayerCache:
        """An empty decode cache for `context` tokens: the normalised latent and the shared rotary key
        (DeepSeek-V2's cache), (B, context, kv_lora_rank + qk_rope_head_dim) values in all."""
        return LayerCache({"latent": torch.zeros(batch, context, self.kv_lora_rank, dtype=dtype, device=device),
                           "k_rot": torch.zeros(batch, context, self.qk_rope_head_dim, dtype=dtype, device=device)},
                          time_dim=1, window=0)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); with a cache, as MultiHeadAttention.forward's."""
        start = cache.length if cache is not None else 0
        q_nope, q_rot = self.query(x, start)
        latent, k_rot = self.latent(x, start)
        if cache is not None and start:
            if x.shape[1] != 1:
                raise ValueError(f"a cache that holds tokens takes one token at a time, not {x.shape[1]}")
            cache.append(latent=latent, k_rot=k_rot)
            step = self.absorbed_step if self.decode_mode == "absorbed" else self.naive_step
            return self.o_proj(step(q_nope, q_rot, cache.read("latent"), cache.read("k_rot")))
        if cache is not None:
            cache.append(latent=latent, k_rot=k_rot)
        q, k, v = self.keys_and_values(latent, k_rot, q_nope, q_rot)
        out = self.kernel(q, k, v, scale=self.qk_head_dim ** -0.5, dropout=self.dropout if self.training else 0.0)
        return self.o_proj(out)

    def naive_step(self, q_nope, q_rot, latent, k_rot) -> torch.Tensor:
        q, k, v = self.keys_and_values(latent, k_rot, q_nope, q_rot)
        return cached_attention(q, k, v, self.qk_head_dim ** -0.5)

    def absorbed_step(self, q_nope, q_rot, latent, k_rot) -> torch.Tensor:
        """Scores and the weighted sum in the latent space: q_nope.k_nope = (W_UK^T q_nope).latent
        per head, and sum_j p_j W_UV latent_j = W_UV (sum_j p_j latent_j)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        # One latent serves every head: the heads are the rows of one (B, H, .) @ (B, ., n) product.
        # (A broadcast (B, H, 1, rank) @ (B, 1, rank, n) copies the latent once per head every step.)
        batch, heads = q_nope.shape[0], self.n_heads
        scores = 0
        if self.qk_nope_head_dim:
            q_latent = torch.einsum("bhtd,hdr->bhr", q_nope, w_uk)  # (B, H, rank); t is the one new token
            scores = q_latent @ latent.transpose(1, 2)  # (B, H, n)
        if self.qk_rope_head_dim:
            scores = scores + q_rot.view(batch, heads, -1) @ k_rot.transpose(1, 2)
        probs = torch.softmax(scores * self.qk_head_dim ** -0.5, dim=-1, dtype=torch.float32).to(latent.dtype)
        out_latent = probs @ latent  # (B, H, rank)
        return torch.einsum("bhr,hvr->bhv", out_latent, w_uv).reshape(batch, 1, heads * self.v_head_dim)
