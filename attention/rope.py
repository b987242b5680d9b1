"""Rotary position embedding (RoPE) in the rotate-half layout of Llama and DeepSeek-V3
(`rope_interleave=False`), with pluggable position scaling.
"""
import torch
from torch import nn

# How a scaling type maps integer positions to the (fractional) positions that get rotated.
# Linear scaling ("position interpolation") divides positions by the factor. Another type is
# one more entry here.
ROPE_SCALINGS = {
    "linear": lambda positions, factor: positions / factor,
}


class RotaryEmbedding(nn.Module):
    """cos/sin tables for `dim` rotary dims, computed once per length and device, then sliced."""

    def __init__(self, dim: int, theta: float = 10000.0, scaling: str | None = None, factor: float = 1.0):
        super().__init__()
        if scaling is not None and scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown RoPE scaling {scaling!r}; allowed: {sorted(ROPE_SCALINGS)}")
        self.dim, self.theta, self.scaling, self.factor = dim, theta, scaling, factor
        self._cos = self._sin = None

    def _build(self, length: int, device) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))
        positions = torch.arange(length, device=device, dtype=torch.float32)
        if self.scaling is not None:
            positions = ROPE_SCALINGS[self.scaling](positions, self.factor)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (length, dim): the rotate-half layout
        self._cos, self._sin = angles.cos(), angles.sin()

    def forward(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != torch.device(device):
            self._build(length, device)
        return self._cos[:length], self._sin[:length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, dim) by position; the tables are float32, the result keeps x's dtype."""
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))
