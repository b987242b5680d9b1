"""What the scores see besides q.k: the causal mask narrowed to a sliding window (Mistral), and
ALiBi's linear distance penalty (Bloom). Both become one additive (or boolean) mask for SDPA;
plain causal attention keeps SDPA's is_causal fast path (no mask at all)."""
import math

import torch


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """One slope per head, Bloom's `_get_alibi_slopes` (Press et al.): 2^(-8 i / n) for a power of
    two n, interleaved extra slopes from the next power of two otherwise."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * i / closest) for i in range(1, closest + 1)]
    extra = min(closest, n_heads - closest)
    slopes += [2 ** (-4 * i / closest) for i in range(1, 2 * extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def score_mask(length: int, window: int, slopes: torch.Tensor | None, device) -> torch.Tensor | None:
    """The mask SDPA takes for `length` positions: None for plain causal attention (SDPA's own
    is_causal), a boolean (T, T) mask for a window (query t sees keys t-window+1..t, transformers'
    sliding_window_overlay), a float (H, T, T) bias with ALiBi (-slope x distance, -inf outside)."""
    if not window and slopes is None:
        return None
    query, key = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None]
    allowed = key <= query
    if window:
        allowed = allowed & (key > query - window)
    if slopes is None:
        return allowed
    # Bloom adds slope x key position; softmax does not see a per-row constant, so this is the same.
    bias = slopes.to(device)[:, None, None] * (key - query).float()
    return bias.masked_fill(~allowed, float("-inf"))
