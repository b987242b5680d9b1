"""The attention-kind contract (attention/registry.py's docstring), checked for every kind in KINDS,
each failure naming what the kind lacks; the init every module declares against the rule model.py
applied before kinds declared their own (kept here as an oracle), drawn bit for bit as before; and
bench comparing a kind that has no seed-style twin against its reference implementation."""
import hashlib
import inspect
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import attention.registry
from attention import KINDS, VARIANTS, AttentionSpec, attention_class, build_attention
from attention.cache import CacheSize
from attention.init import Constant, Init, Normal
from attention.modules import MultiHeadAttention
from bench.reference import KindReference, build_reference, has_reference
from model import INIT_STD, ModelConfig, MoELM, init_weights, parameter_inits
from test_attention import causal_mask, rel_err
from test_perf import SMALL, assert_same_step

ROOT = Path(__file__).resolve().parent.parent
D_MODEL, N_HEADS, CONTEXT, N_LAYERS = 32, 4, 16, 3
METHODS = ("forward", "new_cache", "cache_size", "token_mixing_flops", "parameter_init")


def contract_problems(kind: str) -> list[str]:
    """What the kind lacks of the contract, one sentence each naming it; [] when it has it all."""
    entry = KINDS[kind]
    variants = [spec for spec in VARIANTS.values() if spec.kind == kind]
    if not variants:
        return [f"{kind}: no variant of it in VARIANTS (attention/registry.py)"]
    try:
        cls = attention_class(kind)
    except (ImportError, AttributeError, ValueError) as error:
        return [f"{kind}: KINDS[{kind!r}].module = {entry.module!r} does not import ({error})"]
    problems = [f"{cls.__name__}: no {name}() method (the contract, attention/registry.py)"
                for name in METHODS if not callable(getattr(cls, name, None))]
    arguments = inspect.signature(cls.__init__).parameters
    if "kernel" not in arguments:
        problems.append(f"{cls.__name__}.__init__ takes no 'kernel' (every module is built with the attention "
                        f"kernel choice, attention.kernels.AttentionKernel)")
    problems += [f"{cls.__name__}.__init__ takes no {name!r} (every module is built with its layer index)"
                 for name in ("layer", "n_layers") if name not in arguments]
    if "cache" not in inspect.signature(cls.forward).parameters:
        problems.append(f"{cls.__name__}.forward takes no cache (forward(x, cache) decodes)")
    test = ROOT / entry.test
    if not entry.reference:
        problems.append(f"{kind}: KINDS[{kind!r}].reference does not say what it is checked against")
    if not test.is_file():
        problems.append(f"{kind}: its reference test KINDS[{kind!r}].test = {entry.test!r} does not exist")
    elif not any(f'"{spec.name}"' in test.read_text() for spec in variants):
        problems.append(f"{kind}: {entry.test} tests no variant of it")
    elif hasattr(cls, "reference_attention"):  # a later kind: checked through the shared comparison
        problems += [f"{kind}: {entry.test} never calls reference_check.{name} ({why})" for name, why in (
            ("relative_errors", "outputs, input and parameter gradients against the reference"),
            ("assert_bench_compares_with_the_reference", "bench/ times it against that reference"))
            if f"{name}(" not in test.read_text()]
    if not has_reference(variants[0]):
        problems.append(f"{kind}: bench/ cannot compare it: no seed-style twin in bench/reference.py and no "
                        f"{cls.__name__}.reference_attention")
    if problems:
        return problems
    for spec in variants:
        for layer in range(N_LAYERS):
            problems += _module_problems(spec, layer)
    return problems


