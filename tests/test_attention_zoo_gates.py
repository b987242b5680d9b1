"""Output gates, attention sinks and logit soft-capping (attention/modulated.py; knobs
`output_gate`, `attention_sinks`, `attn_softcap` of the mha kind) against independent references:

- the element-wise gate (with QK-norm, as Qwen3-Next always has it) against `transformers`'
  Qwen3NextAttention; sinks against GptOssAttention; the soft-cap against Gemma2Attention. Weights
  copied across, fp32, outputs and input/parameter gradients, rel err < 1e-5 at three shapes;
- the head-wise gate has no `transformers` reference: it is checked against a float64 explicit
  attention written here from the paper's definition (Qiu et al. 2025, "Gated Attention for Large
  Language Models": Y' = Y * sigmoid(X W_theta), one score per head, on each head's output before
  o_proj), which also checks every option combined;
- refusals, parameter counts and KV cache by hand, the shared initialisation.
Causality of the named variants: tests/test_attention.py's test_attention_is_causal covers every
variant in the registry.
"""
import math

import pytest
import torch

from attention import VARIANTS, build_attention
from config import ConfigError, config_from_values
from model import ModelConfig, MoELM, count_parameters, init_weights, kv_cache_bytes_per_token, shared_parameters_fingerprint
from test_attention import (D_MODEL, N_HEADS, SHAPES, THETA, TOL, assert_equivalent, randomize_, rel_err,
                            rope_parameters, run_both)
from test_model import SEED, SMALL, meta_model, model_config

HEAD_DIM = D_MODEL // N_HEADS


def build(spec, seed):
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed)
    if hasattr(ours, "sinks"):  # logits here are ~N(0, 1): sinks of that size change the output visibly
        with torch.no_grad():
            ours.sinks.copy_(torch.randn(N_HEADS, generator=torch.Generator().manual_seed(seed)))
    return ours


# --- element-wise gate vs Qwen3NextAttention -----------------------------------------------------

def qwen3_next_reference(spec):
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

    # partial_rotary_factor 1.0: Qwen3-Next rotates a quarter of each head, ours the whole head
    config = Qwen3NextConfig(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=spec.n_kv_heads or N_HEADS,
        head_dim=HEAD_DIM, attention_bias=spec.attention_bias, attention_dropout=0.0, rms_norm_eps=1e-6,
        rope_parameters={**rope_parameters(spec), "partial_rotary_factor": 1.0}, max_position_embeddings=4096,
    )
    config._attn_implementation = "eager"
    ref, rotary = Qwen3NextAttention(config, layer_idx=3), Qwen3NextRotaryEmbedding(config)
    assert rotary.inv_freq.numel() == HEAD_DIM // 2 and rotary.attention_scaling == 1.0
    assert ref.scaling == pytest.approx(HEAD_DIM ** -0.5, rel=1e-12)
    return ref.eval(), rotary


def load_into_qwen3_next(ref, ours):
    """Qwen3-Next's RMSNorm scales by (1 + weight) (zero-centred), ours (Qwen3's) by weight: the same
    function at weight - 1, and the same gradient. Every other tensor is copied as is."""
    state = {n: (p - 1.0 if n.endswith("norm.weight") else p) for n, p in ours.state_dict().items()}
    ref.load_state_dict(state, strict=True)


ELEMENTWISE_CASES = {
    "gated": VARIANTS["gated"],
    "gated+mha+linear2+bias": VARIANTS["gated"].with_overrides(n_kv_heads=8, rope_scaling_factor=2.0,
                                                                attention_bias=True),
    "gated+mqa": VARIANTS["gated"].with_overrides(n_kv_heads=1),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE_CASES))
def test_elementwise_gate_matches_qwen3_next(name):
    spec = ELEMENTWISE_CASES[name]
    ours = build(spec, seed=41)
    assert ours.q_proj.out_features == 2 * D_MODEL  # query and gate, per head
    ref, rotary = qwen3_next_reference(spec)
    load_into_qwen3_next(ref, ours)
    assert_equivalent(ours, ref, rotary, seed=43)


