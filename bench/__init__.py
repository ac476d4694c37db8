"""Benchmark scripts (not tests): each writes a JSON + markdown table to bench/results/<device>/.

bench/common.py holds the shared helpers (device name, timing with quantiles, peak memory,
roofline, result files); bench/bench_loss.py times the GRPO loss paths.
"""
