"""Benchmarks of ep_comm: `python -m ep_comm.bench` (one configuration, every mode, under a minute).

The longer sweeps live in bench/ at the top of the repository (bench_ep.py, bench_interconnect.py)
and reuse these modules:
  counting  which bytes count (DeepEP's convention) -- pure functions
  timing    CUDA events / perf_counter, medians, L2 flush, the copy ceiling
  spawn     R processes on a gloo group, rank 0's result returned
  baseline  the same job on all_to_all_single (or a one-process emulation on a shared GPU)
  ep        in-rank measurements and correctness checks
  report    table, JSON schema, metadata, progress bar
See BENCHMARKS.md for the method and the results so far.
"""
