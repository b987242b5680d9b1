"""The fairness audit: prove the comparison was fair instead of claiming it.

Two checks over the successful runs (the ones the tables compare):
1. Runs with the same seed must have consumed the same training tokens in the same order and
   started their shared parameters from the same values: equal `data/fingerprint` and
   `init/shared_fingerprint` (DESIGN.md section 5).
2. Runs may differ in what attention they use and in their seed, nothing else: any other
   setting (steps, batch size, lr, model dims, data, tokenizer, ...) that differs is flagged --
   unless it was swept: every variant ran the same two or more values of it (a grid over lr). Each
   value is then its own configuration, compared only with the baseline of the same value --
   or the runs are stage 2 of the tuning protocol (all carry variant_lr): each variant's lr is
   its tuned one by design (analysis/tuning.py).
3. Runs of one configuration must have run the same attention: equal `attention_spec` (the
   variant's sizes resolved for the model; they may be relative, so an old record of a variant
   can hold another design than a new one of the same name and settings). Runs without one
   (records from before it existed) beside runs with one are flagged: they cannot be told apart.
4. The tables compare time and memory too, so the runs must have been measured alike: the same
   number of processes and the same device (GPU model, or cpu). Runs that do not record them
   (older records, the seed's JSON) are left out of this check.
"""
import json
from collections import Counter
from dataclasses import dataclass, field

from analysis import stats
from analysis.runs import ATTENTION_KNOBS, BOOKKEEPING, Run, by_configuration, configuration, varying_settings

# Settings that may differ between compared runs: what is being compared (the attention and its
# knobs, attention/registry.py's KNOBS), the seed, and bookkeeping that does not change what a run computes.
NOT_COMPARED = BOOKKEEPING | ATTENTION_KNOBS
HARDWARE = ("processes", "device")
FINGERPRINTS = (("data/fingerprint", "data_fingerprint"), ("init/shared_fingerprint", "init_fingerprint"))


@dataclass
class Audit:
    verdict: str  # "fair" | "NOT fair" | "not auditable"
    findings: list = field(default_factory=list)  # one line per problem found
    notes: list = field(default_factory=list)  # what could not be checked
    checks: list = field(default_factory=list)  # (check, result, detail) rows for the table


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:12] + "..." if len(text) > 15 else text


def _odd_ones_out(values: dict) -> tuple[object, list]:
    """{run name: value} -> (the most common value, [names of runs with another value])."""
    common, _ = Counter(values.values()).most_common(1)[0]
    return common, sorted(name for name, value in values.items() if value != common)


def _describe_split(what: str, values: dict, display=_short) -> str:
    common, odd = _odd_ones_out(values)
    others = "; ".join(f"{name} has {display(values[name])}" for name in odd)
    return f"{what} differs: {display(common)} in {len(values) - len(odd)} runs; {others}"


def _swept(runs: list[Run], keys: list[str]) -> dict:
    """{setting: its values} for the keys every variant ran with the same two or more values."""
    swept = {}
    for key in keys:
        per_variant: dict = {}
        for run in runs:
            per_variant.setdefault(run.variant, set()).add(json.dumps(run.config.get(key), sort_keys=True))
        value_sets = list(per_variant.values())
        if len(value_sets[0]) > 1 and all(v == value_sets[0] for v in value_sets):
            swept[key] = sorted(value_sets[0])
    return swept


