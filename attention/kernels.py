"""The attention kernels: the one place where causal softmax attention is computed, for every kind
(in the spirit of transformers' attention-function registry). Each kernel has one signature,

    kernel(q, k, v, *, scale, dropout=0.0, window=0, alibi_slopes=None, sinks=None, softcap=0.0,
           sdpa_pad="auto") -> (B, T, H * d_v)

q (B, H, T, d), k (B, H_kv, T, d), v (B, H_kv, T, d_v): T queries on the same T keys, causal (a
query sees itself and the keys before it; with window > 0 only its last `window` keys), with fewer
key/value heads than query heads grouped-query (each key/value head serves H / H_kv consecutive
query heads, Llama's repeat_kv). What the scores see besides q.k * scale: ALiBi's per-head slopes
(attention.positions), gpt-oss's sink logits (one per head: one more softmax column with no value),
Gemma 2's soft-cap (cap * tanh(score / cap), before the mask).

- "sdpa": torch's scaled_dot_product_attention (its flash / memory-efficient kernels), a window or
  ALiBi as an attn_mask, plain causal attention as is_causal. It has neither sinks nor a cap and
  refuses them.
- "explicit": the (B, H, T, T) scores materialised, softmax in float32, F.dropout on the weights:
  the reference every other kernel is checked against (tests/test_attention_kernels.py), and what
  the probes recompute (causal_scores, attention_weights).
- "flex": torch.nn.attention.flex_attention: causality and the window as a mask_mod (a BlockMask,
  so blocks outside the window are skipped), ALiBi and the soft-cap as one score_mod, GQA by its
  enable_gqa, and sinks fused through the log-sum-exp it returns: a sink is one extra softmax column
  without a value, so out_with_sink = out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse -
  sink), per head and query. Compiled (torch.compile(flex_attention), transformers' way) on CUDA,
  where it is one fused kernel, forward and backward. Where it cannot run the call takes the
  explicit path, the same function: with attention dropout (FlexAttention has none: dropping it
  would change what is trained), and on the CPU whenever a gradient is needed (torch 2.13 refuses
  FlexAttention's backward on the CPU) or under torch.compile (torch 2.13's compiled CPU
  FlexAttention returns no log-sum-exp for the sinks and fails to build with a score_mod, ALiBi's
  or the cap's: an InductorError). On the CPU without a gradient (evaluation) it runs torch's eager
  FlexAttention, which materialises the scores as explicit does.

ModelConfig.attention_kernel picks one for every layer (AttentionKernel below): "auto" is SDPA,
and explicit where there are sinks or a soft-cap (SDPA has neither). Decoding one token at a time
(cached_attention, explicit_causal_attention with the cache's mask) needs no choice: one query.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .positions import score_mask
from .registry import KERNELS

try:  # torch >= 2.5; AuxRequest (the log-sum-exp as an auxiliary output) >= 2.9
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
except ImportError:  # pragma: no cover -- the pinned torch has it
    flex_attention = None


# --- explicit: the materialised scores ------------------------------------------------------------

def causal_scores(q, k, scale: float, softcap: float = 0.0, mask=None) -> torch.Tensor:
    """(B, H, T, d) queries, (B, H_kv, T, d) keys -> the (B, H, T, T) pre-softmax scores q.k * scale,
    soft-capped (softcap > 0) and then -inf above the diagonal (a query never sees a later key), or
    outside `mask` (attention.positions.score_mask: a boolean window, or ALiBi's additive bias).
    The explicit kernel uses them; so do the mechanism probes (probes.py) at evaluation, for every
    kernel: the fused ones never materialise them."""
    if k.shape[1] != q.shape[1]:  # grouped-query: each key head serves H / H_kv consecutive query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    length = q.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def attention_weights(scores: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the keys of (B, H, T, T) scores, in float32 (as Gemma2's eager attention); with
    sinks, each head's sink logit is one more column of the softmax, dropped after it (gpt-oss), so
    the weights on the keys sum to less than 1."""
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    sink_column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat((scores, sink_column), dim=-1), dim=-1, dtype=torch.float32)[..., :-1]


def explicit_causal_attention(q, k, v, scale: float, dropout: float, sinks: torch.Tensor | None = None,
                              softcap: float = 0.0, mask=None) -> torch.Tensor:
    """(B, H, T, d) queries, (B, H_kv, n, d) keys/values -> (B, T, H * d_v), with an explicit softmax:
    scores soft-capped (softcap > 0) and then masked (causal, or `mask`), as Gemma2's eager
    attention; with sinks, a per-head logit appended as one more column of the softmax and dropped
    after it, as gpt-oss's. A decode step passes its cache's mask (one query on n keys)."""
    scores = causal_scores(q, k, scale, softcap, mask)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query: each key/value head serves `groups` consecutive query heads
        v = v.repeat_interleave(groups, dim=1)
    length = q.shape[-2]
    probs = attention_weights(scores, sinks).to(v.dtype)
    probs = F.dropout(probs, p=dropout) if dropout else probs
    out = probs @ v
    batch, heads, _, v_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * v_dim)


