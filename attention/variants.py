"""The attention variants as data: one frozen spec per named configuration.

A spec says which attention a layer gets; the model size (d_model, n_heads) comes from the
training config, so the same spec works at the seed's size and at a laptop's.
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    family: str  # baseline | lora | enhanced | rope | bias: how the report groups variants
    # None means standard multi-head attention (the baseline): q/k/v/o, d_model x d_model.
    # Otherwise DeepSeek-style multi-head latent attention with a key/value latent of this rank.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None  # None: a full-rank q_proj; else q_a_proj -> norm -> q_b_proj
    qk_rope_head_dim: int | None = None  # None: the whole head (d_model // n_heads) is rotary
    qk_nope_head_dim: int = 0  # query/key dims per head without RoPE (0 in all named variants)
    v_head_dim: int | None = None  # None: d_model // n_heads
    attention_bias: bool = False  # on q_a_proj, kv_a_proj_with_mqa and o_proj only
    rope_scaling: str | None = None  # a key of attention.rope.ROPE_SCALINGS, or None
    rope_scaling_factor: float = 1.0

    @property
    def is_latent(self) -> bool:
        return self.kv_lora_rank is not None

    def with_overrides(self, **changes) -> "AttentionSpec":
        """A copy with some knobs changed (a sweep exploring points between the named variants)."""
        if changes.get("rope_scaling_factor", 1.0) != 1.0 and self.rope_scaling is None:
            changes.setdefault("rope_scaling", "linear")
        return replace(self, **changes)


def _mla(name, family, q, kv, rope, v, bias=False, factor=None):
    return AttentionSpec(
        name=name, family=family, q_lora_rank=q, kv_lora_rank=kv, qk_rope_head_dim=rope,
        v_head_dim=v, attention_bias=bias,
        rope_scaling="linear" if factor else None, rope_scaling_factor=factor or 1.0,
    )


# DESIGN.md section 3. Columns: q_lora_rank, kv_lora_rank, qk_rope_head_dim, v_head_dim, bias, factor.
VARIANTS: dict[str, AttentionSpec] = {spec.name: spec for spec in [
    AttentionSpec(name="baseline", family="baseline"),
    _mla("lora_small", "lora", 32, 64, 64, 64),
    _mla("lora_medium", "lora", 64, 128, 64, 64),
    _mla("lora_large", "lora", 128, 256, 64, 64),
    _mla("lora_xl", "lora", 256, 512, 64, 64),
    _mla("enhanced_small", "enhanced", 32, 64, 32, 48, bias=True, factor=1.5),
    _mla("enhanced_medium", "enhanced", 64, 128, 64, 96, bias=True, factor=2.0),
    _mla("enhanced_large", "enhanced", 128, 256, 128, 192, bias=True, factor=2.5),
    _mla("enhanced_xl", "enhanced", 256, 512, 128, 192, bias=True, factor=3.0),
    _mla("rope_only", "rope", None, 64, 64, 96, factor=2.0),
    _mla("rope_small", "rope", None, 64, 32, 48, factor=1.5),
    _mla("rope_large", "rope", None, 64, 128, 192, factor=2.5),
    _mla("bias_only", "bias", None, 64, 64, 64, bias=True),
]}

FAMILIES = ("baseline", "lora", "enhanced", "rope", "bias")
