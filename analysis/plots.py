"""The report's figures (matplotlib, Agg backend: no display needed).

- architecture_search_comprehensive.png: the seed's six panels, one point per variant (mean over
  seeds, with a std bar when there are several), coloured by family, variant names on points.
- learning_curves.png: train loss per step, val loss per eval, and val loss minus the baseline's
  on the same seed; mean over seeds with a min-max band.
- costs.png: validation loss against the two costs of an attention design, parameters and the KV
  cache a decoder keeps per token, one point per variant, each with its Pareto front. The cache is
  the record's, at the run's context (seq_len): a recurrent kind's fixed state, or a window's
  cache, over that many tokens, so it is placed where it stands at the length it was trained at.
- baseline_differences.png (several seeds only): each variant's paired difference to baseline with
  its 95% CI and the per-seed differences, coloured by verdict.
- lengths.png (runs with --eval_lengths only): validation loss and accuracy against the context
  length, the trained seq_len included, one line per variant (mean over seeds, min-max band).
- probes.png (runs with --probes only): each mechanism probe's final value (mean over layers) per
  variant, one point per seed and a bar at the mean, coloured by family.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from analysis import stats  # noqa: E402
from analysis.runs import FAMILIES, Run, by_configuration  # noqa: E402
from analysis.tables import BASELINE, FAMILY_LABELS  # noqa: E402
from record import PROBE_KEYS  # noqa: E402
from attention.registry import FAMILIES as FAMILY_REGISTRY, OTHER_FAMILY  # noqa: E402

FAMILY_COLORS = {**{name: f.color for name, f in FAMILY_REGISTRY.items()}, "other": OTHER_FAMILY.color}
FAMILY_SHADES = {**{name: f.shades for name, f in FAMILY_REGISTRY.items()}, "other": OTHER_FAMILY.shades}
DPI = 130
VERDICT_COLORS = {"better": "#2ca02c", "worse": "#d62728", "indistinguishable": "#7f7f7f"}

plt.rcParams.update({"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                     "grid.alpha": 0.3, "axes.titleweight": "bold", "axes.titlesize": 12,
                     "axes.labelsize": 10.5, "legend.frameon": False})


def _family_order(families) -> list:
    known = [f for f in FAMILIES if f in families]
    return known + sorted(set(families) - set(known))


def _family_legend(families) -> list:
    return [Line2D([], [], marker="o", linestyle="", markersize=8, color=FAMILY_COLORS.get(f, FAMILY_COLORS["other"]),
                   label=FAMILY_LABELS.get(f, f)) for f in _family_order(families)]


def _overlap(a, b) -> float:
    """Overlapping area of two (x0, y0, x1, y1) boxes, in pixels."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _label_points(ax, xs, ys, names, fontsize=7.5):
    """Names next to points: each label takes the first of some positions around its point (nearest
    first) that covers no marker and no label placed so far, else the one covering least, markers
    counting triple. A label that ends up away from its point gets a thin leader line. Call after
    the figure is drawn once with its final limits: placement is in pixels."""
    renderer = ax.figure.canvas.get_renderer()
    points = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    marker = 7  # half a marker's size, in pixels
    markers = [(px - marker, py - marker, px + marker, py + marker) for px, py in points]
    labels = []
    for i in sorted(range(len(xs)), key=lambda i: (points[i][0], points[i][1])):
        probe = ax.annotate(names[i], (xs[i], ys[i]), fontsize=fontsize, textcoords="offset pixels",
                            xytext=(0, 0), va="bottom")
        box = probe.get_window_extent(renderer)
        probe.remove()
        w, h, gap = box.width, box.height, marker + 2
        rows = (1, -h - 1, h + 3, -2 * h - 3, 2 * h + 5, -3 * h - 5)
        candidates = [(dx, dy) for dy in rows for dx in (gap, -w - gap)] + [(-w / 2, gap), (-w / 2, -h - gap)]
        px, py = points[i]

        def cost(offset):
            rect = (px + offset[0], py + offset[1], px + offset[0] + w, py + offset[1] + h)
            return 3 * sum(_overlap(rect, m) for m in markers) + sum(_overlap(rect, b) for b in labels)

        best = min(candidates, key=lambda c: (cost(c) > 0, cost(c), candidates.index(c)))
        far = abs(best[1]) > h + 4
        ax.annotate(names[i], (xs[i], ys[i]), fontsize=fontsize, color="#333333", textcoords="offset pixels",
                    xytext=best, va="bottom",
                    arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.6, "shrinkA": 0,
                                "shrinkB": marker} if far else None)
        labels.append((px + best[0], py + best[1], px + best[0] + w, py + best[1] + h))


