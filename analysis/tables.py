"""Every table of the report, each built once as a Section: markdown lines for report.md and the
terminal, plus columns and rows for a wandb.Table.

The first six reproduce the seed report (same wording, same rounding: numpy's population std,
4 decimals for loss and accuracy, 1 for minutes, GB and millions of parameters). They are
computed over runs, as the seed's were; with several seeds, the per-variant view is the
"Is the difference real?" section.
"""
import math
from statistics import fmean
from dataclasses import dataclass, field

from analysis import stats
from analysis.fairness import Audit
from analysis.runs import RUNNING, Run, by_configuration, configuration, run_label, setting_values, varying_settings
from attention.registry import FAMILIES, OTHER_FAMILY

FAMILY_LABELS = {**{name: family.label for name, family in FAMILIES.items()}, "other": OTHER_FAMILY.label}
BASELINE = "baseline"
NOTHING_TO_RANK = "- no successful run reports this"


@dataclass
class Section:
    key: str  # a short name: the wandb.Table's key
    title: str
    lines: list  # the markdown body
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)

    def markdown(self) -> str:
        return "\n".join([f"### {self.title}", "", *self.lines, ""])


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def markdown_table(columns: list, rows: list) -> list:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def pretty(variant: str) -> str:
    """The seed report's way of naming a variant in prose: rope_only -> RoPE-only, enhanced_xl -> Enhanced-XL."""
    head, _, tail = variant.partition("_")
    if head not in FAMILY_LABELS:
        return variant
    return FAMILY_LABELS[head] + (f"-{tail.upper() if tail == 'xl' else tail}" if tail else "")


def by_loss(runs: list[Run]) -> list[Run]:
    return sorted((r for r in runs if r.succeeded), key=lambda r: (r.val_loss, r.name))


def _labeller(runs: list[Run]):
    """A run's prose name: its variant's, plus its values of the settings that vary (`lr=0.01`),
    plus its seed where that configuration has several runs."""
    varying = varying_settings(runs)
    count = {label: len(group) for label, group in by_configuration(runs).items()}

    def label(run):
        name = " ".join([pretty(run.variant), *setting_values(run, varying)])
        return name + (f" (seed {run.seed})" if count[configuration(run, varying)] > 1 else "")
    return label


# --- the seed report's tables ----------------------------------------------------------------

def success_rate(runs: list[Run]) -> Section:
    done = [r for r in runs if r.status != RUNNING]
    ok = [r for r in done if r.succeeded]
    rate = len(ok) / len(done) if done else math.nan
    lines = [f"**Success Rate**: {len(ok)}/{len(done)} ({fmt(100 * rate, '.0f')}%)"]
    failed = [r for r in done if not r.succeeded]
    if failed:
        lines += ["", "Not successful:"]
        varying = varying_settings(runs)
        lines += [f"- {run_label(r, varying)}: {r.status}" + (f" ({r.error})" if r.error else "") for r in failed]
    running = [r.name for r in runs if r.status == RUNNING]
    if running:
        lines += ["", f"Still running, not counted: {', '.join(running)}"]
    return Section("success_rate", "Success rate", lines, ["successful", "total", "rate"], [[len(ok), len(done), rate]])


def top5(runs: list[Run]) -> Section:
    columns = ["rank", "run", "val_loss", "val_accuracy", "time_min", "memory_gb", "params_m"]
    rows, lines = [], [] if by_loss(runs) else [NOTHING_TO_RANK]
    varying = varying_settings(runs)
    for rank, r in enumerate(by_loss(runs)[:5], 1):
        name = run_label(r, varying)
        lines.append(f"{rank}. **{name}**: Loss={fmt(r.val_loss, '.4f')}, Acc={fmt(r.val_accuracy, '.4f')}, "
                     f"Time={fmt(r.time_min, '.1f')}min, Memory={fmt(r.memory_gb, '.1f')}GB, "
                     f"Params={fmt(r.params_m, '.1f')}M")
        rows.append([rank, name, r.val_loss, r.val_accuracy, r.time_min, r.memory_gb, r.params_m])
    return Section("top5", "Top 5 Configurations by Validation Loss", lines, columns, rows)


