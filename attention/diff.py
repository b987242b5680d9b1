"""Differential attention (Ye et al. 2024, "Differential Transformer", arXiv 2410.05258) as
transformers 5.24's DiffLlamaAttention computes it; tests/test_diff.py checks it against that class
(weights copied; outputs and gradients, float32).

The heads come in pairs. Each head has its own query and key (RoPE, rotate-half layout, as Llama);
a pair's two softmax maps are subtracted, the second scaled by a learned lambda, and the difference
weighs the pair's value of 2 x head_dim dims:

    out_i = (softmax(q_i k_i^T / sqrt(d)) - lambda * softmax(q_j k_j^T / sqrt(d))) [v_a, v_b]
    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init(layer_idx)
    lambda_init(l) = 0.8 - 0.6 exp(-0.3 l)          (l the 0-based layer index: the paper's l - 1)
    y = o_proj((1 - lambda_init) * RMSNorm_no_weight(out))   (per pair, over its 2 x head_dim dims)

The pairing is transformers': with H query heads, head i pairs with head i + H/2 (i < H/2), and with
H_kv key/value heads (each serving g = H / H_kv consecutive query heads, grouped-query), pair i's
value is [v_{i // g}, v_{H_kv/2 + i // g}], the first and second half of the value heads.

Where the official Microsoft code (microsoft/unilm, Diff-Transformer/multihead_diffattn.py) differs:
- pairing: it pairs adjacent heads (2i, 2i+1) and gives each pair one contiguous 2 x head_dim slice
  of v_proj; transformers pairs i with i + H/2 and concatenates two separate value heads. Same
  function class (a permutation of projection rows), different weights for the same checkpoint;
- the group norm ("subln") has a learned weight (elementwise_affine=True); here none, as transformers;
- RoPE interleaved (rotate pairs of adjacent dims) instead of rotate-half;
- it has no attention dropout at all (and applies nan_to_num to the scores).
Both count heads differently too: Microsoft's num_heads is the number of pairs (head_dim =
d_model / num_heads / 2); here, as in transformers, n_heads heads of d_model / n_heads dims form
n_heads / 2 pairs. lambda_init's layer index and the lambda vectors' N(0, 0.1) init agree.

Attention dropout: transformers 5.24 refuses attention_dropout > 0 (its two SDPA calls, one per value
half, cannot share a mask). The seed recipe trains every attention with attention dropout, so here
both halves of a pair's value go through ONE SDPA call (each query head's value is the pair's 2 x
head_dim vector): dropout drops entries of each softmax map, independently for the two maps of a
pair, with one mask for both value halves, i.e. (drop(A_i) - lambda drop(A_j)) [v_a, v_b] -- the
V-doubling semantics of transformers 4.x's DiffLlama. Without dropout (eval, or dropout=0) it is
exactly transformers 5.24's arithmetic.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheSize, LayerCache
from .init import Constant, Normal
from .kernels import AttentionKernel
from .registry import AttentionSpec
from .rope import RotaryEmbedding, apply_rotary

LAMBDA_STD = 0.1  # the lambda vectors' init (transformers' lambda_std_dev, Microsoft's normal_(std=0.1))
GROUPNORM_EPS = 1e-5  # DiffLlamaConfig.rms_norm_eps's default, Microsoft's subln eps


def lambda_init(layer_idx: int) -> float:
    """The depth-dependent part of lambda (and the output scale 1 - lambda_init): 0.2 at layer 0,
    rising towards 0.8 in deep layers."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DifferentialAttention(nn.Module):
    """Differential attention; parameter names as transformers' DiffLlamaAttention (whose state dict
    loads unchanged: the group norm has no weight). n_heads and n_kv_heads must be even."""

    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, dropout: float, rope_theta: float,
                 max_len: int = 0, kernel: AttentionKernel | None = None, layer: int = 0, n_layers: int = 1):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, spec.n_kv_heads or n_heads
        if self.n_kv_heads % 2 or n_heads % self.n_kv_heads:
            raise ValueError(f"differential attention pairs heads: n_kv_heads={self.n_kv_heads} must be even "
                             f"and divide n_heads={n_heads}")
        self.head_dim, self.dropout, self.kernel = d_model // n_heads, dropout, kernel or AttentionKernel()
        self.layer_idx, self.n_layers = layer, n_layers  # (transformers' name for the layer index)
        self.lambda_init = lambda_init(layer)  # the kind's per-layer schedule: a constant of the depth
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=spec.attention_bias)
        self.k_proj = nn.Linear(d_model, kv_dim, bias=spec.attention_bias)
        self.v_proj = nn.Linear(d_model, kv_dim, bias=spec.attention_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=spec.attention_bias)
        # zeros here; the model draws them (parameter_init): N(0, LAMBDA_STD) as transformers
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.zeros(self.head_dim)) for _ in range(4))
        self.rotary = RotaryEmbedding(self.head_dim, rope_theta, spec.rope_scaling, spec.rope_scaling_factor, max_len)

    def parameter_init(self, std: float, residual_std: float) -> dict:
        """How each parameter starts (model.init_weights draws it): the projections N(0, std), o_proj --
        it writes into the residual stream -- N(0, residual_std), biases 0, the lambda vectors
        N(0, 0.1) as transformers' DiffLlama (and Microsoft's code) start them."""
        init = {f"{name}.weight": Normal(std) for name in ("q_proj", "k_proj", "v_proj")}
        init["o_proj.weight"] = Normal(residual_std)
        if self.o_proj.bias is not None:
            init |= {f"{name}.bias": Constant(0.0) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        return init | {name: Normal(LAMBDA_STD) for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}

    def cache_size(self, context: int) -> CacheSize:
        """What new_cache holds per sequence at `context` tokens: per token each kv head's key and half
        a pair's value (2 head_dim values per pair of kv heads), as many values as multi-head
        attention's K and V."""
        return CacheSize(2 * self.n_kv_heads * self.head_dim, context)

    def token_mixing_flops(self, context: int) -> int:
        """Forward FLOPs per token that are no weight matmul, at `context`: each query head's scores
        (head_dim) and weighted sum of its pair's value (2 head_dim) over the whole context (no
        discount for the causal mask), as multi-head attention counts them."""
        return 2 * context * self.n_heads * (self.head_dim + 2 * self.head_dim)

    @classmethod
    def reference_attention(cls, spec, d_model, n_heads, dropout, rope_theta, layer, n_layers):
        """transformers' DiffLlamaAttention for this layer (its SDPA path) and its forward on x, for
        bench/ and tests/test_diff.py. It refuses attention dropout, so it is built without."""
        from transformers.models.diffllama.configuration_diffllama import DiffLlamaConfig
        from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention, DiffLlamaRotaryEmbedding

        if spec.rope_scaling is not None:
            raise ValueError(f"{cls.__name__}: the reference is built for unscaled RoPE, not {spec.rope_scaling!r}")
        config = DiffLlamaConfig(hidden_size=d_model, num_attention_heads=n_heads,
                                 num_key_value_heads=spec.n_kv_heads or n_heads, attention_bias=spec.attention_bias,
                                 attention_dropout=0.0, rms_norm_eps=GROUPNORM_EPS, num_hidden_layers=n_layers,
                                 rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
        config._attn_implementation = "sdpa"
        ref, rotary = DiffLlamaAttention(config, layer_idx=layer), DiffLlamaRotaryEmbedding(config)

        def forward(x):  # SDPA without a mask is causal by itself
            positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
            return ref(x, rotary(x, positions), None)[0]
        return ref, forward

    def lambda_full(self, dtype) -> torch.Tensor:
        """The scalar lambda of every pair in this layer (the dot products in float32, as transformers)."""
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1, dtype=torch.float32)).to(dtype)
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1, dtype=torch.float32)).to(dtype)
        return lambda_1 - lambda_2 + self.lambda_init

    def project(self, x: torch.Tensor, start: int = 0):
        """x (B, T, d_model) -> q (B, H, T, d) and k (B, H_kv, T, d) with RoPE at positions start, ..,
        and the pairs' values (B, H_kv/2, T, 2d): kv head p's is [v_p, v_{H_kv/2 + p}]."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(length, x.device, start)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        first, second = v.chunk(2, dim=1)
        return q, k, torch.cat((first, second), dim=-1)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """(B, T, H, 2d) per-head attention outputs on the pairs' values -> (B, T, d_model): head i minus
        lambda x head i + H/2, the group norm over each pair's 2d dims, times 1 - lambda_init, o_proj."""
        first, second = out.chunk(2, dim=2)
        diff = first - self.lambda_full(out.dtype) * second
        diff = (1 - self.lambda_init) * F.rms_norm(diff, (diff.shape[-1],), eps=GROUPNORM_EPS)
        return self.o_proj(diff.flatten(2))

    def new_cache(self, batch: int, context: int, dtype=torch.float32, device=None) -> LayerCache:
        """An empty decode cache for `context` tokens: the keys (B, H_kv, slots, d) and the pairs'
        values (B, H_kv/2, slots, 2d) -- 2 x H_kv x head_dim values a token, as multi-head attention's."""
        slots = self.cache_size(context).tokens
        return LayerCache({"k": torch.zeros(batch, self.n_kv_heads, slots, self.head_dim, dtype=dtype, device=device),
                           "v": torch.zeros(batch, self.n_kv_heads // 2, slots, 2 * self.head_dim, dtype=dtype,
                                            device=device)}, time_dim=2, window=0)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a cache (new_cache): a prompt into an empty cache
        (prefill), then one token at a time (decode), as MultiHeadAttention.forward."""
        start = cache.length if cache is not None else 0
        q, k, v_pairs = self.project(x, start)
        if cache is not None and start:
            if x.shape[1] != 1:
                raise ValueError(f"a cache that holds tokens takes one token at a time, not {x.shape[1]}")
            cache.append(k=k, v=v_pairs)
            return self.combine(self.decode_step(q, cache.read("k"), cache.read("v")))
        if cache is not None:
            cache.append(k=k, v=v_pairs)
        # kv head m's value is pair m mod H_kv/2's: the pairs' values twice over the kv heads, so that
        # query head i and its partner i + H/2 (on kv heads i//g and H_kv/2 + i//g) read the same one
        values = v_pairs.repeat(1, 2, 1, 1)
        out = self.kernel(q, k, values, scale=self.head_dim ** -0.5, dropout=self.dropout if self.training else 0.0)
        batch, length, _ = x.shape
        return self.combine(out.view(batch, length, self.n_heads, 2 * self.head_dim))

    def decode_step(self, q: torch.Tensor, keys: torch.Tensor, v_pairs: torch.Tensor) -> torch.Tensor:
        """One token's queries (B, H, 1, d) on the n cached keys (B, H_kv, n, d) and pairs' values
        (B, H_kv/2, n, 2d) -> (B, 1, H, 2d), without copying the cached values per head: kv head
        m = s H_kv/2 + p (s: first or second half) reads pair p's value, so the 2 g query heads on
        kv heads p and H_kv/2 + p are the rows of one (2g, n) @ (n, 2d) product per pair."""
        batch, heads, _, dim = q.shape
        kv_heads, pairs = keys.shape[1], v_pairs.shape[1]
        group = heads // kv_heads
        scores = q.view(batch, kv_heads, group, dim) @ keys.transpose(-1, -2) * dim ** -0.5  # (B, H_kv, g, n)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = probs.view(batch, 2, pairs, group, -1).transpose(1, 2).reshape(batch, pairs, 2 * group, -1)
        out = (probs @ v_pairs).view(batch, pairs, 2, group, 2 * dim).transpose(1, 2)  # (B, 2, pairs, g, 2d)
        return out.reshape(batch, 1, heads, 2 * dim)

