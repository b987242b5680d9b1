"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks", arXiv 2412.06464) as
transformers' Qwen3NextGatedDeltaNet computes it on its torch path (no fla, no causal-conv1d);
tests/test_gated_deltanet.py checks it against that class (weights copied; outputs and gradients,
float32) and checks that the reference really ran its torch fallbacks.

A linear-attention layer with a fixed-size state instead of a KV cache. Per value head, a d_k x d_v
matrix S is a fast-weight memory of key -> value, updated every token by the gated delta rule:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t exp(g_t))^T    (decay, then correct the
    o_t = S_t^T q_t                                                         memory's error on k_t)

with q, k L2-normalised (q also / sqrt(d_k)), beta_t = sigmoid(b_t) the write strength, and
g_t = -exp(A_log) softplus(a_t + dt_bias) <= 0 the log decay (Mamba-2's gate). Around it:

    x -> in_proj_qkvz -> q, k, v, z;  x -> in_proj_ba -> b, a   (per key head group, Qwen3-Next's layout)
    q, k, v -> short causal depthwise conv (kernel 4) -> SiLU
    o -> RMSNorm per head (weight) * SiLU(z)  (the gated RMSNorm) -> out_proj

Each key head serves num_v_heads / num_k_heads value heads (Qwen3-Next: 16 key, 32 value heads).
Training and prefill use the chunked form (WY / UT transform: chunks of 64 tokens are matmuls, one
sequential step per chunk); a decode step is the recurrence itself. The state (RecurrentState) is
the matrix S per value head and the conv's last kernel-1 inputs, whatever the context.

Sizes (knob names as transformers' config; the registry entry declares them): linear_num_key_heads,
linear_num_value_heads, linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim. A spec
without them gets Qwen3-Next's shape scaled to the model (registry.gated_deltanet_defaults): n_heads value heads and n_heads / 2 key
heads of d_model / n_heads dims, kernel 4, so in_proj_qkvz + out_proj hold 4 d_model^2 weights, as
multi-head attention's q, k, v, o.

Attention dropout: there is no attention map to drop (Qwen3-Next's layer has no dropout); the
`dropout` argument is accepted for the common constructor and unused; the block's residual dropout
still applies.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CacheSize
from .init import Constant, Drawn, Normal
from .registry import AttentionSpec, gated_deltanet_defaults

CHUNK_SIZE = 64  # tokens per chunk of the chunked form (transformers' and fla's default)
NORM_EPS = 1e-6  # Qwen3NextConfig.rms_norm_eps's default: the gated RMSNorm's eps
L2NORM_EPS = 1e-6  # q, k normalisation: x / sqrt(sum x^2 + eps), as fla and transformers


@dataclass(frozen=True)
class GatedDeltaNetSizes:
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel_size: int = 4

    @classmethod
    def of(cls, spec, d_model: int, n_heads: int) -> "GatedDeltaNetSizes":
        """The spec's sizes (its knobs, registry.KNOBS), the ones it leaves None Qwen3-Next's
        proportions at this model size (registry.gated_deltanet_defaults)."""
        sizes = {name: getattr(spec, name, None) or default
                 for name, default in gated_deltanet_defaults(d_model // n_heads, n_heads).items()}
        return cls(num_k_heads=sizes["linear_num_key_heads"], num_v_heads=sizes["linear_num_value_heads"],
                   head_k_dim=sizes["linear_key_head_dim"], head_v_dim=sizes["linear_value_head_dim"],
                   conv_kernel_size=sizes["linear_conv_kernel_dim"])

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:  # the channels the short convolution runs over: q, k and v
        return 2 * self.key_dim + self.value_dim


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, chunk_size: int = CHUNK_SIZE):
    """The gated delta rule over a sequence, in chunks. q, k (B, H_k, T, d_k) normalised, q scaled;
    v (B, H_v, T, d_v), g and beta (B, H_v, T); all float32; each key head serves H_v / H_k
    consecutive value heads. initial_state (B, H_v, d_k, d_v) or None (zeros) -> outputs
    (B, H_v, T, d_v) and the final state.

    Within a chunk of C tokens, the C delta-rule updates are one lower-triangular solve (the UT
    transform, DeltaNet's WY form): (I + tril(diag(beta) K K^T * decay, -1)) U = [beta V, beta K
    exp(g_cum)]. Across chunks, a state read and a state update per chunk (the only sequential part).
    """
    batch, k_heads, length, k_dim = k.shape
    v_heads, v_dim = v.shape[1], v.shape[-1]
    group = v_heads // k_heads
    pad = (-length) % chunk_size  # zero-padded tokens at the end change nothing before them
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n_chunks = (length + pad) // chunk_size
    # (B, H_k, group, chunks, C, .): a key head's tensors broadcast over the value heads it serves
    q, k = (t.reshape(batch, k_heads, 1, n_chunks, chunk_size, k_dim) for t in (q, k))
    v = v.reshape(batch, k_heads, group, n_chunks, chunk_size, v_dim)
    beta = beta.reshape(batch, k_heads, group, n_chunks, chunk_size, 1)
    g = g.reshape(batch, k_heads, group, n_chunks, chunk_size).cumsum(-1)  # log decay from the chunk's start

    # decay[i, j] = exp(g_i - g_j): how much of token j's write survives to token i (j <= i), else 0
    future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()
    # K K^T and Q K^T once per key head (beta scales rows: diag(beta) K K^T = (beta K) K^T)
    ut_system = (k @ k.transpose(-1, -2)) * beta * decay
    intra_chunk = (q @ k.transpose(-1, -2)) * decay  # causal (diagonal included) within the chunk
    # One solve for both right-hand sides; unitriangular: the diagonal is taken as 1 (the I above).
    rhs = torch.cat((v * beta, k * (beta * g.exp().unsqueeze(-1))), dim=-1)
    new_values, k_cumdecay = torch.linalg.solve_triangular(ut_system, rhs, upper=False, unitriangular=True).split(
        [v_dim, k_dim], dim=-1)

    q_decayed = q * g.exp().unsqueeze(-1)  # reads the state as it was at the chunk's start
    k_decayed = k * (g[..., -1:] - g).exp().unsqueeze(-1)  # writes decayed to the chunk's end
    chunk_decay = g[..., -1].exp()[..., None, None]
    state = (initial_state.view(batch, k_heads, group, k_dim, v_dim) if initial_state is not None
             else v.new_zeros(batch, k_heads, group, k_dim, v_dim))
    outputs = []
    # unbind, not [..., i, :, :]: the backward of one indexing per chunk would zero-fill a whole
    # tensor per chunk, that of unbind stacks the chunks' gradients once
    for new_v, k_cum, q_dec, intra, k_dec, decay_i in zip(*(t.unbind(3) for t in (
            new_values, k_cumdecay, q_decayed, intra_chunk, k_decayed, chunk_decay))):
        v_new = new_v - k_cum @ state  # the delta: what the state mispredicts
        outputs.append(q_dec @ state + intra @ v_new)
        state = state * decay_i + k_dec.transpose(-1, -2) @ v_new
    out = torch.stack(outputs, dim=3).reshape(batch, v_heads, n_chunks * chunk_size, v_dim)
    return out[:, :, :length], state.reshape(batch, v_heads, k_dim, v_dim)


def recurrent_gated_delta_step(q, k, v, g, beta, state):
    """One token of the recurrence: q, k (B, H_k, d_k), v (B, H_v, d_v), g and beta (B, H_v), state
    (B, H_v, d_k, d_v), float32 -> output (B, H_v, d_v) and the new state."""
    q, k = (t.repeat_interleave(v.shape[1] // k.shape[1], dim=1) for t in (q, k))
    state = state * g.exp()[..., None, None]
    predicted = (k.unsqueeze(-2) @ state).squeeze(-2)  # S^T k: what the memory holds for this key
    state = state + k.unsqueeze(-1) * ((v - predicted) * beta.unsqueeze(-1)).unsqueeze(-2)
    return (q.unsqueeze(-2) @ state).squeeze(-2), state


class GatedRMSNorm(nn.Module):
    """weight * RMSNorm(x) * SiLU(z) over the last dim (Qwen3NextRMSNormGated: norm before gate),
    in float32 (float64 for float64 inputs), returned in x's dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        norm_dtype = torch.promote_types(x.dtype, torch.float32)
        normed = self.weight * F.rms_norm(x.to(norm_dtype), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return (normed * F.silu(z.to(norm_dtype))).to(x.dtype)


class RecurrentState:
    """A Gated DeltaNet layer's decode state for a batch, in the cache's dtype: the last kernel-1
    inputs of the short convolution (B, conv_dim, kernel-1) and the delta-rule matrices
    (B, num_v_heads, d_k, d_v). Fixed size: `length` counts the tokens seen, nothing grows with it.
    The rule itself runs in float32 or wider (as transformers and fla); the matrices are stored in
    the cache's dtype like every kind's cache, so its bytes are cache_size's values at that width
    (fla and vLLM keep them in float32: twice the bytes in a bf16 model). transformers' cache keeps the last
    `kernel` conv inputs; the oldest of them is never read."""

    def __init__(self, conv: torch.Tensor, recurrent: torch.Tensor):
        self.buffers = {"conv": conv, "recurrent": recurrent}
        self.length = 0

    conv = property(lambda self: self.buffers["conv"])
    recurrent = property(lambda self: self.buffers["recurrent"])

    def read(self, name: str) -> torch.Tensor:
        """A buffer (the whole of it is read every step: bench.decode counts the bytes read)."""
        return self.buffers[name]

    def update(self, conv: torch.Tensor, recurrent: torch.Tensor, tokens: int) -> None:
        """The state after `tokens` more tokens, stored in the state's dtype."""
        for name, value in (("conv", conv), ("recurrent", recurrent)):
            self.buffers[name] = value.detach().to(self.buffers[name].dtype, copy=True)  # not a view of the input
        self.length += tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


def _decay_rates(shape, generator: torch.Generator) -> torch.Tensor:
    """A_log's init, as transformers' Qwen3Next: log U(0.01, 16), decay rates from slow to fast (the
    lower bound keeps log A finite)."""
    return torch.empty(shape).uniform_(0.01, 16, generator=generator).log_()


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet; parameter names and layouts as transformers' Qwen3NextGatedDeltaNet, so a
    state dict loads unchanged either way. Built like every kind (dropout, rope_theta, max_len and
    the attention kernel have no meaning here: no attention map, no positions but the recurrence's order, no
    SDPA), plus its layer index and the model's depth."""

    def __init__(self, spec: AttentionSpec, d_model: int, n_heads: int, dropout: float, rope_theta: float,
                 max_len: int = 0, kernel=None, layer: int = 0, n_layers: int = 1):
        super().__init__()
        sizes = self.sizes = GatedDeltaNetSizes.of(spec, d_model, n_heads)
        if sizes.num_v_heads % sizes.num_k_heads:
            raise ValueError(f"linear_num_value_heads={sizes.num_v_heads} must divide by "
                             f"linear_num_key_heads={sizes.num_k_heads}")
        self.layer_idx, self.n_layers = layer, n_layers  # nothing here depends on depth
        self.num_k_heads, self.num_v_heads = sizes.num_k_heads, sizes.num_v_heads
        self.head_k_dim, self.head_v_dim = sizes.head_k_dim, sizes.head_v_dim
        self.key_dim, self.value_dim, self.conv_dim = sizes.key_dim, sizes.value_dim, sizes.conv_dim
        self.conv_kernel_size = sizes.conv_kernel_size
        # q, k, v, z (and b, a) interleaved per key head: [q_h, k_h, v_h.., z_h..] for each key head h
        self.in_proj_qkvz = nn.Linear(d_model, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(d_model, 2 * self.num_v_heads, bias=False)
        # Depthwise over time; padded by hand on the left (causal), so no padding of its own.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim,
                                bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))  # drawn by the model: parameter_init
        self.norm = GatedRMSNorm(self.head_v_dim)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def parameter_init(self, std: float, residual_std: float) -> dict:
        """How each parameter starts (model.init_weights draws it), as transformers' Qwen3Next init:
        the projections and the conv N(0, std) (out_proj writes into the residual stream:
        residual_std), dt_bias and the norm's weight 1, A_log log U(0.01, 16)."""
        return {"in_proj_qkvz.weight": Normal(std), "in_proj_ba.weight": Normal(std), "conv1d.weight": Normal(std),
                "out_proj.weight": Normal(residual_std), "dt_bias": Constant(1.0), "A_log": Drawn(_decay_rates),
                "norm.weight": Constant(1.0)}

    def cache_size(self, context: int) -> CacheSize:
        """What new_cache holds per sequence, whatever the context: nothing per token, a fixed state of
        the conv's kernel-1 inputs and a d_k x d_v matrix per value head."""
        state = self.conv_dim * (self.conv_kernel_size - 1) + self.num_v_heads * self.head_k_dim * self.head_v_dim
        return CacheSize(0, 0, state)

    def token_mixing_flops(self, context: int) -> int:
        """Forward FLOPs per token that are no 2-D weight matmul, whatever the context (the point of a
        linear-attention layer): the short convolution's taps, and the chunked delta rule: within a
        chunk of C tokens the K K^T and Q K^T rows (C d_k each, once per key head), per value head the
        triangular solve (about C/2 (d_k + d_v)) and the intra-chunk output (C d_v); across chunks, per
        value head, the state read for the delta and for the output and the state update (d_k d_v each).
        A chunk is C tokens, masked or not; multiply-adds count 2."""
        dk, dv, c = self.head_k_dim, self.head_v_dim, CHUNK_SIZE
        delta_rule = self.num_k_heads * 2 * c * dk + self.num_v_heads * (c * (dk + dv) // 2 + c * dv + 3 * dk * dv)
        return 2 * (self.conv_dim * self.conv_kernel_size + delta_rule)

    @classmethod
    def reference_attention(cls, spec, d_model, n_heads, dropout, rope_theta, layer, n_layers):
        """transformers' Qwen3NextGatedDeltaNet at these sizes (its torch path, without fla and
        causal-conv1d) and its forward on x, for bench/ and tests/test_gated_deltanet.py."""
        from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

        sizes = GatedDeltaNetSizes.of(spec, d_model, n_heads)
        # layer_types: this layer linear attention, whatever transformers' 3:1 default makes it
        config = Qwen3NextConfig(hidden_size=d_model, linear_num_key_heads=sizes.num_k_heads,
                                 linear_num_value_heads=sizes.num_v_heads, linear_key_head_dim=sizes.head_k_dim,
                                 linear_value_head_dim=sizes.head_v_dim, linear_conv_kernel_dim=sizes.conv_kernel_size,
                                 hidden_act="silu", rms_norm_eps=NORM_EPS, num_hidden_layers=n_layers,
                                 layer_types=["linear_attention"] * n_layers, num_attention_heads=n_heads,
                                 num_key_value_heads=n_heads, head_dim=d_model // n_heads)
        ref = Qwen3NextGatedDeltaNet(config, layer_idx=layer)

        def forward(x):  # a function, not the module (bench/ registers the module's children itself)
            return ref(x)
        return ref, forward

    def project(self, x: torch.Tensor):
        """x (B, T, d_model) -> q, k (B, T, H_k, d_k), v, z (B, T, H_v, d_v), b, a (B, T, H_v)."""
        batch, length, _ = x.shape
        per_key_head = self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(batch, length, self.num_k_heads, -1)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, per_key_head * self.head_v_dim,
                                 per_key_head * self.head_v_dim], dim=-1)
        b, a = self.in_proj_ba(x).view(batch, length, self.num_k_heads, 2 * per_key_head).chunk(2, dim=-1)
        heads = (batch, length, self.num_v_heads)
        return q, k, v.reshape(*heads, -1), z.reshape(*heads, -1), b.reshape(heads), a.reshape(heads)

    def short_conv(self, mixed: torch.Tensor, state: RecurrentState | None):
        """Causal depthwise convolution + SiLU of (B, conv_dim, T): output t sees inputs t-kernel+1..t,
        the ones before the sequence being the state's (zeros without one). -> the outputs, and the
        last kernel-1 inputs (the next state's)."""
        if state is None:
            history = F.pad(mixed, (self.conv_kernel_size - 1, 0))
        else:
            history = torch.cat((state.conv.to(mixed.dtype), mixed), dim=-1)
        return F.silu(self.conv1d(history)), history[..., history.shape[-1] - (self.conv_kernel_size - 1):]

    def new_cache(self, batch: int, context: int, dtype=torch.float32, device=None) -> RecurrentState:
        """An empty decode state; its size does not depend on `context` (accepted for the common
        signature)."""
        return RecurrentState(
            torch.zeros(batch, self.conv_dim, self.conv_kernel_size - 1, dtype=dtype, device=device),
            torch.zeros(batch, self.num_v_heads, self.head_k_dim, self.head_v_dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a state (new_cache), x is the tokens after those it
        has seen, any number at a time: one token steps the recurrence, more run the chunked form
        from the state; the state moves on either way."""
        batch, length, _ = x.shape
        q, k, v, z, b, a = self.project(x)
        mixed = torch.cat((q.flatten(2), k.flatten(2), v.flatten(2)), dim=-1).transpose(1, 2)
        mixed, conv_state = self.short_conv(mixed, cache)
        q, k, v = mixed.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        # (B, heads, T, d) in float32; each key head serves num_v_heads / num_k_heads consecutive value heads
        # the rule in float32 at least (as transformers and fla; float64 in a float64 model)
        rule = torch.promote_types(x.dtype, torch.float32)
        q, k = (l2norm(t.reshape(batch, length, self.num_k_heads, self.head_k_dim).to(rule)).transpose(1, 2)
                for t in (q, k))
        q = q * self.head_k_dim ** -0.5
        v = v.reshape(batch, length, self.num_v_heads, self.head_v_dim).to(rule).transpose(1, 2)
        beta = b.to(rule).sigmoid().transpose(1, 2)
        g = (-self.A_log.to(rule).exp() * F.softplus(a.to(rule) + self.dt_bias)).transpose(1, 2)

        initial_state = cache.recurrent.to(rule) if cache is not None else None
        if cache is not None and length == 1:
            out, state = recurrent_gated_delta_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[..., 0], beta[..., 0],
                                                    initial_state)
            out = out.unsqueeze(2)
        else:
            out, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state)
        if cache is not None:
            cache.update(conv_state, state, length)
        out = out.transpose(1, 2).to(x.dtype)  # (B, T, H_v, d_v)
        return self.out_proj(self.norm(out, z).flatten(2))

