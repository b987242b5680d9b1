"""The fast path against the seed-style reference of bench/, torch.compile against eager, and a
smoke run of the benchmark CLI.

Tolerances (float32): the loss to 1e-5 relative, every gradient to 1e-4 of its own norm (plus a
floor of 1e-6 of all gradients' norm, for gradients that are rounding noise around zero). The two
implementations differ in summation order (fused SDPA vs an explicit softmax, grouped vs per-expert
matmuls, F.rms_norm vs a written-out norm), nothing else, so they agree to ~1e-6.
Dropout and router noise are off in these comparisons: the two implementations draw random numbers
differently (SDPA's dropout is not F.dropout), so only the deterministic step can be compared.
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from attention import VARIANTS, kernels, modules
from bench.reference import build_reference, has_reference
from config import TrainConfig
from model import ModelConfig, MoELM, init_weights

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
# Small, with the variants' head dims at this size (relative: rope_large's qk/v 32/48 at head dim
# 16), two layers, and enough tokens that every expert gets some.
SMALL = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=64, n_experts=4, top_k=2, seq_len=24,
             dropout=0.0, router_noise_std=0.0)


def small_config(name: str, fast_paths: dict | None = None, **changes) -> ModelConfig:
    sizes = dict(SMALL, **changes)
    return ModelConfig.from_train_config(TrainConfig(attention=name, **sizes), sizes["vocab_size"], **(fast_paths or {}))


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(ids[:, :-1])
    logits, aux = out.logits, out.aux_loss
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + 0.01 * aux
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_step(ours: torch.nn.Module, ref: torch.nn.Module, ids: torch.Tensor) -> None:
    loss, grads = loss_and_grads(ours, ids)
    ref_loss, ref_grads = loss_and_grads(ref, ids)
    assert abs(loss - ref_loss) <= LOSS_TOL * abs(ref_loss), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    floor = 1e-6 * torch.stack([g.double().norm() for g in ref_grads.values()]).norm()
    for name, grad in grads.items():
        err = (grad.double() - ref_grads[name].double()).norm()
        assert err <= GRAD_TOL * ref_grads[name].double().norm() + floor, \
            f"{name}: relative error {err / ref_grads[name].double().norm():.2e}"


def ours_and_reference(cfg: ModelConfig, seed: int = 0):
    ours, ref = MoELM(cfg), build_reference(cfg)
    init_weights(ours, seed)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names, shapes, nothing extra
    return ours.train(), ref.train()


def test_every_variant_has_a_seed_style_reference():
    """bench.step and bench.check cover every variant: none is left without its plain twin."""
    assert [n for n, spec in VARIANTS.items() if not has_reference(spec)] == []


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fast_path_matches_seed_style_reference(name):
    ours, ref = ours_and_reference(small_config(name))
    ids = torch.randint(0, SMALL["vocab_size"], (3, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    assert_same_step(ours, ref, ids)


# At init the scaled logits are ~0.03, where a cap of 50 is the identity to ~1e-7: the soft-capped
# variants are also compared with a cap the logits reach. (The windows are a quarter of SMALL's 24
# tokens, 6, so the window and the local/global pattern act.)
SHARP = {"softcap": dict(attn_softcap=0.05), "gemma2": dict(attn_softcap=0.05)}


@pytest.mark.parametrize("name", list(SHARP))
def test_soft_cap_that_bites_matches_the_reference(name):
    ours, ref = ours_and_reference(small_config(name, **SHARP[name]))
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(6))
    assert_same_step(ours, ref, ids)


def _tiled_kv(sdpa_attention):
    """Grouped-query with keys/values tiled (head h uses kv head h % H_kv) instead of Llama's
    interleave (h // group): a plausible layout bug."""
    def attention(q, k, v, *args, **kwargs):
        repeats = q.shape[1] // k.shape[1]
        return sdpa_attention(q, k.repeat(1, repeats, 1, 1), v.repeat(1, repeats, 1, 1), *args, **kwargs)
    return attention


def _window_one_longer(score_mask):
    return lambda length, window, slopes, device: score_mask(length, window + 1 if window else 0, slopes, device)


def _sinks_negated(attention_weights):
    return lambda scores, sinks=None: attention_weights(scores, None if sinks is None else -sinks)


# (variant, extra knobs, the module attribute a bug is put into, the bug): each one a mistake the
# model's helpers could make, which the reference -- written without them -- must catch. (Which
# layers of a local/global pattern are local is the kind's schedule, which the twin takes from it;
# tests/test_attention_zoo_combined.py checks it against transformers' layer_types.)
BUGS = [
    ("gqa", {}, kernels.ATTENTION_KERNELS, "sdpa", _tiled_kv),
    ("swa", {}, kernels, "score_mask", _window_one_longer),
    ("alibi", {}, modules, "alibi_slopes", lambda slopes: lambda n: slopes(n).flip(0)),
    ("sinks", {}, kernels, "attention_weights", _sinks_negated),
    ("gated", {}, modules, "apply_output_gate", lambda gate: lambda out, g: gate(out, 2 * g)),
    ("softcap", SHARP["softcap"], kernels, "causal_scores",
     lambda scores: lambda q, k, scale, softcap=0.0, mask=None: scores(q, k, scale, 2 * softcap, mask)),
]


@pytest.mark.parametrize("name,knobs,owner,attribute,bug", BUGS, ids=[b[0] for b in BUGS])
def test_reference_catches_a_bug_in_the_zoo_helpers(name, knobs, owner, attribute, bug, monkeypatch):
    """Negative controls: with one of the model's helpers broken, the comparison fails."""
    if isinstance(owner, dict):  # a kernel in attention.kernels.ATTENTION_KERNELS
        monkeypatch.setitem(owner, attribute, bug(owner[attribute]))
    else:
        monkeypatch.setattr(owner, attribute, bug(getattr(owner, attribute)))
    ours, ref = ours_and_reference(small_config(name, **knobs))
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        assert_same_step(ours, ref, ids)


def test_reference_refuses_a_knob_it_does_not_implement(monkeypatch):
    """A knob added to a kind without its plain form in bench/reference.py: no reference (so
    test_every_variant_has_a_seed_style_reference fails), and building one says why."""
    from dataclasses import replace

    import attention.registry

    mha = attention.registry.KINDS["mha"]
    monkeypatch.setitem(attention.registry.KINDS, "mha", replace(mha, knobs=(*mha.knobs, "new_knob")))
    assert not has_reference(VARIANTS["baseline"])
    with pytest.raises(ValueError, match="the seed-style reference has no 'mha' attention"):
        build_reference(small_config("baseline"))


@pytest.mark.parametrize("sdpa_pad,moe_matmul", [("never", "loop"), ("always", "grouped"), ("never", "grouped")])
@pytest.mark.parametrize("name", ["rope_large", "enhanced_small"])  # unequal qk / v dims at SMALL: 32 / 48 and 8 / 12
def test_every_fast_path_option_matches_the_reference(name, sdpa_pad, moe_matmul):
    """The switches bench/ measures (ModelConfig.sdpa_pad: pad q/k for the flash kernel or not;
    ModelConfig.moe_matmul: grouped or looped experts) are all the same function."""
    ours, ref = ours_and_reference(small_config(name, {"sdpa_pad": sdpa_pad, "moe_matmul": moe_matmul}), seed=3)
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(2))
    assert_same_step(ours, ref, ids)


