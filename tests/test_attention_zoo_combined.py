"""Options combined as published designs combine them: sinks or a soft-cap on a sliding-window
layer (gpt-oss, Gemma 2: named variants `gptoss`, `gemma2`), and combinations no `transformers`
class has (sinks + ALiBi, an output gate + a window, a soft-cap + ALiBi + a window):

- GptOssAttention with sliding_window + sinks, Gemma2Attention with sliding_window +
  attn_logit_softcapping, each fed the mask transformers builds for its window, weights copied:
  outputs and input/parameter gradients, fp32, rel err < 1e-5 at SHAPES;
- the rest against the float64 attention written from the definitions
  (tests/test_attention_zoo_gates.py: explicit_attention);
- the layer pattern (transformers' layer_types for both: sliding, full, sliding, ..), causality and
  the window's reach on the explicit path, the probes' attention weights, the KV cache by hand.
"""
import pytest
import torch

from attention import VARIANTS, build_attention
from model import ModelConfig, MoELM, kv_cache_bytes_per_token
from test_attention import D_MODEL, N_HEADS, TOL, assert_equivalent, rel_err, run_both
from test_attention_zoo_gates import assert_matches_explicit_attention, build, gemma2_reference, gpt_oss_reference
from test_attention_zoo_windows import SMOKE, assert_sees_only_the_past_and_the_window, with_sliding_window_mask


def windowed_reference(make_reference, spec):
    ref, rotary = make_reference(spec)
    return with_sliding_window_mask(ref, ref.config), rotary


# --- the named variants' layer pattern ------------------------------------------------------------

@pytest.mark.parametrize("name", ["gptoss", "gemma2"])
def test_named_variants_alternate_sliding_and_full_layers_as_transformers_does(name):
    """transformers' GptOssConfig and Gemma2Config default layer_types: sliding, full, sliding, .."""
    from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig

    config = {"gptoss": GptOssConfig, "gemma2": Gemma2Config}[name](num_hidden_layers=4)
    model = MoELM(ModelConfig(attention=VARIANTS[name], seq_len=64, **{**SMOKE, "n_layers": 4}))
    local = [layer.self_attn.window == 16 for layer in model.layers]
    assert local == [kind == "sliding_attention" for kind in config.layer_types] == [True, False, True, False]
    # the sinks / the cap are on every layer, local or global
    if name == "gptoss":
        assert all(hasattr(layer.self_attn, "sinks") for layer in model.layers)
        assert {layer.self_attn.k_proj.out_features for layer in model.layers} == {2 * 16}  # 2 kv heads
    else:
        assert {layer.self_attn.softcap for layer in model.layers} == {50.0}


def test_the_layer_pattern_check_catches_a_wrong_schedule(monkeypatch):
    """Negative control: with every layer given the window (no global layers), the layer pattern
    differs from transformers' layer_types."""
    from attention import modules

    monkeypatch.setattr(modules, "layer_window", lambda spec, layer: spec.window)
    with pytest.raises(AssertionError):
        test_named_variants_alternate_sliding_and_full_layers_as_transformers_does("gptoss")


# --- sinks + window vs GptOssAttention's sliding layer ----------------------------------------------

# The named windows are a quarter of the context (attention/registry.py): 16 of a 64-token one.
GPTOSS, GEMMA2 = (VARIANTS[name].resolved(D_MODEL, N_HEADS, seq_len=64) for name in ("gptoss", "gemma2"))

SINK_WINDOW_CASES = {
    "gptoss (local layer)": GPTOSS,  # window 16: shorter than SHAPES' 17 and 32
    "sinks+window5+mha+bias+linear1.5": VARIANTS["gptoss"].with_overrides(
        window=5, n_kv_heads=8, attention_bias=True, rope_scaling_factor=1.5),
}


@pytest.mark.parametrize("name", list(SINK_WINDOW_CASES))
def test_sinks_with_a_window_match_gpt_oss_sliding_layer(name):
    spec = SINK_WINDOW_CASES[name]
    assert spec.window and spec.attention_sinks
    ours = build(spec, seed=101)
    ref, rotary = windowed_reference(gpt_oss_reference, spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, rotary, seed=103)


# --- soft-cap + window vs Gemma2Attention's sliding layer ------------------------------------------

SOFTCAP_WINDOW_CASES = {
    "gemma2 (local layer)": GEMMA2,
    "softcap1.5+window5+gqa": VARIANTS["gemma2"].with_overrides(attn_softcap=1.5, window=5,
                                                                              n_kv_heads=2),
}


@pytest.mark.parametrize("name", list(SOFTCAP_WINDOW_CASES))
def test_softcap_with_a_window_matches_gemma2_sliding_layer(name):
    spec = SOFTCAP_WINDOW_CASES[name]
    assert spec.window and spec.attn_softcap
    ours = build(spec, seed=107)
    ref, rotary = windowed_reference(gemma2_reference, spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, rotary, seed=109)


@pytest.mark.parametrize("make_reference, spec", [(gpt_oss_reference, SINK_WINDOW_CASES["gptoss (local layer)"]),
                                                  (gemma2_reference, SOFTCAP_WINDOW_CASES["softcap1.5+window5+gqa"])])
