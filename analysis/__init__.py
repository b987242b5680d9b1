"""The analysis of an attention sweep: load runs (W&B, local records, the seed's JSON), compute
the seed report's tables plus the statistics that say which differences are real, and write
report.md, the seed-schema JSON and the figures.

    runs.py      one run type, and the three loaders that normalise into it (and the seed export)
    stats.py     per-variant summaries, paired tests against baseline, Holm, noise, seeds needed
    fairness.py  the audit: same data and shared init per seed, same non-attention settings
    tables.py    every table of the report, as markdown and as rows for wandb.Table
    plots.py     the comprehensive six-panel figure, learning curves, differences to baseline
    report.py    the command line and write_report()
"""