def statistics(runs: list[Run]) -> Section:
    ok = by_loss(runs)
    lines, rows = [] if ok else [NOTHING_TO_RANK], []

    def describe(label, values, spec, unit="", show_range=False):
        values = [v for v in values if v is not None]
        if not values:
            return
        d = stats.describe(values)
        text = f"- **{label}**: {d.mean:{spec}} ± {d.std:{spec}}{unit}"
        if show_range:
            text += f" (range: {d.low:{spec}}-{d.high:{spec}})"
        lines.append(text)
        rows.append([label, d.mean, d.std, d.low, d.high])

    describe("Loss", [r.val_loss for r in ok], ".4f", show_range=True)
    describe("Accuracy", [r.val_accuracy for r in ok], ".4f")
    describe("Time", [r.time_min for r in ok], ".1f", " min")
    describe("Memory", [r.memory_gb for r in ok], ".1f", " GB")
    params = [r.params_m for r in ok if r.params_m is not None]
    if params:
        lines.append(f"- **Parameters**: {min(params):.1f}-{max(params):.1f}M")
        rows.append(["Parameters (M)", sum(params) / len(params), stats.describe(params).std, min(params), max(params)])
    return Section("statistics", "Statistics", lines, ["metric", "mean", "std (population)", "min", "max"], rows)


def family_ranking(runs: list[Run]) -> Section:
    """Loss range per family, best family (lowest loss of its runs) first."""
    families: dict = {}
    for r in by_loss(runs):
        families.setdefault(r.family, []).append(r)
    ranked = sorted(families.items(), key=lambda item: item[1][0].val_loss)
    lines, rows = [] if ranked else [NOTHING_TO_RANK], []
    for rank, (family, members) in enumerate(ranked, 1):
        variants = sorted({r.variant for r in members})
        label = f"{FAMILY_LABELS.get(family, family)} variants" if len(variants) > 1 else pretty(variants[0])
        low, high = members[0].val_loss, members[-1].val_loss
        span = f"{low:.4f}" if len(members) == 1 else f"{low:.4f}-{high:.4f}"
        tags = [tag for tag, hit in (("best", rank == 1), ("reference", family == BASELINE)) if hit]
        lines.append(f"{rank}. **{label}**: {span} loss" + (f" ({', '.join(tags)})" if tags else ""))
        rows.append([rank, family, len(members), low, high])
    return Section("family_ranking", "Performance Ranking by Attention Type", lines,
                   ["rank", "family", "runs", "best_loss", "worst_loss"], rows)


def _baseline_point(runs: list[Run]):
    base = [r for r in by_loss(runs) if r.variant == BASELINE and r.params_total is not None]
    if not base:
        return None
    return (sum(r.val_loss for r in base) / len(base), sum(r.params_m for r in base) / len(base))


def parameter_efficiency(runs: list[Run]) -> Section:
    """The seed's three picks, by rules that reproduce them (see EFFICIENCY_RULES), plus the
    Pareto front, which is what "efficient" means without a rule of thumb."""
    ok = [r for r in by_loss(runs) if r.params_m is not None]
    label, varying = _labeller(ok), varying_settings(ok)
    lines, rows = [], []

    def pick(title, run, note=""):
        if run is None:
            lines.append(f"- **{title}**: {note}")
            return
        lines.append(f"- **{title}**: {label(run)} ({run.params_m:.1f}M params, {run.val_loss:.4f} loss)")
        rows.append([title, run_label(run, varying), run.params_m, run.val_loss])

    if not ok:
        return Section("parameter_efficiency", "Parameter Efficiency", [NOTHING_TO_RANK])
    reference = _baseline_point(ok)
    most, note = None, "n/a (no baseline run to measure against)"
    if reference is not None:
        base_loss, base_params = reference
        gains = [((base_loss - r.val_loss) / (base_params - r.params_m), r) for r in ok
                 if r.val_loss < base_loss and r.params_m < base_params]
        most = max(gains, key=lambda g: g[0])[1] if gains else None
        note = "none (no run beats the baseline with fewer parameters)"
    pick("Most Efficient", most, note)
    pick("Best Performance", ok[0])

    def dominated_by(run):
        return sum(o.params_m <= run.params_m and o.val_loss <= run.val_loss
                   and (o.params_m, o.val_loss) != (run.params_m, run.val_loss) for o in ok)

    worst = max(ok, key=lambda r: (dominated_by(r), r.val_loss))
    pick("Worst Efficiency", worst if dominated_by(worst) else None, "none (no run is beaten on both counts)")
    front = [r for r in sorted(ok, key=lambda r: r.params_m) if not dominated_by(r)]
    lines.append("- Pareto front (no other run has both fewer parameters and a lower loss): "
                 + ", ".join(f"{label(r)} ({r.params_m:.1f}M, {r.val_loss:.4f})" for r in front))
    return Section("parameter_efficiency", "Parameter Efficiency", lines, ["pick", "run", "params_m", "val_loss"], rows)