def test_qwen3_next_comparison_sees_the_gate():
    """Negative control: the gate's half of q_proj matters (zeroing it gives sigmoid(0) = 1/2 gates)."""
    spec = VARIANTS["gated"]
    ours = build(spec, seed=41)
    ref, rotary = qwen3_next_reference(spec)
    load_into_qwen3_next(ref, ours)
    with torch.no_grad():
        ours.q_proj.weight.view(N_HEADS, 2, HEAD_DIM, D_MODEL)[:, 1] = 0.0  # each head's gate rows
    y, y_ref = run_both(ours, ref, rotary, 2, 9, 0)[:2]
    assert rel_err(y, y_ref) > 1e-2


# --- sinks vs GptOssAttention ----------------------------------------------------------------------

def layer_type(spec) -> str:
    """The transformers layer type of a one-layer reference: its eager attention takes the window
    only from the mask it is handed (tests/test_attention_zoo_windows.py: with_sliding_window_mask)."""
    return "sliding_attention" if spec.window else "full_attention"


def gpt_oss_reference(spec):
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

    # one layer, full attention or (spec.window) a sliding one, and plain RoPE (gpt-oss ships YaRN)
    config = GptOssConfig(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=spec.n_kv_heads or N_HEADS,
        head_dim=HEAD_DIM, attention_bias=spec.attention_bias, attention_dropout=0.0,
        rope_parameters=rope_parameters(spec), layer_types=[layer_type(spec)], num_hidden_layers=1,
        max_position_embeddings=4096, sliding_window=spec.window or None,
    )
    config._attn_implementation = "eager"
    ref, rotary = GptOssAttention(config, layer_idx=0), GptOssRotaryEmbedding(config)
    assert ref.sliding_window == (spec.window or None) and rotary.attention_scaling == 1.0
    assert rotary.rope_type == ("linear" if spec.rope_scaling else "default")
    return ref.eval(), rotary


SINK_CASES = {
    "sinks": VARIANTS["sinks"],
    "sinks+mha+bias+linear1.5": VARIANTS["sinks"].with_overrides(n_kv_heads=8, attention_bias=True,
                                                                  rope_scaling_factor=1.5),
}


@pytest.mark.parametrize("name", list(SINK_CASES))
def test_sinks_match_gpt_oss(name):
    spec = SINK_CASES[name]
    ours = build(spec, seed=47)
    assert tuple(ours.sinks.shape) == (N_HEADS,)
    ref, rotary = gpt_oss_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, rotary, seed=53)


def test_gpt_oss_comparison_sees_the_sinks():
    """Negative control: the same weights without sinks are far from GptOssAttention."""
    spec = VARIANTS["sinks"]
    ours = build(spec, seed=47)
    ref, rotary = gpt_oss_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    plain = build_attention(VARIANTS["gqa"], D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "sinks"}, strict=True)
    y, y_ref = run_both(plain, ref, rotary, 2, 9, 0)[:2]
    assert rel_err(y, y_ref) > 1e-2


# --- soft-cap vs Gemma2Attention -------------------------------------------------------------------

def gemma2_reference(spec):
    from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding

    # query_pre_attn_scalar = head_dim: Gemma 2's scale becomes ours, head_dim ** -0.5
    config = Gemma2Config(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=spec.n_kv_heads or N_HEADS,
        head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, attn_logit_softcapping=spec.attn_softcap,
        attention_bias=spec.attention_bias, attention_dropout=0.0, rope_parameters=rope_parameters(spec),
        layer_types=[layer_type(spec)], num_hidden_layers=1, max_position_embeddings=4096,
        sliding_window=spec.window or None,
    )
    config._attn_implementation = "eager"
    ref, rotary = Gemma2Attention(config, layer_idx=0), Gemma2RotaryEmbedding(config)
    assert ref.sliding_window == (spec.window or None) and rotary.attention_scaling == 1.0
    assert ref.scaling == pytest.approx(HEAD_DIM ** -0.5, rel=1e-12)
    assert ref.attn_logit_softcapping == spec.attn_softcap
    return ref.eval(), rotary


