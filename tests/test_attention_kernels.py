"""The attention kernels (attention/kernels.py) and the choice of one (ModelConfig.attention_kernel,
--attention_kernel).

- every kernel against the explicit one, and the explicit one against a float64 softmax written
  here query by query, on plain causal attention, GQA, a window, ALiBi, sinks, the soft-cap, sinks
  + soft-cap + window together, ALiBi + soft-cap + window, and unequal q/k and v head dims (MLA):
  outputs and the gradients of q, k, v and the sinks, float32, relative error < 1e-5 (the explicit
  kernel is itself checked against transformers' GptOssAttention, Gemma2Attention, MistralAttention
  and BloomAttention in tests/test_attention_zoo_*.py);
- negative controls: the sinks with the wrong sign, the log-sum-exp unused, a window one key too
  wide are all caught;
- where flex takes the explicit path (attention dropout; a gradient on the CPU) it is exactly the
  explicit kernel, dropout included; "auto" is exactly SDPA, or explicit with sinks or a soft-cap;
  sdpa refuses sinks and the cap;
- a model (weights copied) on explicit, flex and auto: the same loss and gradients for the sinks
  and soft-cap variants; every softmax kind computes its attention through the chosen kernel;
- a bad --attention_kernel, and sdpa for a variant with sinks, refused with one line.

FlexAttention on the CPU: torch 2.13 runs it eagerly (no fused CPU kernel with a backward or a
log-sum-exp) and warns, once per call site, that this is unfused; these tests want exactly that
eager implementation, so that one warning is ignored (pytestmark) and no other. It also refuses any
backward on the CPU at its entry (`_validate_device`); its eager implementation computes one (the
dense arithmetic the fused CUDA kernel implements), so the gradient tests lift that one check
(`flex_backward_on_cpu`) to check our mask_mod, score_mod and sink algebra there. On a GPU the
compiled kernel is measured by bench/gpu.sh, not tested here.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from attention import KINDS, VARIANTS, kernels
from attention.kernels import ATTENTION_KERNELS, AttentionKernel, flex_attend, flex_kernel
from attention.positions import alibi_slopes
from config import ConfigError, TrainConfig, config_from_values, parse_args
from model import ModelConfig, MoELM, init_weights
from test_attention import rel_err
from test_perf import SMALL, assert_same_step

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

TOL = 1e-5
B, H, T = 2, 4, 13  # 13: not a multiple of any block size

# name: (key/value heads, qk head dim, v head dim, what the scores see)
CASES = {
    "causal": (H, 8, 8, {}),
    "gqa": (2, 8, 8, {}),
    "window": (H, 8, 8, {"window": 4}),
    "alibi": (H, 8, 8, {"alibi": True}),
    "sinks": (2, 8, 8, {"sinks": True}),
    "softcap": (H, 8, 8, {"softcap": 0.5}),  # q.k / sqrt(8) ~ N(0, 1): a cap of 0.5 bites
    "sinks+softcap+window": (2, 8, 8, {"sinks": True, "softcap": 0.5, "window": 4}),
    "alibi+softcap+window": (H, 8, 8, {"alibi": True, "softcap": 0.5, "window": 4}),
    "mla qk>v": (H, 12, 8, {}),
    "mla qk<v": (H, 8, 16, {}),
}


def inputs(case: str, seed: int = 0, grad: bool = True):
    """q, k, v and the kernel's keyword arguments for a case (and the tensors, requiring gradients,
    with grad)."""
    kv_heads, qk_dim, v_dim, extras = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, T, qk_dim, generator=gen), torch.randn(B, kv_heads, T, qk_dim, generator=gen)
    v = torch.randn(B, kv_heads, T, v_dim, generator=gen)
    options = dict(scale=qk_dim ** -0.5, window=extras.get("window", 0), softcap=extras.get("softcap", 0.0),
                   alibi_slopes=alibi_slopes(H) if extras.get("alibi") else None,
                   sinks=torch.randn(H, generator=gen) if extras.get("sinks") else None)
    if not grad:
        return q, k, v, options
    tensors = [t.requires_grad_() for t in (q, k, v, options["sinks"]) if t is not None]
    return q, k, v, options, tensors


def naive_attention(q, k, v, scale, window=0, alibi_slopes=None, sinks=None, softcap=0.0):
    """float64, one query at a time: its visible keys' scores, capped, ALiBi added, a sink column,
    softmax, the weighted values. Written from the papers, sharing nothing with attention/."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=torch.float64)
    for h in range(q.shape[1]):
        kv = h // group
        for t in range(q.shape[2]):
            first = max(0, t - window + 1) if window else 0
            scores = torch.einsum("bd,bnd->bn", q[:, h, t], k[:, kv, first:t + 1]) * scale  # (B, keys)
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            if alibi_slopes is not None:
                scores = scores - alibi_slopes[h].double() * torch.arange(t - first, -1, -1, dtype=torch.float64)
            if sinks is not None:
                scores = torch.cat((scores, sinks[h].double().expand(scores.shape[0], 1)), dim=-1)
            probs = torch.softmax(scores, dim=-1)[:, :t + 1 - first]
            out[:, t, h] = torch.einsum("bn,bnd->bd", probs, v[:, kv, first:t + 1])
    return out.flatten(2)