def test_expert_without_tokens_gets_zero_gradient():
    """An empty group in the grouped expert matmul (no token picks expert 5): its gradients are
    exactly zero and everything matches the per-expert loop. bench.check repeats this on CUDA."""
    from bench.check import check_empty_expert

    assert check_empty_expert(torch.device("cpu")) == []


def test_chunked_loss_check_passes_and_catches_a_wrong_gradient(monkeypatch):
    """bench.check's check of the chunked LM-head loss (run on CUDA by bench/gpu.sh): it passes on
    the model as it is, in fp32 and bf16, and fails both when the LM head's weight gradient is 5% off."""
    from bench.check import check_chunked_loss

    monkeypatch.setattr("bench.check.SIZES", dict(SMALL, seq_len=32))
    rows = check_chunked_loss("baseline", torch.device("cpu"))
    assert [(r["dtype"], r["ok"]) for r in rows] == [("fp32", True), ("bf16", True)]

    backward = model_module._LMHeadLoss.backward

    def off_by_5_percent(ctx, *grads):
        grad_h, grad_w, *rest = backward(ctx, *grads)
        return (grad_h, grad_w * 1.05, *rest)

    monkeypatch.setattr(model_module._LMHeadLoss, "backward", staticmethod(off_by_5_percent))
    rows = check_chunked_loss("baseline", torch.device("cpu"))
    assert [(r["dtype"], r["ok"]) for r in rows] == [("fp32", False), ("bf16", False)]


