"""The attention registry, as plain data (no torch): the kinds of attention, their knobs, the
families the report groups variants in, and the named variants. Everything else reads it: the
config's fields, validation and --help (config.py), the model (model.py, which builds each
layer's module of the kind and sums the costs the modules report), the fairness audit and the report's labels and colours (analysis/), the sweep checks.
A kind's module is imported only when a model is built (`attention.build_attention`), so
`analysis/` and `localsweep/` import this file without torch.

Adding a named variant: one entry in VARIANTS (below), then its name in a sweep's
`attention: values:`. A hybrid layer pattern is a variant too (AttentionSpec.full_attention).

Adding a kind is three files: its module, its registry entry, its test file (and its variants'
lines in the zoo sweeps, below). tests/test_kind_contract.py checks the items below for every kind
in KINDS and names what a kind is missing.

1. The module, one file in attention/, one class (KINDS[kind].module names it):
   - `__init__(spec, d_model, n_heads, dropout, rope_theta, max_len=0, kernel=None, layer=0,
     n_layers=1)`: the resolved spec, the model size, the kernel choice (an
     attention.kernels.AttentionKernel, None: its default; a softmax kind computes its attention by
     calling it, so every kernel and ModelConfig.attention_kernel serve a new kind unchanged; a kind
     without a softmax ignores it), and which layer of how many it is. A per-layer
     schedule is the kind's own and lives here only (MHA's local/global windows: layer_window in
     attention/modules.py; a depth-dependent constant such as a lambda_init). It must build on the
     meta device too (the costs below are asked of modules built there).
   - `forward(x, cache=None)`: (B, T, d_model) -> (B, T, d_model). With a cache (below): a prompt into
     the empty cache, then one token at a time, giving the full forward's outputs
     (tests/test_decode.py checks every variant).
   - `new_cache(batch, context, dtype, device)` -> an attention.cache.LayerCache.
   - `cache_size(context)` -> attention.cache.CacheSize(per_token, tokens, state): what new_cache
     holds per sequence at `context` tokens, values per token times the tokens kept (a window: at
     most its window) plus a fixed state (a recurrent kind: its state matrices, with per_token 0).
     model.kv_cache_bytes counts it; the contract test checks it against new_cache's tensors.
   - `token_mixing_flops(context)` -> the forward FLOPs per token that are no weight matmul at
     `context` (softmax attention: scores and weighted values; a recurrent kind: its state update and
     read). model.flops_per_token adds 6 x the 2-D weights a token passes through (every Linear) and
     3 x this; anything else (a short convolution's weights) is the kind's to count here.
   - `parameter_init(std, residual_std)` -> {parameter name: attention.init.Normal(std) | Constant(v)
     | Drawn(fn)} for every parameter it has, nothing else: model.init_weights draws each from the
     generator seeded by (seed, its full name). std and residual_std are the model's (residual_std for
     a projection that writes into the residual stream, such as o_proj).
   - parameter names as in the `transformers` class it is checked against.
   - optional, for the mechanism probes (probes.py): `attention_scores(x)` (B, H, T, T) scaled,
     masked pre-softmax scores, `attention_probabilities(x)` where the softmax spans more than the
     keys, `gate_values(x)` an output gate's openness in [0, 1] (None without a gate).
   - optional, for bench/ when bench/reference.py has no seed-style twin of the kind (the seed's two
     have one): a classmethod `reference_attention(spec, d_model, n_heads, dropout, rope_theta, layer,
     n_layers)` -> (module, forward): the reference implementation (the transformers class) whose
     state dict keys are this module's, and forward(x) -> (B, T, d_model) on it. bench times the kind
     against it, with our weights copied in.
2. The registry entry (this file): its new knobs in KNOBS (each becomes a config field, an option
   with its help line, a validated value) and one Kind in KINDS naming the module, its knobs, its
   reference, its test file, how unset head dims resolve and what combinations it refuses; a
   variant of it in VARIANTS (a new family: one entry in FAMILIES).
3. The test file (KINDS[kind].test) against the reference: weights copied, outputs and input and
   parameter gradients in fp32 within 1e-5 relative error over several shapes, with a negative
   control (a planted bug is caught). A kind with a reference_attention measures through
   tests/reference_check.py (relative_errors, and assert_bench_compares_with_the_reference for
   bench/'s side), which the contract test checks its test file calls.
The zoo sweeps list every variant after the seed's 13 (tests/test_sweeps.py enforces it), so a new
variant is also one line in sweeps/zoo.yaml and sweeps/zoo_smoke.yaml.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Callable


# --- knobs ---------------------------------------------------------------------------------------

def _positive(value) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def _positive_or_full(value) -> str | None:
    if value == FULL_RANK or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return f"must be a positive integer or '{FULL_RANK}'"


def _even(value) -> str | None:
    # 0: no rotary dims at all (MLA without decoupled RoPE)
    return _non_negative(value) or (None if value % 2 == 0 else "must be even (RoPE rotates pairs)")


def _output_gate(value) -> str | None:
    return None if value in OUTPUT_GATES else f"allowed: {', '.join(OUTPUT_GATES)}"


# How a RoPE scaling type maps integer positions to the (fractional) positions that get rotated
# (attention/rope.py applies it). Linear scaling ("position interpolation") divides positions by
# the factor. Another type is one more entry here. Plain data, so validating a variant that uses
# one needs no torch.
ROPE_SCALINGS = {
    "linear": lambda positions, factor: positions / factor,
}


def _rope_scaling(value) -> str | None:
    return None if value in ROPE_SCALINGS else f"allowed: {', '.join(ROPE_SCALINGS)}"


OUTPUT_GATES = ("none", "headwise", "elementwise")  # --output_gate (attention/modulated.py: gate_width)
POSITIONS = ("rope", "none", "alibi")  # the `positions` knob: RoPE, NoPE (no position signal), ALiBi
# --attention_kernel (ModelConfig.attention_kernel): how every softmax attention runs, the same
# function on each; attention/kernels.py implements them. Named here, as plain data, so config.py
# validates the option without torch.
KERNELS = ("auto", "sdpa", "explicit", "flex")


def _position_kind(value) -> str | None:
    return None if value in POSITIONS else f"allowed: {', '.join(POSITIONS)}"


FULL_RANK = "full"  # --q_lora_rank=full: a full-rank q_proj instead of the variant's low-rank query


@dataclass(frozen=True)
class Knob:
    """One setting of an attention kind. In a variant (AttentionSpec) it has `default` unless the
    variant says otherwise; on the command line (TrainConfig, a sweep) it is `cli_type | None`,
    None keeping the variant's value."""
    name: str
    type: object  # the spec field's type
    default: object  # the spec field's default
    help: str  # the --help line, after "<kinds> only: " where not every kind has it
    rule: Callable[[object], str | None] | None = None  # value -> why it is invalid, or None
    cli_type: object = None  # what --name accepts, when it is more than `type` (q_lora_rank: 'full')
    aliases: dict = field(default_factory=dict)  # command-line words meaning a spec value ('full' -> None)
    step: int = 1  # a relative size (below) resolves to a multiple of this: 2 for rotary dims (pairs)


