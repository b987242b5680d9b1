"""The recipe knobs, each against first principles, and `--recipe=seed` as a preset: the seed's
model (vukrosic/blueberry-llm-kimi-deepseek b61d942) is embeddings x sqrt(d_model), 0.01 x the
balance loss summed over layers, dropout inside each expert after SiLU and after the final norm,
every Linear at std 0.02, and no gradient clipping. Also: the model runs in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

import config
import train
from attention import VARIANTS
from config import RECIPES, ConfigError, TrainConfig, config_from_values
from model import ModelConfig, MoELM, init_weights
from train_helpers import offline_run_when_ended, read_record, small_corpus, tiny_args

SMALL = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4, top_k=2, seq_len=16)
SEED_KNOBS = {"embed_scale": True, "aux_loss_reduction": "sum", "expert_dropout": 0.1, "final_dropout": 0.1,
              "init_residual_scaling": False, "grad_clip": 0.0}  # copied from the issue, not from RECIPES


def build(name="baseline", seed=0, **knobs) -> MoELM:
    model = MoELM(ModelConfig(attention=VARIANTS[name], **{**SMALL, **knobs}))
    init_weights(model, seed)
    return model


def keep_input(store: dict, key: str):
    """A forward pre-hook that keeps the module's first input (and returns None: inputs unchanged)."""
    def hook(module, args):
        store.setdefault(key, args[0])
    return hook


def keep_output(store: dict, key: str):
    def hook(module, args, output):
        store.setdefault(key, output)
    return hook


def ids(batch=2, length=SMALL["seq_len"], seed=3):
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the preset ------------------------------------------------------------------------------------

def test_seed_recipe_sets_every_knob_and_explicit_values_win():
    default, seed = config_from_values({}), config_from_values({"recipe": "seed"})
    assert RECIPES["seed"] == SEED_KNOBS
    assert {k: getattr(seed, k) for k in SEED_KNOBS} == SEED_KNOBS
    assert {k: getattr(default, k) for k in SEED_KNOBS} == {k: getattr(TrainConfig(), k) for k in SEED_KNOBS}
    assert default.grad_clip == 1.0 and not default.embed_scale and default.init_residual_scaling
    # Given explicitly (command line, or a sweep's ${args} as typed YAML values), a knob wins.
    mixed = config_from_values({"recipe": "seed", "expert_dropout": "0", "grad_clip": 0.5})
    assert mixed.expert_dropout == 0.0 and mixed.grad_clip == 0.5 and mixed.embed_scale is True
    # The sweep check compares what the sweep gave with the resolved config: they agree.
    train.check_sweep_agrees(mixed, {"recipe": "seed", "expert_dropout": 0, "grad_clip": 0.5})


@pytest.mark.parametrize("values,expected", [
    ({"recipe": "seeed"}, "--recipe=seeed"),
    ({"aux_loss_reduction": "max"}, "--aux_loss_reduction=max"),
    ({"expert_dropout": 1.5}, "--expert_dropout=1.5"),
    ({"final_dropout": -0.1}, "--final_dropout=-0.1"),
    ({"embed_scale": "maybe"}, "--embed_scale=maybe"),
])
def test_recipe_knobs_are_validated(values, expected):
    with pytest.raises(ConfigError, match=expected.replace("+", r"\+")):
        config_from_values(values)


def test_help_shows_what_each_recipe_sets():
    text = config.help_text()
    assert "--recipe=default" in text
    seed_line = next(line for line in text.splitlines() if "--recipe=seed:" in line)
    for name, value in SEED_KNOBS.items():
        assert f"--{name}={value}" in seed_line


# --- each knob from first principles --------------------------------------------------------------

@pytest.mark.parametrize("scale", [False, True])
def test_embed_scale_multiplies_the_table_row_by_sqrt_d_model(scale):
    model = build(embed_scale=scale, dropout=0.0).eval()
    seen = {}
    model.layers[0].register_forward_pre_hook(keep_input(seen, "x"))
    tokens = ids()
    with torch.no_grad():
        model(tokens)
    factor = math.sqrt(SMALL["d_model"]) if scale else 1.0  # 8.0
    torch.testing.assert_close(seen["x"], factor * model.embed_tokens.weight[tokens], rtol=0, atol=0)


def switch_loss_by_hand(tokens: torch.Tensor, gate: torch.Tensor, n_experts: int, top_k: int) -> float:
    """n_experts * sum_e (share of the top-k assignments to e) * (mean softmax probability of e)."""
    logits = (tokens @ gate.T).tolist()
    counts, probs = [0] * n_experts, [0.0] * n_experts
    for row in logits:
        for e in sorted(range(n_experts), key=lambda e: -row[e])[:top_k]:
            counts[e] += 1
        total = sum(math.exp(v) for v in row)
        for e in range(n_experts):
            probs[e] += math.exp(row[e]) / total
    n = len(logits)
    return n_experts * sum(counts[e] / (n * top_k) * probs[e] / n for e in range(n_experts))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_balance_loss_is_the_sum_or_mean_of_per_layer_losses_by_hand(reduction):
    model = build(aux_loss_reduction=reduction, n_layers=3).eval()  # eval: no router noise
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.mlp.register_forward_pre_hook(keep_input(seen, i))
    tokens = ids()
    with torch.no_grad():
        out = model(tokens[:, :-1], tokens[:, 1:])
    ce, aux = out.loss, out.aux_loss
    per_layer = [switch_loss_by_hand(x.reshape(-1, SMALL["d_model"]).double(), layer.mlp.gate.weight.double(),
                                     SMALL["n_experts"], SMALL["top_k"]) for x, layer in zip(seen.values(), model.layers)]
    assert len(per_layer) == 3 and all(v >= 1.0 - 1e-6 for v in per_layer)  # 1 exactly when uniform
    expected = sum(per_layer) if reduction == "sum" else sum(per_layer) / 3
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    # The training objective adds aux_loss_weight (0.01) x that.
    assert TrainConfig().aux_loss_weight == 0.01


