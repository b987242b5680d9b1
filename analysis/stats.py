"""The statistics: is a variant's difference to baseline larger than seed-to-seed noise?

Design: for a given seed every variant sees the same batches and starts its shared parameters
from the same values (DESIGN.md section 5), so runs are paired by seed and the test is a paired
t-test on the per-seed differences (variant - baseline) of the final validation loss. Lower loss
is better. p-values are Holm-corrected across the variants compared; the verdict is "better" or
"worse" (by the sign of the mean difference) when the corrected p is below alpha, else
"indistinguishable".

A configuration is a variant plus its values of the settings that vary within the runs (a sweep
over lr gives `rope_small lr=0.001` and `rope_small lr=0.003`); statistics are per configuration,
and each is paired with the baseline configuration of the same settings.
"""
import json
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from analysis.runs import Run, SourceError, configuration, varying_settings

ALPHA = 0.05
POWER = 0.80
MAX_SEEDS = 1000  # beyond this the "seeds to resolve" is reported as "> 1000"


@dataclass
class Describe:
    """The seed report's statistics line: mean +- population std (numpy's std), and the range."""
    mean: float
    std: float
    low: float
    high: float


def describe(values) -> Describe:
    values = np.asarray(list(values), dtype=float)
    return Describe(float(np.mean(values)), float(np.std(values)), float(values.min()), float(values.max()))


@dataclass
class VariantSummary:
    variant: str
    family: str
    n: int  # successful seeds
    mean: float
    std: float  # sample std (ddof=1) over seeds; nan with one seed
    ci_low: float  # 95% t interval of the mean; nan with one seed
    ci_high: float
    configuration: str = ""  # the variant plus its values of the varying settings


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    half = sps.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def runs_by_configuration_and_seed(runs: list[Run]) -> dict:
    """{(configuration, seed): [successful runs]}; a run without a seed is a group of its own."""
    groups: dict = {}
    varying = varying_settings(runs)
    for run in (r for r in runs if r.succeeded):
        key = (configuration(run, varying), run.seed) if run.seed is not None else id(run)
        groups.setdefault(key, []).append(run)
    return groups


def counted_runs(runs: list[Run]) -> list[Run]:
    """The successful runs the statistics count: of two runs with the same variant and seed, the
    one that ended later (the audit names them); runs of another configuration (a swept lr) are
    not twins. Without an end time to decide by (a record from
    before time/ended_at, a W&B run) the pooling is refused rather than decided by file name."""
    out = []
    varying = varying_settings(runs)
    for twins in runs_by_configuration_and_seed(runs).values():
        if len(twins) > 1 and any(r.ended_at is None for r in twins):
            raise SourceError(f"{configuration(twins[0], varying)} seed {twins[0].seed} ran {len(twins)} times "
                              f"({', '.join(sorted(r.name for r in twins))}) and not every run says when it "
                              f"ended (time/ended_at); keep one of them")
        out.append(max(twins, key=lambda r: r.ended_at or 0.0))
    return out


def final_val_loss(run: Run) -> float | None:
    """The metric every comparison is on unless told otherwise: the final validation loss."""
    return run.val_loss


def at_length(length: int, name: str = "loss"):
    """The metric `run -> validation loss (or accuracy) at context length` (--eval_lengths; None
    where not evaluated)."""
    return lambda run: run.length_metrics.get(length, {}).get(name)


def loss_at_step(step: int):
    """The metric `run -> validation loss of its evaluation at step` (None where it has none)."""
    return lambda run: next((row.get("val/loss") for row in run.eval_history if row.get("step") == step), None)


def losses_by_variant(runs: list[Run], metric=final_val_loss) -> dict[str, dict]:
    """{configuration: {seed: metric(run)}} over successful runs with a value of the metric (the
    configuration is the variant when no setting varies); a run without a seed gets its own key. Of
    two runs with the same configuration and seed the one that ended later counts (the audit names them)."""
    varying = varying_settings(runs)
    table: dict[str, dict] = {}
    for i, run in enumerate(counted_runs(runs)):
        seed = run.seed if run.seed is not None else f"run{i}"
        if (value := metric(run)) is not None:
            table.setdefault(configuration(run, varying), {})[seed] = value
    return table


def _configurations(runs: list[Run]) -> dict[str, Run]:
    """{configuration: one of its successful runs}, for its variant, family and settings."""
    varying = varying_settings(runs)
    return {configuration(r, varying): r for r in runs if r.succeeded}


def summarize_variants(runs: list[Run]) -> list[VariantSummary]:
    """Per configuration: seeds, mean, std and 95% CI of the final validation loss; best mean first."""
    examples = _configurations(runs)
    out = []
    for label, by_seed in losses_by_variant(runs).items():
        values = np.array(list(by_seed.values()), dtype=float)
        std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        out.append(VariantSummary(examples[label].variant, examples[label].family, len(values),
                                  float(values.mean()), std, *t_interval(values), configuration=label))
    return sorted(out, key=lambda s: s.mean)


