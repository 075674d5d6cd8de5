"""Dispatch/combine sweeps: ep_comm against the all_to_all_single baseline, over token counts.

    python bench/bench_ep.py                      # CPU: tokens 1..256, 4 gloo ranks; GPU: 1..8192
    python bench/bench_ep.py --max-tokens 64 --mode normal --dtype bf16 --json out.json --plot plots/

For every token count x mode (normal, low-latency) x dtype (bf16, FP8 dispatch; combine is bf16):
ep_comm (kernels where available, else the reference backend) and the baseline doing the same job
with all_to_all_single -- permute by destination rank, exchange with split sizes, send back and
reduce (one GPU shared by all ranks: a one-process torch emulation of the same permutations and
copies, because NCCL refuses two ranks per GPU). GPU times are CUDA events after warm-up with the
L2 flushed before each run; CPU times perf_counter; medians. Bytes: DeepEP's convention (received
rows x row bytes incl. FP8 scales), see BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ep_comm.bench import counting  # noqa: E402
from ep_comm.bench.__main__ import kernels_usable, render_report  # noqa: E402
from ep_comm.bench.report import make_meta, make_report, write_json  # noqa: E402

COLUMNS = [
    ("mode", "mode", ""), ("op", "op", ""), ("dtype", "dtype", ""), ("impl", "impl", ""), ("tokens", "tokens", "d"),
    ("recv_rows_per_rank", "rows/rank", ".0f"), ("mb_per_rank", "MB/rank", ".3f"),
    ("latency_us", "latency us", ".1f"), ("gbps_per_rank", "GB/s/rank", ".3f"), ("gbps_total", "GB/s all", ".3f"),
    ("ceiling_pct", "% ceiling", ".2f"), ("speedup", "speedup", ".2f"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--min-tokens", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=None, help="GPU 8192, CPU 256")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="explicit token counts (overrides the sweep)")
    p.add_argument("--ll-max-tokens", type=int, default=None,
                   help="low-latency runs only up to this many tokens per rank (default GPU 256, CPU 256)")
    p.add_argument("--hidden", type=int, default=None, help="GPU 7168, CPU 1024")
    p.add_argument("--topk", type=int, default=None, help="GPU 8, CPU 4")
    p.add_argument("--experts", type=int, default=None, help="GPU 256, CPU 32")
    p.add_argument("--dtype", choices=("bf16", "fp8", "both"), default="both")
    p.add_argument("--mode", choices=("normal", "low_latency", "all"), default="all")
    p.add_argument("--iters", type=int, default=None, help="GPU 30, CPU 5")
    p.add_argument("--warmup", type=int, default=None, help="GPU 5, CPU 1")
    p.add_argument("--backend", choices=("auto", "reference", "kernels"), default="auto")
    p.add_argument("--baseline", choices=("auto", "all_to_all", "emulated", "none"), default="auto",
                   help="auto: all_to_all_single where one rank per device is possible, else the emulation")
    p.add_argument("--no-flush-l2", action="store_true", help="GPU: do not flush L2 between runs")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts here (needs matplotlib)")
    p.add_argument("--seed", type=int, default=20261123)
    return p


def plot(report: dict, folder: str) -> list:
    from ep_comm.bench.plots import line_chart
    rows = report["results"]
    written = []
    for mode in ("normal", "low_latency"):
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        written.append(line_chart(mode_rows, "tokens", "gbps_per_rank", ("op", "dtype", "impl"),
                                  os.path.join(folder, f"ep_{mode}_bandwidth.png"),
                                  f"{mode}: bandwidth per rank, ep_comm vs all_to_all baseline", "tokens per rank",
                                  "GB/s per rank (received bytes / time)"))
        written.append(line_chart(mode_rows, "tokens", "latency_us", ("op", "dtype", "impl"),
                                  os.path.join(folder, f"ep_{mode}_latency.png"),
                                  f"{mode}: latency vs tokens", "tokens per rank", "median latency (us)",
                                  log_y=True))
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    on_gpu = kernels_usable(args.backend)
    if args.backend == "kernels" and not on_gpu:
        print("bench_ep: --backend kernels, but the kernels are unavailable here", file=sys.stderr)
        return 2
    d = dict(max_tokens=8192, hidden=7168, topk=8, experts=256, iters=30, warmup=5, ll_max_tokens=256) if on_gpu \
        else dict(max_tokens=256, hidden=1024, topk=4, experts=32, iters=5, warmup=1, ll_max_tokens=256)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.plot:   # fail before spending minutes measuring
        from ep_comm.bench.plots import PlotsUnavailable, _pyplot
        try:
            _pyplot()
        except PlotsUnavailable as e:
            print(f"bench_ep: {e}", file=sys.stderr)
            return 2
    tokens = args.tokens or counting.token_sweep(args.min_tokens, args.max_tokens)
    from ep_comm.bench.ep import Case, bench_body
    from ep_comm.bench.spawn import run_ranks
    cases = [Case(t, args.hidden, args.topk, args.experts, t if t <= args.ll_max_tokens else 0) for t in tokens]
    try:
        for c in cases:
            c.validate(args.ranks)
    except ValueError as e:
        print(f"bench_ep: {e}", file=sys.stderr)
        return 2
    opts = dict(modes=("normal", "low_latency") if args.mode == "all" else (args.mode,),
                dtypes=("bf16", "fp8") if args.dtype == "both" else (args.dtype,), iters=args.iters,
                warmup=args.warmup, backend=args.backend, baseline=args.baseline, flush_l2=not args.no_flush_l2,
                check=not args.no_check, seed=args.seed)
    result = run_ranks(bench_body, args.ranks, cases=[c.__dict__ for c in cases], opts=opts, progress=True)
    config = dict(tokens=tokens, ll_max_tokens=args.ll_max_tokens, hidden=args.hidden, topk=args.topk,
                  experts=args.experts, dtype=args.dtype, mode=args.mode, iters=args.iters, warmup=args.warmup,
                  baseline=result["baseline"], flush_l2=(not args.no_flush_l2) and on_gpu)
    notes = [f"baseline: {result['baseline']} (speedup = ep_comm GB/s all / baseline GB/s all)"]
    if result["backend"] == "reference":
        notes.append("CPU/reference numbers: ep_comm here is the reference backend, itself all_to_all_single plus "
                     "what the API promises (inputs validated and agreed by an all_reduce, top-k ids/weights "
                     "carried, low-latency outputs zero-padded to [E_local, R*T, H]), so it is expected to be "
                     "slower than the bare baseline; the kernels are measured only on a GPU")
    order = {"normal": 0, "low_latency": 1, "dispatch": 0, "combine": 1, "bf16": 0, "fp8": 1, "ep_comm": 0,
             "baseline": 1}
    rows = sorted(result["rows"], key=lambda r: (order[r["mode"]], order[r["op"]], order[r["dtype"]], r["tokens"],
                                                 order[r["impl"]]))
    report = make_report(make_meta("bench_ep", result["backend"], args.ranks, config), rows,
                         result["ceiling"], result["checks"], notes)
    print(render_report(report, COLUMNS))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot(report, args.plot):
            print(f"wrote {path}")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
