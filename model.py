"""The decoder-only mixture-of-experts language model of the seed report, with a pluggable
attention layer. Everything except the attention is identical across variants, down to the
initial values of the shared parameters (see `init_weights`).

    ids -> embed_tokens (x sqrt(d_model) if embed_scale) -> dropout -> n_layers x Block -> norm
        -> final_dropout -> tied LM head -> logits
    Block: x + dropout(self_attn(input_layernorm(x))), then x + dropout(mlp(post_attention_layernorm(x)))
    Expert: Linear(d, d_ff) -> SiLU -> expert_dropout -> Linear(d_ff, d)

The knobs embed_scale, aux_loss_reduction, expert_dropout, final_dropout and init_residual_scaling
exist so the seed's exact model is one recipe away (config.RECIPES); our default leaves them off.
"""
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attention import AttentionSpec, RMSNorm, build_attention
from attention.init import Constant, Init, Normal
from attention.kernels import AttentionKernel


@dataclass(frozen=True)
class ModelConfig:
    attention: AttentionSpec
    vocab_size: int = 49152
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int = 2048
    n_experts: int = 8
    top_k: int = 2
    seq_len: int = 512
    dropout: float = 0.1
    router_noise_std: float = 0.1
    rope_theta: float = 10000.0
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (the seed)
    aux_loss_reduction: str = "mean"  # the per-layer balance losses: "mean", or "sum" (the seed, Switch)
    expert_dropout: float = 0.0  # inside each expert, after SiLU (the seed: 0.1)
    final_dropout: float = 0.0  # after the final norm, before the LM head (the seed: 0.1)
    init_residual_scaling: bool = True  # o_proj/down_proj start at 0.02/sqrt(2 n_layers); off: 0.02 (the seed)
    # fast paths: how the same arithmetic runs (bench/ measures each; see their comments below)
    attention_kernel: str = "auto"  # attention.kernels: auto, sdpa, explicit or flex (the same function)
    sdpa_pad: str = "auto"  # attention.kernels: pad q/k/v head dims to one size for the flash kernel
    moe_matmul: str = "auto"  # MoE experts: "grouped", "loop" or "auto" (MOE_EXPERT_MATMUL_MODES)

    def __post_init__(self):
        self.kernel  # validates attention_kernel and sdpa_pad (attention.kernels.AttentionKernel)
        if self.moe_matmul not in MOE_EXPERT_MATMUL_MODES:
            raise ValueError(f"moe_matmul={self.moe_matmul!r}: allowed: {', '.join(MOE_EXPERT_MATMUL_MODES)}")
        # The one place a model's attention gets its sizes: a variant's relative sizes (head dims,
        # ranks, a window as a share of the context) become integers for this d_model, n_heads and
        # seq_len; everything built from this config (modules, FLOPs, KV cache, bench's twin) reads them.
        object.__setattr__(self, "attention", self.attention.resolved(self.d_model, self.n_heads, self.seq_len))

    @property
    def kernel(self) -> AttentionKernel:
        """The kernel choice every layer's attention module is built with."""
        return AttentionKernel(self.attention_kernel, self.sdpa_pad)

    @classmethod
    def from_train_config(cls, cfg, vocab_size: int, **fast_paths) -> "ModelConfig":
        """The model's settings from a config.TrainConfig: every field of the same name, the resolved
        attention spec, the vocabulary size (the tokenizer's, or --vocab_size). The one place the
        model is configured from (train.py, bench/)."""
        shared = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        shared["attention"] = cfg.attention_spec()
        return cls(**{**shared, "vocab_size": vocab_size, **fast_paths})


class LMOutput(NamedTuple):
    """What MoELM returns, whatever it is asked: the balance loss always; the logits when no
    targets are given; the mean cross-entropy and accuracy (and no logits) when they are. (A named
    tuple: DDP, Accelerate and torch.compile walk it like any tuple.)"""
    aux_loss: torch.Tensor
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # mean cross-entropy over the scored targets (not IGNORE_INDEX)
    accuracy: torch.Tensor | None = None
    # each target's cross-entropy (B, T), float32, no gradient: per-position losses (train.py's
    # context gain) at the cost of B x T floats, never the logits
    token_losses: torch.Tensor | None = None


