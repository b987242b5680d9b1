"""The sweep YAMLs in sweeps/: W&B's own schema accepts them, the seed's enumerate its 13 variants and
zoo_smoke and zoo the rest, every value they can hand out passes train.py's config validation, and their
commands follow the W&B
agent's rules (macros, `accelerate launch` items)."""
import math
from pathlib import Path

import pytest
import yaml

from localsweep import common, macros, validate
from attention import VARIANTS
from config import FIELD_TYPES, _allowed_types, config_from_values, parse_args

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
NAMES = [p.name for p in SWEEPS]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "sweeps" / name).read_text())


def fixed(config: dict) -> dict:
    return {k: v["value"] for k, v in config["parameters"].items() if "value" in v}


def test_the_four_sweeps_are_there_and_nothing_else():
    assert set(NAMES) == {"fast.yaml", "smoke.yaml", "seeds.yaml", "lm_smoke.yaml", "controls_smoke.yaml",
                          "fast_multigpu.yaml", "zoo_smoke.yaml",
                          "zoo.yaml", "tune.yaml", "tune_smoke.yaml"}
    assert sorted(p.name for p in (ROOT / "sweeps").iterdir()) == sorted(NAMES)  # no other file either
    # sweeps/ holds YAML only: a package named `sweeps` here would shadow W&B's engine
    assert not (ROOT / "sweeps" / "__init__.py").exists()


@pytest.mark.parametrize("name", NAMES)
def test_wandb_schema_accepts_it(name):
    sweeps = common.import_engine()
    assert sweeps.schema_violations_from_proposed_config(load(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_fair_grid_shape(name):
    config = load(name)
    assert config["program"] == "train.py"
    assert config["method"] == "grid"
    assert config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert config["project"] == "attnsweep"
    # no early termination or target: every variant gets the same training
    assert "early_terminate" not in config and "target" not in config["metric"]
    command = config["command"]
    assert command[0] == "${env}" and "${program}" in command and command[-1] == "${args}"


@pytest.mark.parametrize("name", NAMES)
def test_comment_at_the_top_says_how_to_run_it(name):
    lines = (ROOT / "sweeps" / name).read_text().splitlines()
    comment = "\n".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])
    assert comment.startswith(f"# {name} -- ")
    assert f"wandb sweep sweeps/{name}" in comment and "wandb agent ENTITY/PROJECT/SWEEP_ID" in comment
    assert f"python local_sweep.py sweeps/{name}" in comment


# The seed report's 13 variants, in its order (DESIGN.md section 3), by hand.
SEED_VARIANTS = ["baseline", "lora_small", "lora_medium", "lora_large", "lora_xl", "enhanced_small",
                 "enhanced_medium", "enhanced_large", "enhanced_xl", "rope_only", "rope_small", "rope_large",
                 "bias_only"]


@pytest.mark.parametrize("name", ["fast.yaml", "smoke.yaml", "seeds.yaml", "fast_multigpu.yaml"])
def test_the_seed_sweeps_enumerate_exactly_the_seed_variants_in_order(name):
    assert load(name)["parameters"]["attention"]["values"] == SEED_VARIANTS


@pytest.mark.parametrize("name,twin", [("zoo_smoke.yaml", "seeds.yaml"), ("zoo.yaml", "fast.yaml")])
def test_zoo_sweeps_list_the_baseline_and_every_zoo_variant_at_their_twins_settings(name, twin):
    """zoo_smoke at seeds' laptop size and recipe (a language model), zoo at fast's GPU size, recipe and data; each on
    seeds 0-2, so every zoo variant gets a paired verdict against the baseline."""
    assert load(name)["parameters"]["attention"]["values"] == \
        ["baseline"] + [variant for variant, spec in VARIANTS.items()
                        if variant not in SEED_VARIANTS and spec.family != "control"]
    assert fixed(load(name)) == {k: v for k, v in fixed(load(twin)).items() if k != "seed"}  # fast: seed 0 only
    assert load(name)["parameters"]["seed"] == {"values": [0, 1, 2]}


@pytest.mark.parametrize("name", NAMES)
def test_every_sweep_lists_known_variants_only(name):
    values = load(name)["parameters"]["attention"].get("values", [load(name)["parameters"]["attention"].get("value")])
    assert values and set(values) <= set(VARIANTS), set(values) - set(VARIANTS)