EFFICIENCY_RULES = (
    "**How the picks are made.** *Best Performance* is the lowest validation loss. *Most Efficient* is, "
    "among runs with both fewer parameters and a lower loss than the baseline (mean over its seeds), "
    "the one with the largest loss reduction per million parameters removed, "
    "(baseline loss - loss) / (baseline params - params): the only rule we found that gives the seed "
    "report's pick (RoPE-only), which the Pareto front does not (Enhanced-medium has fewer parameters "
    "and a lower loss there). *Worst Efficiency* is the run beaten on both parameters and loss by the "
    "most other runs (ties: higher loss)."
)


def memory_usage(runs: list[Run]) -> Section:
    """Least and most peak memory. The seed's Memory Usage section reads as peak memory: its range
    (15.2-17.0 GB) cannot hold values with the ±0.9 GB std of its statistics line (memory_used_gb)."""
    ok = [r for r in by_loss(runs) if (r.peak_memory_gb or r.memory_gb) is not None]
    if not ok:
        return Section("memory_usage", "Memory Usage", [NOTHING_TO_RANK])
    label, varying = _labeller(ok), varying_settings(ok)

    def peak(r):  # per run, not per name: two lrs of one variant and seed share a name
        return r.peak_memory_gb if r.peak_memory_gb is not None else r.memory_gb
    least, most = min(ok, key=peak), max(ok, key=peak)
    lines = [f"- **Most Efficient**: {label(least)} ({peak(least):.1f}GB memory)",
             f"- **Highest Usage**: {label(most)} ({peak(most):.1f}GB memory)",
             f"- **Range**: {peak(least):.1f}-{peak(most):.1f}GB"]
    return Section("memory_usage", "Memory Usage", lines, ["pick", "run", "peak_memory_gb"],
                   [["least", run_label(least, varying), peak(least)], ["most", run_label(most, varying), peak(most)]])


def all_runs(runs: list[Run]) -> Section:
    """Every run; its "variant" is its configuration where settings vary (e.g. `rope_small lr=0.01`)."""
    varying = varying_settings(runs)
    columns = ["#", "run", "variant", "family", "seed", "status", "val loss", "val acc", "val ppl",
               "params", "KV cache (B/token)", "time (min)", "memory (GB)", "peak memory (GB)", "note"]
    ok = by_loss(runs)
    rest = sorted((r for r in runs if not r.succeeded), key=lambda r: r.name)
    rows, cells = [], []
    for rank, r in enumerate(ok + rest, 1):
        position = rank if r.succeeded else ""
        note = "" if r.succeeded else (r.error or "")
        label = configuration(r, varying)
        rows.append([position, r.name, label, r.family, r.seed, r.status, r.val_loss, r.val_accuracy,
                     r.val_perplexity, r.params_total, r.kv_cache_bytes_per_token, r.time_min, r.memory_gb,
                     r.peak_memory_gb, note])
        cells.append([position, r.name, label, r.family, fmt(r.seed, "d"), r.status,
                      fmt(r.val_loss, ".4f"), fmt(r.val_accuracy, ".4f"), fmt(r.val_perplexity, ".2f"),
                      fmt(r.params_total, ",d"), fmt(r.kv_cache_bytes_per_token, ",d"), fmt(r.time_min, ".2f"), fmt(r.memory_gb, ".2f"),
                      fmt(r.peak_memory_gb, ".2f"), note.replace("|", "/")])
    return Section("all_runs", "All runs, sorted by validation loss", markdown_table(columns, cells), columns, rows)


# --- beyond the seed --------------------------------------------------------------------------

