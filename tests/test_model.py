"""The MoE language model: parameter counts derived by hand, FLOPs by hand, the MoE layer against a
dense reference, the balance loss by hand, causality of the whole model, no dead parameters, and
`train.py --dry_run` for all 13 variants."""
import json
import math
from fractions import Fraction
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model as model_module
import processes
import train
from attention import FAMILIES, VARIANTS
from config import TrainConfig
from model import (LMOutput, MoE, ModelConfig, MoELM, count_parameters, flops_per_token, init_weights,
                   kv_cache_bytes_per_token, shared_parameters_fingerprint)

ROOT = Path(__file__).resolve().parent.parent

# The seed's fast setup (DESIGN.md section 2).
SEED = dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, n_experts=8, top_k=2, vocab_size=49152, seq_len=512)

# DESIGN.md section 3, copied by hand (not read from the registry):
# family, q_lora_rank, kv_lora_rank, qk_rope_head_dim, v_head_dim, attention_bias, rope linear factor.
# None in q_lora_rank: a full-rank q_proj. The baseline row is standard multi-head attention.
TABLE = {
    "baseline": ("baseline", "MHA", "MHA", "MHA", "MHA", False, None),
    "lora_small": ("lora", 32, 64, 64, 64, False, None),
    "lora_medium": ("lora", 64, 128, 64, 64, False, None),
    "lora_large": ("lora", 128, 256, 64, 64, False, None),
    "lora_xl": ("lora", 256, 512, 64, 64, False, None),
    "enhanced_small": ("enhanced", 32, 64, 32, 48, True, 1.5),
    "enhanced_medium": ("enhanced", 64, 128, 64, 96, True, 2.0),
    "enhanced_large": ("enhanced", 128, 256, 128, 192, True, 2.5),
    "enhanced_xl": ("enhanced", 256, 512, 128, 192, True, 3.0),
    "rope_only": ("rope", None, 64, 64, 96, False, 2.0),
    "rope_small": ("rope", None, 64, 32, 48, False, 1.5),
    "rope_large": ("rope", None, 64, 128, 192, False, 2.5),
    "bias_only": ("bias", None, 64, 64, 64, True, None),
}
# The seed report's rounded totals, in millions.
SEED_REPORT_MILLIONS = {"rope_small": 162.6, "lora_small": 162.6, "bias_only": 164.4, "enhanced_medium": 164.7,
                        "rope_only": 165.6, "enhanced_xl": 177.8}


