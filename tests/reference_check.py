"""Run one input through our module and its reference (weights already copied) and measure how far
apart their outputs and gradients are: the comparison a kind's reference test asserts on, and its
negative control shows failing."""
import torch


def relative_errors(ours: torch.nn.Module, ref: torch.nn.Module, run_ours, run_ref, x: torch.Tensor,
                    seed: int = 0) -> dict[str, float]:
    """run_ours(ours, x) and run_ref(ref, x) -> (B, T, d_model) outputs; the same random cotangent
    back through both. -> relative error (float64 norms) of the output, the input's gradient and
    each parameter's gradient ("grad <name>", same names on both sides). Each gradient is measured
    against its own norm, or against 1e-2 x the norm of all the reference's gradients where its own
    is smaller: a softmax over one key passes its query a gradient that is 0 up to rounding noise
    (~1e-8 of the total in a fused kernel), which no relative error can compare."""
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours.zero_grad(), ref.zero_grad()
    y_ours, y_ref = run_ours(ours, x_ours), run_ref(ref, x_ref)
    cotangent = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed))
    (y_ours * cotangent).sum().backward()
    (y_ref * cotangent).sum().backward()
    grads_ours = {n: p.grad for n, p in ours.named_parameters()}
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    assert grads_ours.keys() == grads_ref.keys(), "the two modules' parameters differ"

    total = torch.stack([g.double().norm() for g in grads_ref.values()]).norm()

    def error(a, b):
        return ((a.double() - b.double()).norm() / torch.maximum(b.double().norm(), 1e-2 * total)).item()

    errors = {"output": error(y_ours, y_ref), "input grad": error(x_ours.grad, x_ref.grad)}
    errors |= {f"grad {name}": error(grads_ours[name], grads_ref[name]) for name in grads_ref}
    return errors


def assert_bench_compares_with_the_reference(kind: str) -> None:
    """bench/'s comparison of a kind without a seed-style twin: the model with every attention layer
    swapped for the kind's reference_attention (bench.reference.build_reference), our weights loaded,
    computes the same training step (tests/test_perf.py's loss and gradient tolerances)."""
    from attention import VARIANTS
    from bench.reference import KindReference
    from model import ModelConfig
    from test_perf import SMALL, assert_same_step, ours_and_reference

    ours, ref = ours_and_reference(ModelConfig(attention=VARIANTS[kind], **SMALL))
    assert all(isinstance(layer.self_attn, KindReference) for layer in ref.layers)
    ids = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    assert_same_step(ours, ref, ids)
