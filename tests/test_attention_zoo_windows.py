"""Sliding windows, local/global layer patterns, positions (RoPE / NoPE / ALiBi) and DeepSeek-V3-
proportioned latent attention, against independent references:

- a window against `transformers`' MistralAttention (sliding_window), fed the mask transformers'
  own `create_sliding_window_causal_mask` builds for it; with GQA, scaling and bias too;
- local/global patterns: each layer of `local_global` is Mistral-with-the-window or the plain
  baseline, as its position says;
- NoPE against LlamaAttention given the identity rotation (cos 1, sin 0);
- ALiBi against BloomAttention (whole module: its fused query_key_value weights copied from ours,
  its own build_alibi_tensor);
- mla_v3 against DeepseekV3Attention, and mla_norope (qk_rope_head_dim 0) against it given no
  rotary dims;
- causality and the window's reach, the KV cache at a context (by hand), refusals, shared init.
Outputs and gradients (input and every parameter), float32, relative error < 1e-5, several shapes.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

import processes
from attention import VARIANTS, build_attention
from config import ConfigError, config_from_values
from model import ModelConfig, MoELM, init_weights, kv_cache_bytes_per_token, shared_parameters_fingerprint
from test_attention import (D_MODEL, N_HEADS, SHAPES, THETA, TOL, assert_equivalent, llama_reference,
                            ours_and_reference, randomize_, rel_err, rope_parameters)

ROOT = Path(__file__).resolve().parent.parent


# --- sliding windows vs MistralAttention -------------------------------------------------------

def mistral_reference(spec):
    """MistralAttention whose every call gets the mask transformers builds for its sliding window
    (its eager attention only adds the mask it is given; the window lives in the mask)."""
    from transformers.models.mistral.configuration_mistral import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding

    config = MistralConfig(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=spec.n_kv_heads or N_HEADS,
        head_dim=D_MODEL // N_HEADS, attention_dropout=0.0, sliding_window=spec.window,
        rope_parameters=rope_parameters(spec), max_position_embeddings=4096,
    )
    config._attn_implementation = "eager"
    ref, rotary = MistralAttention(config, layer_idx=0), MistralRotaryEmbedding(config)
    if spec.attention_bias:  # Mistral has no bias switch: give it Llama's biased projections
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            old = getattr(ref, name)
            setattr(ref, name, torch.nn.Linear(old.in_features, old.out_features, bias=True))
    return with_sliding_window_mask(ref, config).eval(), rotary


def with_sliding_window_mask(ref, config):
    """`ref` (a transformers attention module) called with the mask transformers builds for
    config.sliding_window instead of the plain causal one the tests hand it."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    forward = ref.forward

    def windowed(x, position_embeddings, _plain_causal_mask):
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        mask = create_sliding_window_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None,
                                                 position_ids=positions)
        return forward(x, position_embeddings, mask)

    ref.forward = windowed
    return ref


# The named windows are a quarter of the context (attention/registry.py): 16 of a 64-token one.
SWA = VARIANTS["swa"].resolved(D_MODEL, N_HEADS, seq_len=64)

WINDOW_CASES = {
    "swa": SWA,  # 16: shorter than 17 and 32 of SHAPES
    "window5+gqa2+linear2+bias": VARIANTS["baseline"].with_overrides(window=5, n_kv_heads=2, rope_scaling_factor=2.0,
                                                                      attention_bias=True),
    "window1+mqa": VARIANTS["mqa"].with_overrides(window=1),  # each token sees only itself
}


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_window_matches_mistral(name):
    spec = WINDOW_CASES[name]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=41)
    ref, rotary = mistral_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, rotary, seed=43)


def test_window_comparison_sees_the_window():
    """Negative control: Mistral with the window differs from our full attention at length 32."""
    ours = build_attention(VARIANTS["baseline"], D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=41)
    ref, rotary = mistral_reference(SWA)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 32, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_ref, _ = ref(x, rotary(x, torch.arange(32)[None].expand(2, -1)), None)
        assert rel_err(ours(x)[:, :16], y_ref[:, :16]) < TOL  # inside the window: the same
        assert rel_err(ours(x)[:, 16:], y_ref[:, 16:]) > 1e-3  # beyond it: not