def baseline_configuration(label: str, runs: list[Run], baseline: str = "baseline") -> str | None:
    """The baseline configuration a configuration is paired with: the baseline run with the same
    values of every varying setting the baseline has (attention knobs it lacks are ignored);
    None if there is not exactly one."""
    varying, examples = varying_settings(runs), _configurations(runs)

    def settings(run):
        return {k: json.dumps(run.config[k], sort_keys=True) for k in varying if run.config.get(k) is not None}

    mine = settings(examples[label]).items()
    matches = [b for b, run in examples.items() if run.variant == baseline and settings(run).items() <= mine]
    return matches[0] if len(matches) == 1 else None


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, made monotone, capped at 1), input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running_max = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running_max = max(running_max, (len(pvalues) - rank) * pvalues[i])
        adjusted[i] = min(1.0, running_max)
    return adjusted


def paired_power(d_z: float, n: int, alpha: float) -> float:
    """Power of a two-sided paired t-test with n pairs at standardized effect d_z
    (noncentral t with n - 1 degrees of freedom and noncentrality d_z * sqrt(n))."""
    df, nc = n - 1, abs(d_z) * math.sqrt(n)
    t_crit = sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(t_crit, df, nc) + sps.nct.cdf(-t_crit, df, nc))


def seeds_to_resolve(d_z: float, alpha: float, power: float = POWER) -> int | None:
    """The smallest number of paired seeds with which a true effect of d_z would be detected with
    the given power; None when there is no observed difference to resolve (d_z = 0 or nan)."""
    if not math.isfinite(d_z) or d_z == 0:
        return None
    if paired_power(d_z, MAX_SEEDS, alpha) < power:
        return MAX_SEEDS + 1
    low, high = 1, MAX_SEEDS  # power grows with n: bisect for the first n that reaches it
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if paired_power(d_z, middle, alpha) < power else (low, middle)
    return high


@dataclass
class Comparison:
    variant: str
    family: str
    n_pairs: int
    mean_diff: float  # variant - baseline, in validation loss (negative: variant is better)
    std_diff: float
    ci_low: float
    ci_high: float
    d_z: float  # Cohen's d for paired samples: mean_diff / std_diff
    t: float
    p: float
    p_holm: float
    verdict: str  # better | worse | indistinguishable | "n/a (...)"
    seeds_needed: int | None
    configuration: str = ""  # the variant plus its values of the varying settings


def compare_to_baseline(runs: list[Run], baseline: str = "baseline", alpha: float = ALPHA,
                        metric=final_val_loss) -> list[Comparison]:
    """Every other configuration against its baseline configuration, paired by seed (seeds both
    have finished) on `metric` (a loss: lower is better; default the final validation loss). Those
    with fewer than 2 pairs are listed with verdict n/a and left out of the Holm family; those
    without a baseline configuration (or without the metric) are left out."""
    table, examples = losses_by_variant(runs, metric), _configurations(runs)
    out = []
    for label, by_seed in table.items():
        base_label = baseline_configuration(label, runs, baseline)
        if examples[label].variant == baseline or base_label is None or base_label not in table:
            continue
        variant, base = examples[label].variant, table[base_label]
        family = examples[label].family
        seeds = sorted((s for s in by_seed if s in base), key=str)
        ours = np.array([by_seed[s] for s in seeds], dtype=float)
        theirs = np.array([base[s] for s in seeds], dtype=float)
        diff = ours - theirs
        nan = math.nan
        if len(seeds) < 2:
            out.append(Comparison(variant, family, len(seeds), float(diff.mean()) if len(seeds) else nan,
                                  nan, nan, nan, nan, nan, nan, nan, "n/a (needs 2+ seeds shared with baseline)", None,
                                  label))
            continue
        std = float(diff.std(ddof=1))
        if std > 0:
            test = sps.ttest_rel(ours, theirs)
            d_z, t, p = float(diff.mean()) / std, float(test.statistic), float(test.pvalue)
        else:  # identical differences on every seed: nothing for a t-test to measure
            d_z = t = p = nan
        out.append(Comparison(variant, family, len(seeds), float(diff.mean()), std, *t_interval(diff),
                              d_z, t, p, nan, "", None, label))
    tested = [c for c in out if math.isfinite(c.p)]
    for c, p_holm in zip(tested, holm([c.p for c in tested])):
        c.p_holm = p_holm
        if p_holm < alpha:
            c.verdict = "better" if c.mean_diff < 0 else "worse"
        else:
            c.verdict = "indistinguishable"
        # Planned at the strictest Holm step (alpha / m): enough seeds for every comparison.
        c.seeds_needed = seeds_to_resolve(c.d_z, alpha / len(tested))
    for c in out:
        if not c.verdict:
            c.verdict = "n/a (same difference on every seed: no variance to test)"
    return sorted(out, key=lambda c: c.mean_diff if math.isfinite(c.mean_diff) else math.inf)


