"""What multi-head attention can add around its softmax (attention/registry.py's knobs
`output_gate`, `attention_sinks`, `attn_softcap`), used by attention.modules.MultiHeadAttention:

- an output gate: the attention output of each head times sigmoid(gate), the gate a second slice of
  q_proj's output -- one value per dim (element-wise, Qwen3-Next) or one per head (head-wise; Qiu et
  al. 2025, "Gated Attention for Large Language Models");
- learned attention sinks (gpt-oss): one learned logit per head that joins the softmax's
  denominator and adds no value, so a head can attend to "nothing";
- soft-capped logits (Gemma 2): cap * tanh(scores / cap) before the mask and softmax.

SDPA has neither sinks nor a cap, so with either of them attention takes the explicit path below,
which materialises the (B, H, T, T) scores: correctness first (it is checked against
transformers' GptOssAttention and Gemma2Attention); a fused form (FlexAttention's score_mod) would
be the next step for the seed's size.
"""
import torch
import torch.nn.functional as F


def gate_width(output_gate: str, head_dim: int) -> int:
    """Extra q_proj outputs per head for the gate: Qwen3-Next lays out each head's slice of q_proj
    as [query (head_dim), gate (head_dim)]; the head-wise gate takes one value there instead."""
    return {"none": 0, "headwise": 1, "elementwise": head_dim}[output_gate]


def apply_output_gate(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(B, T, H * d) attention output, (B, T, H, 1 or d) gate -> out * sigmoid(gate), per head."""
    batch, length, heads, _ = gate.shape
    return (out.view(batch, length, heads, -1) * torch.sigmoid(gate)).reshape(batch, length, -1)


def causal_scores(q, k, scale: float, softcap: float = 0.0, mask=None) -> torch.Tensor:
    """(B, H, T, d) queries, (B, H_kv, T, d) keys -> the (B, H, T, T) pre-softmax scores q.k * scale,
    soft-capped (softcap > 0) and then -inf above the diagonal (a query never sees a later key), or
    outside `mask` (attention.positions.score_mask: a boolean window, or ALiBi's additive bias).
    The explicit path below uses them; so do the mechanism probes (probes.py) at evaluation, for
    every kind whose kernel is SDPA: training on SDPA never materialises them."""
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
    """(B, H, T, d) queries, (B, H_kv, T, d) keys/values -> (B, T, H * d), with an explicit softmax:
    scores soft-capped (softcap > 0) and then masked, as Gemma2's eager attention; with sinks, a
    per-head logit appended as one more column of the softmax and dropped after it, as gpt-oss's."""
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
