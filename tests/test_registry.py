"""The attention registry (attention/registry.py) is the one home of kinds, knobs, families and
variants: it imports without torch, everything else reads it, and a variant defined here, in a
test only, goes through sweep validation, train.py and the analysis like a built-in one."""
import importlib
import json
import sys
from pathlib import Path

import pytest

import processes
import train
from analysis import tables
from analysis.fairness import NOT_COMPARED
from analysis.runs import load_path
from attention.registry import FAMILIES, KINDS, KNOBS, VARIANTS, AttentionSpec, OfModel, PerHead
from config import OPTION_HELP, ConfigError, config_from_values
from localsweep import validate
from train_helpers import read_record, small_corpus, tiny_args

ROOT = Path(__file__).resolve().parent.parent


def test_the_registry_and_the_analysis_import_without_torch():
    code = ("import sys, attention, attention.registry, analysis.runs, analysis.fairness, analysis.tables; "
            "print('torch' in sys.modules)")
    out = processes.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_validating_every_variant_needs_no_torch():
    """localsweep checks every run of a sweep before it starts one, and the analysis builds configs:
    neither may pay for importing torch, also for variants with RoPE scaling (rope_small)."""
    code = ("import sys; from config import TrainConfig; from attention.registry import VARIANTS; "
            "[TrainConfig(attention=name).validate() for name in VARIANTS]; print('torch' in sys.modules)")
    out = processes.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_variant_names_a_kind_and_a_family_and_every_kind_a_module():
    for spec in VARIANTS.values():
        assert spec.kind in KINDS and spec.family in FAMILIES, spec.name
    for kind in KINDS.values():
        module, cls = kind.module.split(":")
        assert hasattr(importlib.import_module(module), cls), kind.module
        assert set(kind.knobs) <= set(KNOBS), kind.name


def test_every_knob_is_an_option_with_its_help_line_and_never_an_unfairness():
    for name in KNOBS:
        assert name in OPTION_HELP["attention"]
        assert name in NOT_COMPARED  # the fairness audit compares runs that differ in a knob
        assert any(name in kind.knobs for kind in KINDS.values()), f"{name}: no kind reads it"


def test_a_knob_a_kind_lacks_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"--n_kv_heads=2: only multi-head attention .* not --attention=lora_small"):
        config_from_values({"attention": "lora_small", "n_kv_heads": "2"})
    with pytest.raises(ConfigError, match=r"--kv_lora_rank=8: only latent \(MLA\) variants have it"):
        config_from_values({"attention": "gqa", "kv_lora_rank": "8"})
    with pytest.raises(ConfigError, match=r"--n_kv_heads=3: --n_heads=8 must divide by it"):
        config_from_values({"attention": "baseline", "n_kv_heads": "3"})
    with pytest.raises(ConfigError, match=r"--n_kv_heads=0: must be greater than 0"):
        config_from_values({"attention": "baseline", "n_kv_heads": "0"})
    # a variant sized for the seed's 8 heads still fits the smoke size's 4 (2 key/value heads divide 4)
    assert config_from_values({"attention": "gqa", "n_heads": "4", "d_model": "64"}).attention_spec().n_kv_heads == 2


def test_a_variant_defined_in_a_test_only_runs_end_to_end(tmp_path, monkeypatch):
    """One entry (here added at run time) is all a named variant takes: the sweep checks accept it,
    train.py trains it and records it, and the report labels it with its family."""
    spec = AttentionSpec(name="test_only_mqa_qknorm", family="qknorm", n_kv_heads=1, qk_norm=True)
    monkeypatch.setitem(VARIANTS, spec.name, spec)
    sweep = {"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
             "parameters": {"attention": {"values": ["baseline", spec.name]}, "d_model": {"value": 32},
                            "n_heads": {"value": 2}}}
    assert validate.bad_values(sweep, validate.grid_size_and_runs(sweep)[1]) == []
    (tmp_path / "corpus").mkdir()
    corpus = small_corpus(tmp_path / "corpus")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_config = {}  # what train.py adds to the W&B run's config
    monkeypatch.setattr(train.Tracker, "update_config", lambda self, values: wandb_config.update(values))
    for name in ("baseline", spec.name):
        assert train.main(tiny_args(tmp_path, corpus, attention=name, group="g")) == 0
    assert wandb_config["attention_spec"]["n_kv_heads"] == 1  # the last run's, resolved
    record = read_record(tmp_path / "results", "g", f"{spec.name}-s0")
    assert record["family"] == "qknorm" and record["config"]["attention"] == spec.name
    assert record["attention_spec"]["n_kv_heads"] == 1 and record["attention_spec"]["qk_norm"] is True
    runs = {r.variant: r for r in load_path(tmp_path / "results")}
    assert runs[spec.name].status == "finished" and runs[spec.name].family == "qknorm"
    assert runs[spec.name].kv_cache_bytes_per_token == 1 * 2 * 1 * 16 * 2  # 1 layer, K+V, 1 head of 16, 2 bytes
    assert runs[spec.name].init_fingerprint == runs["baseline"].init_fingerprint
    table = tables.all_runs(list(runs.values()))
    assert any(f"| {spec.name} | qknorm |" in line for line in table.lines)


