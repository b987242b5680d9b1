"""Mechanism probes (--probes=True): what attention, the residual stream and the router do, the
quantities the gated-attention, softpick and QK-norm papers report. Measured on evaluation batches
only, through forward hooks that exist only inside train.py's evaluate (`with Probes(model)`), so a
training step costs the same with probes on or off.

Per layer, on each evaluation batch:
    attention (kinds with `attention_scores(x)`: the scaled, causally masked pre-softmax scores its
    forward uses; recomputed here explicitly, since training's fused kernel never forms them):
        attn_entropy    mean over heads and queries of each query's attention entropy (nats)
        attn_sink       mean share of attention on the first token (the attention sink)
        attn_logit_max  the largest scaled attention logit
      (both means over queries after the first: the first query can attend only to itself; a kind
      whose softmax spans more than the keys, e.g. learned sinks, also defines
      `attention_probabilities(x)`, (B, H, T, T) weights on the keys, used instead of the softmax)
    the residual stream after the block:
        act_max         the largest |activation|
        act_kurtosis    the kurtosis over d_model of each token's vector, mean over tokens (normal: 3)
    the MoE router (its top-k choices, counted over all the evaluation's tokens):
        expert_load_max / expert_load_min   the largest / smallest expert's share of routed tokens
        routing_entropy the entropy of those shares (nats; log(n_experts) when balanced)
    gated kinds (an attention module with `gate_values(x)`: its output gate's values in [0, 1] on
    the layer's input, recomputed here; None where the module has no gate):
        gate_open       the mean gate value
The maxima are maxima over the evaluation's batches, the rest means; the logged value without
a layer is the mean over layers (record.probe_key).
"""
import torch

import record


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs (..., queries, keys), each row a distribution -> mean over rows of -sum p log p."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1).mean()


def first_token_share(probs: torch.Tensor) -> torch.Tensor:
    """probs (..., queries, keys) -> the mean weight the queries put on key 0."""
    return probs[..., 0].mean()


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Pearson's kurtosis E[(x - mean)^4] / var^2 of each row of x (last dim), in float64."""
    centred = x.double() - x.double().mean(dim=-1, keepdim=True)
    return centred.pow(4).mean(dim=-1) / centred.pow(2).mean(dim=-1).pow(2)


def expert_load(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed-token counts per expert -> (largest share, smallest share, entropy of the shares)."""
    share = counts.double() / counts.sum()
    return share.max(), share.min(), -torch.special.xlogy(share, share).sum()


MAXIMA = (record.PROBE_ATTN_LOGIT_MAX, record.PROBE_ACT_MAX)


class Probes:
    """Forward hooks on every block of a model.MoELM while it evaluates. `with Probes(model) as
    probes:` run the evaluation batches, then `probes.values()` -> {metric name: value}."""

    def __init__(self, model):
        self.layers = model.layers
        self.n_experts = self.layers[0].mlp.n_experts if len(self.layers) else 0
        self.totals = {}  # (probe, layer) -> [sum or max tensor, batches]
        self.counts = {}  # layer -> routed tokens per expert
        self.hooks = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            if hasattr(attn, "attention_scores"):
                self.hooks.append(attn.register_forward_pre_hook(lambda m, args, i=i: self._attention(i, m, args[0])))
            if hasattr(attn, "gate_values"):
                self.hooks.append(attn.register_forward_pre_hook(lambda m, args, i=i: self._gate(i, m, args[0])))
            self.hooks.append(layer.register_forward_hook(lambda m, args, out, i=i: self._residual(i, out[0])))
            self.hooks.append(layer.mlp.gate.register_forward_hook(
                lambda m, args, logits, i=i: self._router(i, m, logits)))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _add(self, name: str, layer: int, value: torch.Tensor) -> None:
        value = value.detach().double()
        if (name, layer) not in self.totals:
            self.totals[name, layer] = [value, 1]
            return
        total = self.totals[name, layer]
        total[0] = torch.maximum(total[0], value) if name in MAXIMA else total[0] + value
        total[1] += 1

    def _attention(self, layer: int, module, x: torch.Tensor) -> None:
        scores = module.attention_scores(x).float()
        # A kind whose softmax has more than the keys (learned sinks) says what reaches each key.
        probs = module.attention_probabilities(x).float() if hasattr(module, "attention_probabilities") \
            else scores.softmax(dim=-1)
        probs = probs[..., 1:, :]  # queries after the first
        self._add(record.PROBE_ATTN_ENTROPY, layer, attention_entropy(probs))
        self._add(record.PROBE_ATTN_SINK, layer, first_token_share(probs))
        self._add(record.PROBE_ATTN_LOGIT_MAX, layer, scores.max())

    def _gate(self, layer: int, module, x: torch.Tensor) -> None:
        gate = module.gate_values(x)
        if gate is not None:
            self._add(record.PROBE_GATE_OPEN, layer, gate.float().mean())

    def _residual(self, layer: int, x: torch.Tensor) -> None:
        self._add(record.PROBE_ACT_MAX, layer, x.abs().max())
        self._add(record.PROBE_ACT_KURTOSIS, layer, kurtosis(x).mean())

    def _router(self, layer: int, module, logits: torch.Tensor) -> None:
        # In eval mode the router adds no noise, so the top-k of its logits are its choices.
        chosen = logits.float().topk(self.layers[layer].mlp.top_k, dim=-1).indices.flatten()
        counts = torch.zeros(self.n_experts, dtype=torch.float64, device=logits.device)
        self.counts[layer] = self.counts.get(layer, 0) + counts.scatter_add_(0, chosen, torch.ones_like(counts[chosen]))

    def tensor(self) -> tuple[list[str], torch.Tensor]:
        """The per-layer values as metric names and one float64 tensor (one reduce over processes)."""
        names, values = [], []
        for (name, layer), (total, batches) in sorted(self.totals.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            names.append(record.probe_key(name, layer))
            values.append(total if name in MAXIMA else total / batches)
        for layer, counts in sorted(self.counts.items()):
            for name, value in zip((record.PROBE_EXPERT_LOAD_MAX, record.PROBE_EXPERT_LOAD_MIN,
                                    record.PROBE_ROUTING_ENTROPY), expert_load(counts)):
                names.append(record.probe_key(name, layer))
                values.append(value)
        return names, torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def with_layer_means(per_layer: dict) -> dict:
    """{probe/x/layerI: v} -> the same plus {probe/x: mean over its layers}, in PROBE_KEYS order."""
    means = {}
    for name in record.PROBE_KEYS:
        layer_values = [v for k, v in per_layer.items() if k.rsplit("/layer", 1)[0] == name]
        if layer_values:
            means[name] = sum(layer_values) / len(layer_values)
    return {**means, **per_layer}