# How the experts' matmuls run. "grouped": one torch._grouped_mm over all expert-sorted tokens --
# no Python loop over experts, no host sync (the group offsets stay on the device; on H100 in bf16
# it is one CUTLASS kernel), and static shapes, so torch.compile keeps the MoE in one graph.
# "loop": one matmul per expert, after reading the per-expert token counts to the host (a sync per
# layer on CUDA). "auto": grouped on CUDA in bf16 (its fast kernel) and on the CPU (as fast as the
# loop there, docs/PERF.md, and compile-friendly); the loop otherwise (CUDA in fp32, where the
# grouped op would fall back to a loop with a sync anyway). ModelConfig.moe_matmul picks the mode;
# `bench.step --moe_matmul` measures it.
MOE_EXPERT_MATMUL_MODES = ("auto", "grouped", "loop")


def _use_grouped_mm(mode: str, tokens: torch.Tensor, *dims: int) -> bool:
    if mode == "loop" or not hasattr(torch, "_grouped_mm"):
        return False
    # The op rejects every other dtype (float64: "Expected mat_a to be Float32, BFloat16 or Float16").
    if tokens.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # The grouped kernels want every row 16-byte aligned (TMA on CUDA; CPU checks it too).
    if any(dim * tokens.element_size() % 16 for dim in dims):
        return False
    if mode == "grouped":
        return True
    return tokens.device.type == "cpu" or tokens.dtype == torch.bfloat16


# torch._grouped_mm runs in float32 (CPU, and CUDA's fallback), but its shape function for
# torch.compile accepts only bf16. For other dtypes it is wrapped in a custom op with its own shape
# function and backward, so a compiled model keeps the MoE in its graph instead of breaking it.
# The backward also writes the weight gradient straight in the (E, out, in) layout of the
# parameter, which saves autograd a strided copy of every expert gradient.
@torch.library.custom_op("attnsweep::expert_linear", mutates_args=())
def _expert_linear_op(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)


@_expert_linear_op.register_fake
def _(x, weight, offs):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("attnsweep::expert_linear_weight_grad", mutates_args=())
def _expert_linear_weight_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per expert e: grad_e^T @ x_e -> (E, out, in); the contraction runs over each group's rows."""
    return torch._grouped_mm(grad.t(), x, offs=offs)


@_expert_linear_weight_grad.register_fake
def _(grad, x, offs):
    return x.new_empty(offs.shape[0], grad.shape[1], x.shape[1])