def explicit_attention(q, k, v, *, scale: float, dropout: float = 0.0, window: int = 0, alibi_slopes=None,
                       sinks=None, softcap: float = 0.0, sdpa_pad: str = "auto") -> torch.Tensor:
    """The "explicit" kernel: the window and ALiBi as score_mask's mask, then explicit_causal_attention."""
    mask = score_mask(q.shape[-2], window, alibi_slopes, q.device)
    return explicit_causal_attention(q, k, v, scale, dropout, sinks, softcap, mask)


# --- sdpa -------------------------------------------------------------------------------------------

# When q/k and v head dims differ (MLA: qk_rope_head_dim 128 vs v_head_dim 192, say), the flash
# kernels -- CUDA's, and PyTorch's CPU one -- do not apply: they need one head dim for q, k and v,
# and SDPA falls back to the memory-efficient kernel (CUDA) or to the math path (CPU), which
# materialises the T x T scores. Zero-padding the smaller side to the larger changes nothing
# (zero dims add nothing to q.k, padded value columns are sliced off; the softmax scale is passed
# explicitly) and lets flash run. "auto" pads on CUDA, and on CPU only without attention dropout:
# the CPU flash kernel has no dropout, so with it SDPA takes the math path anyway and padding would
# only add work. "always" / "never" force the choice (ModelConfig.sdpa_pad);
# `python -m bench.step --sdpa_pad` measures it.
SDPA_PAD_MODES = ("auto", "always", "never")


def _pad_head_dims(q: torch.Tensor, dropout: float, sdpa_pad: str) -> bool:
    if sdpa_pad == "auto":
        return q.device.type == "cuda" or dropout == 0.0
    return sdpa_pad == "always"


def sdpa_attention(q, k, v, *, scale: float, dropout: float = 0.0, window: int = 0, alibi_slopes=None,
                   sinks=None, softcap: float = 0.0, sdpa_pad: str = "auto") -> torch.Tensor:
    """The "sdpa" kernel: fused, causal (is_causal, or score_mask's mask for a window or ALiBi),
    explicit softmax scale, grouped-query by SDPA's enable_gqa; q/k or v zero-padded to one head dim
    as sdpa_pad says (above)."""
    if sinks is not None or softcap:
        raise ValueError("the sdpa kernel has no attention sinks or soft-cap: use explicit or flex (auto picks explicit)")
    mask = score_mask(q.shape[-2], window, alibi_slopes, q.device)
    v_dim = v.shape[-1]
    if q.shape[-1] != v_dim and _pad_head_dims(q, dropout, sdpa_pad):
        dim = max(q.shape[-1], v_dim)
        if q.shape[-1] < dim:
            q, k = F.pad(q, (0, dim - q.shape[-1])), F.pad(k, (0, dim - k.shape[-1]))
        else:
            v = F.pad(v, (0, dim - v_dim))
    grouped = k.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                         scale=scale, enable_gqa=grouped)
    batch, heads, length, _ = out.shape
    return out[..., :v_dim].transpose(1, 2).reshape(batch, length, heads * v_dim)