# --- sizes relative to the model ---------------------------------------------------------------------

def test_variant_sizes_scale_with_the_model():
    """Ranks are fractions of d_model, per-head dims multiples of the head dim (d_model / n_heads),
    windows fractions of the context. At the smoke size (d_model 64, 4 heads of 16, 64 tokens):
    lora_small's q 64/16 = 4, kv 64/8 = 8, rope and v one head dim = 16 (the seed's 32, 64, 64, 64);
    mla_v3's q 64 x 7/32 = 14, kv 64/16 = 4, nope 16, rope 8, v 16; swa's window 64/4 = 16, and
    512/4 = 128 at the seed's context. n_kv_heads stays 2 at both sizes."""
    lora = VARIANTS["lora_small"].resolved(64, 4)
    assert (lora.q_lora_rank, lora.kv_lora_rank, lora.qk_rope_head_dim, lora.v_head_dim) == (4, 8, 16, 16)
    v3 = VARIANTS["mla_v3"].resolved(64, 4)
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_nope_head_dim, v3.qk_rope_head_dim, v3.v_head_dim) == (
        14, 4, 16, 8, 16)
    assert VARIANTS["swa"].resolved(64, 4, seq_len=64).window == 16
    assert VARIANTS["swa"].resolved(512, 8, seq_len=512).window == 128
    assert VARIANTS["gqa"].resolved(64, 4).n_kv_heads == VARIANTS["gqa"].resolved(512, 8).n_kv_heads == 2


def test_a_size_between_integers_rounds_to_the_nearest_halves_up():
    """d_model 80, 8 heads of 10 dims. enhanced_small: rope half a head dim = 5, odd, so the nearest
    even number, halves up: 6; v 0.75 x 10 = 7.5 -> 8; q 80/16 = 5; kv 80/8 = 10. mla_v3's
    q 80 x 7/32 = 17.5 -> 18, kv 80/16 = 5. Never below one step: 2 rotary dims, 1 otherwise."""
    small = VARIANTS["enhanced_small"].resolved(80, 8)
    assert (small.q_lora_rank, small.kv_lora_rank, small.qk_rope_head_dim, small.v_head_dim) == (5, 10, 6, 8)
    v3 = VARIANTS["mla_v3"].resolved(80, 8)
    assert (v3.q_lora_rank, v3.kv_lora_rank) == (18, 5)
    assert PerHead(0.01).size(64, 4, None, step=2) == 2 and OfModel(0.001).size(64, 4, None) == 1
    # 4.9 rotary dims are 4 (2.45 pairs), 5.1 are 6
    assert PerHead(4.9 / 16).size(64, 4, None, step=2) == 4 and PerHead(5.1 / 16).size(64, 4, None, step=2) == 6


def test_a_window_relative_to_the_context_needs_the_context():
    with pytest.raises(ValueError, match="needs the context length"):
        VARIANTS["swa"].resolved(64, 4)


def test_a_command_line_knob_overrides_a_relative_size():
    """The command line's sizes are absolute: --kv_lora_rank=24 is 24 at any d_model; the knobs not
    given keep the variant's relative sizes."""
    spec = config_from_values({"attention": "lora_small", "d_model": "64", "n_heads": "4", "kv_lora_rank": "24",
                               "qk_rope_head_dim": "6"}).attention_spec()
    assert (spec.q_lora_rank, spec.kv_lora_rank, spec.qk_rope_head_dim, spec.v_head_dim) == (4, 24, 6, 16)
    swa = config_from_values({"attention": "swa", "seq_len": "64", "window": "7"}).attention_spec()
    assert swa.window == 7
    assert config_from_values({"attention": "swa", "seq_len": "64"}).attention_spec().window == 16


def test_dry_run_shows_the_resolved_sizes(capsys):
    """--dry_run at the smoke size: lora_small's knobs as integers, and its attention parameters
    by hand: q_a 64x4 + norm 4 + q_b 4x(4x16) + kv_a 64x(8+16) + norm 8 + kv_b 8x(4x16) + o (4x16)x64
    = 256 + 4 + 256 + 1536 + 8 + 512 + 4096 = 6668 a layer, 2 layers."""
    argv = ["--attention=lora_small", "--d_model=64", "--n_heads=4", "--n_layers=2", "--seq_len=64",
            "--vocab_size=97", "--dry_run"]
    assert train.main(argv) == 0
    described = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = described["attention_spec"]
    assert (spec["q_lora_rank"], spec["kv_lora_rank"], spec["qk_rope_head_dim"], spec["v_head_dim"]) == (4, 8, 16, 16)
    assert described["params_attention"] == 2 * 6668