def outputs_and_grads(kernel, case: str):
    q, k, v, options, tensors = inputs(case)
    out = kernel(q, k, v, **options)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), tensors)
    return out.detach(), grads


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Lift torch 2.13's refusal of any FlexAttention backward on the CPU (module docstring)."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda query, key, value: None)


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_kernel_is_the_softmax_written_out(case):
    q, k, v, options, _ = inputs(case)
    expected = naive_attention(q.detach(), k.detach(), v.detach(), **options)
    assert rel_err(ATTENTION_KERNELS["explicit"](q, k, v, **options), expected) < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_flex_matches_explicit_outputs_and_gradients(case, flex_backward_on_cpu):
    out, grads = outputs_and_grads(flex_attend, case)
    ref_out, ref_grads = outputs_and_grads(ATTENTION_KERNELS["explicit"], case)
    assert rel_err(out, ref_out) < TOL
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref) < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_flex_kernel_without_gradients_runs_flex_and_matches_explicit(case, monkeypatch):
    """The path CPU evaluation takes: the public API, no check lifted (FlexAttention itself runs:
    the explicit fallback is made to fail here)."""
    q, k, v, options = inputs(case, grad=False)
    with torch.no_grad():
        expected = ATTENTION_KERNELS["explicit"](q, k, v, **options)
        monkeypatch.setattr(kernels, "explicit_attention", None)
        assert rel_err(flex_kernel(q, k, v, **options), expected) < TOL


@pytest.mark.parametrize("case", [c for c, (*_, extras) in CASES.items() if not {"sinks", "softcap"} & set(extras)])
def test_sdpa_matches_explicit_outputs_and_gradients(case):
    out, grads = outputs_and_grads(ATTENTION_KERNELS["sdpa"], case)
    ref_out, ref_grads = outputs_and_grads(ATTENTION_KERNELS["explicit"], case)
    assert rel_err(out, ref_out) < TOL
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref) < TOL


# --- negative controls: what the comparison above catches ----------------------------------------

def _flex_error(case: str) -> float:
    q, k, v, options = inputs(case, grad=False)
    with torch.no_grad():
        return rel_err(flex_attend(q, k, v, **options), ATTENTION_KERNELS["explicit"](q, k, v, **options))


@pytest.mark.parametrize("bug", ["sink sign", "lse unused"])
def test_a_wrong_sink_fusion_is_caught(bug, monkeypatch):
    assert _flex_error("sinks") < TOL
    wrong = {"sink sign": lambda out, lse, sinks: out * torch.sigmoid(sinks.view(1, -1, 1) - lse).unsqueeze(-1),
             "lse unused": lambda out, lse, sinks: out * torch.sigmoid(-sinks.view(1, -1, 1)).unsqueeze(-1)}[bug]
    monkeypatch.setattr(kernels, "with_sinks", wrong)
    assert _flex_error("sinks") > 1e-2


def test_a_window_one_key_too_wide_is_caught(monkeypatch):
    block_mask = kernels._block_mask
    monkeypatch.setattr(kernels, "_block_mask", lambda length, window, device: block_mask(length, window + 1, device))
    assert _flex_error("window") > 1e-2


# --- where flex does not run, and what auto picks ---------------------------------------------------

def test_flex_with_attention_dropout_is_the_explicit_kernel_with_its_dropout():
    """FlexAttention has no dropout: with dropout > 0 the flex kernel is the explicit one, the same
    random mask for the same seed, and the dropout is applied (not silently dropped). (Without
    gradients, where flex would run on the CPU: the fallback is dropout's alone.)"""
    q, k, v, options = inputs("sinks+softcap+window", grad=False)
    results = []
    for kernel, dropout in ((flex_kernel, 0.3), (ATTENTION_KERNELS["explicit"], 0.3), (flex_kernel, 0.0)):
        torch.manual_seed(7)
        results.append(kernel(q, k, v, dropout=dropout, **options))
    assert torch.equal(results[0], results[1])
    assert rel_err(results[0], results[2]) > 0.1