def _expert_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_linear_backward(ctx, grad):
    x, weight, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _expert_linear_op(grad, weight.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_w = _expert_linear_weight_grad(grad, x, offs) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_expert_linear_op.register_autograd(_expert_linear_backward, setup_context=_expert_linear_setup)


def expert_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped nn.Linear: x (M, in), rows sorted by expert with expert e's rows ending at offs[e],
    times weight (E, out, in) transposed -> (M, out)."""
    if x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)  # known to torch.compile
    return _expert_linear_op(x, weight, offs)


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation perm of x's rows. Autograd would send the gradient of x[perm]
    back through a scatter-add (index_put with accumulate; a slow, serial kernel on CPU); for a
    permutation it is simply the inverse gather."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse, perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        inverse, perm = ctx.saved_tensors
        return _PermuteRows.apply(grad, inverse, perm), None, None


class MoE(nn.Module):
    """Top-k mixture of SiLU experts (Linear(d, d_ff) -> SiLU -> Linear(d_ff, d), no biases).

    The router picks k experts per token from (noisy, while training) logits and weights them by a
    softmax over those k logits. Each token's k copies ("slots") are sorted by expert, so each
    expert runs one matmul over exactly the tokens routed to it -- all experts in one grouped
    matmul where torch has it (matmul: MOE_EXPERT_MATMUL_MODES). Expert weights are stacked,
    (n_experts, out, in).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, noise_std: float,
                 expert_dropout: float = 0.0, matmul: str = "auto"):
        super().__init__()
        self.n_experts, self.top_k, self.noise_std, self.matmul = n_experts, top_k, noise_std, matmul
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        # Elementwise, so one dropout over all experts' hidden rows is each expert's own dropout.
        self.expert_dropout = nn.Dropout(expert_dropout)

    def route(self, tokens: torch.Tensor):
        """-> (expert index, gate weight) of shape (N, k) each, and the load-balancing loss."""
        logits = self.gate(tokens).float()
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        top_weights = top_logits.softmax(dim=-1)
        # Switch-Transformer balance loss: n_experts * sum_e (share of assignments to e) * (mean
        # router probability of e). It is 1 when routing is uniform and grows as it collapses.
        # (Counted with a scatter-add rather than bincount: a static output shape for compile.)
        assigned = self._count(top_experts.flatten()).float()
        share = assigned / top_experts.numel()
        mean_prob = logits.softmax(dim=-1).mean(dim=0)
        aux_loss = self.n_experts * (share * mean_prob).sum()
        return top_experts, top_weights, aux_loss

    def _count(self, experts: torch.Tensor) -> torch.Tensor:
        """How many of `experts` (a 1-D index tensor) name each expert, as (n_experts,) int64."""
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=experts.device)
        return counts.scatter_add_(0, experts, torch.ones_like(experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        n_tokens, d_model = tokens.shape
        top_experts, top_weights, aux_loss = self.route(tokens)
        # Slot s = token * k + j is the token's j-th choice. Sort the slots by expert (stable, so
        # tokens keep their order within an expert) and remember the inverse to undo the sort.
        slot_expert = top_experts.flatten()
        order = slot_expert.argsort(stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        slots = tokens.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, d_model)
        routed = _PermuteRows.apply(slots, order, inverse)  # (N * k, d) in expert order
        counts = self._count(slot_expert)

        # Under autocast the experts run in its dtype, as nn.Linear would (autocast does not know
        # the grouped matmul, and the stacked weights are plain parameters).
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else tokens.dtype
        routed, up, down = routed.to(dtype), self.up_proj.to(dtype), self.down_proj.to(dtype)
        if _use_grouped_mm(self.matmul, routed, d_model, up.shape[1]):
            offsets = counts.cumsum(0).to(torch.int32)  # where each expert's rows end
            hidden = self.expert_dropout(F.silu(expert_linear(routed, up, offsets)))
            expert_out = expert_linear(hidden, down, offsets)
        else:
            ups, downs = up.unbind(0), down.unbind(0)  # unbind: one gradient stack, not E zero-fills
            chunks = routed.split(counts.tolist())
            expert_out = torch.cat([self.expert_dropout(F.silu(chunk @ ups[e].T)) @ downs[e].T
                                    for e, chunk in enumerate(chunks)])

        # Back to slot order; each token's k outputs are then adjacent: weight them and sum over k.
        per_slot = _PermuteRows.apply(expert_out, inverse, order).view(n_tokens, self.top_k, d_model)
        combined = (per_slot.to(tokens.dtype) * top_weights.unsqueeze(-1).to(tokens.dtype)).sum(dim=1)
        return combined.view_as(x), aux_loss


def layer_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """The attention module of layer `layer` (0-based): of the spec's kind, or on a hybrid's full
    layers of its full_attention variant's (AttentionSpec.layer_spec); built with its index, so the
    kind applies its own per-layer schedule (a local/global pattern's windows, a depth-dependent
    constant)."""
    return build_attention(cfg.attention.layer_spec(layer, cfg.n_layers), cfg.d_model, cfg.n_heads, cfg.dropout,
                           cfg.rope_theta, max_len=cfg.seq_len, kernel=cfg.kernel, layer=layer,
                           n_layers=cfg.n_layers)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model)
        self.self_attn = layer_attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model)
        self.mlp = MoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.router_noise_std, cfg.expert_dropout,
                       cfg.moe_matmul)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x)))
        moe_out, aux_loss = self.mlp(self.post_attention_layernorm(x))
        return x + self.dropout(moe_out), aux_loss

    def decode(self, x: torch.Tensor, cache) -> torch.Tensor:
        """forward's arithmetic on the tokens after those `cache` (this layer's) holds."""
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x))[0])