@pytest.mark.parametrize("name", NAMES)
def test_every_value_passes_config_validation(name):
    """Every run the grid can produce, as W&B's engine enumerates it, is a valid TrainConfig."""
    config = load(name)
    total, runs = validate.grid_size_and_runs(config)
    assert runs is not None and len(runs) == total
    for values in runs:
        config_from_values(values)
    assert validate.bad_values(config, runs) == []


@pytest.mark.parametrize("name", NAMES)
def test_values_survive_the_agents_command_line(name):
    """What train.py parses from `${args}` (`--name=value`) equals the YAML's typed values, so
    train.py's check that wandb.config agrees with its command line holds."""
    config = load(name)
    _, runs = validate.grid_size_and_runs(config)
    for values in runs[:3]:
        argv = macros.sweep_command_args(values)["args"]
        assert config_from_values(parse_args(argv)) == config_from_values(values)


@pytest.mark.parametrize("name", NAMES)
def test_no_yaml_1_1_surprises(name):
    """PyYAML reads `1e-4` as a string and `no` as False: numbers need a dot, words need quotes."""
    for key, value in fixed(load(name)).items():
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                continue
            pytest.fail(f"{name}: {key}: {value!r} is a string that looks like a number")
        if isinstance(value, bool):  # `mixed_precision: no` would arrive as False
            assert bool in _allowed_types(FIELD_TYPES[key]), f"{name}: {key}: {value!r} is a boolean"


def test_fast_is_the_seed_experiment_on_the_seed_data():
    values = fixed(load("fast.yaml"))
    assert {k: values[k] for k in ("seed", "steps", "batch_size", "seq_len", "d_model", "n_layers", "n_heads",
                                    "d_ff", "n_experts", "top_k", "lr", "weight_decay", "eval_every",
                                    "eval_batches", "dropout")} == {
        "seed": 0, "steps": 50, "batch_size": 16, "seq_len": 512, "d_model": 512, "n_layers": 8, "n_heads": 8,
        "d_ff": 2048, "n_experts": 8, "top_k": 2, "lr": 1e-4, "weight_decay": 0.01, "eval_every": 10,
        "eval_batches": 10, "dropout": 0.1}
    assert values["dataset"] == "HuggingFaceTB/smollm-corpus" and values["dataset_config"] == "cosmopedia-v2"
    assert values["tokenizer"] == "HuggingFaceTB/SmolLM-135M" and values["max_documents"] > 0
    # the seed's model, not ours: the seed recipe, every knob at the seed's value
    cfg = config_from_values(values)
    assert values["recipe"] == "seed"
    assert (cfg.embed_scale, cfg.aux_loss_reduction, cfg.expert_dropout, cfg.final_dropout,
            cfg.init_residual_scaling, cfg.grad_clip) == (True, "sum", 0.1, 0.1, False, 0.0)


def test_smoke_and_seeds_are_small_and_on_the_embedded_corpus():
    """seeds.yaml: the 13 on the embedded corpus at a laptop size (a language model); lm_smoke.yaml:
    its baseline alone at the same settings (the main job's regime statement); smoke.yaml: the 13 on
    a task at a laptop size. Each on 3 seeds, so the report's paired tests and verdicts appear."""
    for name in ("seeds.yaml", "lm_smoke.yaml"):
        values = fixed(load(name))
        assert "dataset" not in values and "tokenizer" not in values and "task" not in values  # train.py's embedded lm
        cfg = config_from_values(values)
        assert cfg.d_model <= 128 and cfg.seq_len <= 256 and cfg.steps <= 200 and cfg.task == "lm"
    seeds, lm = fixed(load("seeds.yaml")), fixed(load("lm_smoke.yaml"))
    assert {k: v for k, v in lm.items() if k != "attention"} == {k: v for k, v in seeds.items() if k != "seed"}
    assert lm["attention"] == "baseline"
    smoke = config_from_values(fixed(load("smoke.yaml")))
    assert smoke.task == "mqar" and smoke.d_model <= 128 and smoke.steps <= 1000
    for name, runs in (("smoke.yaml", 39), ("seeds.yaml", 39), ("lm_smoke.yaml", 3)):
        assert load(name)["parameters"]["seed"]["values"] == [0, 1, 2]
        assert validate.grid_size_and_runs(load(name))[0] == runs