# The named cap (50) barely bends logits of size ~1; a cap of 1.5 bends them hard.
SOFTCAP_CASES = {
    "softcap": VARIANTS["softcap"],
    "softcap1.5+gqa": VARIANTS["softcap"].with_overrides(attn_softcap=1.5, n_kv_heads=2),
    "softcap1.5+bias+linear2": VARIANTS["softcap"].with_overrides(attn_softcap=1.5, attention_bias=True,
                                                                   rope_scaling_factor=2.0),
}


@pytest.mark.parametrize("name", list(SOFTCAP_CASES))
def test_softcap_matches_gemma2(name):
    spec = SOFTCAP_CASES[name]
    ours = build(spec, seed=59)
    ref, rotary = gemma2_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, rotary, seed=61)


def test_gemma2_comparison_sees_the_cap():
    """Negative control: the same weights uncapped are far from Gemma2Attention with a cap of 1.5."""
    spec = SOFTCAP_CASES["softcap1.5+gqa"]
    ours = build(spec.with_overrides(attn_softcap=0.0), seed=59)
    ref, rotary = gemma2_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    y, y_ref = run_both(ours, ref, rotary, 2, 17, 0)[:2]
    assert rel_err(y, y_ref) > 1e-2


# --- the head-wise gate, and everything combined, vs an explicit float64 attention -------------

def explicit_attention(x, params, spec):
    """Float64 causal attention written from the definitions, every option at once (a window and ALiBi
    too). q_proj's rows
    are, head after head, [query (head_dim), gate (head_dim element-wise, 1 head-wise)]."""
    batch, length, _ = x.shape
    n_kv = spec.n_kv_heads or N_HEADS
    gate_dim = {"none": 0, "headwise": 1, "elementwise": HEAD_DIM}[spec.output_gate]

    def proj(name, inp):
        out = inp @ params[f"{name}.weight"].T
        return out + params[f"{name}.bias"] if f"{name}.bias" in params else out

    def rms_norm(t, weight):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * weight

    def rope(t):  # (B, H, T, d); dims (j, j + d/2) rotate as one complex number
        half = HEAD_DIM // 2
        z = torch.complex(t[..., :half], t[..., half:])
        freqs = THETA ** (-2.0 * torch.arange(half, dtype=torch.float64) / HEAD_DIM)
        angles = (torch.arange(length, dtype=torch.float64) / spec.rope_scaling_factor)[:, None] * freqs
        z = z * torch.polar(torch.ones_like(angles), angles)
        return torch.cat((z.real, z.imag), dim=-1)

    q_and_gate = proj("q_proj", x).view(batch, length, N_HEADS, HEAD_DIM + gate_dim)
    q, gate = q_and_gate[..., :HEAD_DIM], q_and_gate[..., HEAD_DIM:]
    k = proj("k_proj", x).view(batch, length, n_kv, HEAD_DIM)
    v = proj("v_proj", x).view(batch, length, n_kv, HEAD_DIM)
    if spec.qk_norm:
        q, k = rms_norm(q, params["q_norm.weight"]), rms_norm(k, params["k_norm.weight"])
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if spec.positions == "rope":
        q, k = rope(q), rope(k)
    query, key = torch.arange(length)[:, None], torch.arange(length)[None]
    visible = (key <= query) & ((key > query - spec.window) if spec.window else True)  # causal, the window
    distance = (query - key).double()
    out = torch.zeros(batch, N_HEADS, length, HEAD_DIM, dtype=torch.float64)
    for h in range(N_HEADS):
        kv = h // (N_HEADS // n_kv)  # consecutive query heads share a key/value head
        logits = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(HEAD_DIM)
        if spec.attn_softcap:
            logits = spec.attn_softcap * torch.tanh(logits / spec.attn_softcap)
        if spec.positions == "alibi":  # Press et al.: head h of H (a power of two) gets slope 2^(-8(h+1)/H)
            logits = logits - 2.0 ** (-8.0 * (h + 1) / N_HEADS) * distance
        weights = torch.exp(logits) * visible
        denominator = weights.sum(-1, keepdim=True)
        if spec.attention_sinks:
            denominator = denominator + torch.exp(params["sinks"][h])
        out[:, h] = (weights / denominator) @ v[:, kv]
    out = out.transpose(1, 2)  # (B, T, H, d)
    if gate_dim:
        out = out * torch.sigmoid(gate)  # (B, T, H, 1) broadcasts over the head's dims
    return proj("o_proj", out.reshape(batch, length, D_MODEL))


