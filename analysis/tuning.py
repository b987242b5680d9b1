"""Tune, then compare on held-out data: the two-stage protocol.

Stage 1 is an ordinary sweep over variant x learning rate (a grid in log space) on tuning seeds,
scored on the validation set. Stage 2 is an ordinary sweep that runs each variant at its own best
learning rate, and at the shared one, on fresh seeds, scored once on the test set (data.py: blocks
no run trains on and no stage-1 score reads). This module is the bridge and the verdict:

    python -m analysis.tuning stage2 --results results/<stage-1 id> --out stage2.yaml [--seeds 3]
    python -m analysis.tuning stage2 --sweep ENTITY/PROJECT/SWEEP_ID --out stage2.yaml
    python -m analysis.tuning report --stage1 SOURCE --stage2 SOURCE --out DIR

(a SOURCE is a results directory or ENTITY/PROJECT/SWEEP_ID). `local_sweep.py X.yaml --then-stage2`
runs stage 1, writes stage 2 with `stage2`, runs it and writes the `report`.

Stage 2 ties each variant to its lr with one sweep parameter, `variant_lr: {values:
[baseline@0.003, rope_small@0.01, ...]}`: a W&B grid crosses independent parameters, so a grid
over attention and lr would run every variant at every lr again. train.py splits the value into
attention and lr; the config keeps all three, and a run with variant_lr is a stage-2 run (the
fairness audit then takes the per-variant lr as the protocol, not as an unfair difference).

The shared lr is the baseline's best lr from stage 1 unless --shared-lr names another grid value:
stage 2 runs every variant at it too (the baseline's runs serve both comparisons), so the two
comparisons use the same fresh seeds and the same test set, and the report shows whether tuning
changes the ranking.
"""
import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

import record
from analysis import stats, tables
from analysis.runs import BOOKKEEPING, RUNNING, Run, SourceError, load_path, load_wandb

BASELINE = tables.BASELINE
STAGE2_NAME = "stage2.yaml"
TUNING_REPORT = "tuning.md"
CURVES_PNG = "lr_curves.png"
# What stage 1 may vary besides the tuned lr; anything else varying is another experiment.
STAGE1_VARIES = ("attention", "lr", "seed")
# Config keys that say where or how a run was kept, not what it computed: never copied into stage 2.
# (analysis.runs.BOOKKEEPING, but trust_remote_code: a hub tokenizer may need it to load at all.)
NOT_COPIED = (BOOKKEEPING - {"trust_remote_code"}) | {"lr", "variant_lr", "eval_test", "vocab_size"}


@dataclass
class LrPoint:
    """One learning rate of one variant in stage 1."""
    lr: float
    losses: dict  # {seed: final val loss} of the seeds that succeeded
    problems: list  # "seed 1 diverged", "seed 2 did not run", ...

    @property
    def qualifies(self) -> bool:
        """Every tuning seed finished: an lr that diverges on one seed is not a safe choice, and a
        mean over the survivors would flatter it."""
        return bool(self.losses) and not self.problems

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.losses.values()))) if self.losses else math.nan


@dataclass
class Choice:
    variant: str
    lr: float | None  # None: no lr qualified
    points: list = field(default_factory=list)  # LrPoint, by lr
    note: str = ""  # ties, the edge of the grid, or why there is no choice


def _lr(run: Run) -> float | None:
    value = run.config.get("lr")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _latest(runs: list[Run]) -> dict:
    """{(variant, lr, seed): the run of it that ended last} over runs that are not still running."""
    out = {}
    for run in runs:
        if run.status == RUNNING or _lr(run) is None:
            continue
        key = (run.variant, _lr(run), run.seed)
        if key not in out or (run.ended_at or 0.0) >= (out[key].ended_at or 0.0):
            out[key] = run
    return out


