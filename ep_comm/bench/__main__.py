"""python -m ep_comm.bench: dispatch/combine bandwidth and latency of every mode on this machine.

Spawns its own ranks (gloo control plane; on GPUs the ranks share the devices round-robin), checks
the results (CPU: against the ep_comm.testing emulator; GPU: kernels against the reference backend),
then prints a table and optionally writes JSON. Exit status 1 if a check failed.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from ep_comm.bench.report import Column, make_meta, make_report, render_meta, render_table, write_json

COLUMNS: List[Column] = [
    ("mode", "mode", ""), ("op", "op", ""), ("dtype", "dtype", ""), ("tokens", "tokens", "d"),
    ("recv_rows_per_rank", "rows/rank", ".0f"), ("mb_per_rank", "MB/rank", ".3f"),
    ("latency_us", "latency us", ".1f"), ("latency_max_us", "max us", ".1f"),
    ("gbps_per_rank", "GB/s/rank", ".3f"), ("gbps_total", "GB/s all", ".3f"), ("ceiling_pct", "% ceiling", ".2f"),
]


def kernels_usable(backend: str) -> bool:
    if backend == "reference":
        return False
    from ep_comm import _ext
    return _ext.gpu_available() and torch.cuda.is_available()


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ep_comm.bench", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4, help="processes to spawn (default 4)")
    p.add_argument("--tokens", type=int, default=None, help="normal-mode tokens per rank (GPU 4096, CPU 128)")
    p.add_argument("--ll-tokens", type=int, default=None,
                   help="low-latency tokens per rank = num_max_dispatch_tokens_per_rank (default min(tokens, 128))")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (GPU 7168, CPU 2048)")
    p.add_argument("--topk", type=int, default=None, help="experts per token (GPU 8, CPU 4)")
    p.add_argument("--experts", type=int, default=None, help="experts in all (GPU 256, CPU 32); a multiple of --ranks")
    p.add_argument("--dtype", choices=("bf16", "fp8", "both"), default="both", help="dispatch payload")
    p.add_argument("--mode", choices=("normal", "low_latency", "all"), default="all")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (GPU 50, CPU 10); the median is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (GPU 10, CPU 2)")
    p.add_argument("--backend", choices=("auto", "reference", "kernels"), default="auto")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--seed", type=int, default=20261123)
    return p


def defaults(args: argparse.Namespace, on_gpu: bool) -> argparse.Namespace:
    gpu = dict(tokens=4096, hidden=7168, topk=8, experts=256, iters=50, warmup=10)
    cpu = dict(tokens=128, hidden=2048, topk=4, experts=32, iters=10, warmup=2)
    for key, value in (gpu if on_gpu else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ll_tokens is None:
        args.ll_tokens = max(1, min(args.tokens, 128))
    return args


def format_rows(rows: List[dict]) -> List[dict]:
    out = []
    for r in rows:
        r = dict(r)
        r["mb_per_rank"] = r["bytes_per_rank"] / 1e6
        frac = r.get("fraction_of_ceiling")
        r["ceiling_pct"] = None if frac is None else 100 * frac
        out.append(r)
    return out


def render_report(report: dict, columns: List[Column] = COLUMNS) -> str:
    lines = [render_meta(report["meta"])]
    c = report.get("ceiling")
    if c:
        lines.append(f"  ceiling: {c['kind']}: {c['gbps']:.1f} GB/s counting bytes read + written "
                     f"({c['bytes'] / 2**20:.0f} MiB); '% ceiling' = 2 x (GB/s/rank x ranks sharing that memory) / ceiling")
    checks = report.get("checks") or []
    if checks:
        for how in dict.fromkeys(ch.get("how", "") for ch in checks):
            group = [ch for ch in checks if ch.get("how", "") == how]
            bad = [ch for ch in group if not ch["ok"]]
            status = "ok" if not bad else "FAILED: " + "; ".join(f"{ch['name']}: {ch['detail']}" for ch in bad)
            lines.append(f"  check ({len(group)} cases, {how}): {status}")
    lines.append("")
    lines.append(render_table(format_rows(report["results"]), columns))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    on_gpu = kernels_usable(args.backend)
    if args.backend == "kernels" and not on_gpu:
        from ep_comm import _ext
        print(f"ep_comm.bench: --backend kernels, but the kernels are unavailable: {_ext.unavailable_reason() or 'no GPU'}",
              file=sys.stderr)
        return 2
    args = defaults(args, on_gpu)
    from ep_comm.bench.ep import Case, bench_body
    from ep_comm.bench.spawn import run_ranks
    case = Case(args.tokens, args.hidden, args.topk, args.experts, args.ll_tokens)
    try:
        case.validate(args.ranks)
    except ValueError as e:
        print(f"ep_comm.bench: {e}", file=sys.stderr)
        return 2
    opts = dict(modes=("normal", "low_latency") if args.mode == "all" else (args.mode,),
                dtypes=("bf16", "fp8") if args.dtype == "both" else (args.dtype,),
                iters=args.iters, warmup=args.warmup, backend=args.backend, baseline="none", flush_l2=False,
                check=not args.no_check, seed=args.seed)
    result = run_ranks(bench_body, args.ranks, cases=[case.__dict__], opts=opts)
    config = dict(tokens=args.tokens, ll_tokens=args.ll_tokens, hidden=args.hidden, topk=args.topk,
                  experts=args.experts, dtype=args.dtype, mode=args.mode, iters=args.iters, warmup=args.warmup)
    notes = []
    if result["backend"] == "reference":
        notes.append("CPU/reference numbers: the reference backend (all_to_all_single over gloo) moves the rows; "
                     "they measure the oracle on this host, not the GPU kernels")
    report = make_report(make_meta("ep_comm.bench", result["backend"], args.ranks, config), result["rows"],
                         result["ceiling"], result["checks"], notes)
    print(render_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
