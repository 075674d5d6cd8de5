"""python -m ep_comm.bench: dispatch/combine bandwidth and latency of every mode on this machine,
against the same job done with all_to_all_single (the baseline).

Spawns its own ranks (gloo control plane; on GPUs the ranks share the devices round-robin), checks
the results (CPU: against the ep_comm.testing emulator; GPU: kernels against the reference backend;
the baseline against ep_comm), then prints a table and optionally writes JSON and charts. Exit
status 1 if a check failed, 2 for arguments that cannot run.

    python -m ep_comm.bench                                  # one configuration, every mode
    python -m ep_comm.bench --model deepseek-v3 --routing zipf:1.2
    python -m ep_comm.bench --sweep tokens --plot plots/     # tokens 1..--tokens
    python -m ep_comm.bench --sweep bytes --plot plots/      # hidden 128..--hidden (bytes per row)
    python -m ep_comm.bench interconnect --help              # links: p2p, local copy, all_to_all, NVSHMEM
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import torch

from ep_comm.bench import counting, routing
from ep_comm.bench.report import Column, make_meta, make_report, render_meta, render_table, write_json

COLUMNS: List[Column] = [
    ("mode", "mode", ""), ("op", "op", ""), ("dtype", "dtype", ""), ("impl_label", "impl", ""),
    ("tokens", "tokens", "d"), ("hidden", "hidden", "d"),
    ("recv_rows_per_rank", "rows/rank", ".0f"), ("recv_rows_max_over_mean", "max/mean", ".2f"),
    ("mb_per_rank", "MB/rank", ".3f"),
    ("median_us_min", "median us min", ".1f"), ("median_us_max", "median us max", ".1f"),
    ("p99_us_min", "p99 us min", ".1f"), ("p99_us_max", "p99 us max", ".1f"),
    ("algbw_gbps", "algbw GB/s", ".3f"), ("busbw_gbps", "busbw GB/s", ".3f"), ("ceiling_pct", "% ceiling", ".2f"),
    ("speedup", "speedup", ".2f"),
]

# One definition per reported quantity: printed above the table, stored in the JSON, and quoted in
# BENCHMARKS.md, so the three never disagree.
DEFINITIONS: Dict[str, str] = {
    "rows/rank": "token rows a rank received, mean over ranks (normal: one per (token, destination rank); "
                 "low-latency: one per (token, expert))",
    "max/mean": "the busiest rank's received rows / the mean (1.00 = balanced; what the routing's skew costs)",
    "MB/rank": "received token bytes per rank, mean over ranks (MB = 1e6 bytes; bf16 2*H per row, "
               "FP8 H + 4*H/128 with its scales; ids, weights and counters not counted)",
    "median us min/max": "each rank's median time over the timed iterations; the fastest and the slowest rank",
    "p99 us min/max": "each rank's 99th percentile over the timed iterations (interpolated between the largest "
                      "two when there are fewer than 100); the lowest and the highest rank",
    "algbw GB/s": "algorithm bandwidth: received token bytes / median time, per rank, mean over ranks "
                  "(DeepEP's convention; GB = 1e9 bytes); combine counts the same rows sent back",
    "busbw GB/s": "baseline rows only: algbw x (n-1)/n, nccl-tests' bus bandwidth of an all-to-all "
                  "(the share of the bytes that crosses between ranks)",
    "% ceiling": "2 x algbw x ranks sharing one memory / the copy ceiling (bytes read + written per second "
                 "of a local copy in this run)",
    "speedup": "ep_comm algbw / the baseline's algbw for the same mode, op, dtype, tokens and hidden",
    "impl": "ep_comm (eager calls; each is first agreed by every rank through the group's store, on the host), "
            "ep_comm/graph (CUDA-graph replays, GPU only: no host work), baseline (all_to_all_single)",
}

SWEEP_CHOICES = ("tokens", "bytes")
GPU_DEFAULTS = dict(tokens=4096, hidden=7168, topk=8, experts=256, iters=50, warmup=10)
CPU_DEFAULTS = dict(tokens=128, hidden=2048, topk=4, experts=32, iters=10, warmup=2)


def kernels_usable(backend: str) -> bool:
    if backend == "reference":
        return False
    from ep_comm import _ext
    return _ext.gpu_available() and torch.cuda.is_available()


def _routing_arg(text: str) -> str:
    try:
        return str(routing.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    epilog = "\n".join(
        ["routing (--routing, seeded by --seed; every token keeps topk distinct experts):",
         "  uniform   every expert equally likely",
         "  zipf:S    expert popularity ~ 1/rank^S over a seeded order of the experts (S=1.2: a few dominate)",
         "  hot:K     every token takes min(K, topk) of K hot experts, the rest uniformly",
         "  incast    every token's experts on rank 0 (incast:R for rank R): all traffic into one rank",
         "",
         "model presets (--model; explicit --hidden/--topk/--experts override them):"]
        + [f"  {line}" for line in routing.model_help()]
        + ["", "columns of the table:"]
        + [f"  {name}: {text}" for name, text in DEFINITIONS.items()]
        + ["", "subcommand: python -m ep_comm.bench interconnect [--help]  (p2p copies, SM stores, the local copy "
               "ceiling, all_to_all_single with busbw, NVSHMEM put and ping-pong, over message sizes)"])
    p = argparse.ArgumentParser(prog="python -m ep_comm.bench", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4, help="processes to spawn (default 4)")
    p.add_argument("--model", choices=sorted(routing.MODELS), default=None,
                   help="hidden, topk and experts of a model (see below)")
    p.add_argument("--tokens", type=int, default=None,
                   help="normal-mode tokens per rank (GPU 4096, CPU 128); with --sweep tokens the largest")
    p.add_argument("--ll-tokens", type=int, default=None,
                   help="low-latency tokens per rank = num_max_dispatch_tokens_per_rank (default min(tokens, 128)); "
                        "with --sweep tokens the largest low-latency point")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size (GPU 7168, CPU 2048); with --sweep bytes the largest")
    p.add_argument("--topk", type=int, default=None, help="experts per token (GPU 8, CPU 4)")
    p.add_argument("--experts", type=int, default=None, help="experts in all (GPU 256, CPU 32); a multiple of --ranks")
    p.add_argument("--routing", type=_routing_arg, default="uniform",
                   help="uniform | zipf:S | hot:K | incast[:R] (default uniform; see below)")
    p.add_argument("--dtype", choices=("bf16", "fp8", "both"), default="both", help="dispatch payload")
    p.add_argument("--mode", choices=("normal", "low_latency", "all"), default="all")
    p.add_argument("--sweep", choices=SWEEP_CHOICES, default=None,
                   help="tokens: 1, 2, 4, ... --tokens tokens per rank; bytes: hidden 128, 256, ... --hidden "
                        "(bytes per row) at --tokens")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (GPU 50, CPU 10); the median and p99 are reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (GPU 10, CPU 2)")
    p.add_argument("--backend", choices=("auto", "reference", "kernels"), default="auto")
    p.add_argument("--baseline", choices=("auto", "all_to_all", "emulated", "none"), default="auto",
                   help="the same job on all_to_all_single (auto: over NCCL/gloo where each rank has its own "
                        "device, else a one-process emulation on the shared GPU); none: skip it")
    p.add_argument("--graph", action="store_true",
                   help="also time low-latency ops as CUDA-graph replays (GPU kernels only; skipped on CPU)")
    p.add_argument("--no-flush-l2", action="store_true", help="GPU: do not flush L2 before each timed iteration")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (schema in BENCHMARKS.md)")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts here (needs matplotlib: pip install .[bench])")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--seed", type=int, default=20261123, help="seed of inputs and routing")
    return p


def defaults(args: argparse.Namespace, on_gpu: bool) -> argparse.Namespace:
    preset = routing.MODELS.get(args.model or "", {})
    for key in ("hidden", "topk", "experts"):
        if getattr(args, key) is None and key in preset:
            setattr(args, key, preset[key])
    for key, value in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ll_tokens is None:
        args.ll_tokens = max(1, min(args.tokens, 128))
    return args


def hidden_sweep(max_hidden: int) -> List[int]:
    """128, 256, 512, ... up to max_hidden (included); FP8 rows need multiples of 128."""
    sizes = [h for h in counting.message_sizes(counting.FP8_BLOCK, max_hidden)]
    if not sizes or sizes[-1] != max_hidden:
        sizes.append(max_hidden)
    return sizes


def make_cases(args: argparse.Namespace) -> list:
    from ep_comm.bench.ep import Case
    if args.sweep == "tokens":
        return [Case(t, args.hidden, args.topk, args.experts, t if t <= args.ll_tokens else 0, args.routing)
                for t in counting.token_sweep(1, args.tokens)]
    if args.sweep == "bytes":
        return [Case(args.tokens, h, args.topk, args.experts, args.ll_tokens, args.routing)
                for h in hidden_sweep(args.hidden)]
    return [Case(args.tokens, args.hidden, args.topk, args.experts, args.ll_tokens, args.routing)]


def format_rows(rows: List[dict]) -> List[dict]:
    out = []
    for r in rows:
        r = dict(r)
        r["mb_per_rank"] = r["bytes_per_rank"] / 1e6
        r["impl_label"] = r["impl"] + ("/graph" if r.get("launch") == "graph" else "")
        frac = r.get("fraction_of_ceiling")
        r["ceiling_pct"] = None if frac is None else 100 * frac
        out.append(r)
    return out


def render_resources(resources: Optional[dict]) -> List[str]:
    if not resources:
        return []
    parts = []
    for mode in ("normal", "low_latency"):
        res = resources.get(mode)
        if not res:
            continue
        sms = ("no SMs of ours (reference backend)" if not res["allocated"] else
               f"{res['num_sms']} SMs" if res["num_sms"] else "grids sized by the work")
        buf = (f"buffer {res['buffer_bytes'] / 2**20:.1f} MiB per rank" if res["allocated"] else
               f"buffer sized {res['buffer_bytes'] / 2**20:.1f} MiB per rank, not allocated by the reference backend")
        parts.append(f"{mode}: {sms}, {buf}")
    device = f" (device has {resources['device_sms']} SMs)" if resources.get("device_sms") else ""
    return [f"  resources{device}: " + "; ".join(parts)] if parts else []


def render_report(report: dict, columns: List[Column] = COLUMNS) -> str:
    lines = [render_meta(report["meta"])]
    lines += render_resources(report.get("resources"))
    for entry in report.get("routing", []):
        lines.append(f"  routing {entry['routing']} (tokens {entry['tokens']}, low-latency tokens {entry['ll_tokens']}, "
                     f"hidden {entry['hidden']}): "
                     f"{routing.describe(entry)}")
    c = report.get("ceiling")
    if c:
        lines.append(f"  ceiling: {c['kind']}: {c['gbps']:.1f} GB/s counting bytes read + written "
                     f"({c['bytes'] / 2**20:.0f} MiB)")
    checks = report.get("checks") or []
    for how in dict.fromkeys(ch.get("how", "") for ch in checks):
        group = [ch for ch in checks if ch.get("how", "") == how]
        bad = [ch for ch in group if not ch["ok"]]
        status = "ok" if not bad else "FAILED: " + "; ".join(f"{ch['name']}: {ch['detail']}" for ch in bad)
        lines.append(f"  check ({len(group)} cases, {how}): {status}")
    if report.get("definitions"):
        lines.append("  columns:")
        lines += [f"    {name}: {text}" for name, text in report["definitions"].items()]
    lines.append("")
    lines.append(render_table(format_rows(report["results"]), columns))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _op_label(r: dict) -> str:
    return f"{r['op']} {r['dtype']}" + (" graph" if r.get("launch") == "graph" else "")


def plot(report: dict, folder: str, sweep: Optional[str]) -> List[str]:
    """Per mode: algbw and the slowest rank's median time against tokens (or received bytes per rank)."""
    from ep_comm.bench.plots import chart_title, line_chart
    title = chart_title(report["meta"])
    routing_name = report["meta"]["config"].get("routing", "uniform")
    x_key, x_label, x_bytes = (("bytes_per_rank", "received bytes per rank", True) if sweep == "bytes"
                               else ("tokens", "tokens per rank", False))
    written = []
    for mode in ("normal", "low_latency"):
        rows = [dict(r, op=_op_label(r)) for r in report["results"] if r["mode"] == mode]
        if not rows:
            continue
        written.append(line_chart(rows, x_key, "algbw_gbps", os.path.join(folder, f"ep_{mode}_algbw.png"),
                                  f"{mode} dispatch/combine, routing {routing_name}\n{title}", x_label,
                                  "algbw GB/s per rank (received token bytes / median time)", x_bytes=x_bytes))
        written.append(line_chart(rows, x_key, "median_us_max", os.path.join(folder, f"ep_{mode}_latency.png"),
                                  f"{mode} latency, routing {routing_name}\n{title}", x_label,
                                  "median time of the slowest rank (us)", x_bytes=x_bytes, log_y=True))
    return written


