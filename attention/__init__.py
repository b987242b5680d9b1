"""Attention variants for the architecture search: the registry (data) and the modules."""
from .modules import MultiHeadAttention, MultiHeadLatentAttention, RMSNorm, build_attention
from .rope import ROPE_SCALINGS, RotaryEmbedding, apply_rotary
from .variants import FAMILIES, VARIANTS, AttentionSpec

__all__ = [
    "AttentionSpec", "FAMILIES", "VARIANTS", "ROPE_SCALINGS", "RMSNorm", "RotaryEmbedding",
    "MultiHeadAttention", "MultiHeadLatentAttention", "apply_rotary", "build_attention",
]