KNOBS: dict[str, Knob] = {k.name: k for k in [
    # standard multi-head attention (and its grouped-query / multi-query forms)
    Knob("n_kv_heads", int | None, None, "key/value heads, n_heads must divide by it (1: multi-query); "
         "None: the variant's", _positive),
    Knob("qk_norm", bool, False, "RMSNorm on each head's query and key before RoPE (Qwen3); None: the variant's"),
    # latent attention
    Knob("q_lora_rank", int | None, None, "query rank, or 'full' for a full-rank q_proj; None: the variant's",
         _positive_or_full, cli_type=int | str, aliases={FULL_RANK: None}),
    Knob("kv_lora_rank", int | None, None, "rank of the key/value latent; None: the variant's", _positive),
    Knob("qk_rope_head_dim", int | None, None, "rotary dims per query/key head (even; 0: no RoPE, "
         "then qk_nope_head_dim > 0); None: the variant's", _even, step=2),
    Knob("qk_nope_head_dim", int, 0, "non-rotary dims per query/key head; None: the variant's", _non_negative),
    Knob("v_head_dim", int | None, None, "value dims per head; None: the variant's", _positive),
    # every kind
    Knob("attention_bias", bool, False, "bias on the attention projections (True/False); None: the variant's"),
    Knob("rope_scaling", str | None, None, "RoPE position scaling type (linear); None: the variant's", _rope_scaling),
    Knob("rope_scaling_factor", float, 1.0, "RoPE scaling factor (> 1 stretches positions); None: the variant's",
         _positive),
    # around the softmax of multi-head attention (attention/modulated.py)
    Knob("output_gate", str, "none", "sigmoid gate on each head's output from q_proj: none, headwise (one per head) "
         "or elementwise (Qwen3-Next); None: the variant's", _output_gate),
    Knob("attention_sinks", bool, False, "a learned logit per head in the softmax's denominator (gpt-oss); "
         "None: the variant's"),
    Knob("attn_softcap", float, 0.0, "soft-cap the attention logits to cap * tanh(logit / cap) (Gemma 2), 0: off; "
         "None: the variant's", _non_negative),
    # positions and windows (multi-head attention)
    Knob("positions", str, "rope", "position signal: rope, none (NoPE) or alibi (Bloom's linear bias); "
         "None: the variant's", _position_kind),
    Knob("window", int, 0, "sliding window: each query sees itself and the window-1 keys before it "
         "(Mistral); 0: full causal; None: the variant's", _non_negative),
    Knob("global_every", int, 0, "with a window, every Nth layer (N, 2N, ..) attends to all keys, "
         "the others are local (Gemma 2: 2); 0: every layer local; None: the variant's", _non_negative),
    # Gated DeltaNet's sizes, with transformers' Qwen3NextConfig names; None: Qwen3-Next's
    # proportions at the model's size (_gated_deltanet_resolve)
    Knob("linear_num_key_heads", int | None, None, "key heads (each serves linear_num_value_heads / "
         "linear_num_key_heads value heads); None: n_heads / 2", _positive),
    Knob("linear_num_value_heads", int | None, None, "value heads, each with its own d_k x d_v state "
         "(must divide by linear_num_key_heads); None: n_heads", _positive),
    Knob("linear_key_head_dim", int | None, None, "query/key dims per key head; None: d_model / n_heads", _positive),
    Knob("linear_value_head_dim", int | None, None, "value dims per value head; None: d_model / n_heads",
         _positive),
    Knob("linear_conv_kernel_dim", int | None, None, "taps of the short causal convolution on q, k, v; None: 4",
         _positive),
]}