# The regime: can attention matter in these runs at all? A language model that is not clearly below
# the unigram loss of its validation tokens has not learned even what frequencies predict; one
# whose late positions are predicted no better than its early ones (val/context_gain) uses no
# context, and context is all attention adds. Runs that show neither cannot differ by their
# attention; their verdicts measure noise. (A unigram model's own "gain" on the smoke sweep's
# validation blocks moves by about 0.1 nats with the blocks drawn: the threshold is at that noise.)
UNIGRAM_MARGIN = 0.1  # nats below the unigram loss a run must be
MIN_CONTEXT_GAIN = 0.1  # nats the late positions' loss must be below the early ones'


def regime(runs: list[Run]) -> str | None:
    """One sentence when no successful language-model run is both UNIGRAM_MARGIN below its
    validation tokens' unigram loss and MIN_CONTEXT_GAIN of context gain (runs without the
    unigram loss, such as tasks' or old records, are not judged); None otherwise."""
    judged = [r for r in runs if r.succeeded and r.unigram_loss is not None]
    if not judged:
        return None

    def learned_context(r):
        return (r.val_loss <= r.unigram_loss - UNIGRAM_MARGIN and r.context_gain is not None
                and r.context_gain >= MIN_CONTEXT_GAIN)
    if any(learned_context(r) for r in judged):
        return None
    losses, unigrams = [r.val_loss for r in judged], [r.unigram_loss for r in judged]
    gains = [r.context_gain for r in judged if r.context_gain is not None]
    bigrams = [r.bigram_loss for r in judged if r.bigram_loss is not None]

    def span(values, spec=".3f"):
        joint = " to " if "+" in spec else "-"  # -0.020 to +0.010, not -0.020-+0.010
        return f"{min(values):{spec}}" if min(values) == max(values) else f"{min(values):{spec}}{joint}{max(values):{spec}}"
    gain_text = f"context gain {span(gains, '+.3f')} nats" if gains else "no context gain recorded"
    bigram_text = f", bigram {span(bigrams)}" if bigrams else ""
    return (f"**Regime: attention cannot matter in these runs yet.** No run is both {UNIGRAM_MARGIN} nats below the "
            f"unigram loss of its validation tokens (what token frequencies alone predict) and {MIN_CONTEXT_GAIN} "
            f"nats better at the late positions of a block than at the early ones (validation loss {span(losses)} "
            f"against unigram {span(unigrams)}{bigram_text}; {gain_text}), so no model has learned to use its "
            f"context, which is all attention adds, and the verdicts below are about noise.")


# A task is learned when a configuration's mean final answer accuracy reaches this (val/step_at_0.9's
# threshold): below it, the verdicts compare partial learning.
TASK_LEARNED = 0.9


def task_regime(runs: list[Run]) -> list[str]:
    """Per synthetic task in the runs, one sentence: whether any configuration learned it (mean final
    answer accuracy over seeds at least TASK_LEARNED) and the range of the configurations' means."""
    out = []
    tasks = sorted({r.config.get("task") for r in runs if r.succeeded and r.config.get("task", "lm") != "lm"})
    for task in tasks:
        by_config = stats.losses_by_variant(runs, lambda r: r.val_accuracy if r.config.get("task") == task else None)
        if not by_config:
            continue
        means = {label: fmean(by_seed.values()) for label, by_seed in by_config.items()}
        best, worst = max(means, key=means.get), min(means, key=means.get)
        spread = f"from {means[worst]:.3f} ({worst}) to {means[best]:.3f} ({best})"
        if means[best] >= TASK_LEARNED:
            learned = sum(m >= TASK_LEARNED for m in means.values())
            out.append(f"**Regime ({task}): the task is learned here.** {learned} of {len(means)} configurations "
                       f"reach a mean answer accuracy of {TASK_LEARNED} or more; the means run {spread}, so the "
                       "verdicts below are about what each attention design can learn at this budget.")
        else:
            out.append(f"**Regime ({task}): no configuration has learned the task yet** (mean answer accuracy "
                       f"{spread}; learned means {TASK_LEARNED}): the verdicts below compare partial learning.")
    return out


def regime_section(runs: list[Run]) -> Section:
    """The regime sentences as the first thing the seed's tables say: the language model's (when
    it applies) and each task's (empty when neither applies)."""
    text = regime(runs)
    return Section("regime", "Regime: what these models learned", ([text] if text else []) + task_regime(runs))