def cached_attention(q, k, v, scale: float, bias=None) -> torch.Tensor:
    """One decode step: (B, H, 1, d) queries on every cached key (B, H_kv, n, d) -- all of them in
    the past, so no causal mask -- -> (B, 1, H * d_v). bias: ALiBi's (H, 1, n), or None."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    batch, heads, length, v_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * v_dim)


# --- flex -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _block_mask(length: int, window: int, device: str):
    """Causality and the window as FlexAttention's BlockMask for `length` queries and keys (built
    once per length, window and device: it depends on nothing else)."""
    def causal(batch, head, query, key):
        allowed = key <= query
        return allowed & (key > query - window) if window else allowed
    return create_block_mask(causal, None, None, length, length, device=device)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> bool:
    """Whether FlexAttention computes this call, else the explicit path does (the module docstring:
    no dropout in FlexAttention; on the CPU no backward, and nothing compiled)."""
    if flex_attention is None or dropout:
        return False
    if q.device.type == "cpu":  # requires_grad: what torch checks, whether or not grad mode is on
        return not any(t.requires_grad for t in (q, k, v)) and not torch.compiler.is_compiling()
    return True


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d_v) attention output and (B, H, T) log-sum-exp of its scores -> the output of the
    softmax over [scores, sink]: each key's weight times exp(lse) / (exp(lse) + exp(sink)), which is
    sigmoid(lse - sink)."""
    return out * torch.sigmoid(lse - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(out.dtype)


def flex_attend(q, k, v, *, scale: float, window: int = 0, alibi_slopes=None, sinks=None,
                softcap: float = 0.0) -> torch.Tensor:
    """FlexAttention itself (no fallback): the mask as a BlockMask, the soft-cap then ALiBi as one
    score_mod (the explicit path's order), the sinks through the log-sum-exp."""
    slopes = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=torch.float32)
    # the cap as a tensor the score_mod captures: FlexAttention traces score_mod, and a Python float
    # there becomes a symbol its tracing cannot return (torch 2.13: "Pending unbacked symbols")
    cap = torch.tensor(softcap, dtype=torch.float32, device=q.device) if softcap else None

    def score_mod(score, batch, head, query, key):
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        if slopes is not None:  # -slope x distance, as score_mask's bias
            score = score + slopes[head] * (key - query)
        return score

    length = q.shape[-2]
    block_mask = _block_mask(length, window, str(q.device))
    # compiled on CUDA (one fused kernel); already inside torch.compile, the outer graph fuses it;
    # elsewhere torch's eager implementation (it materialises the scores)
    run = _compiled_flex() if q.device.type == "cuda" and not torch.compiler.is_compiling() else flex_attention
    out = run(q, k, v, score_mod=score_mod if softcap or slopes is not None else None, block_mask=block_mask,
              scale=scale, enable_gqa=k.shape[1] != q.shape[1],
              return_aux=AuxRequest(lse=True) if sinks is not None else None)
    if sinks is not None:
        out, aux = out
        out = with_sinks(out, aux.lse, sinks)
    batch, heads, _, v_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * v_dim)


def flex_kernel(q, k, v, *, scale: float, dropout: float = 0.0, window: int = 0, alibi_slopes=None,
                sinks=None, softcap: float = 0.0, sdpa_pad: str = "auto") -> torch.Tensor:
    """The "flex" kernel: flex_attend where it can run (flex_can_run), else the explicit kernel."""
    if not flex_can_run(q, k, v, dropout):
        return explicit_attention(q, k, v, scale=scale, dropout=dropout, window=window, alibi_slopes=alibi_slopes,
                                  sinks=sinks, softcap=softcap)
    return flex_attend(q, k, v, scale=scale, window=window, alibi_slopes=alibi_slopes, sinks=sinks, softcap=softcap)


ATTENTION_KERNELS = {"sdpa": sdpa_attention, "explicit": explicit_attention, "flex": flex_kernel}
assert set(KERNELS) == {"auto", *ATTENTION_KERNELS}, "registry.KERNELS names these kernels (and auto)"


@dataclass(frozen=True)
class AttentionKernel:
    """The kernel choice every attention module is built with (model.py: ModelConfig.attention_kernel
    and .sdpa_pad), called like a kernel without sdpa_pad. "auto": SDPA, explicit with sinks or a
    soft-cap."""
    name: str = "auto"
    sdpa_pad: str = "auto"

    def __post_init__(self):
        for field, allowed in (("attention_kernel", KERNELS), ("sdpa_pad", SDPA_PAD_MODES)):
            value = self.name if field == "attention_kernel" else self.sdpa_pad
            if value not in allowed:
                raise ValueError(f"{field}={value!r}: allowed: {', '.join(allowed)}")
        if self.name == "flex" and flex_attention is None:
            raise ValueError(f"attention_kernel='flex': torch {torch.__version__} has no FlexAttention")

    def resolve(self, sinks=None, softcap: float = 0.0) -> str:
        """The kernel that runs for a layer with (or without) sinks and a soft-cap."""
        if self.name == "auto":
            return "explicit" if sinks is not None or softcap else "sdpa"
        return self.name

    def __call__(self, q, k, v, *, scale: float, dropout: float = 0.0, window: int = 0, alibi_slopes=None,
                 sinks=None, softcap: float = 0.0) -> torch.Tensor:
        kernel = ATTENTION_KERNELS[self.resolve(sinks, softcap)]
        return kernel(q, k, v, scale=scale, dropout=dropout, window=window, alibi_slopes=alibi_slopes, sinks=sinks,
                      softcap=softcap, sdpa_pad=self.sdpa_pad)
