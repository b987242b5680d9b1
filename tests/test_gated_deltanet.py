"""Gated DeltaNet (attention/gated_deltanet.py) against transformers' Qwen3NextGatedDeltaNet on its
torch path.

- the reference really runs its torch fallbacks: neither fla nor causal-conv1d (nor hub kernels) is
  installed, each of the four functions its forward calls resolved to the torch implementation it
  wraps, and its forward does call them;
- weights copied (same state-dict keys and shapes), outputs, the input's gradient and every
  parameter's gradient agree in float32 (rel < TOL): Qwen3-Next's proportions (2 value heads per
  key head) and other sizes (no grouping, d_k != d_v, kernel 3), lengths inside one chunk, exactly
  one, and several with padding;
- negative controls: a convolution padded on both sides (it sees the future), and the gated norm
  without its SiLU(z) gate, each fail that same comparison;
- prefill + decode (one token at a time, and chunks from a state) equals the full forward, with a
  state whose size does not depend on the context; the init declaration and the costs;
- bench's comparison with the reference on the registry's variant, and what the registry refuses.
"""
import importlib.util
import inspect
import types

import pytest
import torch
import torch.nn.functional as F

from attention import VARIANTS
from attention.gated_deltanet import CHUNK_SIZE, GatedDeltaNet, GatedDeltaNetSizes, GatedRMSNorm
from attention.init import Constant, Drawn, Normal
from reference_check import assert_bench_compares_with_the_reference, relative_errors
from test_attention import TOL, randomize_

TORCH_PATH = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
              "causal_conv1d_update")


def qwen3_next():
    import transformers.models.qwen3_next.modeling_qwen3_next as module
    return module


def sizes_spec(**sizes):
    """A spec with the kind's own knobs (the registry entry will declare them)."""
    return types.SimpleNamespace(**{f"linear_{name}": value for name, value in sizes.items()})