def test_local_global_layers_are_mistral_and_baseline_in_turn():
    """Gemma 2's pattern (global_every 2): layers 0, 2 keep the window, 1, 3 see everything. Each
    layer, with the same weights, equals the windowed module or the full-attention baseline."""
    spec = VARIANTS["local_global"]
    model = MoELM(ModelConfig(attention=spec, d_model=64, n_layers=4, n_heads=4, d_ff=64, n_experts=4, top_k=2,
                              vocab_size=97, seq_len=64))
    assert [layer.self_attn.window for layer in model.layers] == [16, 0, 16, 0]
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(3))
    for index, layer in enumerate(model.layers):
        module = layer.self_attn.eval()
        randomize_(module, seed=index)
        windowed = build_attention(VARIANTS["swa"], 64, 4, max_len=64).eval()
        full = build_attention(VARIANTS["baseline"], 64, 4).eval()
        windowed.load_state_dict(module.state_dict(), strict=True)
        full.load_state_dict(module.state_dict(), strict=True)
        with torch.no_grad():
            y, y_windowed, y_full = module(x), windowed(x), full(x)
        expected, other = (y_full, y_windowed) if index % 2 else (y_windowed, y_full)
        assert rel_err(y, expected) < TOL, index
        assert rel_err(y, other) > 1e-3, index  # the two really differ at 40 tokens


# --- positions -------------------------------------------------------------------------------------

class IdentityRotation(torch.nn.Module):
    """cos 1, sin 0: LlamaAttention's rotate-half then leaves q and k as they are (NoPE)."""

    def forward(self, x, position_ids):
        shape = (*position_ids.shape, D_MODEL // N_HEADS)
        return torch.ones(shape), torch.zeros(shape)


NOPE_CASES = {"nope": VARIANTS["nope"], "nope+gqa2+bias": VARIANTS["nope"].with_overrides(n_kv_heads=2,
                                                                                            attention_bias=True)}


@pytest.mark.parametrize("name", list(NOPE_CASES))
def test_nope_matches_llama_without_rotation(name):
    spec = NOPE_CASES[name]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    assert not hasattr(ours, "rotary")
    randomize_(ours, seed=47)
    ref, _ = llama_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, IdentityRotation(), seed=53)


def bloom_reference(ours):
    """BloomAttention with our weights: its fused query_key_value is laid out (head, q/k/v, head_dim)."""
    from transformers.models.bloom.configuration_bloom import BloomConfig
    from transformers.models.bloom.modeling_bloom import BloomAttention

    config = BloomConfig(hidden_size=D_MODEL, n_head=N_HEADS, attention_dropout=0.0, hidden_dropout=0.0)
    ref = BloomAttention(config, layer_idx=0).eval()
    head_dim = D_MODEL // N_HEADS
    with torch.no_grad():
        parts = [getattr(ours, name) for name in ("q_proj", "k_proj", "v_proj")]
        weight = torch.stack([p.weight.view(N_HEADS, head_dim, D_MODEL) for p in parts], dim=1)
        bias = torch.stack([p.bias.view(N_HEADS, head_dim) for p in parts], dim=1)
        ref.query_key_value.weight.copy_(weight.reshape(3 * D_MODEL, D_MODEL))
        ref.query_key_value.bias.copy_(bias.reshape(3 * D_MODEL))
        ref.dense.weight.copy_(ours.o_proj.weight)
        ref.dense.bias.copy_(ours.o_proj.bias)
    return ref


def bloom_grads_as_ours(ref) -> dict:
    """Bloom's gradients under our parameter names (the fused q/k/v split back per head)."""
    head_dim = D_MODEL // N_HEADS
    weight = ref.query_key_value.weight.grad.view(N_HEADS, 3, head_dim, D_MODEL)
    bias = ref.query_key_value.bias.grad.view(N_HEADS, 3, head_dim)
    grads = {"o_proj.weight": ref.dense.weight.grad, "o_proj.bias": ref.dense.bias.grad}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        grads[f"{name}.weight"] = weight[:, i].reshape(D_MODEL, D_MODEL)
        grads[f"{name}.bias"] = bias[:, i].reshape(D_MODEL)
    return grads