# --- sizes relative to the model ------------------------------------------------------------------
# A variant's sizes scale with the model it is trained in, so the smoke sweep's variants are the GPU
# sweep's designs shrunk, not other designs: per-head dims are multiples of the head dim
# (d_model / n_heads), ranks fractions of d_model, windows fractions of the context (seq_len).
# Only VARIANTS entries use these; AttentionSpec.resolved turns them into integers: the nearest
# multiple of the knob's step (2 for rotary dims, else 1), halves rounded up, and at least one step.
# The command line's knobs stay absolute integers and override them.

@dataclass(frozen=True)
class Relative:
    fraction: float

    def exact(self, d_model: int, n_heads: int, seq_len: int | None) -> float:
        raise NotImplementedError

    def size(self, d_model: int, n_heads: int, seq_len: int | None, step: int = 1) -> int:
        return max(step, step * math.floor(self.exact(d_model, n_heads, seq_len) / step + 0.5))


class PerHead(Relative):
    """A per-head dim as a multiple of the head dim: PerHead(1.5) is 96 at the seed's 64-dim heads."""

    def exact(self, d_model, n_heads, seq_len):
        return self.fraction * d_model / n_heads


class OfModel(Relative):
    """A rank as a fraction of d_model: OfModel(1/8) is 64 at the seed's d_model 512."""

    def exact(self, d_model, n_heads, seq_len):
        return self.fraction * d_model


class OfContext(Relative):
    """A window as a fraction of the context: OfContext(1/4) is 128 at the seed's 512 tokens."""

    def exact(self, d_model, n_heads, seq_len):
        if seq_len is None:
            raise ValueError(f"a size of {self.fraction} of the context needs the context length (seq_len)")
        return self.fraction * seq_len