def _module_problems(spec: AttentionSpec, layer: int) -> list[str]:
    where = f"{spec.name}, layer {layer}"
    module = build_attention(spec, D_MODEL, N_HEADS, max_len=CONTEXT, layer=layer, n_layers=N_LAYERS).eval()
    name = type(module).__name__
    declared, own = module.parameter_init(INIT_STD, INIT_STD / 2), dict(module.named_parameters())
    if declared.keys() != own.keys():
        missing, extra = sorted(own.keys() - declared.keys()), sorted(declared.keys() - own.keys())
        return [f"{where}: {name}.parameter_init declares " + " and ".join(
            ([f"no init for {missing}"] if missing else []) + ([f"one for {extra}, which it does not have"] if extra else []))]
    not_init = sorted(n for n, rule in declared.items() if not isinstance(rule, Init))
    if not_init:
        return [f"{where}: {name}.parameter_init gives {not_init} something that is no attention.init.Init"]
    gen = torch.Generator().manual_seed(layer)
    with torch.no_grad():  # the declared rules at a larger scale, so the outputs are far from 0
        for param_name, param in own.items():
            rule = declared[param_name]
            param.copy_(Normal(0.3).draw(param.shape, gen) if isinstance(rule, Normal) else rule.draw(param.shape, gen))
    problems = []
    for context in (1, 5, CONTEXT, 3 * CONTEXT):
        size = module.cache_size(context)
        if not isinstance(size, CacheSize):
            return [f"{where}: {name}.cache_size returns {type(size).__name__}, not attention.cache.CacheSize"]
        cache = module.new_cache(2, context, torch.float32)
        if cache.nbytes != 2 * size.values * 4:
            problems.append(f"{where}: {name}.new_cache(2, {context}) holds {cache.nbytes} bytes, cache_size says "
                            f"2 x {size.values} float32 values")
    flops = module.token_mixing_flops(CONTEXT)
    if not isinstance(flops, int) or flops < 0:
        problems.append(f"{where}: {name}.token_mixing_flops({CONTEXT}) = {flops!r}, not a count")
    try:  # the model's costs ask modules built on the meta device
        with torch.device("meta"):
            meta = build_attention(spec, D_MODEL, N_HEADS, max_len=CONTEXT, layer=layer, n_layers=N_LAYERS)
        if (meta.cache_size(CONTEXT), meta.token_mixing_flops(CONTEXT)) != (module.cache_size(CONTEXT), flops):
            problems.append(f"{where}: {name} built on the meta device reports other costs")
    except (RuntimeError, NotImplementedError) as error:
        problems.append(f"{where}: {name} does not build on the meta device ({error})")
    x = torch.randn(2, 7, D_MODEL, generator=gen)
    cache = module.new_cache(2, CONTEXT)
    with torch.no_grad():
        full = module(x)
        stepped = torch.cat([module(x[:, :5], cache), module(x[:, 5:6], cache), module(x[:, 6:], cache)], dim=1)
    if rel_err(stepped, full) > 1e-5:
        problems.append(f"{where}: {name}.forward(x, cache), a prompt then one token at a time, is not the full "
                        f"forward (rel err {rel_err(stepped, full):.1e})")
    return problems


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_meets_the_contract(kind):
    assert contract_problems(kind) == []


class Incomplete(MultiHeadAttention):
    """A kind as a contributor might first write it: no cost methods, a parameter without an init,
    no kernel choice, no layer index."""
    cache_size = token_mixing_flops = None

    def __init__(self, spec, d_model, n_heads, dropout, rope_theta, max_len=0):
        super().__init__(spec, d_model, n_heads, dropout, rope_theta, max_len)
        self.extra = torch.nn.Parameter(torch.zeros(3))


class UndeclaredParameter(MultiHeadAttention):
    """The same with the methods and the layer index, still a parameter without an init; and one it
    declares an init for that it does not have."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = torch.nn.Parameter(torch.zeros(3))

    __init__.__signature__ = inspect.signature(MultiHeadAttention.__init__)

    def parameter_init(self, std, residual_std):
        return {**super().parameter_init(std, residual_std), "gone": Normal(std)}

    @classmethod
    def reference_attention(cls, *args):
        raise NotImplementedError


def test_the_contract_names_what_a_kind_lacks(monkeypatch, tmp_path):
    monkeypatch.setitem(KINDS, "half", replace(KINDS["mha"], name="half", module="test_kind_contract:Incomplete",
                                                test="tests/test_half.py"))
    assert contract_problems("half") == ["half: no variant of it in VARIANTS (attention/registry.py)"]
    monkeypatch.setitem(VARIANTS, "half", AttentionSpec(name="half", family="baseline", kind="half"))
    assert contract_problems("half") == [
        "Incomplete: no cache_size() method (the contract, attention/registry.py)",
        "Incomplete: no token_mixing_flops() method (the contract, attention/registry.py)",
        "Incomplete.__init__ takes no 'kernel' (every module is built with the attention kernel choice, "
        "attention.kernels.AttentionKernel)",
        "Incomplete.__init__ takes no 'layer' (every module is built with its layer index)",
        "Incomplete.__init__ takes no 'n_layers' (every module is built with its layer index)",
        "half: its reference test KINDS['half'].test = 'tests/test_half.py' does not exist",
        "half: bench/ cannot compare it: no seed-style twin in bench/reference.py and no Incomplete.reference_attention",
    ]
    half_test = tmp_path / "test_half.py"  # absolute: ROOT / it is it
    half_test.write_text('VARIANT = "half"\n')
    monkeypatch.setitem(KINDS, "half", replace(KINDS["half"], module="test_kind_contract:UndeclaredParameter",
                                                test=str(half_test)))
    assert contract_problems("half") == [
        f"half: {half_test} never calls reference_check.relative_errors (outputs, input and parameter gradients "
        "against the reference)",
        f"half: {half_test} never calls reference_check.assert_bench_compares_with_the_reference (bench/ times it "
        "against that reference)"]
    half_test.write_text('VARIANT = "half"\nerrors = relative_errors(ours, ref, run, run, x)\n'
                         'assert_bench_compares_with_the_reference("half")\n')
    assert contract_problems("half") == [
        f"half, layer {layer}: UndeclaredParameter.parameter_init declares no init for ['extra'] and one for "
        "['gone'], which it does not have" for layer in range(N_LAYERS)]


# --- init: what each module declares is the rule model.py applied to every attention parameter ----

def name_pattern_init(name: str, std: float, residual_std: float) -> Init:
    """The oracle: model.py's rule before kinds declared their init, by parameter name: norm weights
    1, biases 0, o_proj and the experts' down_proj N(0, residual std), the rest N(0, std)."""
    if name.endswith("norm.weight"):
        return Constant(1.0)
    if name.endswith(".bias"):
        return Constant(0.0)
    return Normal(residual_std if name.endswith(("o_proj.weight", "down_proj")) else std)