ONE_SEED = ("**One seed per variant: this ranking is not statistically supported.** With a single run "
            "per variant, a difference between two variants cannot be told apart from seed-to-seed noise, "
            "which this sweep cannot measure. Run several seeds per variant (e.g. `sweeps/seeds.yaml`) to test it.")

STATS_RULES = (
    "**Method.** Runs are paired by seed (same batches, same shared initialisation). For each variant, "
    "Δ = its final validation loss minus the baseline's on the same seed; paired t-test on the Δs "
    "(scipy.stats.ttest_rel), p-values Holm-corrected across the variants tested; effect size "
    "d_z = mean(Δ) / std(Δ). Verdict: *better* (mean Δ < 0) or *worse* (mean Δ > 0) when the Holm p "
    f"is below {stats.ALPHA}, else *indistinguishable*. *Seeds to resolve*: the smallest number of paired "
    f"seeds n with which a paired t-test at α = {stats.ALPHA}/m (m variants tested: the strictest Holm "
    f"step) has {stats.POWER:.0%} power if the true effect equals the observed d_z, from the noncentral t "
    "distribution (df = n - 1, noncentrality d_z·√n); the observed d_z is itself noisy with few seeds, "
    "so read it as an order of magnitude. *Resolved from step*: for a better or worse verdict, the first "
    "evaluation step from which on the same test on that evaluation's validation loss (Holm across the "
    "configurations at that step) gives the final verdict at every later evaluation: the steps the "
    "comparison needed."
)


def _seeds_needed(value) -> str:
    if value is None:
        return "-"
    return f"> {stats.MAX_SEEDS}" if value > stats.MAX_SEEDS else str(value)


def seed_statistics(runs: list[Run]) -> Section:
    """Per variant over seeds, and each variant against the baseline, paired by seed."""
    summaries = stats.summarize_variants(runs)
    title = "Variants over seeds, paired against the baseline"
    if not summaries:
        return Section("seed_statistics", title, ["No successful run."])
    opening = [regime(runs), ""] if regime(runs) else []  # the verdicts open with the regime
    if max(s.n for s in summaries) < 2:
        return Section("seed_statistics", title, [*opening, ONE_SEED])
    comparisons = {c.configuration: c for c in stats.compare_to_baseline(runs, BASELINE)}
    varying = varying_settings(runs)
    columns = ["configuration" if varying else "variant", "family", "seeds", "val loss mean ± std", "95% CI", "Δ vs baseline", "95% CI of Δ",
               "d_z", "p", "p (Holm)", "verdict", "seeds to resolve", "resolved from step"]
    resolved = stats.resolved_from_step(runs, BASELINE)
    rows, cells = [], []
    for s in summaries:
        c = comparisons.get(s.configuration)
        row = [s.configuration, s.family, s.n, s.mean, s.std, s.ci_low, s.ci_high]
        cell = [s.configuration, s.family, s.n, f"{s.mean:.4f} ± {fmt(s.std, '.4f')}",
                f"[{fmt(s.ci_low, '.4f')}, {fmt(s.ci_high, '.4f')}]"]
        if s.variant == BASELINE or c is None:
            verdict = "reference" if s.variant == BASELINE else "n/a (no baseline run)"
            row += [None] * 6 + [verdict, None, None]
            cell += ["-"] * 5 + [verdict, "-", "-"]
        else:
            step = resolved.get(s.configuration)
            row += [c.mean_diff, c.ci_low, c.ci_high, c.d_z, c.p, c.p_holm, c.verdict, c.seeds_needed, step]
            cell += [f"{fmt(c.mean_diff, '+.4f')} (n={c.n_pairs})", f"[{fmt(c.ci_low, '+.4f')}, {fmt(c.ci_high, '+.4f')}]",
                     fmt(c.d_z, '+.2f'), fmt_p(c.p), fmt_p(c.p_holm), f"**{c.verdict}**"
                     if c.verdict in ("better", "worse") else c.verdict, _seeds_needed(c.seeds_needed),
                     "-" if step is None else str(step)]
        rows.append(row)
        cells.append(cell)
    lines = opening + markdown_table(columns, cells)
    if varying:
        lines += ["", f"Settings that vary within these runs: {', '.join(varying)}. One row per configuration "
                      "(the variant plus its values of these); runs are paired by seed within a configuration, "
                      "against the baseline with the same values."]
    noise = stats.seed_noise(runs, list(comparisons.values()))
    if noise is not None:
        text = (f"Seed-to-seed noise: the final validation loss of one variant moves by **{noise.pooled_std:.4f}** "
                f"(pooled within-variant std, {noise.variants} variants, {noise.df} degrees of freedom)")
        if math.isfinite(noise.paired_std):
            text += (f"; the per-seed difference to baseline moves by {noise.paired_std:.4f} "
                     "(pooled std of Δ: pairing by seed cancels the noise that runs of one seed share)")
        lines += ["", text + "."]
    single = [s.configuration for s in summaries if s.n < 2]
    if single:
        lines += ["", f"One seed only, not tested: {', '.join(single)}."]
    if BASELINE not in {s.variant for s in summaries}:
        lines += ["", "No successful baseline run: nothing to pair the variants with."]
    lines += ["", STATS_RULES]
    return Section("seed_statistics", title, lines,
                   ["variant", "family", "seeds", "mean", "std", "ci_low", "ci_high", "diff", "diff_ci_low",
                    "diff_ci_high", "d_z", "p", "p_holm", "verdict", "seeds_to_resolve", "resolved_from_step"], rows)