def _sort_key(r: dict) -> tuple:
    order = {"normal": 0, "low_latency": 1, "dispatch": 0, "combine": 1, "bf16": 0, "fp8": 1, "ep_comm": 0,
             "baseline": 1, "eager": 0, "graph": 1}
    return (order[r["mode"]], order[r["op"]], order[r["dtype"]], r["tokens"], r["hidden"], order[r["impl"]],
            order[r.get("launch", "eager")])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["interconnect"]:
        from ep_comm.bench import interconnect
        return interconnect.main(argv[1:])
    args = parser().parse_args(argv)
    on_gpu = kernels_usable(args.backend)
    if args.backend == "kernels" and not on_gpu:
        from ep_comm import _ext
        print(f"ep_comm.bench: --backend kernels, but the kernels are unavailable: {_ext.unavailable_reason() or 'no GPU'}",
              file=sys.stderr)
        return 2
    args = defaults(args, on_gpu)
    if args.plot:   # fail before spending minutes measuring
        from ep_comm.bench.plots import PlotsUnavailable, require_matplotlib
        try:
            require_matplotlib()
        except PlotsUnavailable as e:
            print(f"ep_comm.bench: {e}", file=sys.stderr)
            return 2
    if args.graph and not on_gpu:
        print("ep_comm.bench: --graph skipped: CUDA-graph replays need the GPU kernels; measuring eager calls only",
              file=sys.stderr)
    from ep_comm.bench.ep import bench_body
    from ep_comm.bench.spawn import run_ranks
    cases = make_cases(args)
    try:
        for case in cases:
            case.validate(args.ranks)
    except ValueError as e:
        print(f"ep_comm.bench: {e}", file=sys.stderr)
        return 2
    opts = dict(modes=("normal", "low_latency") if args.mode == "all" else (args.mode,),
                dtypes=("bf16", "fp8") if args.dtype == "both" else (args.dtype,),
                iters=args.iters, warmup=args.warmup, backend=args.backend, baseline=args.baseline,
                flush_l2=not args.no_flush_l2, check=not args.no_check, seed=args.seed, graph=args.graph)
    result = run_ranks(bench_body, args.ranks, cases=[c.__dict__ for c in cases], opts=opts, progress=True)
    config = dict(model=args.model, tokens=args.tokens, ll_tokens=args.ll_tokens, hidden=args.hidden,
                  topk=args.topk, experts=args.experts, routing=args.routing, sweep=args.sweep, dtype=args.dtype,
                  mode=args.mode, iters=args.iters, warmup=args.warmup, baseline=result["baseline"],
                  flush_l2=(not args.no_flush_l2) and on_gpu, graph=result["graph"] or "off", seed=args.seed)
    notes = []
    if args.model:
        notes.append(f"model {args.model}: {routing.MODELS[args.model]['source']}")
    if result["graph"] and result["graph"] != "measured":
        notes.append(f"--graph {result['graph']}")
    elif result["graph"] == "measured":
        notes.append("ep_comm/graph rows: low-latency ops captured once and replayed (normal mode is not captured: "
                     "its dispatch needs host-side counts)")
    if result["baseline"] == "emulated":
        notes.append("baseline emulated: one process runs every rank's share on the shared GPU and each rank is "
                     "credited the whole job's time")
    if result["backend"] == "reference":
        notes.append("CPU/reference numbers: ep_comm here is the reference backend, itself all_to_all_single plus "
                     "what the API promises (inputs validated, each call agreed by every rank, top-k ids/weights "
                     "carried, low-latency outputs zero-padded to [E_local, R*T, H]), so it is expected to be "
                     "slower than the bare baseline; they measure this host, not the GPU kernels")
    rows = sorted(result["rows"], key=_sort_key)
    report = make_report(make_meta("ep_comm.bench", result["backend"], args.ranks, config), rows,
                         result["ceiling"], result["checks"], notes, definitions=DEFINITIONS,
                         resources=result["resources"], routing=result["routing"])
    print(render_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot(report, args.plot, args.sweep):
            print(f"wrote {path}")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
