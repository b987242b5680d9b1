"""Configuration: `--name=value` parsing the way `wandb agent` passes `${args}`, typed values from a
sweep, and bad knobs refused through the real command line (exit 2, one `error:` line, no traceback).
"""
import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import processes
from attention import build_attention
from config import (OPTION_HELP, ConfigError, TrainConfig, config_from_values, help_text, parse_args, parse_value,
                    readme_with_options)

ROOT = Path(__file__).resolve().parent.parent


# --- parsing -------------------------------------------------------------------------------------

def test_bare_flag_means_true():
    assert parse_args(["--compile"]) == {"compile": True}
    assert parse_args(["--dry_run", "--compile", "--attention=lora_small"]) == {
        "dry_run": True, "compile": True, "attention": "lora_small"}
    assert parse_args(["--attention=lora_small", "--dry_run"])["dry_run"] is True


@pytest.mark.parametrize("text,value", [("False", False), ("True", True), ("false", False), ("true", True),
                                        ("0", False), ("1", True)])
def test_booleans_are_parsed_not_truthy_strings(text, value):
    """The type=bool trap: bool("False") is True. Booleans arrive from the agent as True/False."""
    assert parse_args([f"--attention_bias={text}"])["attention_bias"] is value
    assert parse_args(["--attention_bias", text])["attention_bias"] is value  # the `--name value` form
    cfg = config_from_values(parse_args(["--attention=enhanced_small", f"--attention_bias={text}"]))
    assert cfg.attention_bias is value
    assert cfg.attention_spec().attention_bias is value  # enhanced_small has a bias by default


def test_attention_bias_false_removes_the_biases():
    cfg = config_from_values(parse_args(["--attention=enhanced_medium", "--attention_bias=False"]))
    module = build_attention(cfg.attention_spec(), 64, 4)
    assert not [n for n, _ in module.named_parameters() if n.endswith(".bias")]


def test_q_lora_rank_full_gives_a_full_rank_query():
    cfg = config_from_values(parse_args(["--attention=lora_small", "--q_lora_rank=full"]))
    spec = cfg.attention_spec()
    assert spec.q_lora_rank is None and spec.kv_lora_rank == 64
    names = {n for n, _ in build_attention(spec, 64, 4).named_parameters()}
    assert "q_proj.weight" in names and "q_a_proj.weight" not in names
    assert config_from_values(parse_args(["--attention=rope_only", "--q_lora_rank=48"])).attention_spec().q_lora_rank == 48


def test_typed_values_from_a_sweep():
    """A sweep's values may arrive already typed (wandb.config): ints, floats, bools as objects."""
    cfg = config_from_values({"attention": "lora_medium", "seed": 3, "d_model": 128, "n_heads": 4, "lr": 0.003,
                              "attention_bias": True, "compile": False, "q_lora_rank": 16, "kv_lora_rank": 32,
                              "rope_scaling_factor": 2, "steps": 7})
    assert (cfg.seed, cfg.d_model, cfg.n_heads, cfg.steps) == (3, 128, 4, 7)
    assert cfg.attention_bias is True and cfg.compile is False
    assert cfg.lr == 0.003
    assert isinstance(cfg.rope_scaling_factor, float) and cfg.rope_scaling_factor == 2.0
    spec = cfg.attention_spec()
    assert (spec.q_lora_rank, spec.kv_lora_rank, spec.attention_bias) == (16, 32, True)
    assert spec.rope_scaling == "linear" and spec.rope_scaling_factor == 2.0  # lora_medium had none
    # The same values as strings (the command line) give the same config.
    as_strings = config_from_values({k: str(v) for k, v in {
        "attention": "lora_medium", "seed": 3, "d_model": 128, "n_heads": 4, "lr": 0.003, "attention_bias": True,
        "compile": False, "q_lora_rank": 16, "kv_lora_rank": 32, "rope_scaling_factor": 2, "steps": 7}.items()})
    assert as_strings == cfg


@pytest.mark.parametrize("name,value", [("d_model", True), ("attention_bias", "maybe"), ("steps", 2.5),
                                        ("lr", "fast"), ("compile", "yes please")])
def test_wrongly_typed_sweep_values_are_refused(name, value):
    with pytest.raises(ConfigError, match=name):
        config_from_values({name: value})


def test_defaults_are_the_seed_setup():
    cfg = TrainConfig()
    assert (cfg.attention, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.n_experts, cfg.top_k,
            cfg.seq_len) == ("baseline", 512, 8, 8, 2048, 8, 2, 512)
    assert (cfg.dropout, cfg.router_noise_std, cfg.aux_loss_weight) == (0.1, 0.1, 0.01)
    assert config_from_values({}) == cfg


def test_none_for_optional_values():
    assert parse_value("q_lora_rank", "None") is None
    assert parse_value("group", "null") is None
    assert parse_value("q_lora_rank", "64") == 64


def test_unknown_names_are_refused_in_process():
    with pytest.raises(ConfigError, match="bogus"):
        parse_args(["--bogus=1"])
    with pytest.raises(ConfigError, match="bogus"):
        config_from_values({"bogus": 1})


# --- bad knobs through the real command line -----------------------------------------------------