def length_statistics(runs: list[Run]) -> Section:
    """At each context length of --eval_lengths: every configuration's answer or token accuracy and
    its validation loss paired against the baseline's at that length (Holm within each length: each
    length is its own question). Empty when no run was evaluated at another length."""
    title = "Longer contexts than trained on, paired against the baseline"
    lengths = sorted({length for r in runs if r.succeeded for length in r.length_metrics})
    if not lengths:
        return Section("length_statistics", title, [])
    trained = sorted({r.config.get("seq_len") for r in runs if r.succeeded and r.config.get("seq_len")})
    columns = ["configuration", "length", "seeds", "accuracy mean", "val loss mean", "Δ vs baseline",
               "95% CI of Δ", "p (Holm)", "verdict"]
    rows, cells, baselines = [], [], _baselines(runs)
    for length in lengths:
        metric = stats.at_length(length)
        comparisons = {c.configuration: c for c in stats.compare_to_baseline(runs, BASELINE, metric=metric)}
        accuracy = stats.losses_by_variant(runs, stats.at_length(length, "accuracy"))
        for label, by_seed in sorted(stats.losses_by_variant(runs, metric).items(),
                                     key=lambda item: fmean(item[1].values())):
            c = comparisons.get(label)
            acc = fmean(accuracy[label].values()) if label in accuracy else None
            loss = fmean(by_seed.values())
            verdict = c.verdict if c else ("reference" if label in baselines else "n/a (no baseline run)")
            rows.append([label, length, len(by_seed), acc, loss, c.mean_diff if c else None,
                         c.ci_low if c else None, c.ci_high if c else None, c.p_holm if c else None, verdict])
            cells.append([label, length, len(by_seed), fmt(acc, ".3f"), f"{loss:.4f}",
                          f"{fmt(c.mean_diff, '+.4f')} (n={c.n_pairs})" if c else "-",
                          f"[{fmt(c.ci_low, '+.4f')}, {fmt(c.ci_high, '+.4f')}]" if c else "-",
                          fmt_p(c.p_holm) if c else "-",
                          f"**{verdict}**" if verdict in ("better", "worse") else verdict])
    lines = [f"Evaluated after training at {', '.join(map(str, lengths))} tokens (trained at "
             f"{', '.join(map(str, trained))}); a task's examples are scaled to the length (tasks.py). Per "
             "length, the validation loss is paired by seed against the baseline's at that length, as above "
             "(paired t-test, Holm across the configurations at that length).", ""]
    lines += markdown_table(columns, cells)
    return Section("length_statistics", title, lines,
                   ["configuration", "length", "seeds", "accuracy", "loss", "diff", "diff_ci_low", "diff_ci_high",
                    "p_holm", "verdict"], rows)