def choose_lrs(runs: list[Run]) -> dict[str, Choice]:
    """Each variant's lr with the lowest mean final validation loss over the tuning seeds, among
    the lrs at which every tuning seed (every seed any run of the variant used) finished. A tie
    goes to the smaller lr (the more stable side). A variant with no such lr gets lr None and says
    why; a choice at either end of the grid says so (the optimum may lie beyond it)."""
    latest = _latest(runs)
    choices = {}
    for variant in sorted({v for v, _, _ in latest}):
        seeds = sorted({s for v, _, s in latest if v == variant}, key=str)
        lrs = sorted({lr for v, lr, _ in latest if v == variant})
        points = []
        for lr in lrs:
            losses, problems = {}, []
            for seed in seeds:
                run = latest.get((variant, lr, seed))
                if run is None:
                    problems.append(f"seed {seed} did not run")
                elif run.succeeded:
                    losses[seed] = run.val_loss
                else:
                    problems.append(f"seed {seed} {run.status}")
            points.append(LrPoint(lr, losses, problems))
        good = [p for p in points if p.qualifies]
        if not good:
            choices[variant] = Choice(variant, None, points, "no lr finished on every tuning seed: left out of stage 2")
            continue
        best = min(good, key=lambda p: (p.mean, p.lr))
        notes = []
        tied = [p.lr for p in good if p.mean == best.mean and p.lr != best.lr]
        if tied:
            notes.append(f"tied with lr {', '.join(map(_fmt_lr, tied))}: the smaller lr is taken")
        if len(lrs) > 1 and best.lr in (lrs[0], lrs[-1]):
            notes.append(f"at the {'low' if best.lr == lrs[0] else 'high'} end of the grid: the best lr may lie beyond it")
        choices[variant] = Choice(variant, best.lr, points, "; ".join(notes))
    return choices


def _fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


def shared_lr_of(choices: dict[str, Choice], shared_lr: float | None = None) -> float:
    """The lr every variant is also compared at: the baseline's best, unless one is given (then it
    must be a value stage 1 ran)."""
    grid = sorted({p.lr for c in choices.values() for p in c.points})
    if shared_lr is not None:
        if not any(math.isclose(shared_lr, lr, rel_tol=1e-9) for lr in grid):
            raise SourceError(f"--shared-lr {shared_lr}: not an lr of stage 1 ({', '.join(map(_fmt_lr, grid))})")
        return next(lr for lr in grid if math.isclose(shared_lr, lr, rel_tol=1e-9))
    base = choices.get(BASELINE)
    if base is None or base.lr is None:
        raise SourceError(f"stage 1 has no successful {BASELINE} lr to share; name one with --shared-lr")
    return base.lr


# --- stage 2 as a sweep YAML ------------------------------------------------------------------

def fixed_settings(runs: list[Run]) -> dict:
    """The settings every stage-1 run shared (those not at the defaults of its recipe), to fix in stage 2;
    refuses a stage 1 that varied anything but attention, lr and seed."""
    from config import FIELD_TYPES, RECIPES, TrainConfig

    values: dict = {}
    for run in runs:
        for key, value in run.config.items():
            if key in FIELD_TYPES:
                values.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    varied = sorted(k for k, v in values.items() if len(v) > 1 and k not in NOT_COPIED)
    if varied:
        raise SourceError(f"stage 1 varied {', '.join(varied)} besides {', '.join(STAGE1_VARIES)}: "
                          f"the protocol tunes the lr alone")
    fixed = {k: json.loads(next(iter(v))) for k, v in values.items() if k not in NOT_COPIED}
    # a value at the default of the recipe stage 1 ran (--recipe=seed sets some) needs no saying;
    # one at train.py's plain default may still differ from what that recipe would set
    defaults = {**TrainConfig().to_dict(), **RECIPES.get(fixed.get("recipe"), {})}
    return {k: v for k, v in fixed.items() if v != defaults.get(k)}