TINY_MODEL = dict(vocab_size=64, d_model=32, n_layers=N_LAYERS, n_heads=4, d_ff=32, n_experts=4, top_k=2, seq_len=16)
# The kinds that existed before kinds declared their init: what they declare must be that rule, so
# their variants start bit for bit as before. A later kind declares its own (diff's lambdas N(0, 0.1),
# Gated DeltaNet's decay rates), which its own test checks against its reference's init.
NAME_PATTERN_KINDS = ("mha", "mla")


def oracle_init(model: MoELM, name: str, std: float, residual_std: float) -> Init | None:
    """The name-pattern rule for a parameter outside attention (shared by every variant, so equal
    init across variants) or in a layer of a kind that existed before; None for a later kind's."""
    if name.startswith("layers.") and ".self_attn." in name:
        layer = int(name.split(".")[1])
        if model.cfg.attention.layer_spec(layer, model.cfg.n_layers).kind not in NAME_PATTERN_KINDS:
            return None
    return name_pattern_init(name, std, residual_std)


def test_the_oracle_covers_the_kinds_from_before_and_leaves_the_later_ones_to_their_tests():
    # No list of the later kinds here: a new kind must not need an edit of this file.
    assert set(NAME_PATTERN_KINDS) < set(KINDS)
    assert all(f'"{kind}"' in (ROOT / KINDS[kind].test).read_text() and "parameter_init" in
               (ROOT / KINDS[kind].test).read_text() for kind in KINDS if kind not in NAME_PATTERN_KINDS)


def init_mismatches(spec: AttentionSpec, residual_scaling: bool = True) -> list[str]:
    """The parameters whose declared init is not the oracle's (where the oracle covers them)."""
    residual_std = 0.02 / math.sqrt(2 * N_LAYERS) if residual_scaling else 0.02
    with torch.device("meta"):
        model = MoELM(ModelConfig(attention=spec, init_residual_scaling=residual_scaling, **TINY_MODEL))
    declared = parameter_inits(model)
    return [name for name, _ in model.named_parameters()
            if (rule := oracle_init(model, name, 0.02, residual_std)) is not None and declared[name] != rule]


@pytest.mark.parametrize("residual_scaling", [True, False])
def test_every_variants_declared_init_is_the_name_pattern_rule(residual_scaling):
    """All of it for the kinds from before; for a later kind's variant, everything outside its
    attention layers (a hybrid's full layers included)."""
    for name, spec in VARIANTS.items():
        assert init_mismatches(spec, residual_scaling) == [], name


def test_the_init_oracle_sees_a_changed_rule(monkeypatch):
    """Negative control: multi-head attention declaring o_proj at the plain std is caught on the
    baseline and on the hybrid's full layer (layer 2 of 3: the interval at 3 layers), not elsewhere."""
    declare = MultiHeadAttention.parameter_init
    monkeypatch.setattr(MultiHeadAttention, "parameter_init",
                        lambda self, std, residual_std: declare(self, std, std))
    assert init_mismatches(VARIANTS["baseline"]) == [f"layers.{i}.self_attn.o_proj.weight" for i in range(N_LAYERS)]
    assert init_mismatches(VARIANTS["hybrid_gdn"]) == ["layers.2.self_attn.o_proj.weight"]
    assert init_mismatches(VARIANTS["mla_v3"]) == init_mismatches(VARIANTS["gated_deltanet"]) == []


