"""Ours == the seed-style reference on this device: loss and every gradient, for every variant.

    python -m bench.check --device cuda

tests/test_perf.py checks the same on CPU. On CUDA the fast path takes kernels the CPU never runs
(flash attention with padded head dims and an expanded shared key, the bf16 grouped expert matmul),
so bench/gpu.sh runs this first. Two checks per variant, dropout and router noise off:
- fp32 (TF32 off): loss to 1e-5 and each gradient to 1e-4 of its norm, as on CPU;
- bf16 autocast (ours) vs fp32 (reference): loss to 2e-2 relative, the cosine similarity of all
  gradients together above 0.99 and of each parameter's above 0.9 -- bf16 rounding (and the
  routing decisions it flips), nothing more; a wrong kernel or layout lands far below.
Those compare the logits path, model(ids). Training takes model(ids, targets), the chunked LM-head
loss (model._LMHeadLoss, its gradient computed in the forward), so that is checked too, in four
chunks, against cross-entropy of the same model's logits on the same device:
- fp32: loss to 1e-5, accuracy exactly, each gradient to 1e-4 of its norm;
- bf16 autocast, both paths: loss to 5e-3 relative, gradient cosine above 0.999 (all together) and
  0.99 (each parameter), each gradient to 2e-2 of its norm -- the same bf16 products, summed in
  another order (measured on CPU: at most 5e-3).
A variant whose check raises (a kernel error) is reported as failed with its reason; the rest run.
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

import model as model_module
from attention import VARIANTS
from bench.reference import build_reference, has_reference
from bench.step import failure_reason, forced_failure
from config import TrainConfig
from model import ModelConfig, MoELM, init_weights

SIZES = dict(vocab_size=512, d_model=256, n_layers=2, n_heads=4, d_ff=512, n_experts=8, top_k=2, seq_len=128,
             dropout=0.0, router_noise_std=0.0)
# --preset tiny: a CPU dry run of bench/gpu.sh in seconds (the variants' absolute MLA head dims stay)
TINY_SIZES = dict(SIZES, vocab_size=128, d_model=64, d_ff=64, n_experts=4, seq_len=32)


def loss_and_grads(model, ids, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(ids[:, :-1])
    logits, aux = out.logits, out.aux_loss
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()) + 0.01 * aux
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}


def model_and_batch(name: str):
    cfg = ModelConfig.from_train_config(TrainConfig(attention=name, **SIZES), SIZES["vocab_size"])
    ids = torch.randint(0, SIZES["vocab_size"], (4, SIZES["seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    return cfg, ids


def check_variant(name: str, device: torch.device) -> dict:
    forced_failure(name, f"{name}:check")
    cfg, ids = model_and_batch(name)
    ours, ref = MoELM(cfg), build_reference(cfg)
    init_weights(ours, 0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.to(device).train(), ref.to(device).train()
    ids = ids.to(device)
    ref_loss, ref_grads = loss_and_grads(ref, ids, bf16=False)
    loss32, grads32 = loss_and_grads(ours, ids, bf16=False)
    loss16, grads16 = loss_and_grads(ours, ids, bf16=True)
    worst32, _, _ = compare_grads(grads32, ref_grads)
    _, cosine_all, (worst16, worst16_cosine) = compare_grads(grads16, ref_grads)
    ok = (abs(loss32 - ref_loss) <= 1e-5 * abs(ref_loss) and worst32 <= 1e-4
          and abs(loss16 - ref_loss) <= 2e-2 * abs(ref_loss) and cosine_all >= 0.99 and worst16_cosine >= 0.9)
    return dict(variant=name, ok=ok, loss_ref=ref_loss, loss_fp32=loss32, loss_bf16=loss16,
                worst_grad_rel_err_fp32=worst32, grad_cosine_bf16=cosine_all,
                min_param_grad_cosine_bf16=(worst16, worst16_cosine))


def compare_grads(got: dict, ref: dict) -> tuple[float, float, tuple[str, float]]:
    """(the worst per-parameter relative error, the cosine of all gradients together, the parameter
    with the lowest cosine and that cosine) of `got` against `ref`; parameters whose reference
    gradient is below a floor of the total norm count for the error only."""
    floor = 1e-6 * torch.stack([g.norm() for g in ref.values()]).norm()
    worst_err = max(((got[n] - g).norm() / (g.norm() + floor)).item() for n, g in ref.items())
    cosines = {n: F.cosine_similarity(got[n].flatten(), g.flatten(), dim=0).item()
               for n, g in ref.items() if g.norm() > floor}
    worst = min(cosines, key=cosines.get)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    cosine_all = F.cosine_similarity(flat(got), flat(ref), dim=0).item()
    return worst_err, cosine_all, (worst, cosines[worst])


def chunked_loss_and_grads(model, ids, bf16: bool, chunked: bool):
    model.zero_grad(set_to_none=True)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(inputs, targets) if chunked else model(inputs)
    ce, aux, accuracy, logits = out.loss, out.aux_loss, out.accuracy, out.logits
    if not chunked:
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        accuracy = (logits.argmax(-1) == targets).float().mean()
    (ce + 0.01 * aux).backward()
    return ce.item(), accuracy.item(), {n: p.grad.double() for n, p in model.named_parameters()}


def check_chunked_loss(name: str, device: torch.device) -> list[dict]:
    """The chunked LM-head loss (four chunks) against cross-entropy of the logits, fp32 and bf16."""
    forced_failure(f"{name}:chunked")
    cfg, ids = model_and_batch(name)
    model = MoELM(cfg)
    init_weights(model, 0)
    model, ids = model.to(device).train(), ids.to(device)
    saved = model_module.LM_HEAD_CHUNK_ELEMENTS
    model_module.LM_HEAD_CHUNK_ELEMENTS = math.ceil(ids[:, 1:].numel() / 4) * SIZES["vocab_size"]
    try:
        rows = []
        for bf16 in (False, True):
            loss, accuracy, grads = chunked_loss_and_grads(model, ids, bf16, chunked=False)
            c_loss, c_accuracy, c_grads = chunked_loss_and_grads(model, ids, bf16, chunked=True)
            worst_err, cosine_all, (worst, worst_cosine) = compare_grads(c_grads, grads)
            loss_err = abs(c_loss - loss) / abs(loss)
            if bf16:  # (cosines alone are blind to a wrong scale)
                ok = loss_err <= 5e-3 and cosine_all >= 0.999 and worst_cosine >= 0.99 and worst_err <= 2e-2
            else:
                ok = loss_err <= 1e-5 and c_accuracy == accuracy and worst_err <= 1e-4
            rows.append(dict(variant=name, dtype="bf16" if bf16 else "fp32", ok=ok, loss_logits=loss,
                             loss_chunked=c_loss, loss_rel_err=loss_err, accuracy_logits=accuracy,
                             accuracy_chunked=c_accuracy, worst_grad_rel_err=worst_err, grad_cosine=cosine_all,
                             min_param_grad_cosine=(worst, worst_cosine)))
        return rows
    finally:
        model_module.LM_HEAD_CHUNK_ELEMENTS = saved


def check_empty_expert(device: torch.device) -> list[str]:
    """An expert that no token picks (empty group in the grouped matmul): its gradients must be
    exactly zero and everything else must match the per-expert loop, in fp32 and bf16."""
    from model import MoE

    problems = []
    for dtype in (torch.float32, torch.bfloat16):
        results = {}
        for mode in ("grouped", "loop"):
            torch.manual_seed(0)
            moe = MoE(256, 512, 8, 2, 0.0, matmul=mode).to(device)
            with torch.no_grad():
                for p in (moe.up_proj, moe.down_proj, moe.gate.weight):
                    p.normal_(0, 0.05)
                moe.gate.weight[:, 0] = 1.0
                moe.gate.weight[5, 0] = -1.0  # feature 0 is large below: expert 5 always loses
            x = torch.randn(4, 64, 256, device=device)
            x[..., 0] += 50.0
            x.requires_grad_()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out, aux = moe(x)
            (out.float().square().mean() + aux).backward()
            results[mode] = (out.float(), x.grad, moe.up_proj.grad, moe.down_proj.grad)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        for label, grad in (("up_proj", results["grouped"][2]), ("down_proj", results["grouped"][3])):
            if grad[5].abs().max().item() != 0.0:
                problems.append(f"{name}: the unused expert's {label} gradient is not zero")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for label, a, b in zip(("output", "input grad", "up_proj grad", "down_proj grad"),
                               results["grouped"], results["loop"]):
            err = ((a - b).norm() / b.norm()).item()
            if err > tol:
                problems.append(f"{name}: grouped vs loop {label} differ by {err:.1e} (tolerance {tol:g})")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="all")
    p.add_argument("--preset", choices=["default", "tiny"], default="default", help="model sizes (tiny: a dry run)")
    p.add_argument("--chunked_variants", default="baseline,rope_large",
                   help="variants for the chunked-loss check (the LM head is shared; two hidden-state paths)")
    args = p.parse_args(argv)
    if args.preset == "tiny":
        SIZES.update(TINY_SIZES)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    names = [n for n, spec in VARIANTS.items() if has_reference(spec)] if args.variants == "all" else args.variants.split(",")
    print(f"{'variant':16s} {'ok':3s} {'loss ref':>9s} {'fp32':>9s} {'bf16':>9s} {'grad err fp32':>14s} "
          f"{'grad cos bf16':>14s}  worst parameter (bf16 cosine)")
    failed = 0
    for name in names:
        try:
            r = check_variant(name, device)
        except Exception as err:  # one variant's kernel error: report it, check the others
            failed += 1
            print(f"{name:16s} FAILED: {failure_reason(err)}", flush=True)
            continue
        failed += not r["ok"]
        print(f"{name:16s} {'yes' if r['ok'] else 'NO':3s} {r['loss_ref']:9.5f} {r['loss_fp32']:9.5f} "
              f"{r['loss_bf16']:9.5f} {r['worst_grad_rel_err_fp32']:14.2e} {r['grad_cosine_bf16']:14.5f}  "
              f"{r['min_param_grad_cosine_bf16'][0]} ({r['min_param_grad_cosine_bf16'][1]:.3f})",
              flush=True)
    print(f"{len(names) - failed}/{len(names)} variants match the reference on {device}")

    print("\nchunked LM-head loss, model(ids, targets), vs cross-entropy of model(ids)'s logits (4 chunks):")
    print(f"{'variant':16s} {'dtype':5s} {'ok':3s} {'loss logits':>11s} {'chunked':>9s} {'rel err':>8s} "
          f"{'grad err':>9s} {'grad cos':>9s}  worst parameter (cosine)")
    chunk_failed = 0
    for name in args.chunked_variants.split(","):
        try:
            rows = check_chunked_loss(name, device)
        except Exception as err:
            chunk_failed += 1
            print(f"{name:16s} FAILED: {failure_reason(err)}", flush=True)
            continue
        for r in rows:
            chunk_failed += not r["ok"]
            print(f"{name:16s} {r['dtype']:5s} {'yes' if r['ok'] else 'NO':3s} {r['loss_logits']:11.5f} "
                  f"{r['loss_chunked']:9.5f} {r['loss_rel_err']:8.1e} {r['worst_grad_rel_err']:9.1e} "
                  f"{r['grad_cosine']:9.6f}  {r['min_param_grad_cosine'][0]} ({r['min_param_grad_cosine'][1]:.4f})",
                  flush=True)
    try:
        problems = check_empty_expert(device)
    except Exception as err:
        problems = [f"failed: {failure_reason(err)}"]
    print("expert with no tokens (empty group), grouped vs loop, fp32 and bf16: "
          + ("ok" if not problems else "; ".join(problems)))
    return 1 if failed or chunk_failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