# --- the spec of one variant -----------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionSpec:
    """Which attention a layer gets: a kind and its knob values. The model size (d_model, n_heads)
    comes from the training config, so one spec works at the seed's size and at a laptop's: relative
    sizes (PerHead, OfModel, OfContext) and head dims a spec leaves None are resolved from it
    (`resolved`)."""
    name: str
    family: str  # how the report groups variants: a key of FAMILIES
    kind: str = "mha"  # a key of KINDS
    # One field per knob, with the knob's type and default (KNOBS is their one home).
    for _knob in KNOBS.values():
        __annotations__[_knob.name] = _knob.type
        vars()[_knob.name] = _knob.default
    del _knob
    # A hybrid layer pattern (Qwen3-Next, Kimi Linear: three linear-attention layers to one full):
    # layers N-1, 2N-1, .. (0-based, N = full_attention_interval) are built from the VARIANTS entry
    # `full_attention` names, the others from this spec (layer_types; a model shallower than N: its
    # last layer). The command line's knobs change this spec's layers only.
    full_attention: str | None = None
    full_attention_interval: int = 0

    @property
    def is_latent(self) -> bool:
        return self.kind == "mla"

    def with_overrides(self, **changes) -> "AttentionSpec":
        """A copy with some knobs changed (a sweep exploring points between the named variants)."""
        if changes.get("rope_scaling_factor", 1.0) != 1.0 and self.rope_scaling is None:
            changes.setdefault("rope_scaling", "linear")
        return replace(self, **changes)

    def resolved(self, d_model: int, n_heads: int, seq_len: int | None = None) -> "AttentionSpec":
        """Every size an integer for this model size: relative sizes resolved (seq_len: the context,
        needed by a relative window only), then head dims left None filled in (the kind's rule)."""
        sizes = {name: value.size(d_model, n_heads, seq_len, KNOBS[name].step)
                 for name in KNOBS if isinstance(value := getattr(self, name), Relative)}
        return KINDS[self.kind].resolve(replace(self, **sizes), d_model // n_heads, n_heads)

    def knob_values(self) -> dict:
        """The kind's knobs and their values: what --dry_run, the record and the W&B config show of
        a resolved spec (integers where the variant's sizes are relative); a hybrid's pattern too."""
        values = {name: getattr(self, name) for name in KINDS[self.kind].knobs}
        if self.full_attention:
            values.update(full_attention=self.full_attention, full_attention_interval=self.full_attention_interval)
        return values

    def interval_at(self, n_layers: int) -> int:
        """The hybrid's interval in a model of n_layers: full_attention_interval, or n_layers where
        that is fewer. A pattern with no full layer would be the linear kind under another name, so a
        model shallower than the interval keeps one full layer, the last, as Qwen3-Next's last layer is
        (the smoke's 2 layers: linear, full). At n_layers >= the interval it is transformers' pattern."""
        return min(self.full_attention_interval, n_layers)

    def layer_types(self, n_layers: int) -> list[str]:
        """A hybrid's layer pattern as transformers' Qwen3NextConfig derives layer_types from its
        full_attention_interval: layer i is "full_attention" when (i + 1) % interval == 0, else
        "linear_attention" (this spec's kind, whatever it is); the interval at most n_layers
        (interval_at)."""
        if not self.full_attention:
            raise ValueError(f"{self.name}: not a hybrid (no full_attention)")
        interval = self.interval_at(n_layers)
        return [FULL_ATTENTION if (layer + 1) % interval == 0 else LINEAR_ATTENTION for layer in range(n_layers)]

    def layer_spec(self, layer: int, n_layers: int) -> "AttentionSpec":
        """The spec layer `layer` of `n_layers` is built from: on a hybrid's full_attention layers the
        variant full_attention names (unresolved: the model resolves it at its size), else this one."""
        if self.full_attention and self.layer_types(n_layers)[layer] == FULL_ATTENTION:
            return VARIANTS[self.full_attention]
        return self

    def hybrid_problem(self) -> str | None:
        """Why a hybrid's pattern is invalid, or None (not a hybrid, or a valid one)."""
        if not self.full_attention and not self.full_attention_interval:
            return None
        if self.full_attention not in VARIANTS:
            return f"{self.name}: full_attention={self.full_attention!r}: allowed: a variant's name ({', '.join(VARIANTS)})"
        if VARIANTS[self.full_attention].full_attention:
            return f"{self.name}: full_attention={self.full_attention!r} is itself a hybrid"
        if not (isinstance(self.full_attention_interval, int) and self.full_attention_interval > 0):
            return f"{self.name}: full_attention_interval={self.full_attention_interval!r}: must be greater than 0"
        return None


# Layer types of a hybrid, as transformers' configs name them (Qwen3NextConfig.layer_types).
LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"


# --- kinds ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    name: str
    label: str  # how errors and --help name it
    module: str  # "package.module:Class", imported when a model is built
    knobs: tuple  # names in KNOBS this kind reads; any other knob set on the command line is refused
    reference: str  # the independent implementation its test compares against
    test: str  # the test file that compares the module with that reference (weights copied)
    resolve: Callable  # (spec, head_dim, n_heads) -> spec with its None head dims filled in
    refuse: Callable  # (resolved spec, head_dim, n_heads) -> why this combination is refused, or None


def _mha_resolve(spec, head_dim, n_heads):
    return spec if spec.n_kv_heads is not None else replace(spec, n_kv_heads=n_heads)


def _mha_refuse(spec, head_dim, n_heads):
    if head_dim % 2 and spec.positions == "rope":
        return f"head dim {head_dim} (d_model/n_heads) must be even for RoPE"
    if n_heads % spec.n_kv_heads:
        return f"--n_kv_heads={spec.n_kv_heads}: --n_heads={n_heads} must divide by it"
    if spec.rope_scaling and spec.positions != "rope":
        return f"--rope_scaling: only with --positions=rope, not {spec.positions}"
    if spec.global_every and not spec.window:
        return "--global_every: needs a --window (without one every layer is global)"
    return None


def _mla_resolve(spec, head_dim, n_heads):
    rope = head_dim if spec.qk_rope_head_dim is None else spec.qk_rope_head_dim
    return replace(spec, qk_rope_head_dim=rope, v_head_dim=spec.v_head_dim or head_dim)


def _mla_refuse(spec, head_dim, n_heads):
    if spec.qk_rope_head_dim == 0 and spec.qk_nope_head_dim == 0:
        return "--qk_rope_head_dim=0: needs --qk_nope_head_dim > 0 (queries and keys need some dims)"
    if spec.qk_rope_head_dim == 0 and spec.rope_scaling:
        return "--rope_scaling: only with RoPE, not with --qk_rope_head_dim=0"
    return None


def _diff_refuse(spec, head_dim, n_heads):
    # heads pair up (head i with i + n_heads/2) and so do the key/value heads' values
    if head_dim % 2:
        return f"head dim {head_dim} (d_model/n_heads) must be even for RoPE"
    if spec.n_kv_heads % 2 or n_heads % spec.n_kv_heads:
        return (f"--n_kv_heads={spec.n_kv_heads}: differential attention pairs heads, so it must be even and "
                f"--n_heads={n_heads} must divide by it")
    return None


def gated_deltanet_defaults(head_dim: int, n_heads: int) -> dict:
    """Gated DeltaNet's sizes where a spec leaves them None: Qwen3-Next's proportions at this model
    size (n_heads value heads and n_heads / 2 key heads of the head dim, kernel 4), so its
    in_proj_qkvz + out_proj hold 4 d_model^2 weights, as multi-head attention's q, k, v, o."""
    return dict(linear_num_key_heads=max(1, n_heads // 2), linear_num_value_heads=n_heads,
                linear_key_head_dim=head_dim, linear_value_head_dim=head_dim, linear_conv_kernel_dim=4)


def _gated_deltanet_resolve(spec, head_dim, n_heads):
    defaults = gated_deltanet_defaults(head_dim, n_heads)
    return replace(spec, **{name: value for name, value in defaults.items() if getattr(spec, name) is None})


def _gated_deltanet_refuse(spec, head_dim, n_heads):
    if spec.linear_num_value_heads % spec.linear_num_key_heads:
        return (f"--linear_num_value_heads={spec.linear_num_value_heads}: must divide by "
                f"--linear_num_key_heads={spec.linear_num_key_heads} (each key head serves as many value heads)")
    return None


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("mha", "multi-head attention (MHA/GQA/MQA)", "attention.modules:MultiHeadAttention",
         ("n_kv_heads", "qk_norm", "attention_bias", "rope_scaling", "rope_scaling_factor",
          "output_gate", "attention_sinks", "attn_softcap", "positions", "window", "global_every"),
         "transformers LlamaAttention (num_key_value_heads); Qwen3Attention with qk_norm; Qwen3NextAttention with "
         "an element-wise gate; GptOssAttention with sinks; Gemma2Attention with a soft-cap; MistralAttention with "
         "a window; BloomAttention with ALiBi",
         test="tests/test_attention.py",
         resolve=_mha_resolve,
         refuse=_mha_refuse),
    Kind("mla", "latent (MLA)", "attention.modules:MultiHeadLatentAttention",
         ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
          "attention_bias", "rope_scaling", "rope_scaling_factor"),
         "transformers DeepseekV3Attention",
         test="tests/test_attention.py",
         resolve=_mla_resolve,
         refuse=_mla_refuse),
    Kind("diff", "differential attention", "attention.diff:DifferentialAttention",
         ("n_kv_heads", "attention_bias"),
         "transformers DiffLlamaAttention",
         test="tests/test_diff.py",
         resolve=_mha_resolve,
         refuse=_diff_refuse),
    Kind("gated_deltanet", "Gated DeltaNet (linear attention)", "attention.gated_deltanet:GatedDeltaNet",
         ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
          "linear_conv_kernel_dim"),
         "transformers Qwen3NextGatedDeltaNet (its torch path: torch_chunk_gated_delta_rule, the recurrent "
         "step, the torch causal convolution)",
         test="tests/test_gated_deltanet.py",
         resolve=_gated_deltanet_resolve,
         refuse=_gated_deltanet_refuse),
]}