def audit(runs: list[Run]) -> Audit:
    compared = [r for r in runs if r.succeeded]
    result = Audit(verdict="fair")
    if len(compared) < 2:
        result.verdict = "not auditable"
        result.notes.append("fewer than two successful runs: nothing to compare")
        return result

    by_seed: dict = {}
    for run in compared:
        by_seed.setdefault(run.seed, []).append(run)
    counted = {id(r) for r in stats.counted_runs(compared)}
    varying = varying_settings(compared)
    for group in sorted(stats.runs_by_configuration_and_seed(compared).values(), key=lambda g: str(g[0].name)):
        if len(group) > 1:
            names = ", ".join(sorted(r.name for r in group))
            (chosen,) = (r.name for r in group if id(r) in counted)
            result.notes.append(f"{configuration(group[0], varying)} seed {group[0].seed} ran {len(group)} times "
                                f"({names}): the statistics count {chosen} (it ended last)")
    for key, attribute in FINGERPRINTS:
        present = [r for r in compared if getattr(r, attribute)]
        if not present:
            result.notes.append(f"{key}: not recorded by this source (e.g. the seed's JSON), not checked")
            result.checks.append((key, "not checked", "not recorded"))
            continue
        problems = [f"{key}: missing in {', '.join(sorted(r.name for r in compared if not getattr(r, attribute)))}"
                    ] if len(present) < len(compared) else []
        for seed, group in sorted(by_seed.items(), key=lambda item: str(item[0])):
            values = {r.name: getattr(r, attribute) for r in group if getattr(r, attribute)}
            if len(set(values.values())) > 1:
                problems.append(f"seed {seed}: " + _describe_split(key, values))
        result.findings += problems
        result.checks.append((key, "differs" if problems else "same per seed",
                              "; ".join(problems) or f"{len(by_seed)} seed group(s), {len(present)} runs"))

    configured = [r for r in compared if r.config]
    if not configured:
        result.notes.append("settings: the runs carry no config, not checked")
        result.checks.append(("settings", "not checked", "no config recorded"))
    else:
        problems = []
        swept = _swept(configured, [k for k in varying if k not in NOT_COMPARED])
        if swept:
            result.checks.append(("swept settings", "one configuration per value",
                                  "; ".join(f"{k}: {', '.join(v)}" for k, v in swept.items())))
        protocol = _per_variant_lr(configured, result)
        keys = sorted({k for r in configured for k in r.config} - NOT_COMPARED - set(swept) - protocol)
        for key in keys:
            values = {r.name: json.dumps(r.config[key], sort_keys=True) for r in configured if key in r.config}
            if len(set(values.values())) > 1:
                problems.append(_describe_split(key, values, display=str))
        result.findings += problems
        result.checks.append(("settings", "differ" if problems else "same",
                              "; ".join(problems) or f"{len(keys)} non-attention settings equal across runs"))

    _check_attention_sizes(compared, result)
    _check_hardware(compared, result)
    if result.findings:
        result.verdict = "NOT fair"
    elif result.notes:
        result.verdict = "not auditable"
    return result


def _per_variant_lr(configured: list[Run], result: Audit) -> set:
    """Stage 2 of the tuning protocol (every run has variant_lr): each variant runs at its own tuned
    lr, and at the shared one, by design; the lr is then not a difference to flag. Returns the
    settings this excuses."""
    if not all(r.config.get("variant_lr") for r in configured):
        return set()
    lrs: dict = {}
    for run in configured:
        if isinstance(run.config.get("lr"), (int, float)):
            lrs.setdefault(run.variant, set()).add(run.config["lr"])
    detail = "; ".join(f"{v}: {', '.join(f'{lr:.3g}' for lr in sorted(values))}" for v, values in sorted(lrs.items()))
    result.checks.append(("per-variant lr", "tuning protocol (stage 2)", detail))
    return {"lr"}


def _check_hardware(compared: list[Run], result: Audit) -> None:
    problems, recorded = [], 0
    for key in HARDWARE:
        values = {r.name: str(getattr(r, key)) for r in compared if getattr(r, key) is not None}
        recorded = max(recorded, len(values))
        if len(set(values.values())) > 1:
            problems.append(_describe_split(key, values, display=str) + ": their time and memory are not comparable")
    result.findings += problems
    if problems:
        result.checks.append(("hardware", "differs", "; ".join(problems)))
    elif recorded:
        result.checks.append(("hardware", "same", f"{recorded} runs on the same processes and device"))
    else:
        result.checks.append(("hardware", "not checked", "processes and device not recorded"))


def _check_attention_sizes(compared: list[Run], result: Audit) -> None:
    """Check 3: one attention per configuration, as resolved when each run was built."""
    if not any(r.attention_spec for r in compared):
        result.checks.append(("attention sizes", "not checked", "not recorded (records from before attention_spec)"))
        return
    problems, groups = [], by_configuration(compared)
    for label, group in sorted(groups.items()):
        missing = sorted(r.name for r in group if not r.attention_spec)
        if missing and len(missing) < len(group):
            problems.append(f"{label}: no attention_spec in {', '.join(missing)} (recorded before the "
                            "variants' sizes were resolved per model), beside runs that have one")
        values = {r.name: json.dumps(r.attention_spec, sort_keys=True) for r in group if r.attention_spec}
        if len(set(values.values())) > 1:
            problems.append(f"{label}: " + _describe_split("attention_spec", values, display=str))
    result.findings += problems
    result.checks.append(("attention sizes", "differ" if problems else "same per configuration",
                          "; ".join(problems) or f"{len(groups)} configuration(s)"))