@pytest.mark.parametrize("window", [0, 6])
def test_alibi_matches_bloom(window):
    """ALiBi (Bloom has bias on every projection, so attention_bias is on), with and without a
    window (Bloom given the windowed causal mask)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    spec = VARIANTS["alibi"].with_overrides(attention_bias=True, window=window)
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=59)
    ref = bloom_reference(ours)
    for i, (batch, length) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(61 + i)
        x = torch.randn(batch, length, D_MODEL, generator=gen)
        cotangent = torch.randn(batch, length, D_MODEL, generator=gen)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours.zero_grad(), ref.zero_grad()
        y = ours(x_ours)
        query, key = torch.arange(length)[:, None], torch.arange(length)[None]
        allowed = (key <= query) & ((key > query - window) if window else True)
        mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        alibi = build_alibi_tensor(torch.ones(batch, length), N_HEADS, torch.float32)
        y_ref, _ = ref(x_ref, torch.zeros_like(x_ref), alibi, mask)  # zero residual: the attention alone
        (y * cotangent).sum().backward()
        (y_ref * cotangent).sum().backward()
        assert rel_err(y, y_ref) < TOL, (batch, length)
        assert rel_err(x_ours.grad, x_ref.grad) < TOL, (batch, length)
        grads_ref = bloom_grads_as_ours(ref)
        floor = 1e-6 * torch.stack([g.double().norm() for g in grads_ref.values()]).norm()
        for name, param in ours.named_parameters():
            err = (param.grad.double() - grads_ref[name].double()).norm()
            assert err <= TOL * grads_ref[name].double().norm() + floor, (name, batch, length)


def test_alibi_reference_sees_the_bias():
    """Negative control: NoPE with the same weights is far from Bloom's ALiBi attention."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    nope = build_attention(VARIANTS["nope"].with_overrides(attention_bias=True), D_MODEL, N_HEADS).eval()
    randomize_(nope, seed=59)
    ref = bloom_reference(nope)
    x = torch.randn(2, 32, D_MODEL, generator=torch.Generator().manual_seed(5))
    mask = torch.full((32, 32), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        y_ref, _ = ref(x, torch.zeros_like(x), build_alibi_tensor(torch.ones(2, 32), N_HEADS, torch.float32), mask)
        assert rel_err(nope(x), y_ref) > 1e-3


# --- DeepSeek-V3 proportions ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", [VARIANTS["mla_v3"], VARIANTS["mla_v3"].with_overrides(rope_scaling_factor=2.0)],
                         ids=["mla_v3", "mla_v3+linear2"])
def test_mla_v3_matches_deepseek_v3(spec):
    spec = spec.resolved(D_MODEL, N_HEADS)  # the seed's size
    assert spec.qk_nope_head_dim == 64 and spec.qk_rope_head_dim == 32 and spec.v_head_dim == 64
    ours, ref, rotary = ours_and_reference(spec, seed=67)
    assert_equivalent(ours, ref, rotary, seed=71)


class NoRotation(torch.nn.Module):
    """Zero rotary dims: DeepseekV3Attention then rotates nothing (its own rotary module cannot be
    built with 0 dims, so it is handed these empty cos/sin)."""

    def forward(self, x, position_ids):
        return torch.empty(*position_ids.shape, 0), torch.empty(*position_ids.shape, 0)


@pytest.mark.parametrize("spec", [VARIANTS["mla_norope"], VARIANTS["mla_norope"].with_overrides(q_lora_rank=None,
                                                                                                  attention_bias=True)],
                         ids=["mla_norope", "mla_norope+full_q+bias"])
def test_mla_without_decoupled_rope_matches_deepseek_v3(spec):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    spec = spec.resolved(D_MODEL, N_HEADS)  # the seed's size

    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    assert ours.qk_rope_head_dim == 0 and not hasattr(ours, "rotary")
    randomize_(ours, seed=73)
    config = DeepseekV3Config(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, q_lora_rank=spec.q_lora_rank,
        kv_lora_rank=spec.kv_lora_rank, qk_rope_head_dim=0, qk_nope_head_dim=spec.qk_nope_head_dim,
        v_head_dim=spec.v_head_dim, attention_bias=spec.attention_bias, attention_dropout=0.0, rms_norm_eps=1e-6,
        rope_interleave=False, rope_parameters=rope_parameters(spec),
    )
    config._attn_implementation = "eager"
    ref = DeepseekV3Attention(config, layer_idx=0).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, NoRotation(), seed=79)