def test_registry_matches_the_design_table():
    """The seed's 13 come first, as DESIGN.md has them at the seed's size; the zoo's variants follow
    (and may grow). Their sizes are relative (attention/registry.py): at the smoke size (d_model 64,
    4 heads of 16 dims) every rank is the table's divided by 8 (d_model 512 -> 64) and every head
    dim divided by 4 (64 -> 16)."""
    assert list(VARIANTS)[:len(TABLE)] == list(TABLE)
    assert {TABLE[name][0] for name in TABLE} <= set(FAMILIES)
    assert {spec.family for spec in VARIANTS.values()} <= set(FAMILIES)
    for name, (family, q, kv, rope, v, bias, factor) in TABLE.items():
        spec = VARIANTS[name]
        assert spec.name == name and spec.family == family
        assert spec.attention_bias is bias
        assert spec.qk_nope_head_dim == 0
        if factor is None:
            assert spec.rope_scaling is None and spec.rope_scaling_factor == 1.0, name
        else:
            assert spec.rope_scaling == "linear" and spec.rope_scaling_factor == factor, name
        if name == "baseline":
            assert not spec.is_latent
            continue
        assert spec.is_latent
        seed, smoke = spec.resolved(512, 8), spec.resolved(64, 4)
        assert (seed.q_lora_rank, seed.kv_lora_rank, seed.qk_rope_head_dim, seed.v_head_dim) == (q, kv, rope, v)
        assert (smoke.q_lora_rank, smoke.kv_lora_rank, smoke.qk_rope_head_dim, smoke.v_head_dim) == (
            q and q // 8, kv // 8, rope // 4, v // 4), name


# --- counting by hand ------------------------------------------------------------------------------

def table_dims(name: str, d: int, heads: int) -> tuple:
    """The table's (q_lora_rank, kv_lora_rank, qk_rope_head_dim, v_head_dim) scaled from the seed's
    size to this one: ranks with d_model (512), head dims with the head dim (64). Integral at the
    sizes these tests use."""
    _, q_lora, kv, rope, v, _, _ = TABLE[name]
    rank, head = Fraction(d, 512), Fraction(d // heads, 64)
    scaled = (q_lora and q_lora * rank, kv * rank, rope * head, v * head)
    assert all(x is None or x.denominator == 1 for x in scaled), (name, d, heads)
    return tuple(x and int(x) for x in scaled)


def attention_counts(name: str, d: int, heads: int, nope: int = 0) -> tuple[int, int]:
    """(parameters, matmul weights) of one attention layer, from the table's dims alone."""
    bias = TABLE[name][5]
    if name == "baseline":
        weights = 4 * d * d  # q_proj, k_proj, v_proj, o_proj: d x d each, no bias
        return weights, weights
    q_lora, kv, rope, v = table_dims(name, d, heads)
    qk = nope + rope
    if q_lora is None:
        q_weights, q_other = d * heads * qk, 0  # q_proj, never a bias
    else:
        # q_a_proj (d -> r, + r bias), q_a_layernorm (r), q_b_proj (r -> heads * qk, no bias)
        q_weights, q_other = d * q_lora + q_lora * heads * qk, q_lora * bias + q_lora
    kv_a_weights, kv_a_bias = d * (kv + rope), (kv + rope) * bias  # kv_a_proj_with_mqa
    kv_norm = kv  # kv_a_layernorm
    kv_b_weights = kv * heads * (nope + v)  # kv_b_proj, no bias
    o_weights, o_bias = heads * v * d, d * bias  # o_proj
    weights = q_weights + kv_a_weights + kv_b_weights + o_weights
    return weights + q_other + kv_a_bias + kv_norm + o_bias, weights


def moe_params(d: int, d_ff: int, n_experts: int) -> int:
    return n_experts * (2 * d * d_ff) + d * n_experts  # experts (up, down; no biases) + router


def total_params(name, d_model, n_layers, n_heads, d_ff, n_experts, vocab_size, nope=0, **_) -> int:
    attention, _ = attention_counts(name, d_model, n_heads, nope)
    layer = attention + moe_params(d_model, d_ff, n_experts) + 2 * d_model  # + two RMSNorms
    return vocab_size * d_model + n_layers * layer + d_model  # tied embedding/head, final norm


def hand_flops(name, d_model, n_layers, n_heads, d_ff, n_experts, top_k, vocab_size, seq_len, nope=0) -> int:
    """6 x matmul weights a token passes through (attention projections, router, top_k experts, tied
    head) + 6 x n_layers x seq_len x n_heads x (qk_head_dim + v_head_dim)."""
    _, attention_weights = attention_counts(name, d_model, n_heads, nope)
    per_layer = attention_weights + d_model * n_experts + top_k * 2 * d_model * d_ff
    if name == "baseline":
        qk = v = d_model // n_heads
    else:
        _, _, rope, v = table_dims(name, d_model, n_heads)
        qk = nope + rope
    return 6 * (n_layers * per_layer + vocab_size * d_model) + 6 * n_layers * seq_len * n_heads * (qk + v)


def model_config(name: str, nope: int = 0, **sizes) -> ModelConfig:
    spec = VARIANTS[name]
    if nope:
        spec = spec.with_overrides(qk_nope_head_dim=nope)
    return ModelConfig(attention=spec, **sizes)


def meta_model(name: str, nope: int = 0, **sizes) -> MoELM:
    with torch.device("meta"):
        return MoELM(model_config(name, nope, **sizes))


def test_baseline_has_exactly_the_seed_count():
    counts = count_parameters(meta_model("baseline", **SEED))
    assert counts["total"] == 167_813_632
    assert counts["attention"] == 8 * 4 * 512 * 512
    # DESIGN.md section 2: embedding 25,165,824 + 8 x 17,830,912 + final norm 512.
    assert 49152 * 512 == 25_165_824
    assert 4 * 512 * 512 + 8 * (2 * 512 * 2048) + 512 * 8 + 2 * 512 == 17_830_912
    assert total_params("baseline", **SEED) == 25_165_824 + 8 * 17_830_912 + 512 == 167_813_632


@pytest.mark.parametrize("name", list(TABLE))
def test_parameter_counts_match_the_hand_derivation(name):
    counts = count_parameters(meta_model(name, **SEED))
    attention, _ = attention_counts(name, SEED["d_model"], SEED["n_heads"])
    assert counts["attention"] == SEED["n_layers"] * attention
    assert counts["total"] == total_params(name, **SEED)
    if name in SEED_REPORT_MILLIONS:
        assert round(counts["total"] / 1e6, 1) == SEED_REPORT_MILLIONS[name]


@pytest.mark.parametrize("name", ["lora_medium", "rope_only", "enhanced_large"])
def test_parameter_counts_with_non_rotary_dims(name):
    counts = count_parameters(meta_model(name, nope=16, **SEED))
    assert counts["total"] == total_params(name, nope=16, **SEED)
    assert counts["total"] > total_params(name, **SEED)


# Grouped-query / multi-query and QK-norm at the seed's size, by hand: q_proj and o_proj 512 x 512;
# k_proj and v_proj 512 x (n_kv_heads x 64); QK-norm adds two 64-wide norm weights.
ZOO_ATTENTION_PER_LAYER = {
    "gqa": 2 * 512 * 512 + 2 * 512 * (2 * 64),  # 655,360
    "mqa": 2 * 512 * 512 + 2 * 512 * 64,  # 589,824
    "qknorm": 4 * 512 * 512 + 2 * 64,  # 1,048,704
    "qknorm_gqa": 2 * 512 * 512 + 2 * 512 * (2 * 64) + 2 * 64,  # 655,488
}


@pytest.mark.parametrize("name", list(ZOO_ATTENTION_PER_LAYER))
def test_zoo_parameter_counts_by_hand(name):
    counts = count_parameters(meta_model(name, **SEED))
    assert counts["attention"] == 8 * ZOO_ATTENTION_PER_LAYER[name]
    baseline = count_parameters(meta_model("baseline", **SEED))
    assert counts["total"] - counts["attention"] == baseline["total"] - baseline["attention"]  # the rest is shared


# --- KV cache per token --------------------------------------------------------------------------

# By hand, at the seed's size (8 layers, 8 heads of 64), 2 bytes a value:
KV_CACHE_BYTES = {
    "baseline": 8 * 2 * 512 * 2,  # K and V of 8 heads x 64 = 16,384
    "gqa": 8 * 2 * (2 * 64) * 2,  # 2 key/value heads: 4,096
    "mqa": 8 * 2 * 64 * 2,  # 1 key/value head: 2,048
    "qknorm": 8 * 2 * 512 * 2,  # QK-norm caches what MHA caches
    "lora_small": 8 * (64 + 64) * 2,  # MLA: latent (kv_lora_rank 64) + shared rotary key (64): 2,048
    "enhanced_xl": 8 * (512 + 128) * 2,  # 10,240
    "rope_large": 8 * (64 + 128) * 2,  # 3,072
}


@pytest.mark.parametrize("name", list(KV_CACHE_BYTES))
def test_kv_cache_bytes_per_token_by_hand(name):
    assert kv_cache_bytes_per_token(model_config(name, **SEED)) == KV_CACHE_BYTES[name]


# Gated DeltaNet's fixed state a layer at the seed's size: 4 key heads and 8 value heads of 64 dims,
# kernel 4: a 64 x 64 matrix per value head, 8 x 4096 = 32,768, plus the conv's last 3 inputs of its
# 2 x 256 + 512 = 1024 channels, 3,072: 35,840 values, 71,680 bytes, whatever the context
GDN_STATE_BYTES = (8 * 64 * 64 + 3 * (2 * 4 * 64 + 8 * 64)) * 2


def test_dry_run_prints_the_kv_cache(capsys):
    for argv, expected in [(["--attention=baseline"], 16_384), (["--attention=baseline", "--n_kv_heads=2"], 4_096),
                           (["--attention=lora_xl"], 8 * (512 + 64) * 2),
                           (["--attention=gated_deltanet"], round(8 * GDN_STATE_BYTES / 512)),
                           # 6 Gated DeltaNet layers, 2 of `gated`'s: K and V of 2 key/value heads of 64
                           (["--attention=hybrid_gdn"], round(6 * GDN_STATE_BYTES / 512) + 2 * 2 * 128 * 2)]:
        assert train.main([*argv, "--vocab_size=49152", "--dry_run"]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["kv_cache_bytes_per_token"] == expected, argv
        assert record["kv_cache_context"] == 512
    # the whole cache of one sequence: a recurrent kind's is its state at any context
    for context in (64, 512, 2048):
        assert train.main(["--attention=gated_deltanet", f"--seq_len={context}", "--vocab_size=49152",
                           "--dry_run"]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["kv_cache_bytes"] == 8 * GDN_STATE_BYTES == 573_440
        assert record["kv_cache_bytes_per_token"] == round(8 * GDN_STATE_BYTES / context)
    assert train.main(["--attention=baseline", "--seq_len=64", "--vocab_size=49152", "--dry_run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kv_cache_bytes"] == 16_384 * 64


# --- FLOPs ---------------------------------------------------------------------------------------

SMALL_FLOPS = dict(d_model=64, n_layers=2, n_heads=4, d_ff=96, n_experts=4, top_k=2, vocab_size=100, seq_len=32)


def test_flops_baseline_small_worked_example():
    # attention 4*64*64 = 16384, router 64*4 = 256, top-2 experts 2*(2*64*96) = 24576: 41216 a layer;
    # x 2 layers = 82432, + head 100*64 = 6400: 88832 weights, x 6 = 532992;
    # scores/values 6 * 2 layers * 32 positions * 4 heads * (16 + 16) = 49152. Total 582144.
    assert flops_per_token(meta_model("baseline", **SMALL_FLOPS)) == 582_144
    assert hand_flops("baseline", **SMALL_FLOPS) == 582_144


FLOPS_CASES = [(name, 0) for name in TABLE] + [(name, 8) for name in ("lora_small", "enhanced_xl", "rope_large")]


@pytest.mark.parametrize("name,nope", FLOPS_CASES)
def test_flops_match_the_hand_count(name, nope):
    assert flops_per_token(meta_model(name, nope=nope, **SMALL_FLOPS)) == hand_flops(name, nope=nope, **SMALL_FLOPS)


@pytest.mark.parametrize("name", ["gqa", "mqa", "qknorm_gqa"])
def test_flops_of_grouped_query_by_hand(name):
    """Fewer key/value heads shrink k_proj/v_proj; the scores still run over every query head."""
    heads, kv = SMALL_FLOPS["n_heads"], VARIANTS[name].n_kv_heads
    head_dim = SMALL_FLOPS["d_model"] // heads
    delta = 6 * SMALL_FLOPS["n_layers"] * 2 * SMALL_FLOPS["d_model"] * (heads - kv) * head_dim
    assert flops_per_token(meta_model(name, **SMALL_FLOPS)) == hand_flops("baseline", **SMALL_FLOPS) - delta


@pytest.mark.parametrize("name,windowed_layers", [("swa", 2), ("local_global", 1), ("gemma2", 1)])
def test_flops_of_a_windowed_layer_count_the_window_not_the_context(name, windowed_layers):
    """The windows are a quarter of the context (8 of 32 tokens here): a windowed layer's scores and
    values run over 8 keys a query, not 32; every other matmul is the baseline's (soft-cap: no weights)."""
    head_dim, window = SMALL_FLOPS["d_model"] // SMALL_FLOPS["n_heads"], SMALL_FLOPS["seq_len"] // 4
    saved = 6 * windowed_layers * (SMALL_FLOPS["seq_len"] - window) * SMALL_FLOPS["n_heads"] * 2 * head_dim
    assert flops_per_token(meta_model(name, **SMALL_FLOPS)) == hand_flops("baseline", **SMALL_FLOPS) - saved


def test_flops_count_only_top_k_experts():
    more_experts = dict(SMALL_FLOPS, n_experts=16)
    delta = flops_per_token(meta_model("baseline", **more_experts)) - flops_per_token(meta_model("baseline", **SMALL_FLOPS))
    assert delta == 6 * SMALL_FLOPS["n_layers"] * SMALL_FLOPS["d_model"] * 12  # only the router grows


# --- train.py --dry_run for all 13 --------------------------------------------------------------

SUBPROCESS_NAME = "enhanced_xl"  # one through the real command line; the other 12 in-process


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore::DeprecationWarning")
    return env


@pytest.mark.parametrize("recipe", ["default", "seed"])
@pytest.mark.parametrize("name", list(TABLE))
def test_dry_run_reports_the_hand_counts(name, recipe, capsys, monkeypatch):
    """The seed's recipe changes no parameter: its 13 counts are the same hand counts."""
    argv = [f"--attention={name}", "--vocab_size=49152", "--dry_run", f"--recipe={recipe}"]
    if name == SUBPROCESS_NAME and recipe == "seed":
        proc = processes.run([sys.executable, "train.py", *argv], cwd=ROOT, env=clean_env(),
                             capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    else:
        for key in [k for k in os.environ if k.startswith("WANDB_SWEEP")]:
            monkeypatch.delenv(key)
        assert train.main(argv) == 0
        out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["attention"] == name
    assert record["params_total"] == total_params(name, **SEED)
    attention, _ = attention_counts(name, SEED["d_model"], SEED["n_heads"])
    assert record["params_attention"] == SEED["n_layers"] * attention
    assert record["flops_per_token"] == hand_flops(name, **SEED)
    if name != "baseline":  # the resolved sizes, as integers: the table's at the seed's size
        spec = record["attention_spec"]
        assert (spec["q_lora_rank"], spec["kv_lora_rank"], spec["qk_rope_head_dim"], spec["v_head_dim"]) == TABLE[name][1:5]


# --- the MoE layer -------------------------------------------------------------------------------

def make_moe(d=32, d_ff=48, n_experts=4, top_k=2, noise_std=0.1, seed=0) -> MoE:
    moe = MoE(d, d_ff, n_experts, top_k, noise_std)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1]))
    return moe


def dense_moe(x: torch.Tensor, moe: MoE) -> torch.Tensor:
    """Every expert on every token (float64), combined with the softmax over the top-k logits."""
    tokens = x.reshape(-1, x.shape[-1]).double()
    logits = tokens @ moe.gate.weight.double().T
    top_logits, top_experts = logits.topk(moe.top_k, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, top_experts, top_logits.softmax(dim=-1))  # (N, E)
    up, down = moe.up_proj.double(), moe.down_proj.double()  # (E, d_ff, d), (E, d, d_ff)
    hidden = F.silu(torch.einsum("nd,efd->nef", tokens, up))
    every_expert = torch.einsum("nef,edf->ned", hidden, down)  # (N, E, d)
    return torch.einsum("ne,ned->nd", gates, every_expert).view(x.shape)


# The expert matmuls run through more than one code path (a loop over experts, one grouped
# matmul; ModelConfig.moe_matmul): each must equal the dense reference, values and gradients.
@pytest.fixture(params=model_module.MOE_EXPERT_MATMUL_MODES)
def dispatch(request):
    return request.param


@pytest.mark.parametrize("n_experts,top_k", [(4, 2), (8, 2), (4, 1), (4, 4)])
def test_moe_matches_dense_reference(n_experts, top_k, dispatch):
    moe = make_moe(n_experts=n_experts, top_k=top_k, seed=n_experts * 10 + top_k).eval()
    moe.matmul = dispatch
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 32), (2, 7, 32), (3, 50, 32)]:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            out, _ = moe(x)
        expected = dense_moe(x, moe)
        assert out.shape == x.shape
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_moe_gradients_match_dense_reference(dispatch):
    """Gradients to the input, the router and every expert equal those of the dense reference
    (the top-k choice itself is not differentiable; the gate weights are)."""
    moe = make_moe(n_experts=4, top_k=2, seed=7).eval()
    moe.matmul = dispatch
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 20, 32, generator=gen)
    cotangent = torch.randn(3, 20, 32, generator=gen)
    x_ours = x.clone().requires_grad_()
    out, _ = moe(x_ours)
    (out * cotangent).sum().backward()

    reference = make_moe(n_experts=4, top_k=2, seed=7).double().eval()
    x_ref = x.double().requires_grad_()
    (dense_moe(x_ref, reference) * cotangent.double()).sum().backward()
    pairs = [("input", x_ours.grad, x_ref.grad)] + [
        (name, param.grad, dict(reference.named_parameters())[name].grad) for name, param in moe.named_parameters()]
    for name, grad, expected in pairs:
        assert grad is not None and expected.norm() > 0, name
        err = ((grad.double() - expected).norm() / expected.norm()).item()
        assert err < 1e-5, f"gradient of {name}: relative error {err:.2e}"


