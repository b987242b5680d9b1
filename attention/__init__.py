"""Attention for the architecture search: the registry (`registry.py`, plain data, imported without
torch), RoPE (`rope.py`) and the modules (`modules.py`), which are imported on first use."""
import importlib

from .registry import (FAMILIES, FULL_RANK, KINDS, KNOBS, OTHER_FAMILY, VARIANTS, AttentionSpec, Family, Kind,
                       Knob)

# Names that need torch, loaded when first asked for (PEP 562), so `from attention import VARIANTS`
# (the analysis, the sweep checks) never imports it.
_LAZY = {"RMSNorm": "modules", "MultiHeadAttention": "modules", "MultiHeadLatentAttention": "modules",
         "ROPE_SCALINGS": "rope", "RotaryEmbedding": "rope", "apply_rotary": "rope"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attention_class(kind: str):
    """The module class of a kind (KINDS[kind].module), imported on first use."""
    module_name, class_name = KINDS[kind].module.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_attention(spec: AttentionSpec, d_model: int, n_heads: int, dropout: float = 0.0,
                    rope_theta: float = 10000.0, max_len: int = 0, kernel=None, layer: int = 0,
                    n_layers: int = 1):
    """The module of the spec's kind for layer `layer` (0-based) of `n_layers`, at this model size.
    The kind reads its per-layer schedule from them (a window on some layers, a depth-dependent
    constant). max_len: build the RoPE tables for this many positions now (the model's seq_len)
    rather than on the first forward, and resolve a window relative to the context
    (registry.OfContext) at it; kernel: an attention.kernels.AttentionKernel (None: auto)."""
    return attention_class(spec.kind)(spec.resolved(d_model, n_heads, max_len or None), d_model, n_heads, dropout,
                                      rope_theta, max_len, kernel, layer=layer, n_layers=n_layers)


__all__ = [
    "AttentionSpec", "FAMILIES", "FULL_RANK", "Family", "KINDS", "KNOBS", "Kind", "Knob", "OTHER_FAMILY", "VARIANTS",
    "ROPE_SCALINGS", "RMSNorm", "RotaryEmbedding", "MultiHeadAttention", "MultiHeadLatentAttention", "apply_rotary",
    "attention_class", "build_attention",
]