def _per_variant(runs: list[Run]) -> dict:
    """{variant: {"family", metric: (mean, std)}} over successful runs."""
    metrics = {"loss": "val_loss", "acc": "val_accuracy", "ppl": "val_perplexity", "time": "time_min",
               "memory": "memory_gb", "params": "params_m", "kv_cache": "kv_cache_bytes_per_token"}
    out = {}
    for run in runs:
        if run.succeeded:
            out.setdefault(run.variant, {"family": run.family, "runs": []})["runs"].append(run)
    for entry in out.values():
        for key, attribute in metrics.items():
            values = [getattr(r, attribute) for r in entry["runs"] if getattr(r, attribute) is not None]
            entry[key] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0) \
                if values else (np.nan, 0.0)
    return out


def comprehensive_figure(runs: list[Run], path: Path, title: str) -> Path:
    data = _per_variant(runs)
    variants = sorted(data, key=lambda v: data[v]["loss"][0])
    colors = [FAMILY_COLORS.get(data[v]["family"], FAMILY_COLORS["other"]) for v in variants]
    fig, axes = plt.subplots(2, 3, figsize=(19, 11), dpi=DPI)
    panels = [  # (axis, x, y, x label, y label, title): the seed's panels, in its order
        (axes[0, 0], "params", "loss", "Parameters (millions)", "Validation loss", "Loss vs parameters"),
        (axes[0, 1], "params", "acc", "Parameters (millions)", "Validation accuracy", "Accuracy vs parameters"),
        (axes[0, 2], "memory", "time", "Memory used (GB)", "Training time (min)", "Time vs memory"),
        (axes[1, 0], "time", "loss", "Training time (min)", "Validation loss", "Loss vs training time"),
        (axes[1, 1], "params", "ppl", "Parameters (millions)", "Validation perplexity", "Perplexity vs parameters"),
    ]
    labels = []  # (axis, xs, ys, names), placed once the layout is final
    for ax, x_key, y_key, x_label, y_label, panel_title in panels:
        xs = [data[v][x_key][0] for v in variants]
        ys = [data[v][y_key][0] for v in variants]
        shown = [i for i in range(len(variants)) if np.isfinite(xs[i]) and np.isfinite(ys[i])]
        for i in shown:
            ax.errorbar(xs[i], ys[i], xerr=data[variants[i]][x_key][1] or None, yerr=data[variants[i]][y_key][1] or None,
                        fmt="o", color=colors[i], markersize=8, alpha=0.9, elinewidth=1, capsize=2,
                        markeredgecolor="white", markeredgewidth=0.8, zorder=3)
        ax.set(xlabel=x_label, ylabel=y_label, title=panel_title)
        ax.margins(x=0.18, y=0.12)
        if shown:
            labels.append((ax, [xs[i] for i in shown], [ys[i] for i in shown], [variants[i] for i in shown]))
        else:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="gray")

    ax = axes[1, 2]
    families = _family_order({r.family for r in runs if r.succeeded})
    losses = [[r.val_loss for r in runs if r.succeeded and r.family == f] for f in families]
    box = ax.boxplot(losses, patch_artist=True, widths=0.55, showfliers=False,  # the points show every run
                     medianprops={"color": "black"})
    ax.set_xticks(range(1, len(families) + 1), [FAMILY_LABELS.get(f, f) for f in families])
    for patch, family in zip(box["boxes"], families):
        patch.set(facecolor=FAMILY_COLORS.get(family, FAMILY_COLORS["other"]), alpha=0.35)
    jitter = np.random.default_rng(0)
    for i, (family, values) in enumerate(zip(families, losses), 1):
        ax.scatter(i + jitter.uniform(-0.12, 0.12, len(values)), values, s=22, zorder=3,
                   color=FAMILY_COLORS.get(family, FAMILY_COLORS["other"]), edgecolor="white", linewidth=0.5)
    ax.set(xlabel="Attention family", ylabel="Validation loss", title="Loss by attention family")

    fig.legend(handles=_family_legend(families), loc="upper center", ncol=len(families),
               bbox_to_anchor=(0.5, 0.955), fontsize=11)
    fig.suptitle(title, fontsize=16, fontweight="bold", y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.canvas.draw()  # one draw fixes limits and transforms; labels do not move either
    for ax, xs, ys, names in labels:
        _label_points(ax, xs, ys, names)
    fig.savefig(path, dpi=DPI)  # the dpi the labels were placed at: they are placed in pixels
    plt.close(fig)
    return path


def pareto_front(points: list) -> list:
    """The (cost, loss) points no other point beats on both (lower or equal cost and loss, one of
    them lower), by increasing cost."""
    return sorted(p for p in points
                  if not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in points))