def kinds_with(knob: str) -> list[str]:
    return [kind.name for kind in KINDS.values() if knob in kind.knobs]


def knob_help(knob: str) -> str:
    """The --help line of a knob: prefixed with the kinds that have it, unless every kind does."""
    kinds = kinds_with(knob)
    prefix = "" if len(kinds) == len(KINDS) else "/".join(k.upper() for k in kinds) + " only: "
    return prefix + KNOBS[knob].help


# --- families and variants -------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    label: str  # in the report's tables and legends
    color: str  # its points and boxes in the figures
    shades: str  # a matplotlib colormap for its members in line plots


FAMILIES: dict[str, Family] = {
    "baseline": Family("Baseline", "#d62728", "Reds"),
    "lora": Family("LoRA", "#1f77b4", "Blues"),
    "enhanced": Family("Enhanced", "#2ca02c", "Greens"),
    "rope": Family("RoPE", "#ff7f0e", "Oranges"),
    "bias": Family("Bias", "#9467bd", "Purples"),
    "gqa": Family("GQA", "#8c564b", "copper"),
    "qknorm": Family("QK-norm", "#e377c2", "RdPu"),
    "gate": Family("Gated", "#17becf", "GnBu"),
    "sinks": Family("Sinks", "#bcbd22", "YlGn"),
    "softcap": Family("Soft-cap", "#393b79", "BuPu"),
    "window": Family("Window", "#aec7e8", "Blues"),
    "positions": Family("Positions", "#ffbb78", "Oranges"),
    "mla_v3": Family("MLA (V3)", "#98df8a", "Greens"),
    "diff": Family("Differential", "#e7ba52", "YlOrBr"),
    "linear": Family("Linear / hybrid", "#637939", "summer"),  # a recurrent state instead of a KV cache
    "control": Family("Control", "#525252", "Greys"),
}
OTHER_FAMILY = Family("Other", "#7f7f7f", "Greys")