def dropout_sites(model: MoELM, monkeypatch) -> list[str]:
    """The modules whose F.dropout ran with p > 0 in one training forward, in call order."""
    names = {id(m): n for n, m in model.named_modules()}
    calls, current = [], []
    original = F.dropout

    def counting(input, p=0.5, training=True, inplace=False):
        if training and p > 0:
            calls.append(current[-1] if current else "?")
        return original(input, p, training, inplace)

    monkeypatch.setattr(F, "dropout", counting)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_pre_hook(lambda m, a: current.append(names[id(m)]))  # returns None
            module.register_forward_hook(lambda m, a, o: current.pop() and None)  # None: output unchanged
    model.train()
    tokens = ids()
    model(tokens[:, :-1], tokens[:, 1:])
    return calls


def test_dropout_sites_default_recipe(monkeypatch):
    sites = dropout_sites(build(dropout=0.1), monkeypatch)
    assert sites == ["dropout"] + ["layers.0.dropout"] * 2 + ["layers.1.dropout"] * 2


def test_dropout_sites_seed_recipe_inside_each_expert_and_after_the_final_norm(monkeypatch):
    model = build(dropout=0.1, expert_dropout=0.1, final_dropout=0.1)
    seen = {}
    model.norm.register_forward_hook(keep_output(seen, "norm_out"))
    model.final_dropout.register_forward_pre_hook(keep_input(seen, "final_in"))
    model.layers[0].mlp.expert_dropout.register_forward_pre_hook(keep_input(seen, "expert_in"))
    sites = dropout_sites(model, monkeypatch)
    per_layer = lambda i: [f"layers.{i}.dropout", f"layers.{i}.mlp.expert_dropout", f"layers.{i}.dropout"]
    assert sites == ["dropout", *per_layer(0), *per_layer(1), "final_dropout"]
    assert seen["final_in"] is seen["norm_out"]  # directly after the final norm
    # Inside the expert, after SiLU: (tokens x top_k) rows of d_ff hidden units, SiLU's range.
    n_slots = 2 * (SMALL["seq_len"] - 1) * SMALL["top_k"]
    assert seen["expert_in"].shape == (n_slots, SMALL["d_ff"])
    assert seen["expert_in"].min().item() >= -0.2785  # SiLU's minimum, -0.27846...


@pytest.mark.parametrize("scaling", [True, False])
def test_init_std_per_parameter_group(scaling):
    sizes = dict(SMALL, vocab_size=2000, d_model=256, n_layers=4, d_ff=512, n_heads=4)
    model = MoELM(ModelConfig(attention=VARIANTS["lora_medium"], **{**sizes, "init_residual_scaling": scaling}))
    init_weights(model, 0)
    groups = {"residual outputs": [], "other matrices": []}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue  # norms (ones) and biases (zeros)
        residual = name.endswith(("o_proj.weight", "down_proj"))
        groups["residual outputs" if residual else "other matrices"].append(param.detach().flatten())
    expected = {"other matrices": 0.02, "residual outputs": 0.02 / math.sqrt(2 * 4) if scaling else 0.02}
    for group, values in groups.items():
        values = torch.cat(values)
        assert values.numel() > 500_000
        # The sample std of n normal draws is within ~1/sqrt(2n) relative of the true one: 1% is > 10 SE.
        assert values.std().item() == pytest.approx(expected[group], rel=0.01), group
        assert abs(values.mean().item()) < 1e-4


# --- float64 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_float64_forward_and_backward(name):
    model = build(name, router_noise_std=0.0, dropout=0.0).double().train()
    tokens = ids()
    out = model(tokens[:, :-1])
    logits, aux = out.logits, out.aux_loss
    assert logits.dtype == torch.float64
    out = model(tokens[:, :-1], tokens[:, 1:])
    ce, aux = out.loss, out.aux_loss
    (ce + 0.01 * aux).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float64, pname
        assert torch.isfinite(param.grad).all(), pname
    reference = build(name, router_noise_std=0.0, dropout=0.0).train()
    ce32 = reference(tokens[:, :-1], tokens[:, 1:]).loss
    assert ce.item() == pytest.approx(ce32.item(), rel=1e-4)


# --- a run with the seed recipe: what it trained is what it says -----------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def test_seed_recipe_run_logs_resolved_knobs_and_does_not_clip(tmp_path, corpus, monkeypatch):
    """grad_clip 0 means the gradients reach the optimizer as computed: the clipping call leaves
    them unchanged although their norm is above the default recipe's clip of 1.0."""
    real_clip = torch.nn.utils.clip_grad_norm_
    norms = []

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = [p.grad.clone() for p in parameters]
        total = real_clip(parameters, max_norm, *args, **kwargs)
        norms.append(total.item())
        assert all(torch.equal(b, p.grad) for b, p in zip(before, parameters)), "gradients were clipped"
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code = train.main(tiny_args(tmp_path, corpus, recipe="seed", lr=0.03, steps=4, eval_every=4))
    assert code == 0
    assert len(norms) == 4 and max(norms) > 1.0
    record = read_record(tmp_path / "results", "local", "baseline-s0")
    assert {k: record["config"][k] for k in SEED_KNOBS} == SEED_KNOBS
    assert record["config"]["recipe"] == "seed"
    (run_dir,) = (tmp_path / "results" / "wandb").glob("offline-run-*")
    logged = offline_run_when_ended(run_dir)["config"]
    assert {k: logged[k] for k in SEED_KNOBS} == SEED_KNOBS