# A target that is not scored (a task's non-answer positions): no loss, no accuracy, no gradient
# (PyTorch's own ignore_index default). data.py's batches use it; the loss below honours it.
IGNORE_INDEX = -100


class _LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy (and accuracy) of the tied LM head, computed in chunks of tokens, with
    the gradient computed in the forward pass.

    The plain path, F.cross_entropy(F.linear(h, W).float(), t), holds the (tokens x vocab) logits
    in the compute dtype and in float32, their log-softmax saved for backward, and a gradient of
    the same size: at batch 16 x 512 and vocab 49152 that is ~5 GB at its peak, more than all
    the model's activations. Here at most one chunk of logits exists at a time. The arithmetic is
    the plain path's under autocast: logits from a matmul in the compute dtype, softmax and loss in
    float32, the logits' gradient cast to the compute dtype for the two gradient matmuls; only the
    weight gradient is summed over chunks in float32 instead of inside one matmul.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_tokens, grads_needed):
        n_tokens = hidden.shape[0]
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        # Only targets != IGNORE_INDEX are scored (a task's answer positions; every position for a
        # language model): the mean is over them, and the others get no gradient. A mask, not a
        # gather of the scored rows, so the count never has to reach the host mid-step.
        scored = targets != IGNORE_INDEX
        n_scored = scored.sum().clamp(min=1)
        safe_targets = targets.masked_fill(~scored, 0)
        token_losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)  # 0 where not scored
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_h = torch.empty_like(h) if grads_needed else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads_needed else None
        for start in range(0, n_tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h_chunk, t_chunk, m_chunk = h[rows], safe_targets[rows], scored[rows]
            logits = (h_chunk @ w.T).float()
            lse = logits.logsumexp(dim=-1)
            token_losses[rows] = (lse - logits.gather(1, t_chunk[:, None]).squeeze(1)) * m_chunk
            correct += ((logits.argmax(dim=-1) == t_chunk) & m_chunk).sum()
            if grads_needed:
                # d(mean CE)/d(logits) = (softmax - one_hot(target)) / n_scored on scored rows, 0 elsewhere
                grad_logits = (logits - lse[:, None]).exp_()
                grad_logits.scatter_add_(1, t_chunk[:, None], torch.full_like(lse[:, None], -1.0))
                grad_logits = (grad_logits / n_scored * m_chunk[:, None]).to(compute_dtype)
                grad_h[rows] = grad_logits @ w
                grad_w += (grad_logits.T @ h_chunk).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct, token_losses)
        return token_losses.sum() / n_scored, correct.float() / n_scored, token_losses

    @staticmethod
    def backward(ctx, grad_loss, grad_accuracy, grad_token_losses):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None)


