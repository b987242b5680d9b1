"""The mechanism probes (probes.py, --probes=True) against hand-computed numbers and independent
references, and end to end: probes on leave training unchanged, run only inside evaluation, and
reach the record, the offline W&B run and the report's figure."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import probes
import record
import train
from attention import VARIANTS, build_attention
from attention.modules import MultiHeadAttention
from model import MoELM, ModelConfig, init_weights
from probes import Probes, attention_entropy, expert_load, first_token_share, kurtosis
from test_attention import (D_MODEL, N_HEADS, THETA, causal_mask, deepseek_reference, explicit_mha, llama_reference,
                            qwen3_reference, randomize_)
from train_helpers import TINY, offline_run_contents, read_record, small_corpus, tiny_args


# --- the measures, on hand-built cases -------------------------------------------------------------

def test_entropy_of_uniform_attention_is_log_of_the_keys_and_of_one_hot_zero():
    for keys in (1, 2, 7, 64):
        uniform = torch.full((3, 5, keys), 1.0 / keys)  # 3 heads x 5 queries
        assert attention_entropy(uniform).item() == pytest.approx(math.log(keys), abs=1e-6)
    one_hot = torch.zeros(2, 4, 9)
    one_hot[..., 3] = 1.0
    assert attention_entropy(one_hot).item() == 0.0
    # causal and uniform: query i spreads over keys 0..i, so the mean is mean_i log(i + 1)
    length = 6
    causal = torch.tril(torch.ones(length, length)) / torch.arange(1, length + 1)[:, None]
    expected = sum(math.log(i + 1) for i in range(length)) / length
    assert attention_entropy(causal).item() == pytest.approx(expected, abs=1e-6)


def test_first_token_share_on_a_constructed_case():
    # two queries: one puts 0.5 on the first key, the other 0.1 -> mean 0.3
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.0, 0.9]])
    assert first_token_share(probs).item() == pytest.approx(0.3)


def test_kurtosis_of_a_hand_vector_and_of_normal_samples():
    # [1, 0, 0, 0, -1]: mean 0, variance 2/5, fourth moment 2/5 -> (2/5) / (2/5)^2 = 2.5
    assert kurtosis(torch.tensor([[1.0, 0, 0, 0, -1]])).item() == pytest.approx(2.5)
    assert kurtosis(torch.tensor([[-1.0, 1.0]])).item() == pytest.approx(1.0)  # two points: the minimum
    normal = torch.randn(4, 250_000, generator=torch.Generator().manual_seed(0))
    assert kurtosis(normal) == pytest.approx(torch.full((4,), 3.0, dtype=torch.float64), abs=0.05)
    # a heavy tail (Laplace: 6) is far from it
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1, 250_000))
    assert kurtosis(laplace).item() == pytest.approx(6.0, abs=0.3)


def test_expert_load_shares_and_entropy_by_hand():
    largest, smallest, entropy = expert_load(torch.tensor([6, 2, 0, 0]))
    assert (largest.item(), smallest.item()) == (0.75, 0.0)
    assert entropy.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    _, _, balanced = expert_load(torch.tensor([5, 5, 5, 5]))
    assert balanced.item() == pytest.approx(math.log(4))


def tiny_model(attention="baseline", n_layers=2, seed=0) -> MoELM:
    cfg = ModelConfig(attention=VARIANTS[attention], vocab_size=64, d_model=32, n_layers=n_layers,
                      n_heads=4, d_ff=64, n_experts=4, top_k=2, seq_len=16)
    model = MoELM(cfg)
    init_weights(model, seed)
    return model.eval()


def probe_values(model, ids) -> dict:
    with torch.no_grad(), Probes(model) as measured:
        model(ids, ids)
    names, values = measured.tensor()
    return probes.with_layer_means(dict(zip(names, values.tolist())))


def test_expert_load_of_a_hand_routed_batch():
    """The router hook counts the top-k choices: a router that reads the first 4 dims (identity
    rows), and three tokens whose top-2 by hand are (0, 1), (0, 2), (0, 1): expert 0 has 3 of the 6
    routed slots, 1 has 2, 2 has 1, 3 none."""
    model = tiny_model(n_layers=1)
    router = model.layers[0].mlp.gate
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, 32))
    tokens = torch.zeros(3, 32)
    tokens[0, :4] = torch.tensor([3.0, 2, 0, 0])
    tokens[1, :4] = torch.tensor([3.0, 0, 2, 0])
    tokens[2, :4] = torch.tensor([3.0, 2, 0, -1])
    with torch.no_grad(), Probes(model) as measured:
        router(tokens)
    names, values = measured.tensor()
    got = dict(zip(names, values.tolist()))
    shares = [3 / 6, 2 / 6, 1 / 6]
    assert got["probe/expert_load_max/layer0"] == pytest.approx(0.5)
    assert got["probe/expert_load_min/layer0"] == 0.0
    assert got["probe/routing_entropy/layer0"] == pytest.approx(-sum(s * math.log(s) for s in shares))


# --- the attention probabilities are the module's ----------------------------------------------------

def probe_probs(module, x):
    return module.attention_scores(x).softmax(dim=-1)


def test_baseline_probabilities_equal_a_float64_explicit_softmax():
    spec = VARIANTS["baseline"]
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval().double()
    randomize_(ours, seed=9)
    weights = {n.rsplit(".", 1)[0]: p.detach() for n, p in ours.named_parameters()}
    x = torch.randn(2, 17, D_MODEL, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, expected = explicit_mha(x, weights, N_HEADS, THETA, spec.rope_scaling_factor, with_probs=True)
    with torch.no_grad():
        got = probe_probs(ours, x)
    assert got.shape == (2, N_HEADS, 17, 17)
    # (not 1e-12: the module's RoPE cos/sin tables are float32 even in a float64 module; 7.5e-8 measured)
    assert (got - expected).abs().max().item() < 1e-6


REFERENCES = {"gqa": llama_reference, "mqa": llama_reference, "qknorm_gqa": qwen3_reference,
              "lora_small": deepseek_reference, "rope_only": deepseek_reference}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_probabilities_equal_the_transformers_eager_weights(name):
    """Each kind's attention_scores -> softmax equals the attention weights transformers' eager
    attention returns (which softmaxes in float32, hence the tolerance)."""
    spec = VARIANTS[name].resolved(D_MODEL, N_HEADS)  # the reference's config needs integer sizes
    ours = build_attention(spec, D_MODEL, N_HEADS, dropout=0.0, rope_theta=THETA).eval()
    randomize_(ours, seed=3)
    ref, rotary = REFERENCES[name](spec)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.double(), ref.double()
    length = 19
    x = torch.randn(2, length, D_MODEL, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    position_ids = torch.arange(length)[None].expand(2, -1)
    with torch.no_grad():
        cos, sin = rotary(x, position_ids)
        _, expected = ref(x, (cos.double(), sin.double()), causal_mask(length).double())
        got = probe_probs(ours, x)
    assert got.shape == expected.shape == (2, N_HEADS, length, length)
    assert (got - expected).abs().max().item() < 1e-6
    assert got.triu(1).abs().max().item() == 0.0  # causal


# --- which probes a model has ---------------------------------------------------------------------

class GatedForTest(MultiHeadAttention):
    """A stand-in for a gated kind: a fixed gate of sigmoid(0.5) on every head, reported by
    `gate_values(x)` (the method a gated kind implements)."""

    def gate_values(self, x):
        return torch.full(x.shape[:-1] + (self.n_heads,), torch.sigmoid(torch.tensor(0.5)).item())


class NoScores(nn.Module):
    """An attention kind without attention_scores."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_gate_openness_only_for_gated_kinds_and_attention_probes_only_with_scores():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = probe_values(tiny_model(), ids)
    assert record.PROBE_GATE_OPEN not in plain
    assert set(record.PROBE_KEYS) - {record.PROBE_GATE_OPEN} <= plain.keys()
    assert {record.probe_key(record.PROBE_ATTN_ENTROPY, layer) for layer in (0, 1)} <= plain.keys()

    gated = tiny_model()
    for layer in gated.layers:
        layer.self_attn.__class__ = GatedForTest
    values = probe_values(gated, ids)
    assert values[record.PROBE_GATE_OPEN] == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert values["probe/gate_open/layer1"] == pytest.approx(1 / (1 + math.exp(-0.5)))

    no_scores = tiny_model()
    for layer in no_scores.layers:
        layer.self_attn = NoScores(layer.self_attn)
    values = probe_values(no_scores, ids)
    assert not {record.PROBE_ATTN_ENTROPY, record.PROBE_ATTN_SINK, record.PROBE_ATTN_LOGIT_MAX} & values.keys()
    assert {record.PROBE_ACT_MAX, record.PROBE_ACT_KURTOSIS, record.PROBE_EXPERT_LOAD_MAX} <= values.keys()
    # the layer means are means of the layers
    assert plain[record.PROBE_ACT_MAX] == pytest.approx(
        (plain["probe/act_max/layer0"] + plain["probe/act_max/layer1"]) / 2)