EXPLICIT_CASES = {
    "gated_headwise": VARIANTS["gated_headwise"],
    "headwise alone": VARIANTS["baseline"].with_overrides(output_gate="headwise"),
    "elementwise alone": VARIANTS["baseline"].with_overrides(output_gate="elementwise"),
    "gated": VARIANTS["gated"],
    "all: headwise+sinks+softcap2+qknorm+gqa+bias+linear2": VARIANTS["gated_headwise"].with_overrides(
        attention_sinks=True, attn_softcap=2.0, attention_bias=True, rope_scaling_factor=2.0),
    "all: elementwise+sinks+softcap2+mqa": VARIANTS["gated"].with_overrides(
        attention_sinks=True, attn_softcap=2.0, n_kv_heads=1),
}


@pytest.mark.parametrize("name", list(EXPLICIT_CASES))
def test_gates_sinks_and_softcap_match_the_explicit_float64_attention(name):
    assert_matches_explicit_attention(EXPLICIT_CASES[name])


def assert_matches_explicit_attention(spec):
    """Outputs, input and parameter gradients of our module equal explicit_attention's, at SHAPES."""
    ours = build(spec, seed=67)
    gen = torch.Generator().manual_seed(71)
    for batch, length in SHAPES:
        x = torch.randn(batch, length, D_MODEL, generator=gen)
        cotangent = torch.randn(batch, length, D_MODEL, generator=gen)
        x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
        params = {n: p.detach().double().requires_grad_() for n, p in ours.named_parameters()}
        ours.zero_grad()
        y = ours(x_ours)
        y_ref = explicit_attention(x_ref, params, spec)
        (y * cotangent).sum().backward()
        (y_ref * cotangent.double()).sum().backward()
        assert rel_err(y, y_ref) < TOL, f"output {(batch, length)}: {rel_err(y, y_ref):.2e}"
        assert rel_err(x_ours.grad, x_ref.grad) < TOL, f"input grad {(batch, length)}"
        floor = 1e-6 * torch.stack([p.grad.norm() for p in params.values()]).norm()  # as assert_equivalent
        for n, p in ours.named_parameters():
            err = (p.grad.double() - params[n].grad).norm()
            assert err <= TOL * params[n].grad.norm() + floor, f"grad of {n}, {(batch, length)}"


def test_headwise_gate_layout_and_the_explicit_reference_sees_it():
    """One gate row per head, after that head's query rows; zeroing them (gates of 1/2) is seen."""
    spec = VARIANTS["gated_headwise"]
    ours = build(spec, seed=67)
    assert ours.q_proj.out_features == N_HEADS * (HEAD_DIM + 1)
    x = torch.randn(2, 9, D_MODEL, generator=torch.Generator().manual_seed(0))
    params = {n: p.detach().double() for n, p in ours.named_parameters()}
    with torch.no_grad():
        ours.q_proj.weight.view(N_HEADS, HEAD_DIM + 1, D_MODEL)[:, HEAD_DIM] = 0.0
        assert rel_err(ours(x), explicit_attention(x.double(), params, spec)) > 1e-2