# --- causality and the window's reach -------------------------------------------------------------

REACH_CASES = {"window3": VARIANTS["baseline"].with_overrides(window=3),
               "alibi+window3+gqa2": VARIANTS["alibi"].with_overrides(window=3, n_kv_heads=2),
               "alibi": VARIANTS["alibi"], "nope": VARIANTS["nope"], "mla_norope": VARIANTS["mla_norope"]}


@pytest.mark.parametrize("name", list(REACH_CASES))
def test_outputs_see_only_the_past_and_only_the_window(name):
    assert_sees_only_the_past_and_the_window(REACH_CASES[name])


def assert_sees_only_the_past_and_the_window(spec):
    """Position t depends on tokens t-window+1..t only: changing later tokens never changes it,
    changing tokens older than the window never does either, changing the window's own does."""
    module = build_attention(spec, 64, 4, dropout=0.0).eval()
    randomize_(module, seed=2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 64, generator=gen)
    with torch.no_grad():
        y = module(x)
        for t in (0, 5, 10):
            later = x.clone()
            later[:, t + 1:] = torch.randn(2, 11 - t, 64, generator=gen)
            torch.testing.assert_close(module(later)[:, :t + 1], y[:, :t + 1], rtol=1e-6, atol=1e-6)
            if spec.window and t >= spec.window:
                older = x.clone()
                older[:, :t - spec.window + 1] = torch.randn(2, t - spec.window + 1, 64, generator=gen)
                torch.testing.assert_close(module(older)[:, t], y[:, t], rtol=1e-6, atol=1e-6)
            inside = x.clone()
            inside[:, t] = torch.randn(2, 64, generator=gen)
            assert not torch.allclose(module(inside)[:, t], y[:, t], atol=1e-3)


# --- KV cache at a context length (by hand) ------------------------------------------------------

SMOKE = dict(d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4, top_k=2, vocab_size=97)


@pytest.mark.parametrize("name, window, seq_len, expected", [
    # per layer, full: K and V x 4 heads x 16 dims x 2 B = 256 B/token; 2 layers = 512
    ("baseline", None, 64, 512),
    ("swa", None, 64, 128),  # each layer keeps 16 of 64 tokens (a quarter): 2 x 256 x 16/64
    ("swa", None, 16, 128),  # a quarter of any context: 4 of 16
    ("swa", 16, 16, 512),  # a window (--window=16) that covers the whole context: no saving
    ("swa", 16, 8, 512),
    ("local_global", None, 64, 320),  # local 256 x 16/64 = 64, global 256
    ("alibi", None, 64, 512), ("nope", None, 64, 512),  # positions change no cache
])
def test_kv_cache_per_token_at_the_context(name, window, seq_len, expected):
    spec = VARIANTS[name] if window is None else VARIANTS[name].with_overrides(window=window)
    assert kv_cache_bytes_per_token(ModelConfig(attention=spec, seq_len=seq_len, **SMOKE)) == expected


def test_kv_cache_at_the_seeds_size():
    seed = dict(d_model=512, n_layers=8, n_heads=8, seq_len=512)
    # mla_v3: latent 32 + shared rotary key 32 = 64 values x 2 B x 8 layers
    assert kv_cache_bytes_per_token(ModelConfig(attention=VARIANTS["mla_v3"], **seed)) == 1024
    # mla_norope: the latent alone, 32 values x 2 B x 8 layers
    assert kv_cache_bytes_per_token(ModelConfig(attention=VARIANTS["mla_norope"], **seed)) == 512
    # local_global, window 128 (a quarter) of 512: 4 local layers x 2048 x 128/512 + 4 global x 2048 = 2048 + 8192
    assert kv_cache_bytes_per_token(ModelConfig(attention=VARIANTS["local_global"], **seed)) == 10240
    # a window that leaves a fraction of a byte is rounded: 2048 x 8 layers x 5/512 = 160 exactly;
    # window 7 with 1 layer at 100 tokens: 2048 x 7/100 = 143.36 -> 143
    spec = VARIANTS["swa"].with_overrides(window=7)
    assert kv_cache_bytes_per_token(ModelConfig(attention=spec, d_model=512, n_layers=1, n_heads=8,
                                                seq_len=100)) == 143


