"""Rotary position embedding (RoPE) in the rotate-half layout of Llama and DeepSeek-V3
(`rope_interleave=False`), with pluggable position scaling.
"""
import torch
from torch import nn

from .registry import ROPE_SCALINGS  # scaling type -> how positions map (plain data, no torch)


def rope_tables(dim: int, theta: float, scaling: str | None, factor: float, length: int,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (length, dim) cos and sin tables in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    positions = torch.arange(length, device=device, dtype=torch.float32)
    if scaling is not None:
        positions = ROPE_SCALINGS[scaling](positions, factor)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (length, dim): the rotate-half layout
    return angles.cos(), angles.sin()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for `dim` rotary dims, computed once and sliced to each call's length.

    The tables are non-persistent buffers: they follow the module across devices (`.to`), stay
    out of the state dict, and under torch.compile are plain graph inputs, so a compiled model
    neither breaks its graph nor recompiles on them. With `max_len` the tables are built at
    construction (the model passes its seq_len); a longer call rebuilds them once, in eager mode.
    """

    def __init__(self, dim: int, theta: float = 10000.0, scaling: str | None = None, factor: float = 1.0,
                 max_len: int = 0):
        super().__init__()
        if scaling is not None and scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown RoPE scaling {scaling!r}; allowed: {sorted(ROPE_SCALINGS)}")
        self.dim, self.theta, self.scaling, self.factor = dim, theta, scaling, factor
        cos, sin = rope_tables(dim, theta, scaling, factor, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, length: int, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of positions start .. start+length-1 (start: a decode step's absolute position)."""
        end = start + length
        if self.cos.shape[0] < end or self.cos.device != torch.device(device):
            # Built outside inference mode even when called under it: cached inference tensors
            # would make every later training step fail ("cannot be saved for backward").
            with torch.inference_mode(False):
                self.cos, self.sin = rope_tables(self.dim, self.theta, self.scaling, self.factor, end, device)
        return self.cos[start:end], self.sin[start:end]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, dim) by position; the tables are float32, the result keeps x's dtype."""
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))