BASE = ["--vocab_size=49152", "--dry_run"]  # accepted input would print the JSON line and exit 0
# case: (arguments, substrings the error line must contain: the bad value, and what is allowed)
BAD = {
    "unknown_variant": (["--attention=nope_variant"], ["nope_variant", "lora_small"]),
    "zero_d_ff": (["--d_ff=0"], ["d_ff=0", "greater than 0"]),
    "negative_n_layers": (["--n_layers=-3"], ["n_layers=-3", "greater than 0"]),
    "zero_kv_lora_rank": (["--attention=lora_small", "--kv_lora_rank=0"], ["kv_lora_rank=0"]),
    "negative_q_lora_rank": (["--attention=lora_small", "--q_lora_rank=-4"], ["q_lora_rank=-4", "full"]),
    "negative_lr": (["--lr=-0.1"], ["lr=-0.1"]),
    "d_model_not_divisible": (["--d_model=100", "--n_heads=8"], ["100", "n_heads=8"]),
    "odd_rotary_dim_mla": (["--attention=rope_only", "--qk_rope_head_dim=33"], ["33", "even"]),
    "odd_head_dim_baseline": (["--d_model=40", "--n_heads=8"], ["5", "even"]),
    "top_k_over_n_experts": (["--top_k=9"], ["top_k=9", "n_experts=8"]),
    "steps_ten": (["--steps=ten"], ["steps=ten", "integer"]),
    "compile_maybe": (["--compile=maybe"], ["compile=maybe", "True/False"]),
    "attention_kernel_typo": (["--attention_kernel=fast"], ["attention_kernel=fast", "auto, sdpa, explicit, flex"]),
    "unknown_option": (["--bogus_option=1"], ["bogus_option"]),
    "misspelt_option": (["--atention=baseline"], ["--atention", "did you mean --attention?"]),
    "misspelt_variant": (["--attention=lora_smal"], ["lora_smal", "did you mean lora_small?"]),
    "latent_knob_on_baseline": (["--attention=baseline", "--kv_lora_rank=64"], ["kv_lora_rank=64", "baseline"]),
}


# Each of these is a fresh Python importing torch (~2 s of CPU): the cases the command line must
# refuse, run through it; every case is also checked in-process below.
SUBPROCESS_CASES = ["unknown_variant", "zero_d_ff", "negative_n_layers", "d_model_not_divisible",
                    "odd_rotary_dim_mla", "top_k_over_n_experts", "steps_ten", "compile_maybe", "unknown_option",
                    "misspelt_option", "attention_kernel_typo"]


@pytest.fixture(scope="module")
def refusals():
    """All bad-knob commands at once (each is a fresh Python importing torch): {case: (rc, out, err)}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    results = {}
    with contextlib.ExitStack() as stack:
        procs = {case: stack.enter_context(processes.started(
                     [sys.executable, "train.py", *args, *BASE], cwd=ROOT, env=env, text=True,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                 for case, (args, _) in BAD.items() if case in SUBPROCESS_CASES}
        for case, proc in procs.items():
            out, err = proc.communicate(timeout=180)
            results[case] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_knob_is_refused_on_the_command_line(case, refusals):
    rc, out, err = refusals[case]
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in BAD[case][1]:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert out.strip() == ""  # no JSON line: nothing was built


@pytest.mark.parametrize("case", list(BAD))
def test_bad_knob_raises_config_error_in_process(case):
    """The same refusals at config time, without a process: the validation is in the config."""
    args, needles = BAD[case]
    with pytest.raises(ConfigError) as caught:
        config_from_values(parse_args([*args, *BASE]))
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("arg", ["--lr=nan", "--lr=inf", "--weight_decay=nan", "--rope_scaling_factor=nan",
                                 "--rope_theta=nan", "--router_noise_std=nan", "--aux_loss_weight=inf"])
def test_non_finite_numbers_are_refused(arg):
    """nan compares False with everything, so `value <= 0` checks let it through; a run would then
    train on NaN (or rotate by NaN angles) instead of being refused at config time."""
    name, value = arg[2:].split("=")
    with pytest.raises(ConfigError, match=f"{name}={value}"):
        config_from_values(parse_args(["--attention=rope_only", arg]))


# --- the help text and README's option table -----------------------------------------------------

def test_every_option_has_exactly_one_description():
    """A new TrainConfig field without its line in OPTION_HELP fails here (and so would be missing
    from --help and the README); a line for a field that does not exist fails too."""
    described = [name for options in OPTION_HELP.values() for name in options]
    assert sorted(described) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(described) == len(set(described))  # no option in two groups
    assert list(OPTION_HELP) == ["model", "attention", "recipe", "task", "data", "run", "W&B"]
    for options in OPTION_HELP.values():
        for text in options.values():
            assert text.strip() and "\n" not in text


def test_help_prints_every_option_with_its_line_under_its_group(capsys):
    import train

    assert train.main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert printed == help_text() + "\n"
    lines = printed.splitlines()
    for group, options in OPTION_HELP.items():
        start = lines.index(f"{group}:")
        block = lines[start + 1: lines.index("", start)]
        assert [line.split()[0] for line in block] == [f"--{name}" for name in options]
        for line, (name, text) in zip(block, options.items()):
            default = getattr(TrainConfig(), name)
            assert text in line and (f"[{default}]" in line or str(default).startswith(str(ROOT)))


def test_readme_option_table_is_the_rendered_one():
    """README's table is OPTION_HELP rendered; if this fails, run `python config.py --readme`."""
    readme = (ROOT / "README.md").read_text()
    assert readme_with_options(readme) == readme
    table = readme.split("<!-- options:")[1].split("<!-- /options -->")[0]
    for options in OPTION_HELP.values():
        for name, text in options.items():
            assert f"`--{name}`" in table and text in table
    assert str(ROOT) not in table  # defaults inside the repository are shown relative to it