# Tokens per chunk of _LMHeadLoss: ~2**25 float32 logits (128 MiB) at a time.
LM_HEAD_CHUNK_ELEMENTS = 2 ** 25


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.final_dropout = nn.Dropout(cfg.final_dropout)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        """ids (B, T) -> LMOutput: the balance loss over layers (mean or sum) and the logits (B, T, vocab).

        With targets (B, T): the mean cross-entropy and accuracy over the scored targets (those not
        IGNORE_INDEX), and each target's cross-entropy (0 where not scored), instead of the logits,
        without ever materialising them (see _LMHeadLoss) -- what training and evaluation need.
        """
        x = self.embed_tokens(ids)
        if self.cfg.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)
        x = self.dropout(x)
        aux_losses = []
        for layer in self.layers:
            x, aux_loss = layer(x)
            aux_losses.append(aux_loss)
        hidden = self.final_dropout(self.norm(x))
        aux_losses = torch.stack(aux_losses)
        aux_loss = aux_losses.sum() if self.cfg.aux_loss_reduction == "sum" else aux_losses.mean()
        if targets is None:
            return LMOutput(aux_loss, logits=F.linear(hidden, self.embed_tokens.weight))  # head tied to the embedding
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        chunk = max(1, LM_HEAD_CHUNK_ELEMENTS // self.cfg.vocab_size)
        # (Forward passes of autograd Functions run without grad mode, so whether the gradient
        # is wanted is decided here.)
        grads_needed = torch.is_grad_enabled() and (hidden.requires_grad or self.embed_tokens.weight.requires_grad)
        ce, accuracy, token_losses = _LMHeadLoss.apply(hidden.flatten(0, 1), self.embed_tokens.weight,
                                                       targets.flatten(), dtype, chunk, grads_needed)
        return LMOutput(aux_loss, loss=ce, accuracy=accuracy, token_losses=token_losses.view(targets.shape))

    # --- incremental decoding: each attention kind owns its cache (attention/cache.py) ----------

    def new_cache(self, batch: int, context: int, dtype=torch.float32, device=None) -> list:
        """One empty cache per layer, made by its attention module, with room for `context` tokens
        (a window layer: its last `window`)."""
        return [layer.self_attn.new_cache(batch, context, dtype, device) for layer in self.layers]

    def decode(self, ids: torch.Tensor, cache: list) -> torch.Tensor:
        """ids (B, T), the tokens after those the cache holds -> their logits (B, T, vocab), in eval
        mode the full forward's: a prompt into an empty cache (prefill), then one token at a time."""
        x = self.embed_tokens(ids)
        if self.cfg.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)
        x = self.dropout(x)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer.decode(x, layer_cache)
        return F.linear(self.final_dropout(self.norm(x)), self.embed_tokens.weight)


# --- initialisation: fair by construction ------------------------------------------------------

# Projections that write into the residual stream start smaller (GPT-2), so depth does not grow
# the residual's variance: the experts' down_proj here, and whatever an attention kind says
# (its parameter_init gets both stds).
INIT_STD = 0.02


def is_attention_parameter(name: str) -> bool:
    return ".self_attn." in name


def residual_init_std(cfg: ModelConfig) -> float:
    return INIT_STD / math.sqrt(2 * cfg.n_layers) if cfg.init_residual_scaling else INIT_STD


def parameter_inits(model: MoELM) -> dict[str, Init]:
    """How each parameter starts, by its full name. The attention's: what its module declares
    (`parameter_init(std, residual_std)`: attention/registry.py's contract); the rest, shared by
    every variant: norm weights 1, biases 0, the experts' down_proj N(0, residual std), everything
    else N(0, INIT_STD). An attention parameter its module declares nothing for is an error."""
    std, residual_std = INIT_STD, residual_init_std(model.cfg)
    inits = {}
    for index, layer in enumerate(model.layers):
        declared = layer.self_attn.parameter_init(std, residual_std)
        own = dict(layer.self_attn.named_parameters())
        if declared.keys() != own.keys():
            missing, extra = sorted(own.keys() - declared.keys()), sorted(declared.keys() - own.keys())
            raise ValueError(f"{type(layer.self_attn).__name__}.parameter_init: declares no init for {missing}"
                             + (f", and one for {extra}, which it does not have" if extra else ""))
        inits.update({f"layers.{index}.self_attn.{name}": init for name, init in declared.items()})
    for name, _ in model.named_parameters():
        if is_attention_parameter(name):
            continue
        if name.endswith("norm.weight"):
            inits[name] = Constant(1.0)
        elif name.endswith(".bias"):
            inits[name] = Constant(0.0)
        else:
            inits[name] = Normal(residual_std if name.endswith("down_proj") else std)
    return inits