def test_dry_run_states_the_windowed_cache_and_its_context():
    result = processes.run(
        [sys.executable, "train.py", "--dry_run", "--vocab_size=97", "--attention=local_global", "--d_model=64",
         "--n_layers=2", "--n_heads=4", "--seq_len=64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout.strip().splitlines()[-1])
    assert described["kv_cache_bytes_per_token"] == 320 and described["kv_cache_context"] == 64


# --- refusals and shared init --------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"attention": "lora_small", "positions": "alibi"}, r"--positions=alibi: only multi-head attention"),
    ({"attention": "mla_v3", "window": "16"}, r"--window=16: only multi-head attention"),
    ({"attention": "nope", "rope_scaling_factor": "2.0"}, r"--rope_scaling: only with --positions=rope, not none"),
    ({"attention": "baseline", "global_every": "2"}, r"--global_every: needs a --window"),
    ({"attention": "baseline", "positions": "learned"}, r"--positions=learned: allowed: rope, none, alibi"),
    ({"attention": "baseline", "window": "-1"}, r"--window=-1: must be 0 or greater"),
    ({"attention": "mla_norope", "qk_nope_head_dim": "0"}, r"--qk_rope_head_dim=0: needs --qk_nope_head_dim > 0"),
    ({"attention": "mla_norope", "rope_scaling_factor": "2.0"}, r"--rope_scaling: only with RoPE"),
    ({"attention": "lora_small", "qk_rope_head_dim": "-2"}, r"--qk_rope_head_dim=-2: must be 0 or greater"),
])
def test_combinations_that_make_no_sense_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_values(values)


def test_combinations_that_make_sense_are_accepted():
    spec = config_from_values({"attention": "alibi", "window": "8", "n_kv_heads": "2", "qk_norm": "True",
                               "global_every": "3"}).attention_spec()
    assert (spec.positions, spec.window, spec.n_kv_heads, spec.qk_norm, spec.global_every) == ("alibi", 8, 2, True, 3)


def test_shared_init_is_the_same_for_the_new_variants():
    prints = {}
    for name in ["baseline", "swa", "local_global", "nope", "alibi", "mla_v3", "mla_norope"]:
        model = MoELM(ModelConfig(attention=VARIANTS[name], seq_len=32, **SMOKE))
        init_weights(model, 5)
        prints[name] = shared_parameters_fingerprint(model)
    assert len(set(prints.values())) == 1, prints


# --- the probes' scores see the window and the bias ------------------------------------------------

def test_probe_scores_give_the_references_attention_weights():
    """attention_scores (probes.py) -> softmax equals the weights Mistral's (window) and Bloom's
    (ALiBi + window) eager attention return."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    x = torch.randn(2, 24, D_MODEL, generator=torch.Generator().manual_seed(83))
    positions = torch.arange(24)[None].expand(2, -1)
    swa = build_attention(SWA, D_MODEL, N_HEADS, rope_theta=THETA).eval()
    randomize_(swa, seed=89)
    ref, rotary = mistral_reference(SWA)
    ref.load_state_dict(swa.state_dict(), strict=True)
    alibi = build_attention(VARIANTS["alibi"].with_overrides(attention_bias=True, window=6), D_MODEL, N_HEADS).eval()
    randomize_(alibi, seed=97)
    bloom = bloom_reference(alibi)
    query, key = torch.arange(24)[:, None], torch.arange(24)[None]
    mask = torch.zeros(24, 24).masked_fill((key > query) | (key <= query - 6), torch.finfo(torch.float32).min)
    with torch.no_grad():
        _, weights = ref(x, rotary(x, positions), None)
        assert rel_err(swa.attention_scores(x).softmax(-1), weights) < TOL
        _, weights = bloom(x, torch.zeros_like(x), build_alibi_tensor(torch.ones(2, 24), N_HEADS, torch.float32),
                           mask[None, None])
        assert rel_err(alibi.attention_scores(x).softmax(-1), weights) < TOL
