#!/usr/bin/env python
"""Run a W&B sweep YAML on this machine, offline: the stand-in for `wandb agent` (DESIGN.md section 7).

    python local_sweep.py sweeps/smoke.yaml
    python local_sweep.py my_random_search.yaml --count 20      (random and bayes need --count)
    python local_sweep.py sweeps/smoke.yaml --resume SWEEP_ID [--retry-failed]
    python local_sweep.py sweeps/tune_smoke.yaml --then-stage2 [--stage2-seeds 3]   (tuning, both stages)
    python local_sweep.py sweeps/smoke.yaml --parallel 2      (two runs at once, one thread each on 2 cores)

What it does, in the order `wandb sweep` + `wandb agent` would:
  1. reads the YAML (safe_load) and checks it with W&B's own schema
     (`sweeps.schema_violations_from_proposed_config`), then checks every value the sweep can hand
     out through train.py's config validation, so a bad sweep is refused before any run starts,
     with one `error:` line that lists every bad value;
  2. asks W&B's sweep engine (`sweeps.next_run`, grid / random / bayes) for each next run, given the
     runs so far with their states and, for bayes, their metric from each run's results record;
     stops handing out runs once a run reaches `metric.target`;
  3. for each run: writes the params file exactly as wandb's agent does
     (`<sweep_dir>/wandb/sweep-<id>/config-<run_id>.yaml`), sets WANDB_MODE=offline,
     WANDB_SWEEP_PARAM_PATH, WANDB_RUN_ID, WANDB_RUN_GROUP and WANDB_TAGS (the sweep id),
     WANDB_PROJECT and WANDB_DIR -- but no WANDB_SWEEP_ID: the server has never seen a local sweep
     id, and `wandb sync` of runs carrying one fails (wandb#8115) --, expands the YAML's `command:`
     macros the way wandb's agent does (default `${env} ${interpreter} ${program} ${args}`), runs it
     with its output in `<sweep_dir>/logs/<run_name>-<run_id>.log` (train.py under the default
     command: forked from this process after importing torch and wandb once, localsweep/forked.py;
     any other command, or --subprocess: a fresh subprocess), and records finished / failed /
     diverged / interrupted from the exit code and the run's record; with `early_terminate`, W&B's
     hyperband (`sweeps.stop_runs`) is asked every second over the runs' W&B histories (the running
     run's read from its offline .wandb file), and a run it stops gets SIGTERM and is `stopped`;
  4. prints one line per run and, at the end, a results table sorted by validation loss, then
     writes the report (analysis.report) when that module is available.

With --parallel N, N runs are in flight at once, as N agents on one machine would run them: each
still its own process, W&B run, record and log, with max(1, cores // N) torch threads (cores: the
CPUs this process may run on), since a small model's step gets more done per core on one thread
than on two (docs/PERF.md). The engine is asked for a run whenever a slot is free, with the runs in
flight among those it is given (state `running`): a grid hands out each point once, bayes treats
them as W&B's engine treats runs in flight under several agents; hyperband judges every run in
flight each second; Ctrl-C is passed on to all of them. Lines about a run start with its
`[i/n] name`; its output is in its own log.

Where things go (results dir R: --results-dir, else the sweep's fixed `results_dir` value, else
`results`): the sweep dir R/<sweep_id>/ holds sweep.yaml (a copy), sweep_state.json (the runs so
far), logs/ and wandb/ (the offline W&B runs: upload them later with `wandb sync`). Each run gets
`--results_dir=R` and `--group=<sweep_id>` added to its arguments unless the sweep sets them, so
train.py writes its record to R/<group>/<attention>-s<seed>.json, next to the sweep's state.
The report goes to --report-dir (default R/<sweep_id>/report/; the analysis reads records only,
so the report's own JSON there is never mistaken for a run).

With --then-stage2 the sweep is stage 1 of the tuning protocol (analysis/tuning.py): once it has run
to its end, stage 2 is written to R/<sweep_id>/stage2.yaml, run as a sweep of its own, and the
tuning report goes to R/<stage-2 id>/tuning_report/.

Differences from `wandb agent`, on purpose: `${interpreter}` is this Python (sys.executable)
rather than whatever `python` is first on PATH, and this interpreter's bin directory is put first
on the runs' PATH (so `accelerate`/`torchrun` come from the same environment); runs are started
in their own process group, so Ctrl-C reaches a run once, through this script.

Exit codes: 0 when the sweep ran to its end, even if some runs failed (they are recorded as
failed, with the reason, and the report counts them: a failed variant is a result, not an error
of the sweep); 2 on bad input (unreadable or malformed YAML, a schema violation, a bad value,
a bad option, an unknown sweep to resume); 130 after Ctrl-C (143 after SIGTERM, 129 after SIGHUP):
the runs in flight are stopped cleanly (they checkpoint), and the sweep continues with --resume.
"""
import sys

from localsweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