# --- refusals, parameter counts, KV cache, shared initialisation -----------------------------------

def test_the_options_are_refused_on_latent_attention_and_bad_values_refused():
    for knob, value in [("output_gate", "elementwise"), ("attention_sinks", "True"), ("attn_softcap", "50")]:
        with pytest.raises(ConfigError, match=rf"--{knob}=\S+: only multi-head attention .* not --attention=lora_small"):
            config_from_values({"attention": "lora_small", knob: value})
    with pytest.raises(ConfigError, match=r"--output_gate=sigmoid: allowed: none, headwise, elementwise"):
        config_from_values({"attention": "baseline", "output_gate": "sigmoid"})
    with pytest.raises(ConfigError, match=r"--attn_softcap=-1.0: must be 0 or greater"):
        config_from_values({"attention": "baseline", "attn_softcap": "-1"})
    spec = config_from_values({"attention": "gqa", "output_gate": "headwise", "attention_sinks": "True",
                               "attn_softcap": "30"}).attention_spec()  # they combine with GQA
    assert (spec.output_gate, spec.attention_sinks, spec.attn_softcap, spec.n_kv_heads) == ("headwise", True, 30.0, 2)


# At the seed's size, by hand: q_proj 512 x (8 heads x (64 + gate width)); k_proj and v_proj
# 512 x (n_kv_heads x 64); o_proj 512 x 512; QK-norm 2 x 64; sinks one per head.
GATE_ATTENTION_PER_LAYER = {
    "gated": 512 * (8 * 128) + 2 * 512 * (2 * 64) + 512 * 512 + 2 * 64,  # 917,632
    "gated_headwise": 512 * (8 * 65) + 2 * 512 * (2 * 64) + 512 * 512 + 2 * 64,  # 659,584
    "sinks": 2 * 512 * 512 + 2 * 512 * (2 * 64) + 8,  # 655,368
    "softcap": 4 * 512 * 512,  # 1,048,576: the cap has no parameters
}


@pytest.mark.parametrize("name", list(GATE_ATTENTION_PER_LAYER))
def test_parameter_counts_by_hand(name):
    counts = count_parameters(meta_model(name, **SEED))
    assert counts["attention"] == 8 * GATE_ATTENTION_PER_LAYER[name]
    baseline = count_parameters(meta_model("baseline", **SEED))
    assert counts["total"] - counts["attention"] == baseline["total"] - baseline["attention"]


# Gates, sinks and the cap change no key or value: the cache is their key/value heads' (by hand,
# 8 layers x K and V x n_kv_heads x 64 x 2 bytes).
KV_CACHE_BYTES = {"gated": 8 * 2 * 2 * 64 * 2, "gated_headwise": 4_096, "sinks": 4_096, "softcap": 16_384}


@pytest.mark.parametrize("name", list(KV_CACHE_BYTES))
def test_kv_cache_is_unchanged_by_gates_sinks_and_caps(name):
    assert kv_cache_bytes_per_token(model_config(name, **SEED)) == KV_CACHE_BYTES[name]
    plain = VARIANTS[name].with_overrides(output_gate="none", attention_sinks=False, attn_softcap=0.0)
    assert kv_cache_bytes_per_token(ModelConfig(attention=plain, **SEED)) == KV_CACHE_BYTES[name]


def test_shared_init_is_equal_with_gates_sinks_and_caps():
    prints = set()
    for name in ["baseline", *GATE_ATTENTION_PER_LAYER]:
        model = MoELM(model_config(name, **SMALL))
        init_weights(model, 5)
        prints.add(shared_parameters_fingerprint(model))
    assert len(prints) == 1
