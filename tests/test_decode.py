"""Incremental decoding with each kind's own cache (attention/cache.py, MoELM.new_cache/decode):
prefill + one token at a time gives the full forward's logits at every position, for every variant
in the registry (a new one is covered without a change here), past a window too; MLA's absorbed
step equals its naive one; the cache's tensors hold exactly the bytes model.py counts."""
import pytest
import torch

from attention import VARIANTS
from attention.cache import LayerCache
from model import ModelConfig, MoELM, kv_cache_bytes, kv_cache_bytes_per_token

# Tiny: head dim 8, a relative window of seq_len / 4 = 4 tokens, two layers (local_global: local, global).
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=32, n_experts=4, top_k=2, seq_len=16)
PROMPT, TOTAL = 5, 13  # 8 decode steps, well past the window of 4
MLA = [name for name, spec in VARIANTS.items() if spec.kind == "mla"]


def tiny_model(name: str, seed: int = 0, **sizes) -> MoELM:
    """Weights larger than init_weights' 0.02 (std 0.3, norms and sinks too), so the attention is
    far from uniform and a wrong key, position or bias shows in the logits."""
    model = MoELM(ModelConfig(attention=VARIANTS[name], **{**TINY, **sizes}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if param.dim() == 1 else 0.0))
    return model.eval()


def decoded_logits(model: MoELM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    steps = [model.decode(ids[:, :prompt], cache)]
    steps += [model.decode(ids[:, t:t + 1], cache) for t in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_and_decode_equal_the_full_forward(name):
    torch.manual_seed(1)
    model = tiny_model(name)
    ids = torch.randint(0, TINY["vocab_size"], (2, TOTAL))
    with torch.no_grad():
        full = model(ids).logits
        modes = ["absorbed", "naive"] if VARIANTS[name].kind == "mla" else [None]
        for mode in modes:
            for module in model.modules():
                if hasattr(module, "decode_mode"):
                    module.decode_mode = mode
            assert relative_error(decoded_logits(model, ids, PROMPT), full) < 1e-5, (name, mode)


def test_the_decode_check_can_fail():
    """The negative control: a cache that forgets the window's oldest key (one slot too few) or
    decodes at the wrong position no longer matches."""
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (1, TOTAL))
    model = tiny_model("swa")
    with torch.no_grad():
        full = model(ids).logits
        short = [LayerCache({k: v[:, :, :-1].clone() for k, v in c.buffers.items()}, 2, c.window - 1)
                 for c in model.new_cache(1, TOTAL)]
        steps = [model.decode(ids[:, :PROMPT], short)]
        steps += [model.decode(ids[:, t:t + 1], short) for t in range(PROMPT, TOTAL)]
        assert relative_error(torch.cat(steps, 1), full) > 1e-3
        model = tiny_model("baseline")
        full = model(ids).logits
        cache = model.new_cache(1, TOTAL)
        model.decode(ids[:, :PROMPT], cache)
        cache[0].length = cache[1].length = PROMPT + 1  # RoPE one position off (the slot is empty too)
        assert relative_error(model.decode(ids[:, PROMPT:PROMPT + 1], cache), full[:, PROMPT + 1:PROMPT + 2]) > 1e-3


@pytest.mark.parametrize("name", MLA)
def test_mla_absorbed_step_equals_the_naive_step(name):
    torch.manual_seed(2)
    model = tiny_model(name)
    attention = model.layers[0].self_attn
    x = torch.randn(3, 9, TINY["d_model"])
    with torch.no_grad():
        q_nope, q_rot = attention.query(x[:, -1:], 8)
        latent, k_rot = attention.latent(x)
        naive = attention.naive_step(q_nope, q_rot, latent, k_rot)
        absorbed = attention.absorbed_step(q_nope, q_rot, latent, k_rot)
    assert absorbed.shape == naive.shape == (3, 1, TINY["n_heads"] * attention.v_head_dim)
    assert relative_error(absorbed, naive) < 1e-5


@pytest.mark.parametrize("name", VARIANTS)
def test_cache_bytes_are_what_model_counts(name):
    """bf16, as kv_cache_bytes_per_token counts (2 bytes a value): at the context seq_len the whole
    cache is kv_cache_bytes_per_token x seq_len; at any context kv_cache_bytes (a window: its last
    window tokens)."""
    model = tiny_model(name).to(torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (1, TINY["seq_len"]))
    for context in (3, TINY["seq_len"]):
        cache = model.new_cache(1, context, dtype=torch.bfloat16)
        with torch.no_grad():
            model.decode(ids[:, :2], cache)
            for t in range(2, context):
                model.decode(ids[:, t:t + 1], cache)
        assert sum(c.nbytes for c in cache) == kv_cache_bytes(model.cfg, context), (name, context)
    assert sum(c.nbytes for c in cache) == kv_cache_bytes_per_token(model.cfg) * TINY["seq_len"], name


def test_cache_bytes_by_hand():
    """baseline: 2 layers x K and V x 4 heads x 8 dims x 4 bytes (fp32) x 13 tokens; swa: the window
    of 4 instead of 13; lora_small: 2 layers x (latent 32/8 = 4 + rotary key 8) x 4 bytes x 13."""
    assert sum(c.nbytes for c in tiny_model("baseline").new_cache(1, 13)) == 2 * 2 * 4 * 8 * 4 * 13
    assert sum(c.nbytes for c in tiny_model("swa").new_cache(1, 13)) == 2 * 2 * 4 * 8 * 4 * 4
    assert sum(c.nbytes for c in tiny_model("lora_small").new_cache(1, 13)) == 2 * (4 + 8) * 4 * 13


def test_rolling_buffer_slots_and_a_full_cache():
    """Window 3: after 5 tokens the slots hold positions 3, 4, 2 (token p in slot p % 3); a cache
    without a window refuses a token past its context."""
    ring = LayerCache({"k": torch.zeros(1, 3, 1)}, time_dim=1, window=3)
    ring.append(k=torch.arange(4.0).view(1, 4, 1))
    ring.append(k=torch.tensor([[[4.0]]]))
    assert ring.read("k").flatten().tolist() == [3.0, 4.0, 2.0]
    assert ring.positions().tolist() == [3, 4, 2]
    full = LayerCache({"k": torch.zeros(1, 2, 1)}, time_dim=1, window=0)
    full.append(k=torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match="holds 2 tokens"):
        full.append(k=torch.zeros(1, 1, 1))