def resolved_from_step(runs: list[Run], baseline: str = "baseline", alpha: float = ALPHA) -> dict:
    """{configuration: the first evaluation step from which on its verdict against the baseline
    (the paired test on the validation loss at that step, Holm across the configurations there) is
    its final verdict at every later evaluation} for configurations whose final verdict is better or
    worse: how many steps the comparison needed to resolve."""
    final = {c.configuration: c.verdict for c in compare_to_baseline(runs, baseline, alpha)
             if c.verdict in ("better", "worse")}
    steps = sorted({row["step"] for r in runs if r.succeeded for row in r.eval_history if "val/loss" in row})
    verdicts = {step: {c.configuration: c.verdict for c in compare_to_baseline(runs, baseline, alpha, loss_at_step(step))}
                for step in steps}
    out = {}
    for label, verdict in final.items():
        last_other = max((step for step in steps if verdicts[step].get(label) != verdict), default=-math.inf)
        out[label] = min((step for step in steps if step > last_other), default=None)
    return out


@dataclass
class Noise:
    pooled_std: float  # pooled within-variant sample std of the final validation loss
    df: int  # its degrees of freedom: sum over variants of (seeds - 1)
    variants: int  # how many variants have 2+ seeds
    paired_std: float  # pooled std of the per-seed differences to baseline (nan without pairs)


def seed_noise(runs: list[Run], comparisons: list[Comparison]) -> Noise | None:
    """Seed-to-seed noise: how much the final loss of one configuration moves between seeds."""
    sum_sq, df, count = 0.0, 0, 0
    for by_seed in losses_by_variant(runs).values():
        values = np.array(list(by_seed.values()), dtype=float)
        if len(values) > 1:
            sum_sq += float(((values - values.mean()) ** 2).sum())
            df += len(values) - 1
            count += 1
    if df == 0:
        return None
    paired = [c for c in comparisons if math.isfinite(c.std_diff)]
    paired_df = sum(c.n_pairs - 1 for c in paired)
    paired_std = (math.sqrt(sum((c.n_pairs - 1) * c.std_diff ** 2 for c in paired) / paired_df)
                  if paired_df else math.nan)
    return Noise(math.sqrt(sum_sq / df), df, count, paired_std)


# --- seeds where they are needed ------------------------------------------------------------------

# The smallest difference in final validation loss worth resolving, in nats (report option
# --min-effect). 0.02 is below the seed report's gaps of ~0.03 and about half the seed-to-seed SD
# of one variant's loss measured at smoke size (DESIGN.md: 0.040 with our recipe).
MIN_EFFECT = 0.02
SEED_REPORT_GAP = 0.03  # the gaps between variants the seed report ranks on, in nats


def minimum_detectable_effect(std_diff: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true paired difference (in the units of std_diff) a two-sided paired t-test
    with n pairs detects with the given power: power grows with the effect, so bisect d_z."""
    if n < 2 or not math.isfinite(std_diff):
        return math.nan
    low, high = 0.0, 1.0
    while paired_power(high, n, alpha) < power:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if paired_power(middle, n, alpha) < power else (low, middle)
    return high * std_diff


@dataclass
class SeedNeed:
    """A comparison the seeds so far leave open, and the seeds that would settle it."""
    configuration: str
    variant: str
    n_pairs: int
    ci_low: float
    ci_high: float
    effect: float  # the difference planned for: the observed one, at least the smallest of interest
    seeds_needed: int | None  # paired seeds in all (not more than MAX_SEEDS + 1); None: no noise measured


def is_unresolved(c: Comparison, min_effect: float) -> bool:
    """Open: no better/worse verdict, and the 95% interval of the paired difference still holds
    differences of min_effect or more (a comparison with n/a has no interval: open too). An
    interval inside (-min_effect, min_effect) is resolved: whatever the difference is, it is too
    small to matter."""
    if c.verdict in ("better", "worse"):
        return False
    if not (math.isfinite(c.ci_low) and math.isfinite(c.ci_high)):
        return True
    return max(abs(c.ci_low), abs(c.ci_high)) >= min_effect


def seeds_where_needed(comparisons: list[Comparison], noise: "Noise | None", min_effect: float = MIN_EFFECT,
                       alpha: float = ALPHA, power: float = POWER) -> list[SeedNeed]:
    """Each unresolved comparison with the paired seeds it needs for `power` against a true
    difference of max(|observed|, min_effect), from the pooled SD of the paired differences (one
    comparison's own SD over 3 seeds is too rough to plan with), at the strictest Holm step."""
    family = max(1, sum(math.isfinite(c.p) for c in comparisons))
    paired_std = noise.paired_std if noise is not None else math.nan
    out = []
    for c in comparisons:
        if not is_unresolved(c, min_effect):
            continue
        effect = max(abs(c.mean_diff), min_effect) if math.isfinite(c.mean_diff) else min_effect
        needed = None
        if math.isfinite(paired_std) and paired_std > 0:
            needed = max(seeds_to_resolve(effect / paired_std, alpha / family, power) or 2, c.n_pairs + 1)
        out.append(SeedNeed(c.configuration, c.variant, c.n_pairs, c.ci_low, c.ci_high, effect, needed))
    return out