def init_weights(model: MoELM, seed: int) -> None:
    """Each parameter from its own generator seeded by (seed, parameter name), drawn on the CPU, by
    the rule parameter_inits gives it.

    So a parameter that exists in two variants (embedding, experts, router, norms) starts from the
    same values in both, whatever the other parameters are, and on any device. The draws are
    independent, so they run on a few threads (torch releases the GIL while drawing): the values do
    not depend on the threading, and a run starts sooner (~1 s of draws for the seed's model).
    """
    inits = parameter_inits(model)

    @torch.no_grad()
    def initialise(name: str, param: torch.Tensor) -> None:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        param.copy_(inits[name].draw(param.shape, generator))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda item: initialise(*item), model.named_parameters()))


def shared_parameters_fingerprint(model: MoELM) -> str:
    """sha256 of every non-attention parameter, by name, in name order: equal across the variants
    of one seed exactly when the shared initialisation is equal."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if not is_attention_parameter(name):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- accounting ----------------------------------------------------------------------------------

def count_parameters(model: MoELM) -> dict[str, int]:
    """Total (the tied head counted once) and attention-only parameter counts."""
    named = dict(model.named_parameters())
    return {
        "total": sum(p.numel() for p in named.values()),
        "attention": sum(p.numel() for n, p in named.items() if is_attention_parameter(n)),
    }


def flops_per_token(model: MoELM) -> int:
    """Training FLOPs per token: 6 x (matmul weights a token actually passes through) for forward
    and backward, plus 3 x the forward FLOPs each layer's attention does beyond its weights at the
    context seq_len, as the kind counts them (`token_mixing_flops`; softmax attention: 2 x keys x
    n_heads x (qk_head_dim + v_head_dim) for the scores and the weighted sum of values, the
    PaLM/nanoGPT convention: the full seq_len x seq_len products, no discount for the causal mask,
    and min(window, seq_len) keys on a sliding-window layer: what a kernel that skips the keys
    outside the window computes; our explicit-mask path computes them all and masks them).

    Matmul weights per token: every attention projection, the router, top_k of the n_experts
    experts, and the tied LM head (vocab x d_model). Embedding lookups, norms and biases are not
    matmuls and are left out.
    """
    cfg = model.cfg
    active = 0
    for name, param in model.named_parameters():
        if name.endswith(("up_proj", "down_proj")):
            active += param.numel() // cfg.n_experts * cfg.top_k
        elif param.dim() == 2:  # every Linear weight, and the embedding as the LM head
            active += param.numel()
    token_mixing = sum(layer.self_attn.token_mixing_flops(cfg.seq_len) for layer in model.layers)
    return 6 * active + 3 * token_mixing


def attention_layers(cfg: ModelConfig) -> list[nn.Module]:
    """Every layer's attention module on the meta device (no memory, no init): what the costs ask."""
    with torch.device("meta"):
        return [layer_attention(cfg, layer) for layer in range(cfg.n_layers)]


KV_CACHE_BYTES_PER_VALUE = 2  # bf16/fp16, as a decoder would cache


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_value: int = KV_CACHE_BYTES_PER_VALUE) -> int:
    """The whole decode cache of one sequence at `context` tokens, over all layers, as each layer's
    kind counts it (`cache_size`: MHA/GQA K and V of each key/value head per token, a window layer
    min(window, context) tokens; MLA the normalised latent plus the shared rotary key; a recurrent
    kind its fixed state). Counted, and exactly what MoELM.new_cache's tensors hold
    (tests/test_decode.py)."""
    return sum(module.cache_size(context).values for module in attention_layers(cfg)) * bytes_per_value


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
    """What a decoder caches per generated token, over all layers, at 2 bytes a value, at the
    context length cfg.seq_len (L): each layer's kind says how many values a token adds (MHA/GQA:
    K and V of each key/value head; MLA: the compressed latent plus the shared rotary key). A
    sliding-window layer keeps only its last min(window, L) tokens, so it is counted as
    values x min(window, L) / L per token: the whole cache at context L divided by L, rounded to
    the byte. Without a window this is the plain per-token size, whatever L."""
    return round(kv_cache_bytes(cfg, cfg.seq_len) / cfg.seq_len)