def test_moe_without_noise_is_deterministic_and_matches_in_training_mode():
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))
    eval_moe = make_moe(noise_std=0.1).eval()
    with torch.no_grad():
        first, aux_first = eval_moe(x)
        second, aux_second = eval_moe(x)
    assert torch.equal(first, second) and torch.equal(aux_first, aux_second)
    quiet = make_moe(noise_std=0.0).train()  # training mode, noise off: the same function
    with torch.no_grad():
        third, aux_third = quiet(x)
        fourth, _ = quiet(x)
    assert torch.equal(third, fourth)
    torch.testing.assert_close(third, first, rtol=0, atol=0)
    assert torch.equal(aux_third, aux_first)


def test_moe_router_noise_in_training_changes_outputs():
    moe = make_moe(noise_std=0.1).train()
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, aux_first = moe(x)
        second, aux_second = moe(x)
    assert not torch.equal(first, second)
    assert not torch.equal(aux_first, aux_second)


def test_aux_loss_by_hand():
    """4 tokens, 4 experts, top-2, router = identity, so a token's router logits are its own values.

        token  logits          top-2
        t0     [3, 1, 0, 0]    e0, e1
        t1     [1, 3, 0, 0]    e1, e0
        t2     [2, 0, 1, 0]    e0, e2
        t3     [0, 1, 0, 2]    e3, e1

    Share of the 8 assignments: e0 3/8, e1 3/8, e2 1/8, e3 1/8. Mean router probability P_e: the
    softmax over all 4 logits, averaged over tokens. Loss = n_experts * sum_e share_e * P_e.
    """
    moe = MoE(d_model=4, d_ff=3, n_experts=4, top_k=2, noise_std=0.1).eval()
    logits = [[3.0, 1.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0]]
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4))
        moe.up_proj.fill_(0.1), moe.down_proj.fill_(0.1)
        experts, weights, aux = moe.route(torch.tensor(logits))
    assert [set(row) for row in experts.tolist()] == [{0, 1}, {0, 1}, {0, 2}, {1, 3}]
    # Gate weight of t0's first expert: softmax([3, 1])[0] = 1 / (1 + e^-2).
    assert weights[0].max().item() == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-6)

    share = [3 / 8, 3 / 8, 1 / 8, 1 / 8]
    mean_prob = [sum(math.exp(row[e]) / sum(math.exp(v) for v in row) for row in logits) / 4 for e in range(4)]
    expected = 4 * sum(s * p for s, p in zip(share, mean_prob))
    assert mean_prob == pytest.approx([0.403064, 0.306619, 0.096936, 0.193381], abs=1e-6)
    assert expected == pytest.approx(1.209684, abs=1e-6)
    assert aux.item() == pytest.approx(expected, rel=1e-6)
    # And through forward, on a (batch, length, d) input.
    with torch.no_grad():
        _, aux_forward = moe(torch.tensor(logits).view(2, 2, 4))
    assert aux_forward.item() == pytest.approx(expected, rel=1e-6)