def stage2_config(runs: list[Run], seeds: int = 3, shared_lr: float | None = None,
                  template: dict | None = None) -> tuple[dict, dict[str, Choice], float]:
    """(the stage-2 sweep, the choices, the shared lr). Fresh seeds follow the largest tuning
    seed; the template (stage 1's YAML) lends its name, project, entity, program and command."""
    if seeds < 2:
        raise SourceError(f"--seeds {seeds}: stage 2 needs at least 2 fresh seeds for a paired test")
    choices = choose_lrs(runs)
    if not choices:
        raise SourceError("stage 1 has no runs with an lr: nothing to tune")
    shared = shared_lr_of(choices, shared_lr)
    arms = []
    for choice in choices.values():
        if choice.lr is not None:
            arms += [f"{choice.variant}@{lr!r}" for lr in dict.fromkeys([choice.lr, shared])]
    used = [r.seed for r in runs if isinstance(r.seed, int)]
    first = max(used) + 1 if used else 0
    template = template or {}
    chosen = ", ".join(f"{c.variant}@{_fmt_lr(c.lr)}" if c.lr is not None else f"{c.variant}: none"
                       for c in choices.values())
    config = {
        "name": f"{template.get('name') or 'attnsweep-tune'}-stage2",
        "description": f"stage 2: each variant at its tuned lr ({chosen}) and at the shared lr "
                       f"{_fmt_lr(shared)}, fresh seeds, scored on test",
        "project": template.get("project") or next((r.config.get("project") for r in runs if r.config.get("project")),
                                                   "attnsweep"),
    }
    if template.get("entity"):
        config["entity"] = template["entity"]
    config.update({
        "program": template.get("program") or "train.py", "method": "grid",
        "metric": {"name": record.TEST_LOSS, "goal": "minimize"},
        "command": template.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"],
        "parameters": {
            "variant_lr": {"values": arms},
            "seed": {"values": list(range(first, first + seeds))},
            "eval_test": {"value": True},
            **{k: {"value": v} for k, v in fixed_settings(runs).items()},
        },
    })
    return config, choices, shared


def stage2_yaml(config: dict, choices: dict[str, Choice], shared: float, source: str) -> str:
    """The sweep as YAML, headed by where it came from and what was chosen."""
    lines = [f"# Stage 2 of the tuning protocol, built by `python -m analysis.tuning stage2` from {source}.",
             f"# Each variant at its best stage-1 lr (mean final val/loss over the tuning seeds) and at the",
             f"# shared lr {_fmt_lr(shared)}, on fresh seeds; each run scores itself once on the test set.",
             "#   python local_sweep.py THIS.yaml    or    wandb sweep THIS.yaml"]
    for choice in choices.values():
        what = _fmt_lr(choice.lr) if choice.lr is not None else "none"
        lines.append(f"#   {choice.variant}: lr {what}" + (f" ({choice.note})" if choice.note else ""))
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False, width=100)


# --- the report ---------------------------------------------------------------------------------

def _scored_on_test(runs: list[Run]) -> list[Run]:
    """The runs with their test loss as the score the statistics read (stats compares val_loss)."""
    return [dataclasses.replace(r, val_loss=r.test_loss) for r in runs if r.succeeded and r.test_loss is not None]


def arm(runs: list[Run], lr_of) -> list[Run]:
    """The stage-2 runs of one arm: each variant's runs at the lr lr_of(variant) gives."""
    out = []
    for run in runs:
        wanted = lr_of(run.variant)
        if wanted is not None and _lr(run) is not None and math.isclose(_lr(run), wanted, rel_tol=1e-9):
            out.append(run)
    return out