def test_init_weights_draws_as_before_for_every_variant():
    """Bit for bit the values of the per-name generators the seed's init drew from: sha256 of
    "seed:name", its first 8 bytes little-endian, one normal_ per parameter (norms 1, biases 0); a
    later kind's parameters by its declared rule from that same generator."""
    residual_std = 0.02 / math.sqrt(2 * N_LAYERS)
    for name, spec in VARIANTS.items():
        model = MoELM(ModelConfig(attention=spec, **TINY_MODEL))
        init_weights(model, 11)
        declared = parameter_inits(model)
        for param_name, param in model.named_parameters():
            rule = oracle_init(model, param_name, 0.02, residual_std)
            digest = hashlib.sha256(f"11:{param_name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            if rule is None:
                expected = declared[param_name].draw(param.shape, generator)
            elif isinstance(rule, Constant):
                expected = torch.full(param.shape, rule.value)
            else:
                expected = torch.empty(param.shape).normal_(0.0, rule.std, generator=generator)
            assert torch.equal(param.detach(), expected), (name, param_name)


def test_init_refuses_an_attention_parameter_without_a_declared_init():
    model = MoELM(ModelConfig(attention=VARIANTS["baseline"], **TINY_MODEL))
    model.layers[1].self_attn.extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"MultiHeadAttention.parameter_init: declares no init for \['extra'\]"):
        init_weights(model, 0)


# --- bench: a kind without a seed-style twin is compared with its reference implementation -----------

class LlamaKind(MultiHeadAttention):
    """A stand-in for a new kind: multi-head attention, whose reference implementation for bench/ is
    transformers' LlamaAttention (eager), our weights copied in."""

    @classmethod
    def reference_attention(cls, spec, d_model, n_heads, dropout, rope_theta, layer, n_layers):
        from transformers.models.llama.configuration_llama import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        config = LlamaConfig(hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=spec.n_kv_heads,
                             head_dim=d_model // n_heads, attention_bias=spec.attention_bias,
                             attention_dropout=dropout, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                             max_position_embeddings=4096, num_hidden_layers=n_layers)
        config._attn_implementation = "eager"
        ref, rotary = LlamaAttention(config, layer_idx=layer), LlamaRotaryEmbedding(config)

        def forward(x):
            positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
            return ref(x, rotary(x, positions), cls.mask(x.shape[1]).to(x.device))[0]
        return ref, forward

    @staticmethod
    def mask(length):
        return causal_mask(length)


class LlamaKindWithoutMask(LlamaKind):
    """A planted bug in the reference: no causal mask."""

    @staticmethod
    def mask(length):
        return torch.zeros(1, 1, length, length)


def llama_kind_config(monkeypatch, module: str, **knobs) -> ModelConfig:
    monkeypatch.setitem(attention.registry.KINDS, "llama", replace(KINDS["mha"], name="llama", module=module))
    return ModelConfig(attention=AttentionSpec(name="llama", family="baseline", kind="llama", **knobs),
                       **{k: v for k, v in SMALL.items()})


@pytest.mark.parametrize("knobs", [{}, {"n_kv_heads": 2, "attention_bias": True}])
def test_bench_compares_a_kind_without_a_twin_with_its_reference(monkeypatch, knobs):
    cfg = llama_kind_config(monkeypatch, "test_kind_contract:LlamaKind", **knobs)
    assert has_reference(cfg.attention)
    ours, ref = MoELM(cfg), build_reference(cfg)
    assert all(isinstance(layer.self_attn, KindReference) for layer in ref.layers)
    init_weights(ours, 0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    assert_same_step(ours.train(), ref.train(), ids)
    broken = build_reference(llama_kind_config(monkeypatch, "test_kind_contract:LlamaKindWithoutMask", **knobs))
    broken.load_state_dict(ours.state_dict(), strict=True)
    with pytest.raises(AssertionError):  # negative control: the comparison sees a bug in the reference
        assert_same_step(ours, broken.train(), ids)


def test_bench_refuses_a_kind_with_neither_twin_nor_reference(monkeypatch):
    cfg = llama_kind_config(monkeypatch, "attention.modules:MultiHeadAttention")
    assert not has_reference(cfg.attention)
    with pytest.raises(ValueError, match="give the kind's module a reference_attention"):
        build_reference(cfg)