def test_comparison_catches_a_wrong_rope_factor():
    """Negative control: the comparison is sharp enough to see a RoPE scaling mismatch (in the
    attention gradients, and in the loss by 3e-5 relative: at init it barely depends on positions)."""
    cfg = small_config("rope_only")  # linear factor 2.0
    wrong = ModelConfig(**{**cfg.__dict__, "attention": cfg.attention.with_overrides(rope_scaling_factor=1.0)})
    ours, ref = MoELM(wrong), build_reference(cfg)
    init_weights(ours, 0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        assert_same_step(ours.train(), ref.train(), ids)


@pytest.mark.parametrize("name", ["baseline", "enhanced_medium"])
def test_chunked_lm_head_loss_matches_logits_path(name, monkeypatch):
    """model(ids, targets) -- the loss without materialised logits, in several chunks here -- gives
    the loss, accuracy and every gradient of cross-entropy on model(ids)'s logits."""
    monkeypatch.setattr(model_module, "LM_HEAD_CHUNK_ELEMENTS", 10 * SMALL["vocab_size"])  # 10-token chunks
    model = MoELM(small_config(name)).train()
    init_weights(model, 0)
    ids = torch.randint(0, SMALL["vocab_size"], (3, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(4))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    out = model(inputs)
    logits, aux = out.logits, out.aux_loss
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    accuracy = (logits.argmax(-1) == targets).float().mean()
    (ce + 0.01 * aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    out = model(inputs, targets)
    chunked_ce, chunked_aux, chunked_accuracy = out.loss, out.aux_loss, out.accuracy
    (chunked_ce + 0.01 * chunked_aux).backward()
    assert chunked_ce.item() == pytest.approx(ce.item(), rel=LOSS_TOL)
    assert chunked_accuracy.item() == accuracy.item() and chunked_aux.item() == aux.item()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=GRAD_TOL, atol=1e-7, msg=n)

    with torch.no_grad():  # evaluation: no gradient work, same numbers
        assert model(inputs, targets).loss.item() == pytest.approx(ce.item(), rel=LOSS_TOL)


def test_answer_only_loss_counts_only_scored_targets(monkeypatch):
    """Targets IGNORE_INDEX (a task's non-answer positions) are not scored: the loss is the mean
    cross-entropy over the scored positions alone, the accuracy over them, and the gradient is that
    mean's -- F.cross_entropy(ignore_index=-100) on materialised logits, across 10-token chunks with
    some chunks holding no scored target at all."""
    from model import IGNORE_INDEX

    model = MoELM(small_config("baseline")).train()
    init_weights(model, 0)
    ids = torch.randint(0, SMALL["vocab_size"], (3, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(6))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    keep = torch.zeros_like(targets, dtype=torch.bool)
    keep[0, 3], keep[1, [0, 7, 8]], keep[2, -1] = True, True, True  # 5 answers; row 2's first chunk has none
    targets[~keep] = IGNORE_INDEX
    assert IGNORE_INDEX == -100  # PyTorch's own ignore_index default, so the two below agree by construction

    logits = model(inputs).logits
    hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    by_hand_sum = sum(-F.log_softmax(logits[b, t], -1)[targets[b, t]] for b, t in keep.nonzero().tolist()) / 5
    torch.testing.assert_close(hand, by_hand_sum)  # the reference itself: a mean over the 5 answers
    accuracy = (logits.argmax(-1)[keep] == targets[keep]).float().mean()
    hand.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    monkeypatch.setattr(model_module, "LM_HEAD_CHUNK_ELEMENTS", 10 * SMALL["vocab_size"])  # 10-token chunks
    out = model(inputs, targets)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(hand.item(), rel=LOSS_TOL)
    assert out.accuracy.item() == accuracy.item()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=GRAD_TOL, atol=1e-7, msg=n)


def test_chunked_lm_head_loss_under_bf16_autocast():
    """Under autocast the chunked loss follows the plain path's arithmetic (bf16 matmul, float32
    softmax): equal to bf16 rounding."""
    model = MoELM(small_config("rope_small")).train()
    init_weights(model, 0)
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids[:, :-1]).logits
        chunked = model(ids[:, :-1], ids[:, 1:]).loss
    plain = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-3)