def _baselines(runs: list[Run]) -> set:
    """The labels of the baseline configurations."""
    varying = varying_settings(runs)
    return {configuration(r, varying) for r in runs if r.succeeded and r.variant == BASELINE}


def seeds_where_needed(runs: list[Run], min_effect: float = stats.MIN_EFFECT,
                       plan_file: str | None = None) -> Section:
    """The measured noise, the smallest effect these seeds can detect, and the comparisons still open
    with the seeds each needs (plan_file: the sweep YAML that adds them)."""
    title = "Seeds where they are needed"
    comparisons = stats.compare_to_baseline(runs, BASELINE)
    noise = stats.seed_noise(runs, comparisons)
    if noise is None or not math.isfinite(noise.paired_std):
        return Section("seed_plan", title, ["No variant has 2+ seeds paired with the baseline: the noise is "
                                            "not measured yet; run at least 3 seeds (sweeps/seeds.yaml)."])
    tested = [c.n_pairs for c in comparisons if math.isfinite(c.p)]
    pairs = max(set(tested), key=tested.count) if tested else 2
    mde = stats.minimum_detectable_effect(noise.paired_std, pairs)
    gap = stats.SEED_REPORT_GAP
    lines = [f"Measured seed-to-seed noise of the paired difference to baseline: SD **{noise.paired_std:.4f}** "
             f"nats (pooled over the comparisons). With {pairs} seeds the smallest true difference a paired "
             f"t-test detects with {stats.POWER:.0%} power at alpha {stats.ALPHA} is **{mde:.4f}** nats, "
             + (f"so the seed report's gaps of {gap} nats are below what {pairs} seeds can resolve."
                if mde > gap else f"so gaps of {gap} nats (the seed report's) are resolvable at this seed count."),
             "",
             f"Unresolved: no better/worse verdict, and the 95% interval of the difference still holds "
             f"differences of {min_effect} nats or more (the smallest effect of interest, `--min-effect`). "
             f"Seeds needed: paired seeds in all for {stats.POWER:.0%} power against the observed difference "
             f"(at least {min_effect}), from the pooled noise, at the strictest Holm step.", ""]
    needs = stats.seeds_where_needed(comparisons, noise, min_effect)
    if not needs:
        return Section("seed_plan", title, lines + ["Every comparison is resolved."])
    columns = ["configuration", "seeds", "95% CI of Δ", "planned for |Δ|", "seeds needed"]
    cells = [[n.configuration, n.n_pairs, f"[{fmt(n.ci_low, '+.4f')}, {fmt(n.ci_high, '+.4f')}]",
              f"{n.effect:.4f}", _seeds_needed(n.seeds_needed)] for n in needs]
    lines += markdown_table(columns, cells)
    hopeless = [n.configuration for n in needs if n.seeds_needed is not None and n.seeds_needed > stats.MAX_SEEDS]
    if hopeless:
        lines += ["", f"Not in the sweep (they need more than {stats.MAX_SEEDS} seeds): {', '.join(hopeless)}."]
    if plan_file:
        lines += ["", f"`{plan_file}` (next to this report) adds the new seeds for these variants and the baseline; run it "
                      "(`python local_sweep.py <it>`) and rerun this report over both sweeps' results."]
    return Section("seed_plan", title, lines, columns,
                   [[n.configuration, n.n_pairs, n.ci_low, n.ci_high, n.effect, n.seeds_needed] for n in needs])


def fairness(audit: Audit) -> Section:
    lines = [f"**Fairness: {audit.verdict}**", ""]
    if audit.findings:
        lines += ["Flagged (these runs were not compared on equal terms):", *[f"- {f}" for f in audit.findings], ""]
    lines += markdown_table(["check", "result", "detail"], [[c, r, d.replace("|", "/")] for c, r, d in audit.checks])
    if audit.notes:
        lines += ["", *[f"- {n}" for n in audit.notes]]
    return Section("fairness", "Same data, same initialisation, same settings?", lines, ["check", "result", "detail"], [list(c) for c in audit.checks])


def build_sections(runs: list[Run], audit: Audit) -> list[Section]:
    return [regime_section(runs), success_rate(runs), top5(runs), statistics(runs), family_ranking(runs),
            parameter_efficiency(runs), memory_usage(runs), all_runs(runs), seed_statistics(runs),
            length_statistics(runs), fairness(audit)]
