"""What multi-head attention can add around its softmax (attention/registry.py's knobs
`output_gate`, `attention_sinks`, `attn_softcap`), used by attention.modules.MultiHeadAttention:

- an output gate: the attention output of each head times sigmoid(gate), the gate a second slice of
  q_proj's output -- one value per dim (element-wise, Qwen3-Next) or one per head (head-wise; Qiu et
  al. 2025, "Gated Attention for Large Language Models");
- learned attention sinks (gpt-oss): one learned logit per head that joins the softmax's
  denominator and adds no value, so a head can attend to "nothing";
- soft-capped logits (Gemma 2): cap * tanh(scores / cap) before the mask and softmax.

The gate is here; sinks and the cap change the softmax, so they are the attention kernels' own
(attention/kernels.py): SDPA has neither, the explicit kernel materialises the (B, H, T, T) scores
(checked against transformers' GptOssAttention and Gemma2Attention), FlexAttention fuses them
(a score_mod for the cap, the log-sum-exp for the sinks).
"""
import torch


def gate_width(output_gate: str, head_dim: int) -> int:
    """Extra q_proj outputs per head for the gate: Qwen3-Next lays out each head's slice of q_proj
    as [query (head_dim), gate (head_dim)]; the head-wise gate takes one value there instead."""
    return {"none": 0, "headwise": 1, "elementwise": head_dim}[output_gate]


def apply_output_gate(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(B, T, H * d) attention output, (B, T, H, 1 or d) gate -> out * sigmoid(gate), per head."""
    batch, length, heads, _ = gate.shape
    return (out.view(batch, length, heads, -1) * torch.sigmoid(gate)).reshape(batch, length, -1)
