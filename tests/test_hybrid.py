"""Hybrid layer patterns (AttentionSpec.full_attention / full_attention_interval): a hybrid is a
VARIANTS entry, not code. Checked on a hybrid defined here (MLA layers with a grouped-query layer
every 4th, as Qwen3-Next puts one full-attention layer after three linear ones): the pattern is
transformers' Qwen3NextConfig.layer_types; the KV cache by hand; decoding equals the full forward;
the full layers start from the values the full variant's layers start from (fair init); bench's
seed-style reference matches it; bad patterns are refused."""
import json
from dataclasses import replace

import pytest
import torch

import train
from attention import VARIANTS
from attention.modules import MultiHeadAttention, MultiHeadLatentAttention
from config import ConfigError, config_from_values
from model import ModelConfig, MoELM, init_weights, kv_cache_bytes
from test_decode import decoded_logits, relative_error, tiny_model
from test_perf import SMALL, assert_same_step, ours_and_reference, small_config

HYBRID = replace(VARIANTS["mla_v3"], name="test_hybrid", full_attention="gqa", full_attention_interval=4)
SIZE = dict(vocab_size=64, d_model=32, n_layers=8, n_heads=4, d_ff=32, n_experts=4, top_k=2, seq_len=16)


@pytest.fixture
def hybrid(monkeypatch):
    monkeypatch.setitem(VARIANTS, HYBRID.name, HYBRID)
    return HYBRID


def test_the_layer_pattern_is_qwen3_nexts(hybrid):
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

    expected = Qwen3NextConfig(num_hidden_layers=8, full_attention_interval=4).layer_types
    assert hybrid.layer_types(8) == expected
    model = MoELM(ModelConfig(attention=hybrid, **SIZE))
    kinds = [type(layer.self_attn) for layer in model.layers]
    assert kinds == [MultiHeadAttention if t == "full_attention" else MultiHeadLatentAttention for t in expected]
    assert {layer.self_attn.n_kv_heads for layer in model.layers[3::4]} == {2}  # gqa's 2 key/value heads


def test_the_kv_cache_by_hand(hybrid):
    # d_model 32, 4 heads of 8: mla_v3's latent 32/16 = 2 plus its rotary key 8/2 = 4 per token on 6
    # layers; gqa's K and V of 2 heads of 8 = 32 per token on 2 layers; 2 bytes a value
    cfg = ModelConfig(attention=hybrid, **SIZE)
    for context in (1, 10, 16):
        assert kv_cache_bytes(cfg, context) == (6 * (2 + 4) + 2 * 32) * 2 * context


def test_decoding_a_hybrid_equals_the_full_forward(hybrid):
    model = tiny_model(hybrid.name, n_layers=4)
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(decoded_logits(model, ids, 5), model(ids).logits) < 1e-5


def test_full_layers_start_as_the_full_variants_layers(hybrid):
    """Per-name init: the hybrid's full layers hold exactly what gqa's layers of the same index start
    with, its MLA layers what mla_v3's do, and everything outside attention is shared."""
    models = {}
    for name in (hybrid.name, "gqa", "mla_v3"):
        models[name] = MoELM(ModelConfig(attention=VARIANTS[name], **SIZE))
        init_weights(models[name], 3)
    states = {name: model.state_dict() for name, model in models.items()}
    types = hybrid.layer_types(8)
    for key, value in states[hybrid.name].items():
        if ".self_attn." in key:
            layer = int(key.split(".")[1])
            other = "gqa" if types[layer] == "full_attention" else "mla_v3"
        else:
            other = "gqa"
        assert torch.equal(value, states[other][key]), key


def test_bench_reference_matches_a_hybrid(hybrid):
    ours, ref = ours_and_reference(small_config(hybrid.name, n_layers=4))
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    assert_same_step(ours, ref, ids)