def test_the_controls_run_on_the_smoke_task_and_both_evaluate_at_2x_and_4x_the_trained_length():
    """README: the main job gives a verdict "at the trained length and at 2x and 4x it", and the
    controls' effects are read against the smoke sweep's: both must train and evaluate alike."""
    smoke, controls = fixed(load("smoke.yaml")), fixed(load("controls_smoke.yaml"))
    assert controls == smoke  # every fixed setting (the task, the model, the recipe) the same
    assert load("controls_smoke.yaml")["parameters"]["seed"] == load("smoke.yaml")["parameters"]["seed"]
    assert "baseline" in load("controls_smoke.yaml")["parameters"]["attention"]["values"]
    for values in (smoke, controls):
        cfg = config_from_values(values)
        assert cfg.lengths == (2 * cfg.seq_len, 4 * cfg.seq_len)


def test_multigpu_command_is_accelerate_launch_then_the_program():
    command = load("fast_multigpu.yaml")["command"]
    assert "accelerate" in command and "launch" in command  # separate items, not "accelerate launch"
    start, program = command.index("launch"), command.index("${program}")
    assert command.index("accelerate") + 1 == start
    options = command[start + 1: program]
    assert options and all(str(o).startswith("--") for o in options)  # ${program} right after the options
    assert "${interpreter}" not in command  # accelerate starts python itself
    assert command[program + 1:] == ["${args}"]  # every process gets the sweep's values
    processes = [int(str(o).split("=")[1]) for o in options if str(o).startswith("--num_processes=")]
    assert processes and fixed(load("fast_multigpu.yaml"))["batch_size"] % processes[0] == 0
    # otherwise the same experiment as fast.yaml
    assert load("fast_multigpu.yaml")["parameters"] == load("fast.yaml")["parameters"]
    argv = macros.expand_command(command, {"attention": "baseline", "seed": 0}, program="train.py",
                                      interpreter="python", args_json_file="x.json")
    assert argv[:3] == ["/usr/bin/env", "accelerate", "launch"]
    assert argv[argv.index("train.py") + 1:] == ["--attention=baseline", "--seed=0"]


def test_learning_rate_values_are_floats():
    for name in NAMES:
        spec = load(name)["parameters"]["lr"]
        for lr in spec.get("values", [spec.get("value")]):  # the tuning sweeps list a grid of lrs
            assert isinstance(lr, float) and math.isfinite(lr) and lr > 0


@pytest.mark.parametrize("name", ["tune.yaml", "tune_smoke.yaml"])
def test_the_tuning_sweeps_cross_variants_with_a_log_spaced_lr_grid_on_tuning_seeds(name):
    """Stage 1 of the tuning protocol: variants x lrs x 2+ seeds, nothing else varied (stage 2 is
    built from it; analysis/tuning.py refuses a stage 1 that varied anything else)."""
    config = load(name)
    varied = {k for k, v in config["parameters"].items() if "values" in v}
    assert varied == {"attention", "lr", "seed"}
    lrs = config["parameters"]["lr"]["values"]
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert len(lrs) >= 3 and all(2.5 < r < 4 for r in ratios)  # ~3x apart: even steps in log space
    assert len(config["parameters"]["seed"]["values"]) >= 2


def test_two_multigpu_launches_on_one_machine_do_not_share_a_port():
    """fast_multigpu's launch options, parsed and prepared by accelerate's own launcher code: the
    port is picked free per launch instead of the fixed default both launches would take."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    command = load("fast_multigpu.yaml")["command"]
    options = command[command.index("launch") + 1: command.index("${program}")]

    def port(launch_options):
        args = launch_command_parser().parse_args([*launch_options, "train.py", "--seed=0"])
        args = _validate_launch_command(args)[0]
        prepare_multi_gpu_env(args)
        return int(args.master_port)

    default = port([o for o in options if not o.startswith("--main_process_port")])
    assert default == 29500  # without the option: every launch on the machine asks for the same port
    assert port(options) != default
