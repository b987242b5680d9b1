"""The attention modules against independent references, and causality.

- every MLA variant (and a qk_nope_head_dim > 0 case) against `transformers`' DeepseekV3Attention
  (eager, rope_interleave=False, linear RoPE scaling), same weights: outputs and gradients;
- the baseline against `transformers`' LlamaAttention and against an explicit-softmax attention
  written here (complex-number RoPE, float64), with and without linear RoPE scaling;
- grouped-query and multi-query attention (n_kv_heads) against LlamaAttention with
  num_key_value_heads, and QK-norm against Qwen3Attention (q_norm/k_norm), with and without GQA;
- causality of every variant: changing tokens t+1.. never changes outputs at positions <= t.
"""
import math

import pytest
import torch

from attention import VARIANTS, build_attention

D_MODEL, N_HEADS, THETA = 512, 8, 10000.0  # the seed's size: the reference sees the real dims
SHAPES = [(1, 1), (2, 17), (3, 32)]  # (batch, length)
TOL = 1e-5  # relative error, float32

# (qk_rope_head_dim 0, e.g. mla_norope: the reference needs empty cos/sin, tests/test_attention_zoo_windows.py)
# Specs resolved at the seed's size (variants' sizes are relative to the model), so the reference's
# config gets the integers our module is built with.
MLA_CASES = {name: spec.resolved(D_MODEL, N_HEADS) for name, spec in VARIANTS.items()
             if spec.is_latent and spec.qk_rope_head_dim != 0}
# The seed's named variants have qk_nope_head_dim = 0; these exercise the non-rotary query/key path
# (low-rank and full-rank query, with and without scaling and bias).
MLA_CASES["lora_medium+nope16"] = VARIANTS["lora_medium"].with_overrides(qk_nope_head_dim=16).resolved(D_MODEL, N_HEADS)
MLA_CASES["rope_only+nope16"] = VARIANTS["rope_only"].with_overrides(qk_nope_head_dim=16).resolved(D_MODEL, N_HEADS)
MLA_CASES["enhanced_small+nope24"] = VARIANTS["enhanced_small"].with_overrides(qk_nope_head_dim=24).resolved(
    D_MODEL, N_HEADS)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights, and norm weights and biases far from their 1/0 init, so a missing or
    misplaced norm or bias shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


def rope_parameters(spec) -> dict:
    if spec.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": THETA}
    assert spec.rope_scaling == "linear"
    return {"rope_type": "linear", "factor": float(spec.rope_scaling_factor), "rope_theta": THETA}