def lr_curve_section(choices: dict[str, Choice]) -> tables.Section:
    grid = sorted({p.lr for c in choices.values() for p in c.points})
    columns = ["variant", *(f"lr {_fmt_lr(lr)}" for lr in grid), "chosen lr", "note"]
    rows = []
    for choice in choices.values():
        cells = {p.lr: (f"{p.mean:.4f}" if p.qualifies else "; ".join(p.problems)) for p in choice.points}
        rows.append([choice.variant, *(cells.get(lr, "not run") for lr in grid),
                     _fmt_lr(choice.lr) if choice.lr is not None else "none", choice.note or ""])
    lines = ["Mean final validation loss over the tuning seeds per learning rate (stage 1); an lr at which "
             "any tuning seed failed, diverged or did not run is not eligible.", "",
             *tables.markdown_table(columns, rows)]
    return tables.Section("lr_choice", "Stage 1: loss against learning rate, and the chosen lr", lines, columns, rows)


def comparison_section(stage2: list[Run], choices: dict[str, Choice], shared: float) -> tables.Section:
    """Paired by seed against the baseline, on test loss: at each variant's tuned lr (the baseline at
    its own) beside all at the shared lr, with each arm's rank by mean test loss."""
    tuned = _scored_on_test(arm(stage2, lambda v: choices[v].lr if v in choices else None))
    at_shared = _scored_on_test(arm(stage2, lambda v: shared))
    results = {}
    for name, runs in (("tuned", tuned), ("shared", at_shared)):
        ranked = stats.summarize_variants(runs) if runs else []
        compared = {c.variant: c for c in stats.compare_to_baseline(runs)} if runs else {}
        results[name] = ({s.variant: (rank, s) for rank, s in enumerate(ranked, 1)}, compared)
    columns = ["variant", "tuned lr", "test loss (tuned)", "rank (tuned)", "diff to baseline (tuned)",
               "verdict (tuned)", f"test loss (lr {_fmt_lr(shared)})", f"rank (lr {_fmt_lr(shared)})",
               f"diff to baseline (lr {_fmt_lr(shared)})", f"verdict (lr {_fmt_lr(shared)})"]
    rows = []
    for variant, choice in choices.items():
        row = [variant, _fmt_lr(choice.lr) if choice.lr is not None else "none"]
        for name in ("tuned", "shared"):
            ranks, compared = results[name]
            rank, summary = ranks.get(variant, (None, None))
            c = compared.get(variant)
            diff = ("reference" if variant == BASELINE else "n/a" if c is None else
                    f"{c.mean_diff:+.4f} [{tables.fmt(c.ci_low, '+.4f')}, {tables.fmt(c.ci_high, '+.4f')}] (n={c.n_pairs})")
            row += [tables.fmt(summary.mean if summary else None, ".4f"), rank or "n/a", diff,
                    "reference" if variant == BASELINE else (c.verdict if c else "n/a")]
        rows.append(row)
    order = {name: [v for v, _ in sorted(results[name][0].items(), key=lambda item: item[1][0])]
             for name in results}
    changed = order["tuned"] != order["shared"]
    lines = [f"Stage 2, on the test set and fresh seeds; differences are variant - baseline, paired by seed "
             f"(negative: better), 95% CI, Holm-corrected verdicts within each arm. Shared lr: {_fmt_lr(shared)} "
             f"(the {BASELINE}'s tuned lr unless named).", "", *tables.markdown_table(columns, rows), "",
             f"- ranking at tuned lrs: {' < '.join(order['tuned']) or 'n/a'}",
             f"- ranking at lr {_fmt_lr(shared)}: {' < '.join(order['shared']) or 'n/a'}",
             f"- **tuning {'changes' if changed else 'does not change'} the ranking**"]
    return tables.Section("tuned_vs_shared", "Stage 2: tuned learning rates beside the shared one", lines, columns, rows)


