"""Benchmarks of ep_comm, one entry point: `python -m ep_comm.bench` (dispatch/combine, routing
skew, sweeps, charts) and `python -m ep_comm.bench interconnect` (the links under it).

  counting      which bytes count (DeepEP's convention) -- pure functions
  routing       expert choice: uniform, zipf:S, hot:K, incast; imbalance summaries; model presets
  timing        CUDA events / perf_counter, median and p99, L2 flush, the copy ceiling
  spawn         R processes on a gloo group, rank 0's result returned
  baseline      the same job on all_to_all_single (or a one-process emulation on a shared GPU)
  ep            in-rank measurements (eager and CUDA-graph) and correctness checks
  interconnect  p2p copies, SM stores, all_to_all_single, NVSHMEM put and ping-pong
  report        table, versioned JSON schema, metadata, progress bar
  plots         PNG charts (matplotlib, optional: pip install .[bench])
See BENCHMARKS.md for the method, the definitions and the results so far.
"""
