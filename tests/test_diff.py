"""Differential attention (attention/diff.py) against transformers 5.24's DiffLlamaAttention.

- weights copied (the state dicts have the same keys and shapes), random lambda vectors: outputs,
  the input's gradient and every parameter's gradient agree in float32 (rel < TOL) on a few sizes,
  with multi-head and grouped-query heads, with and without bias, at several layer indices, against
  both the reference's eager and its SDPA attention;
- negative controls: a lambda_init one layer off, and Microsoft's adjacent head pairing in place of
  transformers', each fail that same comparison;
- attention dropout (which the reference refuses) drops entries of each softmax map, one mask for
  both halves of a pair's value, and is off in eval;
- prefill + one-token decode equals the full forward; the init declaration and the costs;
- bench's comparison with the reference on the registry's variant, and what the registry refuses.
"""
import math
import types

import pytest
import torch

from attention import VARIANTS
from attention.diff import LAMBDA_STD, DifferentialAttention, lambda_init
from attention.init import Constant, Normal
from reference_check import assert_bench_compares_with_the_reference, relative_errors
from test_attention import TOL, randomize_

THETA = 10000.0
LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def build(d_model, n_heads, n_kv_heads, layer_idx, bias=False, dropout=0.0, seed=0):
    spec = VARIANTS["baseline"].with_overrides(n_kv_heads=n_kv_heads, attention_bias=bias)
    ours = DifferentialAttention(spec, d_model, n_heads, dropout, THETA, layer=layer_idx, n_layers=8)
    randomize_(ours, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # lambda far enough from lambda_init that its learned part shows
        for name in LAMBDAS:
            getattr(ours, name).copy_(0.3 * torch.randn(ours.head_dim, generator=gen))
    return ours


def reference(d_model, n_heads, n_kv_heads, layer_idx, bias=False, implementation="eager"):
    """The module's own reference_attention (what bench/ times), on the attention path asked for."""
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaRotaryEmbedding

    spec = VARIANTS["baseline"].with_overrides(n_kv_heads=n_kv_heads, attention_bias=bias)
    ref, _ = DifferentialAttention.reference_attention(spec, d_model, n_heads, 0.0, THETA, layer_idx, 8)
    ref.config._attn_implementation = implementation
    rotary = DiffLlamaRotaryEmbedding(ref.config)
    assert rotary.attention_scaling == 1.0 and ref.head_dim == d_model // n_heads
    assert ref.lambda_init == pytest.approx(lambda_init(layer_idx), rel=1e-12)
    return ref.eval(), rotary


def run_reference(rotary, implementation):
    def run(ref, x):
        batch, length, _ = x.shape
        position_embeddings = rotary(x, torch.arange(length)[None].expand(batch, -1))
        # eager adds the mask to the scores; SDPA without a mask is causal by itself
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None] if implementation == "eager" else None
        return ref(x, position_embeddings, mask)[0]
    return run


def run_ours(ours, x):
    return ours(x)


def errors_against_reference(ours, layer_idx, implementation, batch, length, seed=0):
    d_model, n_heads, n_kv_heads = ours.q_proj.in_features, ours.n_heads, ours.n_kv_heads
    ref, rotary = reference(d_model, n_heads, n_kv_heads, layer_idx, ours.o_proj.bias is not None, implementation)
    assert {n: p.shape for n, p in ours.state_dict().items()} == {n: p.shape for n, p in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed))
    return relative_errors(ours.eval(), ref, run_ours, run_reference(rotary, implementation), x, seed)


# (d_model, n_heads, n_kv_heads, bias, layer_idx, the reference's attention)
CASES = [(64, 4, 4, False, 0, "eager"), (64, 4, 2, False, 3, "sdpa"), (128, 8, 4, True, 7, "eager"),
         (128, 8, 2, False, 1, "sdpa"), (512, 8, 8, False, 5, "sdpa")]
SHAPES = [(1, 2), (2, 17), (3, 64)]  # (batch, length); at length 1 the q, k gradients are 0 up to rounding