def test_flex_with_a_gradient_on_the_cpu_is_the_explicit_kernel():
    """torch 2.13 has no FlexAttention backward on the CPU: training there takes the explicit path."""
    for case in ("causal", "sinks+softcap+window"):
        out, grads = outputs_and_grads(flex_kernel, case)
        ref_out, ref_grads = outputs_and_grads(ATTENTION_KERNELS["explicit"], case)
        assert torch.equal(out, ref_out) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


def test_flex_under_torch_compile_on_the_cpu_is_the_explicit_kernel(monkeypatch):
    """torch 2.13's compiled CPU FlexAttention has no log-sum-exp and fails with a score_mod: under
    torch.compile (as the model is with --compile=True) the CPU takes the explicit path."""
    q, k, v, options = inputs("alibi+softcap+window", grad=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kernels, "flex_attend", None)  # not called
    assert torch.equal(flex_kernel(q, k, v, **options), ATTENTION_KERNELS["explicit"](q, k, v, **options))


def test_auto_is_sdpa_or_explicit_with_sinks_or_a_cap():
    auto = AttentionKernel()
    assert (auto.resolve(), auto.resolve(sinks=torch.zeros(H)), auto.resolve(softcap=50.0)) == ("sdpa", "explicit",
                                                                                              "explicit")
    for case, expected in (("gqa", "sdpa"), ("window", "sdpa"), ("sinks", "explicit"), ("softcap", "explicit")):
        q, k, v, options, _ = inputs(case)
        assert torch.equal(auto(q, k, v, **options), ATTENTION_KERNELS[expected](q, k, v, **options))


def test_sdpa_refuses_sinks_and_the_cap():
    for case in ("sinks", "softcap"):
        q, k, v, options, _ = inputs(case)
        with pytest.raises(ValueError, match="the sdpa kernel has no attention sinks or soft-cap"):
            AttentionKernel("sdpa")(q, k, v, **options)


def test_a_bad_kernel_name_is_refused():
    with pytest.raises(ValueError, match="attention_kernel='fast': allowed: auto, sdpa, explicit, flex"):
        AttentionKernel("fast")
    with pytest.raises(ValueError, match="attention_kernel='fast': allowed: auto, sdpa, explicit, flex"):
        ModelConfig.from_train_config(TrainConfig(), 64, attention_kernel="fast")


# --- the model: the kernel is chosen in ModelConfig and reaches every kind ----------------------------

def kernel_model(name: str, kernel: str, **knobs) -> MoELM:
    sizes = dict(SMALL, **knobs)
    cfg = ModelConfig.from_train_config(TrainConfig(attention=name, attention_kernel=kernel, **sizes),
                                        sizes["vocab_size"])
    return MoELM(cfg).train()


# sinks: gpt-oss-style (with 2 key/value heads); softcap with a cap the logits reach (test_perf's)
@pytest.mark.parametrize("name,knobs", [("sinks", {}), ("gptoss", {}), ("softcap", {"attn_softcap": 0.05}),
                                        ("gemma2", {"attn_softcap": 0.05}), ("alibi", {})])
def test_model_on_every_kernel_gives_the_same_loss_and_gradients(name, knobs, flex_backward_on_cpu, monkeypatch):
    """explicit, flex (FlexAttention itself: the CPU fallback off) and auto, weights copied."""
    monkeypatch.setattr(kernels, "flex_can_run", lambda q, k, v, dropout: True)
    explicit = kernel_model(name, "explicit", **knobs)
    init_weights(explicit, 3)
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(4))
    for kernel in ("flex", "auto"):
        other = kernel_model(name, kernel, **knobs)
        other.load_state_dict(explicit.state_dict())
        assert_same_step(other, explicit, ids)


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "gated_deltanet"])
def test_every_softmax_kind_computes_its_attention_through_the_chosen_kernel(kind, monkeypatch):
    """One counting kernel in the registry: each layer of a variant of the kind calls it once per
    forward (gated_deltanet has no softmax and ignores the choice)."""
    calls = []
    explicit = ATTENTION_KERNELS["explicit"]
    monkeypatch.setitem(ATTENTION_KERNELS, "explicit", lambda *args, **kwargs: calls.append(1) or explicit(*args, **kwargs))
    name = next(name for name, spec in VARIANTS.items() if spec.kind == kind)
    model = kernel_model(name, "explicit")
    model(torch.zeros(1, 8, dtype=torch.long))
    assert len(calls) == SMALL["n_layers"]
    assert all(block.self_attn.kernel == AttentionKernel("explicit") for block in model.layers)