def test_the_references_see_the_window(make_reference, spec):
    """Negative control: the same module without its window equals the windowed reference only on
    the positions the window covers."""
    ours = build(spec, seed=113)
    full = build_attention(spec.with_overrides(window=0), D_MODEL, N_HEADS, dropout=0.0).eval()
    full.load_state_dict(ours.state_dict(), strict=True)
    ref, rotary = windowed_reference(make_reference, spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    y, y_ref = run_both(full, ref, rotary, 2, 32, 0)[:2]
    assert rel_err(y[:, :spec.window], y_ref[:, :spec.window]) < TOL
    assert rel_err(y[:, spec.window:], y_ref[:, spec.window:]) > 1e-3


# --- combinations without a transformers class vs the float64 attention --------------------------

EXPLICIT_COMBINED_CASES = {
    "sinks+alibi": VARIANTS["alibi"].with_overrides(attention_sinks=True),
    "sinks+alibi+window6+gqa": VARIANTS["alibi"].with_overrides(attention_sinks=True, window=6, n_kv_heads=2),
    "elementwise gate+window5": VARIANTS["gated"].with_overrides(window=5),
    "headwise gate+window5+mqa": VARIANTS["baseline"].with_overrides(output_gate="headwise", window=5, n_kv_heads=1),
    "softcap2+alibi+window6": VARIANTS["alibi"].with_overrides(attn_softcap=2.0, window=6),
    "gptoss local layer": GPTOSS,
}


@pytest.mark.parametrize("name", list(EXPLICIT_COMBINED_CASES))
def test_combinations_match_the_explicit_float64_attention(name):
    assert_matches_explicit_attention(EXPLICIT_COMBINED_CASES[name])


def test_explicit_reference_sees_the_window_and_the_bias():
    """Negative control: the module without the window, or with RoPE instead of ALiBi, is far from
    the float64 reference of the combined spec."""
    from test_attention_zoo_gates import explicit_attention

    spec = EXPLICIT_COMBINED_CASES["sinks+alibi+window6+gqa"]
    ours = build(spec, seed=127)
    params = {n: p.detach().double() for n, p in ours.named_parameters()}
    x = torch.randn(2, 24, D_MODEL, generator=torch.Generator().manual_seed(131))
    with torch.no_grad():
        assert rel_err(ours(x), explicit_attention(x.double(), params, spec)) < TOL
        for other in (spec.with_overrides(window=0), spec.with_overrides(positions="rope")):
            assert rel_err(ours(x), explicit_attention(x.double(), params, other)) > 1e-3


# --- causality and the window's reach on the explicit path -------------------------------------------

REACH_CASES = {
    "gptoss local layer": VARIANTS["gptoss"].with_overrides(window=3),
    "gemma2 local layer, cap 1.5": VARIANTS["gemma2"].with_overrides(window=3, attn_softcap=1.5),
    "sinks+alibi+window3": VARIANTS["alibi"].with_overrides(attention_sinks=True, window=3),
    "gate+window3": VARIANTS["gated"].with_overrides(window=3),
    "gptoss global layer": VARIANTS["gptoss"].with_overrides(window=0),  # what its layer 1 gets
}


@pytest.mark.parametrize("name", list(REACH_CASES))
def test_combined_outputs_see_only_the_past_and_only_the_window(name):
    assert_sees_only_the_past_and_the_window(REACH_CASES[name])


# --- the probes' attention weights ---------------------------------------------------------------------

def test_probe_probabilities_are_the_references_attention_weights():
    """gpt-oss's eager attention returns its weights with the sink column dropped (rows sum to less
    than 1), as attention_probabilities does; Gemma 2's are the capped, windowed softmax."""
    x = torch.randn(2, 24, D_MODEL, generator=torch.Generator().manual_seed(137))
    positions = torch.arange(24)[None].expand(2, -1)
    for make_reference, spec, seed in [(gpt_oss_reference, SINK_WINDOW_CASES["gptoss (local layer)"], 139),
                                       (gemma2_reference, SOFTCAP_WINDOW_CASES["softcap1.5+window5+gqa"], 149)]:
        ours = build(spec, seed)
        ref, rotary = windowed_reference(make_reference, spec)
        ref.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            _, weights = ref(x, rotary(x, positions), None)
            probabilities = ours.attention_probabilities(x)
        assert probabilities.shape == weights.shape == (2, N_HEADS, 24, 24)
        assert rel_err(probabilities, weights) < TOL
        query, key = torch.arange(24)[:, None], torch.arange(24)[None]
        assert (probabilities[..., (key > query) | (key <= query - spec.window)] == 0).all()  # causal, windowed
        if spec.attention_sinks:
            assert probabilities.sum(-1).max() < 1 - 1e-3  # the sinks take some weight
        else:
            torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, N_HEADS, 24))


# --- KV cache (by hand) --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, size, expected", [
    # smoke (d_model 64, 2 layers, 4 heads of 16, L = 64). gptoss: K and V x 2 kv heads x 16 x 2 B = 128
    # per layer; local layer 0 keeps 16 of 64 tokens: 32; global layer 1: 128
    ("gptoss", dict(SMOKE, seq_len=64), 160),
    # gemma2: K and V x 4 heads x 16 x 2 B = 256 per layer; 256 x 16/64 = 64 + 256
    ("gemma2", dict(SMOKE, seq_len=64), 320),
    # the seed's size (512, 8 layers, 8 heads of 64, L = 512). gptoss: 2 x 2 x 64 x 2 B = 512 per
    # layer; the window a quarter of 512 = 128: 4 local x 512 x 128/512 = 512, 4 global x 512 = 2048
    ("gptoss", dict(d_model=512, n_layers=8, n_heads=8, seq_len=512), 2560),
    # gemma2: 2 x 8 x 64 x 2 B = 2048 per layer; 4 local x 512 = 2048, 4 global x 2048 = 8192
    ("gemma2", dict(d_model=512, n_layers=8, n_heads=8, seq_len=512), 10240),
])
def test_kv_cache_of_the_combined_variants(name, size, expected):
    assert kv_cache_bytes_per_token(ModelConfig(attention=VARIANTS[name], **size)) == expected