def curves_figure(choices: dict[str, Choice], path: Path) -> Path:
    from analysis import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, choice in enumerate(choices.values()):
        good = [p for p in choice.points if p.qualifies]
        color = f"C{i % 10}"
        ax.plot([p.lr for p in good], [p.mean for p in good], "o-", color=color, label=choice.variant)
        if choice.lr is not None:
            best = next(p for p in good if p.lr == choice.lr)
            ax.plot([best.lr], [best.mean], "*", color=color, markersize=16, markeredgecolor="black")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (mean over tuning seeds)")
    ax.set_title("Stage 1: loss against learning rate (star: chosen)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=plots.DPI)
    plt.close(fig)
    return path


def write_report(stage1: list[Run], stage2: list[Run], out_dir, source: str, shared_lr: float | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    choices = choose_lrs(stage1)
    shared = shared_lr_of(choices, shared_lr)
    sections = [lr_curve_section(choices), comparison_section(stage2, choices, shared)]
    parts = ["# Tune, then compare on held-out data", "", f"Source: {source}.", ""]
    parts += [s.markdown() for s in sections]
    if any(c.lr is not None for c in choices.values()):
        curves_figure(choices, out_dir / CURVES_PNG)
        parts += ["### Figure", "", f"![loss against learning rate]({CURVES_PNG})", ""]
    path = out_dir / TUNING_REPORT
    path.write_text("\n".join(parts))
    return path


# --- the command line ---------------------------------------------------------------------------

def load_source(source: str) -> list[Run]:
    """A results directory (or record, or seed-schema JSON), else ENTITY/PROJECT/SWEEP_ID on W&B."""
    if Path(source).exists():
        return load_path(source)
    parts = source.split("/")
    if len(parts) != 3 or not all(parts):
        raise SourceError(f"{source}: neither a path nor ENTITY/PROJECT/SWEEP_ID")
    try:
        runs = load_wandb("/".join(parts[:2]), {"sweep": parts[2]})
    except Exception as exc:  # network, auth, a missing sweep: say which, without a traceback
        raise SourceError(f"could not read the runs of sweep {source} from W&B: {exc}") from None
    if not runs:
        raise SourceError(f"sweep {source}: no training runs found")
    return runs


def write_stage2(source: str, out: Path, seeds: int = 3, shared_lr: float | None = None,
                 template: Path | None = None) -> tuple[Path, dict[str, Choice]]:
    template_config = yaml.safe_load(Path(template).read_text()) if template else None
    config, choices, shared = stage2_config(load_source(source), seeds, shared_lr, template_config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(stage2_yaml(config, choices, shared, source))
    return out, choices


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise SourceError(message)


def main(argv=None) -> int:
    parser = _Parser(prog="python -m analysis.tuning", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("stage2", help="write stage 2's sweep YAML from stage 1's runs")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", metavar="DIR", help="stage 1's results directory")
    source.add_argument("--sweep", metavar="ENTITY/PROJECT/SWEEP_ID", help="stage 1's W&B sweep")
    build.add_argument("--out", required=True, metavar="YAML")
    build.add_argument("--seeds", type=int, default=3, help="fresh seeds (after the largest tuning seed)")
    build.add_argument("--shared-lr", type=float, help="the lr all variants are also compared at "
                       "(default: the baseline's tuned lr)")
    build.add_argument("--template", metavar="YAML", help="stage 1's sweep YAML: name, project, program, command")
    show = commands.add_parser("report", help="the lr curves and the tuned-vs-shared comparison")
    show.add_argument("--stage1", required=True, metavar="SOURCE")
    show.add_argument("--stage2", required=True, metavar="SOURCE")
    show.add_argument("--out", required=True, metavar="DIR")
    show.add_argument("--shared-lr", type=float)
    try:
        args = parser.parse_args(argv)
        if args.command == "stage2":
            path, choices = write_stage2(args.results or args.sweep, Path(args.out), args.seeds, args.shared_lr,
                                         args.template)
            for choice in choices.values():
                print(f"{choice.variant}: lr {_fmt_lr(choice.lr) if choice.lr is not None else 'none'}"
                      + (f" ({choice.note})" if choice.note else ""))
            print(f"wrote {path}")
        else:
            path = write_report(load_source(args.stage1), load_source(args.stage2), args.out,
                                f"stage 1 {args.stage1}, stage 2 {args.stage2}", args.shared_lr)
            print(path.read_text())
            print(f"wrote {path}")
    except (SourceError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