def costs_figure(runs: list[Run], path: Path, title: str, decode=None) -> Path:
    """Loss vs parameters beside loss vs KV-cache bytes per token (counted), each with its Pareto
    front; with decode (analysis.decode.DecodeSpeeds) a third panel: loss vs measured decode
    tokens/s at its context and batch (faster is better: its front runs the other way)."""
    data = _per_variant(runs)
    if decode is not None:
        for v, entry in data.items():
            entry["decode"] = (decode.tokens_per_s.get(v, np.nan), 0.0)
    variants = sorted(data, key=lambda v: data[v]["loss"][0])
    fig, axes = plt.subplots(1, 3 if decode else 2, figsize=(22 if decode else 15, 6.5), dpi=DPI)
    panels = [(axes[0], "params", "Parameters (millions)", "Loss vs parameters"),
              (axes[1], "kv_cache", "KV cache per token at the run's context (bytes, all layers, 2 bytes a value; "
               "counted; a window or a recurrent state: its bytes / context)",
               "Loss vs KV cache per token")]
    if decode is not None:
        panels.append((axes[2], "decode", f"Decode tokens/s at context {decode.context:,}, batch {decode.batch} "
                       "(measured)", "Loss vs decode speed"))
    labels = []
    for ax, key, x_label, panel_title in panels:
        shown = [v for v in variants if np.isfinite(data[v][key][0]) and np.isfinite(data[v]["loss"][0])]
        sign = -1 if key == "decode" else 1  # the front of "higher is better" is the front of -x
        for v in shown:
            ax.errorbar(data[v][key][0], data[v]["loss"][0], yerr=data[v]["loss"][1] or None, fmt="o",
                        color=FAMILY_COLORS.get(data[v]["family"], FAMILY_COLORS["other"]), markersize=8,
                        elinewidth=1, capsize=2, markeredgecolor="white", markeredgewidth=0.8, zorder=3)
        front = [(sign * x, y) for x, y in pareto_front([(sign * data[v][key][0], data[v]["loss"][0]) for v in shown])]
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post" if sign > 0 else "pre", color="#444444",
                    linestyle="--", linewidth=1, zorder=2, label="Pareto front")
            ax.legend(loc="upper right", fontsize=9)
        ax.set(xlabel=x_label, ylabel="Validation loss", title=panel_title)
        ax.margins(x=0.18, y=0.12)
        if shown:
            labels.append((ax, [data[v][key][0] for v in shown], [data[v]["loss"][0] for v in shown], shown))
        else:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="gray")
    families = {data[v]["family"] for v in variants}
    fig.legend(handles=_family_legend(families), loc="upper center", ncol=max(len(families), 1),
               bbox_to_anchor=(0.5, 0.94), fontsize=10)
    fig.suptitle(title, fontsize=14, fontweight="bold", y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.canvas.draw()
    for ax, xs, ys, names in labels:
        _label_points(ax, xs, ys, names)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _curve(histories: list, key: str):
    """Steps, and the mean/min/max over the histories (one list of rows per run) at each step."""
    by_step: dict = {}
    for rows in histories:
        for row in rows:
            if row.get(key) is not None and np.isfinite(row[key]):
                by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(by_step)
    values = [by_step[s] for s in steps]
    return (np.array(steps), np.array([np.mean(v) for v in values]),
            np.array([min(v) for v in values]), np.array([max(v) for v in values]))


def _difference_to_baseline(runs: list[Run], baseline_runs: list[Run]) -> list:
    """Per run, rows of (val loss - the baseline's val loss at the same seed and step)."""
    base = {(r.seed, row["step"]): row.get("val/loss") for r in baseline_runs for row in r.eval_history}
    out = []
    for run in runs:
        rows = [{"step": row["step"], "diff": row["val/loss"] - base[(run.seed, row["step"])]}
                for row in run.eval_history if base.get((run.seed, row["step"])) is not None]
        out.append(rows)
    return out


def _configuration_colors(by_config: dict) -> tuple[list, dict]:
    """(configurations in family order, {configuration: colour}): a family's colour, or its shades
    when the family has several configurations."""
    family_of = {v: members[0].family for v, members in by_config.items()}
    families = _family_order(set(family_of.values()))
    order = sorted(by_config, key=lambda v: (families.index(family_of[v]), v))
    colors = {}
    for family in families:
        members = [v for v in order if family_of[v] == family]
        shades = plt.get_cmap(FAMILY_SHADES.get(family, "Greys"))(np.linspace(0.5, 0.95, max(len(members), 1)))
        colors.update({v: FAMILY_COLORS.get(family) if len(members) == 1 else shades[i] for i, v in enumerate(members)})
    return order, colors


def curves_figure(runs: list[Run], path: Path, title: str) -> Path:
    ok = [r for r in runs if r.succeeded]
    by_config = by_configuration(ok)  # a variant at two lrs is two curves
    order, colors = _configuration_colors(by_config)

    several_seeds = any(len(members) > 1 for members in by_config.values())
    is_baseline = {v: members[0].variant == BASELINE for v, members in by_config.items()}
    panels = [("train_history", "train/loss", "Train loss per step", "Train loss"),
              ("eval_history", "val/loss", "Validation loss per evaluation", "Validation loss")]
    if any(is_baseline.values()):
        panels.append(("diff", "diff", "Validation loss minus baseline (same seed)", "Δ validation loss"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels) + 2.2, 5.6), squeeze=False)
    for ax, (history, key, panel_title, y_label) in zip(axes[0], panels):
        for config in order:
            members = by_config[config]
            if history == "diff":
                paired_with = stats.baseline_configuration(config, ok, BASELINE)
                if is_baseline[config] or paired_with is None:
                    continue
                histories = _difference_to_baseline(members, by_config[paired_with])
            else:
                histories = [getattr(run, history) for run in members]
            steps, mean, low, high = _curve(histories, key)
            if not len(steps):
                continue
            is_base = is_baseline[config]
            ax.plot(steps, mean, color=colors[config], linewidth=2.4 if is_base else 1.3,
                    linestyle="--" if is_base else "-", marker="o" if history != "train_history" else None,
                    markersize=3, label=f"{config} (n={len(members)})" if several_seeds else config,
                    zorder=4 if is_base else 3)
            if len(members) > 1:
                ax.fill_between(steps, low, high, color=colors[config], alpha=0.12, linewidth=0)
        if history == "diff":
            ax.axhline(0, color=FAMILY_COLORS["baseline"], linestyle="--", linewidth=1.5)
        ax.set(xlabel="Step", ylabel=y_label, title=panel_title)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1 - 2.1 / fig.get_figwidth(), 0.5), fontsize=9,
               title="variant (seeds)" if several_seeds else "variant", title_fontsize=9.5)
    banded = " (line: mean over seeds, band: min-max)" if several_seeds else ""
    fig.suptitle(title + banded, fontsize=14, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / fig.get_figwidth(), 0.95))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def differences_figure(runs: list[Run], path: Path, title: str) -> Path | None:
    comparisons = [c for c in stats.compare_to_baseline(runs, BASELINE) if np.isfinite(c.ci_low)]
    if not comparisons:
        return None
    losses = stats.losses_by_variant(runs)  # by configuration
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(comparisons) + 2.2))
    for y, c in enumerate(reversed(comparisons)):
        color = VERDICT_COLORS.get(c.verdict, "#7f7f7f")
        ax.plot([c.ci_low, c.ci_high], [y, y], color=color, linewidth=2.5, solid_capstyle="round")
        ax.plot(c.mean_diff, y, "o", color=color, markersize=8, markeredgecolor="white", zorder=3)
        base = losses[stats.baseline_configuration(c.configuration, runs, BASELINE)]
        per_seed = [loss - base[s] for s, loss in losses[c.configuration].items() if s in base]
        ax.scatter(per_seed, [y + 0.22] * len(per_seed), s=10, color=color, alpha=0.6, zorder=2)
        ax.annotate(f"p(Holm)={c.p_holm:.3g}", (1.0, y), xycoords=("axes fraction", "data"), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8.5, color=color)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(range(len(comparisons)), [c.configuration for c in reversed(comparisons)])
    ax.set_xlabel("Validation loss minus baseline, paired by seed (negative = better)")
    ax.set_title(title, pad=34)
    ax.legend(handles=[Line2D([], [], color=c, linewidth=2.5, label=v) for v, c in VERDICT_COLORS.items()]
              + [Line2D([], [], marker="o", linestyle="", color="#7f7f7f", markersize=4, label="one seed")],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=9,
              title="line: 95% CI of the mean difference; colour: verdict after Holm", title_fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def probes_figure(runs: list[Run], path: Path, title: str) -> Path | None:
    """One panel per probe that some run measured; None when no run has probes."""
    measured = [r for r in runs if r.succeeded and r.probes]
    keys = [k for k in PROBE_KEYS if any(k in r.probes for r in measured)]
    if not keys:
        return None
    by_config = by_configuration(measured)  # a variant at two lrs is two rows
    families = _family_order([r.family for r in measured])
    variants = sorted(by_config, key=lambda v: (by_config[v][0].variant != BASELINE,
                                                families.index(by_config[v][0].family), v))
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 0.28 * len(variants) * rows + 2.2 * rows),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for y, variant in enumerate(variants):
            values = [r.probes[key] for r in by_config[variant] if key in r.probes]
            if not values:
                continue
            color = FAMILY_COLORS.get(by_config[variant][0].family, FAMILY_COLORS["other"])
            ax.scatter(values, [y] * len(values), s=18, color=color, alpha=0.75, zorder=3)
            ax.plot([np.mean(values)] * 2, [y - 0.3, y + 0.3], color=color, linewidth=2)
        ax.set_yticks(range(len(variants)), variants, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(key.removeprefix("probe/"), fontsize=10.5)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontweight="bold")
    fig.legend(handles=_family_legend({r.family for r in measured}), loc="lower center",
               ncol=min(6, len({r.family for r in measured})), fontsize=8.5)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def lengths_figure(runs: list[Run], path: Path, title: str) -> Path | None:
    """Validation loss and accuracy against the context length (--eval_lengths), one line per
    configuration (mean over seeds, band min-max), the trained length (seq_len: the run's val/loss)
    included and marked; None when no run was evaluated at another length."""
    measured = [r for r in runs if r.succeeded and r.length_metrics]
    if not measured:
        return None
    by_config = by_configuration(measured)
    order, colors = _configuration_colors(by_config)
    trained = sorted({r.config.get("seq_len") for r in measured if r.config.get("seq_len")})
    fig, axes = plt.subplots(1, 2, figsize=(14.6, 5.4), squeeze=False)
    for ax, (metric, attribute, label) in zip(axes[0], (("loss", "val_loss", "Validation loss"),
                                                       ("accuracy", "val_accuracy", "Validation accuracy"))):
        for config in order:
            histories = []
            for run in by_config[config]:
                rows = [{"step": length, metric: values[metric]} for length, values in run.length_metrics.items()
                        if metric in values]
                if run.config.get("seq_len") and getattr(run, attribute) is not None:
                    rows.append({"step": run.config["seq_len"], metric: getattr(run, attribute)})
                histories.append(rows)
            lengths, mean, low, high = _curve(histories, metric)
            if not len(lengths):
                continue
            is_base = by_config[config][0].variant == BASELINE
            ax.plot(lengths, mean, color=colors[config], marker="o", markersize=4, linewidth=2.4 if is_base else 1.3,
                    linestyle="--" if is_base else "-", label=f"{config} (n={len(by_config[config])})")
            if len(by_config[config]) > 1:
                ax.fill_between(lengths, low, high, color=colors[config], alpha=0.12, linewidth=0)
        for length in trained:
            ax.axvline(length, color="#999999", linestyle=":", linewidth=1.2)
        ax.set_xscale("log", base=2)
        ticks = sorted({length for r in measured for length in r.length_metrics} | set(trained))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set(xlabel="Context length (tokens; dotted: the trained seq_len)", ylabel=label, title=f"{label} by context length")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1 - 2.3 / fig.get_figwidth(), 0.5), fontsize=9,
               title="variant (seeds)", title_fontsize=9.5)
    fig.suptitle(title + " (line: mean over seeds, band: min-max)", fontsize=13, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 0.94))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