def test_the_option_is_refused_when_bad_or_when_sdpa_cannot_compute_the_variant():
    with pytest.raises(ConfigError, match=r"^--attention_kernel=fast: allowed: auto, sdpa, explicit, flex$"):
        config_from_values(parse_args(["--attention_kernel=fast"]))
    for name in ("sinks", "gemma2"):
        with pytest.raises(ConfigError, match=f"--attention_kernel=sdpa: SDPA has no attention sinks or soft-cap, "
                                              f"which --attention={name} has; use auto, explicit or flex"):
            config_from_values(parse_args([f"--attention={name}", "--attention_kernel=sdpa"]))
    assert config_from_values(parse_args(["--attention=sinks", "--attention_kernel=flex"])).attention_kernel == "flex"


def test_the_report_does_not_tell_runs_apart_by_their_kernel():
    """analysis: two runs that differ only in --attention_kernel are one configuration; lr, which
    changes what is trained, tells them apart (the positive control)."""
    from analysis.runs import Run, varying_settings

    def run(kernel, lr):
        return Run(name=f"sinks-{kernel}", variant="sinks", family="sinks", seed=0, status="finished", val_loss=1.0,
                   config={"attention_kernel": kernel, "lr": lr})
    assert varying_settings([run("explicit", 1e-3), run("flex", 1e-3)]) == []
    assert varying_settings([run("explicit", 1e-3), run("flex", 3e-3)]) == ["lr"]


def test_the_layer_benchmark_says_which_kernel_ran(tmp_path, capsys):
    """bench.kernels: flex's training row on the CPU ran the explicit path, its evaluation row flex;
    sdpa is left out for sinks (it cannot compute them)."""
    import json

    from bench import kernels as bench_kernels

    assert bench_kernels.main(["--variants", "sinks", "--d_model", "16", "--n_heads", "2", "--seq_lens", "8",
                               "--batch", "1", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "k")]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())
    assert {(r["kernel"], r["mode"]): r["runs"] for r in rows} == {
        ("explicit", "train"): "explicit", ("explicit", "eval"): "explicit",
        ("flex", "train"): "explicit", ("flex", "eval"): "flex"}
    assert "sinks    flex     flex     eval" in capsys.readouterr().out


def test_bench_step_sweeps_the_kernel_for_ours_only():
    """bench.step --attention_kernel auto,flex: a case of ours per kernel, the seed-style reference
    (which has its own attention) once; the model each case builds has that kernel."""
    from bench import step

    _, cases = step.resolve(step.parse_args(["--preset", "tiny", "--device", "cpu", "--variants", "sinks",
                                             "--attention_kernel", "auto,flex"]))
    assert [(c["impl"], c["attention_kernel"]) for c in cases] == [("ours", "auto"), ("ours", "flex"),
                                                                  ("reference", "auto")]
    model, _ = step.build_model(dict(cases[1], isolated=True), torch.device("cpu"))
    assert model.cfg.attention_kernel == "flex"


def test_the_gpu_run_compares_the_kernels():
    """bench/gpu.sh's kernels section: bench.kernels, every kernel, the sinks and soft-cap variants
    and the baseline, bf16 at 1k to 8k tokens (its CPU dry run: `--dry_run --sections env,kernels`)."""
    import argparse

    from bench.gpu import BUDGETED, SECTIONS, section_commands

    args = argparse.Namespace(device="cuda", dry_run=False, variants="all", zoo_variants="zoo", train_args=None)
    command = section_commands(args, ROOT)["kernels"]
    after = lambda flag: command[command.index(flag) + 1]  # noqa: E731
    assert command[1:3] in BUDGETED and "kernels" in [name for name, _, _ in SECTIONS]
    assert after("--kernels").split(",") == list(ATTENTION_KERNELS)
    assert {"baseline", "sinks", "softcap"} <= set(after("--variants").split(","))
    assert (after("--dtype"), after("--seq_lens")) == ("bf16", "1024,4096,8192")
