"""The sweep that adds seeds where they are needed: the unresolved variants and the baseline, on
new seeds, with every other parameter as the original runs had it (read from their configs).

    python -m analysis.report --results results/<group> --out reports/<group>   # writes more_seeds.yaml
    python local_sweep.py reports/<group>/more_seeds.yaml
    python -m analysis.report --results results/<group> --results results/<new group> --out ...
"""

import yaml

from analysis.runs import BOOKKEEPING, Run
from analysis.stats import MAX_SEEDS, SeedNeed

PLAN_YAML = "more_seeds.yaml"
BASELINE = "baseline"
# Not swept values: the variant and seed are the grid; where records go is the agent's business.
NOT_PARAMETERS = BOOKKEEPING - {"trust_remote_code"}  # a hub tokenizer may need it to load at all


class PlanError(ValueError):
    """Why no sweep can be written for these runs."""


def fixed_parameters(runs: list[Run]) -> dict:
    """{name: value} of every setting the successful runs agree on (None: the option's default, left
    out); refused when a setting varies, since a grid over variant x seed would cross it."""
    from config import FIELD_TYPES  # train.py's options: a W&B config may hold other keys too

    values: dict = {}
    for run in (r for r in runs if r.succeeded):
        for key, value in run.config.items():
            if key in FIELD_TYPES and key not in NOT_PARAMETERS:
                values.setdefault(key, set()).add(yaml.safe_dump(value))
    varying = sorted(key for key, seen in values.items() if len(seen) > 1)
    if varying:
        raise PlanError(f"the runs differ in {', '.join(varying)}: a grid over variant x seed would cross "
                        "them; add seeds by hand for these configurations")
    fixed = {key: yaml.safe_load(seen.pop()) for key, seen in values.items()}
    return {key: value for key, value in fixed.items() if value is not None}


def plan_sweep(runs: list[Run], needs: list[SeedNeed], min_effect: float) -> dict | None:
    """The sweep (a dict, W&B's schema) that brings every planned variant and the baseline to the
    largest number of seeds any of them needs, on seeds none of the runs used; None when nothing
    needs seeds, or no need could be estimated."""
    planned = [n for n in needs if n.seeds_needed is not None and n.seeds_needed <= MAX_SEEDS]
    if not planned:
        return None
    fixed = fixed_parameters(runs)
    have = {r.seed for r in runs if r.succeeded and r.variant == BASELINE and r.seed is not None}
    total = max(n.seeds_needed for n in planned)
    extra = total - min(n.n_pairs for n in planned)
    first = max([r.seed for r in runs if r.seed is not None] or [-1]) + 1
    seeds = list(range(first, first + extra))
    variants = [BASELINE] + sorted({n.variant for n in planned})
    project = next((r.config.get("project") for r in runs if r.config.get("project")), "attnsweep")
    groups = sorted({r.group for r in runs if r.group})
    return {
        "name": f"attnsweep-more-seeds-{'-'.join(groups) or 'local'}",
        "description": (f"{len(seeds)} new seeds ({seeds[0]}-{seeds[-1]}) for the {len(variants) - 1} comparisons "
                        f"the runs of {', '.join(groups) or 'these records'} left unresolved at a smallest effect of "
                        f"{min_effect} nats (baseline seeds so far: {len(have)}); every other parameter as in those runs"),
        "project": project,
        "program": "train.py",
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
        "parameters": {"attention": {"values": variants}, "seed": {"values": seeds},
                       **{key: {"value": value} for key, value in fixed.items()}},
    }


def write_plan(sweep: dict, path) -> None:
    header = ("# Written by analysis.report: more seeds where the comparisons are unresolved.\n"
              "# Run it, then rerun the report over both sweeps' results to update the verdicts.\n")
    path.write_text(header + yaml.safe_dump(sweep, sort_keys=False, default_flow_style=None, width=100))