def causal_mask(length: int) -> torch.Tensor:
    """The additive (1, 1, T, T) mask the eager attention paths add to the scores."""
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def run_both(ours, ref, rotary, batch, length, seed):
    """Same input through both; outputs and gradients (input and every parameter) of both."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, D_MODEL, generator=gen)
    cotangent = torch.randn(batch, length, ours.o_proj.out_features, generator=gen)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours.zero_grad(), ref.zero_grad()

    y_ours = ours(x_ours)
    position_ids = torch.arange(length)[None].expand(batch, -1)
    cos, sin = rotary(x_ref, position_ids)
    y_ref, _ = ref(x_ref, (cos, sin), causal_mask(length))
    (y_ours * cotangent).sum().backward()
    (y_ref * cotangent).sum().backward()
    grads_ours = {n: p.grad for n, p in ours.named_parameters()}
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    return y_ours, y_ref, x_ours.grad, x_ref.grad, grads_ours, grads_ref


def assert_equivalent(ours, ref, rotary, seed=0):
    for i, (batch, length) in enumerate(SHAPES):
        y, y_ref, gx, gx_ref, grads, grads_ref = run_both(ours, ref, rotary, batch, length, seed + i)
        assert y.shape == y_ref.shape == (batch, length, D_MODEL)
        assert rel_err(y, y_ref) < TOL, f"output, shape {(batch, length)}: {rel_err(y, y_ref):.2e}"
        assert rel_err(gx, gx_ref) < TOL, f"input grad, shape {(batch, length)}: {rel_err(gx, gx_ref):.2e}"
        assert grads.keys() == grads_ref.keys()
        # Relative to each gradient, with a floor relative to all of them: at length 1 the softmax
        # over a single key passes no gradient to the query, exactly 0 in the reference and
        # rounding noise (~1e-8 of the total) in the fused kernel.
        floor = 1e-6 * torch.stack([g.double().norm() for g in grads_ref.values()]).norm()
        for name in grads:
            err = (grads[name].double() - grads_ref[name].double()).norm()
            assert err <= TOL * grads_ref[name].double().norm() + floor, \
                f"grad of {name}, shape {(batch, length)}: {rel_err(grads[name], grads_ref[name]):.2e}"


# --- MLA vs transformers' DeepseekV3Attention ----------------------------------------------------

def deepseek_reference(spec):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention,
                                                                      DeepseekV3RotaryEmbedding)

    config = DeepseekV3Config(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
        q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
        qk_rope_head_dim=spec.qk_rope_head_dim, qk_nope_head_dim=spec.qk_nope_head_dim,
        v_head_dim=spec.v_head_dim, attention_bias=spec.attention_bias, attention_dropout=0.0,
        rms_norm_eps=1e-6, rope_interleave=False, rope_parameters=rope_parameters(spec),
        max_position_embeddings=4096,
    )
    config._attn_implementation = "eager"
    ref, rotary = DeepseekV3Attention(config, layer_idx=0), DeepseekV3RotaryEmbedding(config)
    # The reference must really be configured as we think: its RoPE type, no cos/sin scaling, and
    # a softmax scale of 1/sqrt(qk_head_dim) (it applies YaRN's mscale only for yarn configs).
    assert config._attn_implementation == "eager"
    assert rotary.rope_type == ("linear" if spec.rope_scaling else "default")
    assert rotary.attention_scaling == 1.0
    assert ref.scaling == pytest.approx((spec.qk_nope_head_dim + spec.qk_rope_head_dim) ** -0.5, rel=1e-12)
    return ref.eval(), rotary


def ours_and_reference(spec, seed=0):
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed)
    ref, rotary = deepseek_reference(spec)
    # Same names, same shapes, nothing extra on either side.
    ours_shapes = {n: tuple(p.shape) for n, p in ours.state_dict().items()}
    ref_shapes = {n: tuple(p.shape) for n, p in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref, rotary


@pytest.mark.parametrize("name", list(MLA_CASES))
def test_mla_matches_deepseek_v3(name):
    spec = MLA_CASES[name]
    ours, ref, rotary = ours_and_reference(spec, seed=hash(name) % 1000)
    assert_equivalent(ours, ref, rotary, seed=17)


def test_mla_comparison_catches_a_wrong_rope_factor():
    """Negative control: the comparison is sharp enough to see a RoPE scaling mismatch."""
    spec = MLA_CASES["rope_only"]  # linear factor 2.0
    ours, _, _ = ours_and_reference(spec.with_overrides(rope_scaling_factor=1.0))
    ref, rotary = deepseek_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    y, y_ref, *_ = run_both(ours, ref, rotary, 2, 33, seed=3)
    assert rel_err(y, y_ref) > 1e-3


def test_mla_parameter_layout():
    """Bias only on q_a_proj, kv_a_proj_with_mqa and o_proj; q_proj xor the low-rank pair."""
    for spec in (VARIANTS["enhanced_medium"], VARIANTS["bias_only"], VARIANTS["lora_small"]):
        names = set(dict(build_attention(spec, D_MODEL, N_HEADS).named_parameters()))
        biases = {n for n in names if n.endswith(".bias")}
        expected_biases = {"kv_a_proj_with_mqa.bias", "o_proj.bias"}
        if spec.q_lora_rank is not None:
            expected_biases.add("q_a_proj.bias")
        assert biases == (expected_biases if spec.attention_bias else set()), spec.name
        low_rank_q = {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"}
        if spec.q_lora_rank is None:
            assert "q_proj.weight" in names and not names & low_rank_q
        else:
            assert low_rank_q <= names and "q_proj.weight" not in names


# --- the baseline vs LlamaAttention and an explicit implementation ------------------------------

BASELINE_CASES = {
    "baseline": VARIANTS["baseline"],
    "baseline+linear2.5": VARIANTS["baseline"].with_overrides(rope_scaling_factor=2.5),
    "baseline+bias": VARIANTS["baseline"].with_overrides(attention_bias=True),
}


def llama_reference(spec):
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=spec.n_kv_heads or N_HEADS,
        head_dim=D_MODEL // N_HEADS, attention_bias=spec.attention_bias, attention_dropout=0.0,
        rope_parameters=rope_parameters(spec), max_position_embeddings=4096,
    )
    config._attn_implementation = "eager"
    ref, rotary = LlamaAttention(config, layer_idx=0), LlamaRotaryEmbedding(config)
    assert rotary.rope_type == ("linear" if spec.rope_scaling else "default")
    assert rotary.attention_scaling == 1.0
    return ref.eval(), rotary


@pytest.mark.parametrize("name", list(BASELINE_CASES))
def test_baseline_matches_llama(name):
    spec = BASELINE_CASES[name]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=5)
    ref, rotary = llama_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, rotary, seed=23)


# Grouped-query (4 and 2 query heads per key/value head) and multi-query, with scaling and bias.
GQA_CASES = {
    "gqa": VARIANTS["gqa"],
    "mqa": VARIANTS["mqa"],
    "baseline+kv4+linear2+bias": VARIANTS["baseline"].with_overrides(n_kv_heads=4, rope_scaling_factor=2.0,
                                                                      attention_bias=True),
}


@pytest.mark.parametrize("name", list(GQA_CASES))
def test_grouped_query_matches_llama(name):
    spec = GQA_CASES[name]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    assert ours.k_proj.out_features == spec.n_kv_heads * (D_MODEL // N_HEADS)  # really fewer key/value heads
    randomize_(ours, seed=13)
    ref, rotary = llama_reference(spec)
    assert ref.num_key_value_groups == N_HEADS // spec.n_kv_heads
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_equivalent(ours, ref, rotary, seed=29)


def qwen3_reference(spec):
    from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    config = Qwen3Config(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=spec.n_kv_heads or N_HEADS,
        head_dim=D_MODEL // N_HEADS, attention_bias=spec.attention_bias, attention_dropout=0.0,
        rms_norm_eps=1e-6, rope_parameters=rope_parameters(spec), max_position_embeddings=4096,
        use_sliding_window=False,
    )
    config._attn_implementation = "eager"
    ref, rotary = Qwen3Attention(config, layer_idx=0), Qwen3RotaryEmbedding(config)
    assert ref.sliding_window is None and rotary.attention_scaling == 1.0
    return ref.eval(), rotary


QK_NORM_CASES = {
    "qknorm": VARIANTS["qknorm"],
    "qknorm_gqa": VARIANTS["qknorm_gqa"],
    "qknorm+mqa+linear1.5+bias": VARIANTS["qknorm"].with_overrides(n_kv_heads=1, rope_scaling_factor=1.5,
                                                                    attention_bias=True),
}


@pytest.mark.parametrize("name", list(QK_NORM_CASES))
def test_qk_norm_matches_qwen3(name):
    spec = QK_NORM_CASES[name]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=17)  # norm weights away from 1: a misplaced norm shows
    ref, rotary = qwen3_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert {"q_norm.weight", "k_norm.weight"} <= set(dict(ours.named_parameters()))
    assert_equivalent(ours, ref, rotary, seed=31)


def test_qk_norm_reference_sees_the_norm():
    """Negative control: the same weights without QK-norm differ from Qwen3Attention by far."""
    spec = VARIANTS["qknorm"]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=17)
    ref, rotary = qwen3_reference(spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    plain = build_attention(VARIANTS["baseline"], D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "norm" not in k})
    y, y_ref = run_both(plain, ref, rotary, 2, 9, 0)[:2]
    assert rel_err(y, y_ref) > 1e-2


def explicit_mha(x, weights, n_heads, theta, factor, bias=None, with_probs=False):
    """Float64 causal multi-head attention with an explicit softmax (with_probs: and its (B, H, T, T)
    attention probabilities). RoPE in the rotate-half layout
    written as complex rotation: dims (j, j + d/2) form the complex number x_j + i x_{j+d/2},
    multiplied by exp(i * (position / factor) * theta^(-2j/d))."""
    x = x.double()
    batch, length, d_model = x.shape
    head = d_model // n_heads
    bias = bias or {}

    def proj(name, inp):
        out = inp @ weights[name].double().T
        return out + bias[name].double() if name in bias else out

    def heads(t):
        return t.view(batch, length, n_heads, head).transpose(1, 2)  # (B, H, T, d)

    def rope(t):
        half = head // 2
        z = torch.complex(t[..., :half], t[..., half:])
        freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head)
        angles = (torch.arange(length, dtype=torch.float64) / factor)[:, None] * freqs[None, :]
        z = z * torch.polar(torch.ones_like(angles), angles)
        return torch.cat((z.real, z.imag), dim=-1)

    q, k, v = rope(heads(proj("q_proj", x))), rope(heads(proj("k_proj", x))), heads(proj("v_proj", x))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, d_model)
    return (proj("o_proj", out), probs) if with_probs else proj("o_proj", out)


@pytest.mark.parametrize("name", list(BASELINE_CASES))
def test_baseline_matches_explicit_softmax(name):
    spec = BASELINE_CASES[name]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=9)
    weights = {n.rsplit(".", 1)[0]: p.detach() for n, p in ours.named_parameters() if n.endswith(".weight")}
    bias = {n.rsplit(".", 1)[0]: p.detach() for n, p in ours.named_parameters() if n.endswith(".bias")}
    assert set(weights) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    gen = torch.Generator().manual_seed(11)
    for batch, length in SHAPES:
        x = torch.randn(batch, length, D_MODEL, generator=gen)
        with torch.no_grad():
            y = ours(x)
        expected = explicit_mha(x, weights, N_HEADS, THETA, spec.rope_scaling_factor, bias)
        assert rel_err(y, expected) < TOL, f"{(batch, length)}: {rel_err(y, expected):.2e}"


def test_explicit_reference_sees_rope_scaling():
    """Negative control for the explicit reference: a factor of 2 vs none is a large difference."""
    ours = build_attention(VARIANTS["baseline"], D_MODEL, N_HEADS).eval()
    randomize_(ours, seed=1)
    weights = {n.rsplit(".", 1)[0]: p.detach() for n, p in ours.named_parameters()}
    x = torch.randn(1, 24, D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = ours(x)
    assert rel_err(y, explicit_mha(x, weights, N_HEADS, THETA, 2.0)) > 1e-3


# --- causality ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_attention_is_causal(name):
    d_model, n_heads, length = 64, 4, 12
    # max_len: a window that is a quarter of the context is 3 of these 12 tokens
    module = build_attention(VARIANTS[name], d_model, n_heads, dropout=0.0, max_len=length).eval()
    randomize_(module, seed=2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, length, d_model, generator=gen)
    with torch.no_grad():
        y = module(x)
        for t in (0, 4, length - 2):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn(2, length - t - 1, d_model, generator=gen)
            y_changed = module(changed)
            torch.testing.assert_close(y_changed[:, :t + 1], y[:, :t + 1], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(y_changed[:, t + 1:], y[:, t + 1:], atol=1e-3)  # the change did land


@pytest.mark.parametrize("name", ["baseline", "rope_only"])
def test_inference_mode_forward_does_not_break_training(name):
    """Evaluating under torch.inference_mode() (the usual eval/benchmark idiom) before training must
    not poison the module: the RoPE cos/sin tables cached by the first call would be inference
    tensors, which autograd refuses to save for backward."""
    module = build_attention(VARIANTS[name], 64, 4, dropout=0.0)
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = module(x)
    out = module(x)  # same length: served from the cache
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected.clone())
    assert all(p.grad is not None for p in module.parameters())
