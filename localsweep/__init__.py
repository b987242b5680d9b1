"""The local stand-in for `wandb agent` behind local_sweep.py (its docstring says what it does), one
file per job: macros (the agent's params file and command macros), validate (checking a sweep),
state (the sweep on disk and its lock), runner (one run as a subprocess), engine (the loop over
W&B's sweep engine, hyperband stopping, metric.target), table (the results table and report),
cli (the command line); common holds the small shared helpers, wandb_file reads offline runs."""