# --- the whole model: causality and no dead parameters ---------------------------------------

SMALL = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4, top_k=2, seq_len=16)


def small_model(name: str, seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    model = MoELM(model_config(name, **SMALL))
    init_weights(model, seed)
    return model


@pytest.mark.parametrize("name", list(TABLE))
def test_model_is_causal(name):
    model = small_model(name).eval()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"]), generator=gen)
    with torch.no_grad():
        logits = model(ids).logits
        for t in (0, 7, SMALL["seq_len"] - 2):
            changed = ids.clone()
            changed[:, t + 1:] = (ids[:, t + 1:] + 1 + torch.randint(0, 90, changed[:, t + 1:].shape,
                                                                     generator=gen)) % SMALL["vocab_size"]
            assert (changed[:, t + 1:] != ids[:, t + 1:]).all()
            changed_logits = model(changed).logits
            torch.testing.assert_close(changed_logits[:, :t + 1], logits[:, :t + 1], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(changed_logits[:, t + 1:], logits[:, t + 1:], atol=1e-4)


@pytest.mark.parametrize("name", list(TABLE))
def test_every_parameter_gets_a_gradient(name):
    model = small_model(name, seed=1).train()
    ids = torch.randint(0, SMALL["vocab_size"], (4, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    out = model(ids[:, :-1])
    logits, aux_loss = out.logits, out.aux_loss
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) + 0.01 * aux_loss
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Every expert of every layer saw tokens (per-expert slices of the stacked weights).
    for layer in model.layers:
        for grad in (layer.mlp.up_proj.grad, layer.mlp.down_proj.grad):
            assert (grad.flatten(1).abs().sum(dim=1) > 0).all()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters the step did not change: {unchanged}"


# --- one model, one output, one source of settings ------------------------------------------------

def test_forward_returns_one_type_whatever_it_is_asked():
    model = MoELM(model_config("baseline", **SMALL)).eval()
    init_weights(model, 0)  # the experts start as torch.empty
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    plain, with_targets = model(ids[:, :-1]), model(ids[:, :-1], ids[:, 1:])
    assert type(plain) is type(with_targets) is LMOutput
    assert plain.logits.shape == (2, 8, SMALL["vocab_size"]) and plain.loss is None and plain.accuracy is None
    assert with_targets.logits is None
    expected = F.cross_entropy(plain.logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(with_targets.loss, expected)
    torch.testing.assert_close(with_targets.aux_loss, plain.aux_loss)


def test_model_config_takes_every_model_setting_from_the_train_config():
    """One source: a non-default value of each field ModelConfig shares with TrainConfig arrives
    (bench/step.py's hand copy used to drop rope_theta and router_noise_std)."""
    from dataclasses import fields

    changed = dict(d_model=96, n_layers=3, n_heads=6, d_ff=40, n_experts=5, top_k=3, seq_len=17, dropout=0.2,
                   router_noise_std=0.3, rope_theta=500.0, embed_scale=True, aux_loss_reduction="sum",
                   expert_dropout=0.05, final_dropout=0.07, init_residual_scaling=False, attention_kernel="explicit")
    shared = {f.name for f in fields(ModelConfig)} - {"attention", "vocab_size", "sdpa_pad", "moe_matmul"}
    assert shared == set(changed)  # a new shared field needs a value here
    cfg = ModelConfig.from_train_config(TrainConfig(attention="gqa", **changed), 321, moe_matmul="loop")
    assert {k: getattr(cfg, k) for k in changed} == changed
    assert cfg.vocab_size == 321 and cfg.moe_matmul == "loop" and cfg.attention.n_kv_heads == 2
    with pytest.raises(ValueError, match="sdpa_pad='alwyas': allowed: auto, always, never"):
        ModelConfig.from_train_config(TrainConfig(), 321, sdpa_pad="alwyas")  # a typo is not "never"


def test_shared_init_is_equal_across_every_kind():
    """For one seed, every parameter outside the attention starts equal, whatever the kind."""
    prints = {}
    for name in ["baseline", "gqa", "mqa", "qknorm_gqa", "lora_small", "rope_only"]:
        model = MoELM(model_config(name, **SMALL))
        init_weights(model, 5)
        prints[name] = shared_parameters_fingerprint(model)
    assert len(set(prints.values())) == 1, prints
    other = MoELM(model_config("baseline", **SMALL))
    init_weights(other, 6)
    assert shared_parameters_fingerprint(other) != prints["baseline"]  # the fingerprint sees the seed


def test_one_attention_layer_mixes_no_tokens_in_its_first_layer_and_all_in_its_second():
    """The positive control `one_attention_layer` (README, "Can the tool see an effect?"): layer 0's
    attention output at every position is a function of that position's input alone (a window of 1),
    layer 1's reaches back to the first token (global), as the baseline's layer 0 does."""
    from test_decode import tiny_model

    def moved_by_the_first_token(model, layer):
        x = torch.randn(1, 6, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
        y = x.clone()
        y[:, 0] += 1.0
        with torch.no_grad():
            before, after = model.layers[layer].self_attn(x), model.layers[layer].self_attn(y)
        return (after - before)[:, 1:].abs().max().item()

    control, baseline = tiny_model("one_attention_layer"), tiny_model("baseline")
    assert moved_by_the_first_token(control, 0) == 0.0
    assert moved_by_the_first_token(control, 1) > 1e-3 and moved_by_the_first_token(baseline, 0) > 1e-3


def test_tiny_latent_is_a_32nd_of_the_model():
    """The control `tiny_latent`: keys and values through a latent of d_model / 32 (2 at the smoke
    size, 16 at the seed's), with no query compression."""
    assert VARIANTS["tiny_latent"].resolved(64, 2, seq_len=16).kv_lora_rank == 2
    assert VARIANTS["tiny_latent"].resolved(512, 8, seq_len=512).kv_lora_rank == 16
    assert VARIANTS["tiny_latent"].resolved(64, 2, seq_len=16).q_lora_rank is None
