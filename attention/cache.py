"""The decode cache of one attention layer: named buffers with `capacity` slots along one time dim,
filled as tokens arrive. Each kind's module says what it keeps (`new_cache`): multi-head
attention K and V of its key/value heads, MLA the normalised latent and the shared rotary key.

A layer with a window keeps only its last `window` tokens: a rolling buffer (Mistral), token p in
slot p % capacity, overwriting the token that just left the window. Slot order does not matter to
the softmax (RoPE is applied before a key is cached); a bias that depends on distance (ALiBi)
asks `positions()` which token each slot holds. A layer without a window has room for the whole
context it was made for, and refuses more.

A kind's module also says how big its cache is without making one (`cache_size(context)`, what
model.kv_cache_bytes counts): a CacheSize, values that grow with the tokens kept plus a fixed state
(a recurrent kind: its state matrices, whatever the context).
"""
from typing import NamedTuple

import torch


class CacheSize(NamedTuple):
    """What one layer's decode cache holds for one sequence: `tokens` tokens of `per_token` values
    each (a window keeps at most its window) plus `state` values whatever the context."""
    per_token: int
    tokens: int
    state: int = 0

    @property
    def values(self) -> int:
        return self.per_token * self.tokens + self.state


class LayerCache:
    def __init__(self, buffers: dict[str, torch.Tensor], time_dim: int, window: int):
        self.buffers, self.time_dim, self.window = buffers, time_dim, window
        self.capacity = next(iter(buffers.values())).shape[time_dim]
        self.length = 0  # tokens seen so far: the next token's absolute position

    @property
    def nbytes(self) -> int:
        """The bytes the cache's tensors hold (what kv_cache_bytes in model.py counts)."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def append(self, **values: torch.Tensor) -> None:
        """Write the next tokens' values (each with its time dim as the buffers'); a window keeps the
        last `capacity` of them."""
        count = next(iter(values.values())).shape[self.time_dim]
        if not self.window and self.length + count > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens; {self.length} + {count} do not fit")
        keep = min(count, self.capacity)
        slots = torch.arange(self.length + count - keep, self.length + count) % self.capacity
        device = next(iter(self.buffers.values())).device
        for name, value in values.items():
            kept = value.narrow(self.time_dim, count - keep, keep)
            self.buffers[name].index_copy_(self.time_dim, slots.to(device), kept.to(self.buffers[name].dtype))
        self.length += count

    def read(self, name: str) -> torch.Tensor:
        """The filled slots of a buffer (a view: no copy)."""
        return self.buffers[name].narrow(self.time_dim, 0, min(self.length, self.capacity))

    def positions(self, device=None) -> torch.Tensor:
        """The absolute position of the token in each filled slot: slot s holds the latest position p
        with p = s mod capacity."""
        last, filled = self.length - 1, min(self.length, self.capacity)
        slots = torch.arange(filled, device=device)
        return last - (last - slots) % self.capacity
