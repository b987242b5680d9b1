"""The attention registry (attention/registry.py) is the one home of kinds, knobs, families and
variants: it imports without torch, everything else reads it, and a variant defined here, in a
test only, goes through sweep validation, train.py and the analysis like a built-in one."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import train
from analysis import tables
from analysis.fairness import NOT_COMPARED
from analysis.runs import load_path
from attention.registry import FAMILIES, KINDS, KNOBS, VARIANTS, AttentionSpec
from config import OPTION_HELP, ConfigError, config_from_values
from localsweep import validate
from train_helpers import read_record, small_corpus, tiny_args

ROOT = Path(__file__).resolve().parent.parent


def test_the_registry_and_the_analysis_import_without_torch():
    code = ("import sys, attention, attention.registry, analysis.runs, analysis.fairness, analysis.tables; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_validating_every_variant_needs_no_torch():
    """localsweep checks every run of a sweep before it starts one, and the analysis builds configs:
    neither may pay for importing torch, also for variants with RoPE scaling (rope_small)."""
    code = ("import sys; from config import TrainConfig; from attention.registry import VARIANTS; "
            "[TrainConfig(attention=name).validate() for name in VARIANTS]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
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
    for name in ("baseline", spec.name):
        assert train.main(tiny_args(tmp_path, corpus, attention=name, group="g")) == 0
    record = read_record(tmp_path / "results", "g", f"{spec.name}-s0")
    assert record["family"] == "qknorm" and record["config"]["attention"] == spec.name
    runs = {r.variant: r for r in load_path(tmp_path / "results")}
    assert runs[spec.name].status == "finished" and runs[spec.name].family == "qknorm"
    assert runs[spec.name].kv_cache_bytes_per_token == 1 * 2 * 1 * 16 * 2  # 1 layer, K+V, 1 head of 16, 2 bytes
    assert runs[spec.name].init_fingerprint == runs["baseline"].init_fingerprint
    table = tables.all_runs(list(runs.values()))
    assert any(f"| {spec.name} | qknorm |" in line for line in table.lines)