def _mla(name, family, q, kv, rope, v, bias=False, factor=None):
    return AttentionSpec(
        name=name, family=family, kind="mla", q_lora_rank=q, kv_lora_rank=kv, qk_rope_head_dim=rope,
        v_head_dim=v, attention_bias=bias,
        rope_scaling="linear" if factor else None, rope_scaling_factor=factor or 1.0,
    )


# The seed's 13 (DESIGN.md section 3; columns: q_lora_rank, kv_lora_rank, qk_rope_head_dim,
# v_head_dim, bias, factor), then the zoo. Sizes are relative (above): at the seed's size (d_model
# 512, 8 heads of 64 dims) they are the seed's absolute numbers -- lora_small's q 512/16 = 32,
# kv 512/8 = 64, rope and v 64 -- and at the smoke size (d_model 64, 4 heads of 16) ranks an eighth
# of them and per-head dims a quarter (lora_small: q 4, kv 8, rope 16, v 16).
# n_kv_heads stays absolute: 2 key/value heads fit 4 and 8 query heads, where a fraction of n_heads
# would turn gqa into mqa at 4 heads.
VARIANTS: dict[str, AttentionSpec] = {spec.name: spec for spec in [
    AttentionSpec(name="baseline", family="baseline"),
    _mla("lora_small", "lora", OfModel(1 / 16), OfModel(1 / 8), PerHead(1), PerHead(1)),
    _mla("lora_medium", "lora", OfModel(1 / 8), OfModel(1 / 4), PerHead(1), PerHead(1)),
    _mla("lora_large", "lora", OfModel(1 / 4), OfModel(1 / 2), PerHead(1), PerHead(1)),
    _mla("lora_xl", "lora", OfModel(1 / 2), OfModel(1), PerHead(1), PerHead(1)),
    _mla("enhanced_small", "enhanced", OfModel(1 / 16), OfModel(1 / 8), PerHead(0.5), PerHead(0.75), bias=True,
         factor=1.5),
    _mla("enhanced_medium", "enhanced", OfModel(1 / 8), OfModel(1 / 4), PerHead(1), PerHead(1.5), bias=True,
         factor=2.0),
    _mla("enhanced_large", "enhanced", OfModel(1 / 4), OfModel(1 / 2), PerHead(2), PerHead(3), bias=True,
         factor=2.5),
    _mla("enhanced_xl", "enhanced", OfModel(1 / 2), OfModel(1), PerHead(2), PerHead(3), bias=True, factor=3.0),
    _mla("rope_only", "rope", None, OfModel(1 / 8), PerHead(1), PerHead(1.5), factor=2.0),
    _mla("rope_small", "rope", None, OfModel(1 / 8), PerHead(0.5), PerHead(0.75), factor=1.5),
    _mla("rope_large", "rope", None, OfModel(1 / 8), PerHead(2), PerHead(3), factor=2.5),
    _mla("bias_only", "bias", None, OfModel(1 / 8), PerHead(1), PerHead(1), bias=True),
    # the zoo
    AttentionSpec(name="gqa", family="gqa", n_kv_heads=2),  # Llama-style grouped-query
    AttentionSpec(name="mqa", family="gqa", n_kv_heads=1),  # multi-query: one key/value head
    AttentionSpec(name="qknorm", family="qknorm", qk_norm=True),  # QK-norm alone
    AttentionSpec(name="qknorm_gqa", family="qknorm", n_kv_heads=2, qk_norm=True),  # Qwen3-style
    # Qwen3-Next-style: element-wise output gate with QK-norm and grouped-query; then the same with
    # the head-wise gate (one scalar per head), so the two differ in the gate only
    AttentionSpec(name="gated", family="gate", n_kv_heads=2, qk_norm=True, output_gate="elementwise"),
    AttentionSpec(name="gated_headwise", family="gate", n_kv_heads=2, qk_norm=True, output_gate="headwise"),
    AttentionSpec(name="sinks", family="sinks", n_kv_heads=2, attention_sinks=True),  # gpt-oss-style, with GQA
    AttentionSpec(name="softcap", family="softcap", attn_softcap=50.0),  # Gemma-2-style logit soft-cap 50
    # Windows: a quarter of the context (16 of smoke's 64 tokens, 128 of the seed's 512); sweep
    # --window (absolute) to ask about others.
    AttentionSpec(name="swa", family="window", window=OfContext(1 / 4)),  # Mistral-style: every layer local
    AttentionSpec(name="local_global", family="window", window=OfContext(1 / 4),
                  global_every=2),  # Gemma 2: local, global, ..
    AttentionSpec(name="nope", family="positions", positions="none"),  # no position signal at all
    AttentionSpec(name="alibi", family="positions", positions="alibi"),  # Bloom / MPT
    # DeepSeek-V3's proportions (V3: qk_nope 128, qk_rope 64, v 128 at 128 heads of 128 dims,
    # d_model 7168, q_lora 1536, kv_lora 512): per-head dims as multiples of the head dim (nope 1,
    # rope 1/2, v 1), ranks the same fraction of d_model, as first rounded to 16 at d_model 512:
    # q 1536/7168 x 512 = 110 -> 112 = 7/32 of d_model, kv 512/7168 x 512 = 37 -> 32 = 1/16.
    AttentionSpec(name="mla_v3", family="mla_v3", kind="mla", q_lora_rank=OfModel(7 / 32),
                  kv_lora_rank=OfModel(1 / 16), qk_nope_head_dim=PerHead(1), qk_rope_head_dim=PerHead(0.5),
                  v_head_dim=PerHead(1)),
    # MLA without the decoupled rotary key: mla_v3's 1.5 head dims of query/key all from the latent, no
    # positions at all (RoPE cannot pass through the latent, DeepSeek-V2 section 2.1.3); caches the
    # latent alone.
    AttentionSpec(name="mla_norope", family="mla_v3", kind="mla", q_lora_rank=OfModel(7 / 32),
                  kv_lora_rank=OfModel(1 / 16), qk_nope_head_dim=PerHead(1.5), qk_rope_head_dim=0,
                  v_head_dim=PerHead(1)),
    # options combined as published designs combine them; both alternate sliding and full layers as
    # transformers' GptOssConfig / Gemma2Config layer_types do (sliding, full, sliding, ..)
    AttentionSpec(name="gptoss", family="sinks", n_kv_heads=2, attention_sinks=True, window=OfContext(1 / 4),
                  global_every=2),  # gpt-oss: sinks and GQA on every layer
    AttentionSpec(name="gemma2", family="softcap", attn_softcap=50.0, window=OfContext(1 / 4),
                  global_every=2),  # Gemma 2: the logit soft-cap 50 on every layer
    # Beyond one softmax: differential attention (DiffLlama: pairs of heads, one softmax map minus
    # lambda x the other; as many heads and key/value heads as the baseline), Gated DeltaNet on every
    # layer (a fixed d_k x d_v state per value head instead of a KV cache; Qwen3-Next's head
    # proportions at the model's size), and Qwen3-Next's hybrid: three Gated DeltaNet layers to one
    # full-attention layer. Qwen3-Next's full layers are its gated attention (Qwen3NextAttention: the
    # element-wise output gate, QK-norm, grouped-query), which is the `gated` variant here, so the
    # hybrid's full layers are that variant and not plain softmax. At fewer layers than the interval
    # the last layer is the full one (AttentionSpec.layer_types): 1:1 at the smoke's 2 layers.
    AttentionSpec(name="diff", family="diff", kind="diff"),
    AttentionSpec(name="gated_deltanet", family="linear", kind="gated_deltanet"),
    AttentionSpec(name="hybrid_gdn", family="linear", kind="gated_deltanet", full_attention="gated",
                  full_attention_interval=4),
    # Positive controls (family "control": sweeps/controls_smoke.yaml, not the zoo): designs the
    # literature predicts to fail associative recall, so a sweep must see them fail (README, "Can the
    # tool see an effect?"). one_attention_layer: layer 0 attends to itself only (a window of 1),
    # layer 1 to every key (global_every 2): one layer of attention instead of two, at the baseline's
    # parameters, so no induction circuit (Olsson et al. 2022). tiny_latent: MLA whose keys and
    # values pass through a latent of d_model/32 (2 at the smoke size).
    AttentionSpec(name="one_attention_layer", family="control", window=1, global_every=2),
    _mla("tiny_latent", "control", None, OfModel(1 / 32), PerHead(1), PerHead(1)),
]}