@pytest.mark.parametrize("case", CASES, ids=lambda c: "d{}_h{}_kv{}_bias{}_layer{}_{}".format(*c))
def test_matches_diffllama_attention(case):
    d_model, n_heads, n_kv_heads, bias, layer_idx, implementation = case
    ours = build(d_model, n_heads, n_kv_heads, layer_idx, bias, seed=layer_idx)
    for batch, length in SHAPES:
        errors = errors_against_reference(ours, layer_idx, implementation, batch, length, seed=length)
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f"{case} shape {(batch, length)}: {worst} off by {errors[worst]:.2e}"


def test_comparison_catches_a_lambda_init_one_layer_off():
    """Negative control: ours built for layer 3, the reference for layer 4 (lambda_init 0.558 vs
    0.619, and the output scale 1 - lambda_init with it)."""
    ours = build(64, 4, 2, layer_idx=3)
    assert errors_against_reference(ours, 3, "eager", 2, 17)["output"] < TOL
    ours.lambda_init = lambda_init(4)  # the planted bug: what a layer index shifted by one would give
    assert errors_against_reference(ours, 3, "eager", 2, 17)["output"] > 1e-2


class AdjacentPairs(DifferentialAttention):
    """The planted bug: Microsoft's pairing (heads 2i and 2i+1) on transformers' weights."""

    def combine(self, out):
        batch, length, heads, dims = out.shape
        pairs = out.view(batch, length, heads // 2, 2, dims)
        diff = pairs[:, :, :, 0] - self.lambda_full(out.dtype) * pairs[:, :, :, 1]
        diff = (1 - self.lambda_init) * torch.nn.functional.rms_norm(diff, (dims,), eps=1e-5)
        return self.o_proj(diff.flatten(2))


def test_comparison_catches_the_adjacent_head_pairing():
    ours = build(64, 4, 4, layer_idx=2)
    wrong = AdjacentPairs(VARIANTS["baseline"], 64, 4, 0.0, THETA, layer=2)
    wrong.load_state_dict(ours.state_dict())
    assert errors_against_reference(ours, 2, "sdpa", 2, 17)["output"] < TOL
    assert errors_against_reference(wrong, 2, "sdpa", 2, 17)["output"] > 1e-2


def test_attention_dropout_drops_each_softmax_map_with_one_mask_per_pair_value():
    """With one token a head's softmax map is the single weight 1, so each query head's output is
    (its dropout mask m in {0, 1/(1-p)}) x its pair's 2d-dim value: the same m on both value halves.
    Both values of m occur (dropout is on, per head, per sequence), none in eval."""
    p = 0.5
    ours = build(64, 4, 2, layer_idx=1, dropout=p).train()
    x = torch.randn(256, 1, 64, generator=torch.Generator().manual_seed(0))
    seen = {}
    original_combine = ours.combine

    def recording_combine(out):  # keep the per-head outputs before the pairs are combined
        seen["out"] = out
        return original_combine(out)

    ours.combine = recording_combine
    torch.manual_seed(0)
    ours(x)
    out = seen["out"]  # (B, 1, H, 2d)
    _, _, v_pairs = ours.project(x)  # (B, H_kv/2, 1, 2d)
    group = ours.n_heads // ours.n_kv_heads
    pair_of_head = torch.tensor([(head // group) % (ours.n_kv_heads // 2) for head in range(ours.n_heads)])
    value = v_pairs[:, pair_of_head, 0]  # (B, H, 2d): each query head's pair value
    scale = (out[:, 0] * value).sum(-1) / (value * value).sum(-1)  # (B, H) least-squares m per head
    assert torch.allclose(out[:, 0], scale.unsqueeze(-1) * value, atol=1e-5), "one mask for both value halves"
    kept = torch.isclose(scale, torch.tensor(1 / (1 - p)), atol=1e-4)
    dropped = torch.isclose(scale, torch.tensor(0.0), atol=1e-4)
    assert (kept | dropped).all()
    assert 0.3 < kept.float().mean() < 0.7, "about half the entries kept"
    ours.eval()
    ours(x)
    assert torch.allclose(seen["out"][:, 0], value, atol=1e-5), "no dropout in eval"


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_prefill_and_decode_equal_the_full_forward(n_kv_heads):
    ours = build(64, 4, n_kv_heads, layer_idx=2).eval()
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache(2, 20)
        steps = [ours(x[:, :7], cache)] + [ours(x[:, t:t + 1], cache) for t in range(7, 20)]
    decoded = torch.cat(steps, dim=1)
    assert ((decoded - full).norm() / full.norm()).item() < TOL
    assert cache.length == 20


def test_decode_check_can_fail():
    """Negative control for the decode test: a step that reads the cached values in the wrong pair
    order is caught by the same comparison."""
    ours = build(64, 4, 2, layer_idx=2).eval()
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache(1, 9)
        ours(x[:, :8], cache)
        cache.buffers["v"] = cache.buffers["v"].flip(-1)  # the planted bug: value halves swapped
        last = ours(x[:, 8:], cache)
    assert ((last - full[:, 8:]).norm() / full[:, 8:].norm()).item() > 1e-2


def test_parameter_init_declares_every_parameter():
    for bias in (False, True):
        ours = build(64, 4, 2, layer_idx=0, bias=bias)
        init = ours.parameter_init(0.02, 0.005)
        assert set(init) == {name for name, _ in ours.named_parameters()}
        assert all(init[name] == Normal(LAMBDA_STD) == Normal(0.1) for name in LAMBDAS)
        assert init["o_proj.weight"] == Normal(0.005) and init["q_proj.weight"] == Normal(0.02)
        assert all(init[name] == Constant(0.0) for name in init if name.endswith(".bias"))


def test_lambda_init_by_hand():
    assert lambda_init(0) == pytest.approx(0.2)
    assert lambda_init(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init(30) == pytest.approx(0.8, abs=1e-4)


def test_costs():
    """The cache is exactly new_cache's tensors; FLOPs by hand at d_model 64, 4 heads of 16 dims, 64
    keys: 2 x 64 keys x 4 heads x (16 score dims + 32 pair value dims) = 24576."""
    ours = build(64, 4, 2, layer_idx=0)
    size = ours.cache_size(100)
    assert size.values == 100 * 2 * 2 * 16  # per token: 2 kv heads' keys + 1 pair value of 32 dims
    assert ours.new_cache(1, 100, dtype=torch.bfloat16).nbytes == 2 * size.values
    assert ours.token_mixing_flops(64) == 24576


def test_bench_compares_it_with_its_reference():
    """bench/ times the "diff" variant against the model with every layer its reference (weights copied);
    the kind contract itself is tests/test_kind_contract.py's, over every kind in KINDS."""
    assert_bench_compares_with_the_reference("diff")


@pytest.mark.parametrize("n_kv_heads", [3, 1])
def test_refuses_heads_that_do_not_pair(n_kv_heads):
    spec = types.SimpleNamespace(n_kv_heads=n_kv_heads, attention_bias=False, rope_scaling=None,
                                 rope_scaling_factor=1.0)
    with pytest.raises(ValueError, match="must be even"):
        DifferentialAttention(spec, 48, 6 if n_kv_heads == 3 else 4, 0.0, THETA)


@pytest.mark.parametrize("values,match", [
    ({"n_kv_heads": "1"}, r"--n_kv_heads=1: differential attention pairs heads, so it must be even"),
    ({"n_kv_heads": "3", "n_heads": "6", "d_model": "96"}, r"--n_kv_heads=3: .* must be even"),
    ({"n_kv_heads": "4", "n_heads": "6", "d_model": "96"}, r"--n_heads=6 must divide by it"),
    ({"qk_norm": "True"}, r"--qk_norm=True: only multi-head attention .* variants have it"),
])
def test_the_registry_refuses_heads_that_do_not_pair(values, match):
    """The registry entry's refusal, as the command line meets it (one line, before a model is built)."""
    from config import ConfigError, config_from_values

    assert config_from_values({"attention": "diff", "n_kv_heads": "2"}).attention_spec().n_kv_heads == 2
    with pytest.raises(ConfigError, match=match):
        config_from_values({"attention": "diff", **values})