# --- torch.compile ------------------------------------------------------------------------------

def compiler_unavailable() -> str | None:
    """Why torch.compile (inductor, CPU) cannot run here, or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        compiler = get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 -- any failure to find one means: skip
        return f"no C++ compiler for inductor ({err})"
    if not shutil.which(compiler):
        return f"inductor's C++ compiler {compiler!r} is not installed"
    return None


@pytest.mark.skipif(compiler_unavailable() is not None, reason=str(compiler_unavailable()))
def test_compiled_short_run_matches_eager():
    """Three AdamW steps of torch.compile(model) -- what --compile=True does -- give eager's losses,
    for the baseline and an MLA variant with unequal q/k and v head dims, with the whole model in
    one graph (fullgraph: no graph breaks) and no recompilation after the first step."""
    sizes = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=32, n_experts=4, top_k=2, seq_len=16)
    batch = torch.randint(0, sizes["vocab_size"], (2, sizes["seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    for name in ("baseline", "rope_small"):
        losses = {}
        for compiled in (False, True):
            model = MoELM(small_config(name, **sizes))
            init_weights(model, 0)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            forward = torch.compile(model, fullgraph=True) if compiled else model
            losses[compiled] = []
            for step in range(3):
                if compiled and step == 1:
                    torch.compiler.set_stance("fail_on_recompile")
                out = forward(batch[:, :-1], batch[:, 1:])  # the chunked loss, as train.py
                ce, aux = out.loss, out.aux_loss
                loss = ce + 0.01 * aux
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses[compiled].append(loss.item())
            torch.compiler.set_stance("default")
        assert losses[True] == pytest.approx(losses[False], rel=1e-5), name
        assert losses[False][-1] < losses[False][0]  # it trained on the batch: the steps landed


# --- the benchmark CLI ---------------------------------------------------------------------------

@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_cli_runs_end_to_end(tmp_path, capsys, keep_threads):
    from bench import step

    out = tmp_path / "bench"
    code = step.main(["--preset", "tiny", "--device", "cpu", "--variants", "baseline,rope_small", "--isolate", "no",
                      "--threads", "1", "--warmup", "1", "--repeats", "1", "--peak_n", "256", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    header = [line for line in printed.splitlines() if line.startswith("variant")][0]
    assert header.split()[-2:] == ["time", "ours/ref"]  # the ratio comes last
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["variant"], r["impl"]) for r in results] == [
        ("baseline", "ours"), ("baseline", "reference"), ("rope_small", "ours"), ("rope_small", "reference")]
    for r in results:
        assert r["status"] == "ok" and r["ms_per_step"] > 0 and r["flops_per_token"] > 0
    assert results[0]["time_ratio"] == pytest.approx(results[0]["ms_per_step"] / results[1]["ms_per_step"])
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-3)  # same weights, same batch
    assert (tmp_path / "bench.csv").read_text().startswith("variant,impl,compile")


def test_bench_seq_len_scan_isolated(tmp_path, capsys):
    """The scan mode, with each case in its own process (how CPU peak memory is measured)."""
    from bench import step

    code = step.main(["--preset", "tiny", "--device", "cpu", "--variants", "baseline", "--impls", "ours",
                      "--seq_lens", "16,32", "--isolate", "yes", "--threads", "1", "--warmup", "1",
                      "--repeats", "1", "--peak_n", "256", "--out", str(tmp_path / "scan.json")])
    assert code == 0
    results = json.loads((tmp_path / "scan.json").read_text())["results"]
    assert [r["seq_len"] for r in results] == [16, 32]
    assert all(r["status"] == "ok" and r["peak_mem_bytes"] > 0 for r in results)
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("variant")][0]
    assert "seq" in header.split()