def build(d_model, n_heads, spec=None, seed=0, cls=GatedDeltaNet):
    ours = cls(spec or VARIANTS["baseline"], d_model, n_heads, 0.0, 10000.0, layer=0, n_layers=2)
    # A_log as transformers draws it (decay rates from slow to fast), dt_bias around 0
    randomize_(ours, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        ours.A_log.copy_(torch.empty(ours.num_v_heads).uniform_(0.01, 16, generator=gen).log())
        ours.dt_bias.copy_(torch.randn(ours.num_v_heads, generator=gen))
    return ours


def reference(ours):
    """The module's own reference_attention (what bench/ times) at our sizes, our weights copied in."""
    spec = sizes_spec(num_key_heads=ours.num_k_heads, num_value_heads=ours.num_v_heads, key_head_dim=ours.head_k_dim,
                      value_head_dim=ours.head_v_dim, conv_kernel_dim=ours.conv_kernel_size)
    ref, _ = GatedDeltaNet.reference_attention(spec, ours.in_proj_qkvz.in_features, ours.num_v_heads, 0.0, 10000.0,
                                               layer=0, n_layers=2)
    assert ref.layer_type == "linear_attention" and ref.activation == "silu"
    assert {n: p.shape for n, p in ours.state_dict().items()} == {n: p.shape for n, p in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref


def errors_against_reference(ours, batch, length, seed=0):
    ref = reference(ours)
    x = torch.randn(batch, length, ours.in_proj_qkvz.in_features, generator=torch.Generator().manual_seed(seed))
    return relative_errors(ours, ref, lambda m, x: m(x), lambda m, x: m(x), x, seed)


def test_the_reference_takes_its_torch_path(monkeypatch):
    """What transformers would swap in for its torch code is absent, and each function the
    reference's forward calls is the torch fallback it wraps (`implementation` is the wrapped torch
    function); a spy shows the forward calls the chunked rule and the conv through them."""
    for package in ("fla", "causal_conv1d", "kernels"):
        assert importlib.util.find_spec(package) is None, f"{package} installed: the reference would not be torch"
    module = qwen3_next()
    for name in TORCH_PATH:
        wrapper = getattr(module, name)
        bound = inspect.getclosurevars(wrapper).nonlocals
        assert bound["is_new_implementation"] is False, name
        assert bound["implementation"] is wrapper.__wrapped__ is bound["torch_function"], name
        assert wrapper.__wrapped__.__name__ == name
    calls = []
    for name in ("torch_chunk_gated_delta_rule", "causal_conv1d_fn"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ours = build(64, 4)
    reference(ours)(torch.randn(1, 5, 64))
    assert calls == ["causal_conv1d_fn", "torch_chunk_gated_delta_rule"]


CASES = {
    "qwen3next_shape": (64, 4, None),  # defaults: 2 key heads, 4 value heads of 16 dims, kernel 4
    "ungrouped_dk24_dv40_kernel3": (96, 4, sizes_spec(num_key_heads=3, num_value_heads=3, key_head_dim=24,
                                                      value_head_dim=40, conv_kernel_dim=3)),
    "grouped4": (128, 8, sizes_spec(num_key_heads=2, num_value_heads=8)),
}
LENGTHS = [1, 17, CHUNK_SIZE, 2 * CHUNK_SIZE + 3]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_qwen3next_gated_deltanet(name):
    d_model, n_heads, spec = CASES[name]
    ours = build(d_model, n_heads, spec, seed=len(name))
    for length in LENGTHS:
        errors = errors_against_reference(ours, 2, length, seed=length)
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f"{name} length {length}: {worst} off by {errors[worst]:.2e}"


class ConvSeesTheFuture(GatedDeltaNet):
    """The planted bug: the short convolution padded on both sides and centred (non-causal)."""

    def short_conv(self, mixed, state):
        pad = self.conv_kernel_size - 1
        out = self.conv1d(F.pad(mixed, (pad // 2, pad - pad // 2)))
        return F.silu(out), mixed[..., -pad:]


class UngatedNorm(GatedRMSNorm):
    def forward(self, x, z):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class NoGate(GatedDeltaNet):
    """The planted bug: the gated RMSNorm without its SiLU(z) gate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm.__class__ = UngatedNorm


@pytest.mark.parametrize("bug", [ConvSeesTheFuture, NoGate])
def test_comparison_catches_a_planted_bug(bug):
    right, wrong = build(64, 4, seed=3), build(64, 4, seed=3, cls=bug)
    assert errors_against_reference(right, 2, 17)["output"] < TOL
    assert errors_against_reference(wrong, 2, 17)["output"] > 1e-2


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_decode_equal_the_full_forward(name):
    d_model, n_heads, spec = CASES[name]
    ours = build(d_model, n_heads, spec, seed=5).eval()
    x = torch.randn(2, 90, d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours(x)
        state = ours.new_cache(2, 90)
        size = state.nbytes
        # a prompt, single tokens, then a chunk from the state (70 tokens: two chunks, padded)
        pieces = [ours(x[:, :13], state)] + [ours(x[:, t:t + 1], state) for t in range(13, 20)] + [ours(x[:, 20:], state)]
    decoded = torch.cat(pieces, dim=1)
    assert ((decoded - full).norm() / full.norm()).item() < TOL
    assert state.length == 90 and state.nbytes == size == ours.new_cache(2, 10_000).nbytes


def test_decode_check_can_fail():
    """Negative control for the decode test: a step that forgets the conv state is caught."""
    ours = build(64, 4, seed=6).eval()
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(x)
        state = ours.new_cache(1, 9)
        ours(x[:, :8], state)
        state.conv.zero_()  # the planted bug
        last = ours(x[:, 8:], state)
    assert ((last - full[:, 8:]).norm() / full[:, 8:].norm()).item() > 1e-2


def test_parameter_init_declares_every_parameter():
    ours = build(64, 4)
    init = ours.parameter_init(0.02, 0.005)
    assert set(init) == {name for name, _ in ours.named_parameters()}
    assert init["out_proj.weight"] == Normal(0.005)
    assert init["in_proj_qkvz.weight"] == init["in_proj_ba.weight"] == init["conv1d.weight"] == Normal(0.02)
    assert init["dt_bias"] == init["norm.weight"] == Constant(1.0)
    assert isinstance(init["A_log"], Drawn)
    a_log = init["A_log"].draw((10_000,), torch.Generator().manual_seed(0))
    assert a_log.min() >= torch.log(torch.tensor(0.01)) and a_log.max() <= torch.log(torch.tensor(16.0))
    assert a_log.exp().mean().item() == pytest.approx((0.01 + 16) / 2, rel=0.02)  # uniform on [0.01, 16]


def test_default_sizes_match_multi_head_attention_weights():
    """Qwen3-Next's proportions at the model's size: in_proj_qkvz + out_proj hold 4 d_model^2, as
    q, k, v, o of multi-head attention."""
    sizes = GatedDeltaNetSizes.of(VARIANTS["baseline"], 512, 8)
    assert (sizes.num_k_heads, sizes.num_v_heads, sizes.head_k_dim, sizes.head_v_dim) == (4, 8, 64, 64)
    ours = GatedDeltaNet(VARIANTS["baseline"], 512, 8, 0.0, 10000.0)
    assert ours.in_proj_qkvz.weight.numel() + ours.out_proj.weight.numel() == 4 * 512 ** 2


def test_costs():
    """The state is exactly new_cache's tensors and fixed; FLOPs by hand at d_model 64, 4 heads:
    2 key heads and 4 value heads of 16 dims, kernel 4: conv 128 channels x 4 taps = 512; delta rule
    2 key heads x (2 x 64 x 16) + 4 value heads x (64 x 32 / 2 + 64 x 16 + 3 x 16 x 16) = 4096 + 11264;
    x 2 FLOPs a multiply-add."""
    ours = build(64, 4)
    for context in (1, 512, 8192):
        size = ours.cache_size(context)
        assert (size.per_token, size.values) == (0, 128 * 3 + 4 * 16 * 16)
        assert ours.new_cache(1, context, dtype=torch.bfloat16).nbytes == 2 * size.values
        assert ours.token_mixing_flops(context) == 2 * (512 + 4096 + 11264)
    projections = sum(p.numel() for p in ours.parameters() if p.dim() == 2)  # what the model counts itself
    assert projections == 64 * (64 + 128 + 8) + 64 * 64


def test_bench_compares_it_with_its_reference():
    """bench/ times the "gated_deltanet" variant against the model with every layer its reference (weights copied);
    the kind contract itself is tests/test_kind_contract.py's, over every kind in KINDS."""
    assert_bench_compares_with_the_reference("gated_deltanet")


def test_refuses_value_heads_that_key_heads_do_not_divide():
    with pytest.raises(ValueError, match="must divide"):
        GatedDeltaNet(sizes_spec(num_key_heads=3, num_value_heads=4), 64, 4, 0.0, 10000.0)


def test_the_registry_resolves_and_refuses_its_sizes():
    """Unset sizes are Qwen3-Next's proportions at the model's size, as the module builds them; the
    command line sets each by transformers' name; bad ones are refused in one line."""
    from config import ConfigError, config_from_values

    spec = config_from_values({"attention": "gated_deltanet", "d_model": "64", "n_heads": "4"}).attention_spec()
    assert spec.knob_values() == dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                      linear_value_head_dim=16, linear_conv_kernel_dim=4)
    assert GatedDeltaNetSizes.of(spec, 64, 4) == GatedDeltaNetSizes.of(VARIANTS["gated_deltanet"], 64, 4)
    set_ = config_from_values({"attention": "gated_deltanet", "linear_num_key_heads": "1", "linear_key_head_dim": "8",
                               "linear_conv_kernel_dim": "3"}).attention_spec()
    ours = GatedDeltaNet(set_, 512, 8, 0.0, 10000.0)
    assert (ours.num_k_heads, ours.num_v_heads, ours.head_k_dim, ours.head_v_dim, ours.conv_kernel_size) == (1, 8, 8, 64, 3)
    for values, match in [({"linear_num_key_heads": "3"}, r"--linear_num_value_heads=8: must divide by "
                                                          r"--linear_num_key_heads=3"),
                          ({"linear_conv_kernel_dim": "0"}, r"--linear_conv_kernel_dim=0: must be greater than 0"),
                          ({"n_kv_heads": "2"}, r"--n_kv_heads=2: only .* variants have it, not --attention=gated_deltanet")]:
        with pytest.raises(ConfigError, match=match):
            config_from_values({"attention": "gated_deltanet", **values})
    with pytest.raises(ConfigError, match=r"--linear_key_head_dim=8: only Gated DeltaNet"):
        config_from_values({"attention": "baseline", "linear_key_head_dim": "8"})