def test_dry_run_shows_the_pattern_and_bad_patterns_are_refused(hybrid, monkeypatch, capsys):
    assert train.main([f"--attention={hybrid.name}", "--vocab_size=64", "--dry_run"]) == 0
    described = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert described["attention_spec"]["full_attention"] == "gqa"
    assert described["attention_spec"]["full_attention_interval"] == 4
    assert all(spec.hybrid_problem() is None for spec in VARIANTS.values())
    assert "allowed: a variant's name" in replace(HYBRID, full_attention="nope_not_a_variant").hybrid_problem()
    assert "must be greater than 0" in replace(HYBRID, full_attention_interval=0).hybrid_problem()
    monkeypatch.setitem(VARIANTS, "nested", replace(HYBRID, name="nested", full_attention=HYBRID.name))
    assert "is itself a hybrid" in VARIANTS["nested"].hybrid_problem()
    with pytest.raises(ConfigError, match="is itself a hybrid"):
        config_from_values({"attention": "nested"})
    # the full layers' variant is checked at the run's size too: gqa's 2 key/value heads do not divide 3 heads
    with pytest.raises(ConfigError, match=r"its full-attention layers \(gqa\): --n_kv_heads=2: --n_heads=3"):
        config_from_values({"attention": hybrid.name, "n_heads": "3", "d_model": "48"})


def test_hybrid_gdn_is_qwen3_nexts_pattern_with_its_gated_full_layers(capsys):
    """The registry's hybrid_gdn: at 8 layers transformers' Qwen3NextConfig layer_types (3 Gated
    DeltaNet layers to 1 full), the full layers the `gated` variant (element-wise output gate,
    QK-norm, 2 key/value heads: Qwen3NextAttention's design); at fewer layers than the interval, one
    full layer, the last (the smoke's 2 layers: 1:1), which --dry_run shows as the interval."""
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

    from attention.gated_deltanet import GatedDeltaNet

    spec = VARIANTS["hybrid_gdn"]
    assert spec.layer_types(8) == Qwen3NextConfig(num_hidden_layers=8, full_attention_interval=4).layer_types
    assert spec.layer_types(12) == Qwen3NextConfig(num_hidden_layers=12, full_attention_interval=4).layer_types
    assert spec.layer_types(2) == ["linear_attention", "full_attention"]
    assert spec.layer_types(1) == ["full_attention"] and spec.layer_types(5)[3:] == ["full_attention", "linear_attention"]
    model = MoELM(ModelConfig(attention=spec, **SIZE))
    full = [layer.self_attn for layer in model.layers[3::4]]
    assert all(isinstance(layer.self_attn, GatedDeltaNet) for i, layer in enumerate(model.layers) if i % 4 != 3)
    assert all(isinstance(m, MultiHeadAttention) and m.gate_dim == m.head_dim and hasattr(m, "q_norm")
               and m.n_kv_heads == 2 for m in full)  # one gate per output dim: element-wise
    for n_layers, interval, kinds in [(2, 2, ["GatedDeltaNet", "MultiHeadAttention"]), (8, 4, None)]:
        assert train.main(["--attention=hybrid_gdn", f"--n_layers={n_layers}", "--d_model=64", "--n_heads=4",
                           "--vocab_size=64", "--dry_run"]) == 0
        described = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert described["attention_spec"]["full_attention_interval"] == interval
        if kinds:
            cfg = config_from_values({"attention": "hybrid_gdn", "n_layers": str(n_layers), "d_model": "64",
                                      "n_heads": "4"})
            model = MoELM(ModelConfig.from_train_config(cfg, 64))
            assert [type(layer.self_attn).__name__ for layer in model.layers] == kinds


def test_the_command_lines_knobs_change_the_hybrids_own_layers_not_its_full_ones(hybrid):
    """README: a knob given on the command line changes the spec's own (here MLA) layers; the full
    layers stay the full variant's (gqa's: no bias, 2 key/value heads)."""
    plain = config_from_values({"attention": hybrid.name, **SIZE})
    biased = config_from_values({"attention": hybrid.name, "attention_bias": True, "kv_lora_rank": 4, **SIZE})
    for cfg, bias, rank in ((plain, False, 2), (biased, True, 4)):
        model = MoELM(ModelConfig.from_train_config(cfg, SIZE["vocab_size"]))
        for layer in model.layers:
            attn = layer.self_attn
            if isinstance(attn, MultiHeadLatentAttention):
                assert (attn.kv_a_proj_with_mqa.bias is not None, attn.kv_lora_rank) == (bias, rank)
            else:
                assert attn.q_proj.bias is None and attn.n_kv_heads == 2
