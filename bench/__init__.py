"""Throughput, MFU and memory benchmarks: ours vs a seed-style reference (see docs/PERF.md)."""