@pytest.mark.parametrize("name", ["gated", "gated_headwise"])
def test_gate_openness_is_the_mean_sigmoid_of_q_projs_gate_slice(name):
    """Qwen3-Next's layout: each head's slice of q_proj is [query (head dim), gate (width)]; the
    probe is the mean of sigmoid(gate) over the evaluation's tokens, heads and gate dims."""
    model = tiny_model(name)
    x = torch.randn(2, 16, model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    attn = model.layers[0].self_attn
    heads, head_dim = model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
    width = head_dim if name == "gated" else 1  # element-wise: one per dim; head-wise: one per head
    gate = attn.q_proj(x).view(2, 16, heads, head_dim + width)[..., head_dim:]
    assert torch.equal(attn.gate_values(x), torch.sigmoid(gate))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = [model.layers[0].input_layernorm(model.embed_tokens(ids))]
    values = probe_values(model, ids)
    assert values["probe/gate_open/layer0"] == pytest.approx(torch.sigmoid(
        attn.q_proj(hidden[0]).view(2, 16, heads, head_dim + width)[..., head_dim:]).mean().item(), rel=1e-6)
    assert record.PROBE_GATE_OPEN not in probe_values(tiny_model(), ids)  # no gate, no openness


def test_probes_leave_no_hooks_behind():
    model = tiny_model()
    with Probes(model):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def test_probes_change_no_training_step_run_only_in_evaluate_and_are_recorded(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    in_evaluate, measured_in = [False], []
    evaluate = train.Run.evaluate

    def watched_evaluate(self, *args, **kwargs):
        in_evaluate[0] = True
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            in_evaluate[0] = False

    add = Probes._add
    monkeypatch.setattr(train.Run, "evaluate", watched_evaluate)
    monkeypatch.setattr(Probes, "_add", lambda self, *a: (measured_in.append(in_evaluate[0]), add(self, *a))[1])

    final_weights = []
    loop = train.Run._loop

    def kept_loop(self, model, *args, **kwargs):  # the weights as training left them
        loop(self, model, *args, **kwargs)
        final_weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(train.Run, "_loop", kept_loop)

    def run(directory, probes_on):
        assert train.main(tiny_args(directory, corpus, attention="lora_small", n_layers=2, probes=probes_on)) == 0
        return read_record(directory / "results", "local", "lora_small-s0")

    off = run(tmp_path / "off", False)
    assert measured_in == []
    on = run(tmp_path / "on", True)
    assert measured_in and all(measured_in)

    def losses(rec):
        return [(row["train/loss"], row["train/grad_norm"], row.get("val/loss")) for row in rec["history"]]

    assert losses(on) == losses(off)  # bit for bit
    weights_off, weights_on = final_weights
    assert weights_off.keys() == weights_on.keys()
    assert all(torch.equal(weights_off[k], weights_on[k]) for k in weights_off)  # bit for bit
    assert off["summary"]["data/fingerprint"] == on["summary"]["data/fingerprint"]
    expected = {record.probe_key(name, layer) for name in record.PROBE_KEYS if name != record.PROBE_GATE_OPEN
                for layer in (None, 0, 1)}
    for row in on["history"]:
        probe_keys = {k for k in row if k.startswith(record.PROBE_PREFIX)}
        assert probe_keys == (expected if "val/loss" in row else set()), row["step"]
    assert not any(k.startswith(record.PROBE_PREFIX) for row in off["history"] for k in row)
    final = on["history"][-1]
    assert {k: on["summary"][k] for k in expected} == {k: final[k] for k in expected}
    assert 0 < on["summary"][record.PROBE_ATTN_ENTROPY] < math.log(TINY["seq_len"])
    assert 0 < on["summary"][record.PROBE_ATTN_SINK] < 1

    import wandb
    wandb.teardown()  # an in-process run's offline file is complete once the W&B service has flushed it
    (run_dir,) = (tmp_path / "on" / "results" / "wandb").glob("offline-run-*")
    logged = offline_run_contents(run_dir)
    logged_probes = [row for row in logged["history"] if record.PROBE_ATTN_ENTROPY in row]
    assert len(logged_probes) == TINY["steps"] // TINY["eval_every"]
    assert expected <= logged_probes[-1].keys()
    assert logged["summary"][record.PROBE_ATTN_ENTROPY] == pytest.approx(final[record.PROBE_ATTN_ENTROPY])

    # the analysis reads them from the record and from W&B alike, and the report plots them
    from analysis import report
    from analysis.runs import run_from_record, run_from_wandb
    from test_analysis import FakeWandbRun
    probed = run_from_record(on)
    assert probed.probes == {k: v for k, v in on["summary"].items() if k.startswith(record.PROBE_PREFIX)}
    assert run_from_wandb(FakeWandbRun(on, "finished")).probes == probed.probes
    assert run_from_record(off).probes == {}
    other_seed = dataclasses.replace(probed, seed=1, name="lora_small-s1",
                                     probes={k: v + 0.1 for k, v in probed.probes.items()})
    written = report.build([probed, other_seed, run_from_record(off)], tmp_path / "report", "test")
    figure = written.files[report.PROBES_PNG]
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:4] == b"\x89PNG"
    assert f"]({report.PROBES_PNG})" in written.path.read_text()
    without = report.build([run_from_record(off)], tmp_path / "report_off", "test")
    assert report.PROBES_PNG not in without.files and not (tmp_path / "report_off" / report.PROBES_PNG).exists()


def test_maxima_are_over_batches_and_means_over_batches_even_when_negative():
    """Two evaluation batches' values: maxima take the larger (also below zero), means the mean."""
    measured = Probes(tiny_model(n_layers=1))
    for logit_max, entropy in ((-3.0, 1.0), (-2.0, 2.0)):
        measured._add(record.PROBE_ATTN_LOGIT_MAX, 0, torch.tensor(logit_max))
        measured._add(record.PROBE_ATTN_ENTROPY, 0, torch.tensor(entropy))
    names, values = measured.tensor()
    got = dict(zip(names, values.tolist()))
    assert got == {"probe/attn_logit_max/layer0": -2.0, "probe/attn_entropy/layer0": 1.5}


class HalfToASink(MultiHeadAttention):
    """A stand-in for a kind with a learned sink: half of every query's attention goes to the sink
    (no key), the rest as the plain softmax."""

    def attention_probabilities(self, x):
        return self.attention_scores(x).softmax(dim=-1) / 2


def test_a_kind_with_its_own_probabilities_is_measured_by_them():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = probe_values(tiny_model(n_layers=1), ids)
    sinking = tiny_model(n_layers=1)
    sinking.layers[0].self_attn.__class__ = HalfToASink
    halved = probe_values(sinking, ids)
    assert halved[record.PROBE_ATTN_SINK] == pytest.approx(plain[record.PROBE_ATTN_SINK] / 2)
    assert halved[record.PROBE_ATTN_LOGIT_MAX] == plain[record.PROBE_ATTN_LOGIT_MAX]  # scores unchanged
