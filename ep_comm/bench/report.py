"""Reports: a plain-text table, a JSON document with a versioned schema, run metadata, a progress bar.

JSON schema "ep_comm.bench/2" (BENCHMARKS.md, "JSON", describes every field):
  {"schema": "ep_comm.bench/2",
   "meta": {"benchmark", "date" (UTC ISO-8601), "commit", "device", "backend", "ranks", "torch",
            "ep_comm", "command", "config": {...}},
   "definitions": {result field: what it means, in words},
   "resources": {"device_sms", "normal": {"num_sms", "buffer_bytes", "allocated"}, "low_latency": {...}} | null,
   "routing": [{"routing", "tokens", "ll_tokens", "hidden", "tokens_per_expert": {...}, "normal_rows_per_rank": {...},
                "low_latency_rows_per_rank": {...}, "normal_rows": [...], "low_latency_rows": [...]}],
   "ceiling": {"kind", "bytes", "gbps", "median_us"} | null,
   "checks": [{"name", "ok", "detail"}],
   "results": [{"name", ...numbers...}],
   "notes": [str]}
Version 2 replaced version 1's latency_us/latency_max_us/gbps_per_rank/gbps_total with per-rank
median and p99 (min and max over ranks), algbw/busbw, and added definitions, resources and routing.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

SCHEMA = "ep_comm.bench/2"
TOP_LEVEL = ("meta", "definitions", "resources", "routing", "ceiling", "checks", "results", "notes")
REQUIRED_META = ("benchmark", "date", "commit", "device", "backend", "ranks", "torch", "ep_comm", "command", "config")

Column = Tuple[str, str, str]   # (key in the row, header, format spec such as ".2f"; "" for str())


def format_cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def render_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column], title: Optional[str] = None) -> str:
    """Fixed-width table: text columns left-aligned, numbers right-aligned, '-' for missing values."""
    cells = [[format_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    numeric = [bool(spec) for _, _, spec in columns]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(c) for c in cells)
    return "\n".join(out)


def git_commit(path: Optional[str] = None) -> str:
    """`git rev-parse --short HEAD` of the checkout holding ep_comm (+ '-dirty'), or 'unknown'."""
    path = path or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_device() -> str:
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"{torch.cuda.device_count()}x {', '.join(sorted(names))}"
    return f"CPU ({os.cpu_count()} cores, no GPU)"


def invocation() -> List[str]:
    """How this process was started, readable: 'python -m ep_comm.bench ...' or 'python bench/x.py ...'."""
    script = sys.argv[0] if sys.argv else ""
    if script.replace(os.sep, "/").endswith("ep_comm/bench/__main__.py"):
        head = ["python", "-m", "ep_comm.bench"]
    else:
        head = ["python", os.path.relpath(script) if script else "-c"]
    return head + sys.argv[1:]


def make_meta(benchmark: str, backend: str, ranks: int, config: Dict[str, Any],
              command: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import torch
    import ep_comm
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "commit": git_commit(),
        "device": describe_device(),
        "backend": backend,
        "ranks": ranks,
        "torch": torch.__version__,
        "ep_comm": ep_comm.__version__,
        "command": " ".join(command if command is not None else invocation()),
        "config": dict(config),
    }


def make_report(meta: Dict[str, Any], results: List[Dict[str, Any]], ceiling: Optional[Dict[str, Any]] = None,
                checks: Optional[List[Dict[str, Any]]] = None, notes: Optional[List[str]] = None,
                definitions: Optional[Dict[str, str]] = None, resources: Optional[Dict[str, Any]] = None,
                routing: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    report = {"schema": SCHEMA, "meta": meta, "definitions": definitions or {}, "resources": resources,
              "routing": routing or [], "ceiling": ceiling, "checks": checks or [], "results": results,
              "notes": notes or []}
    validate_report(report)
    return report


def validate_report(report: Dict[str, Any]) -> None:
    """Raise ValueError naming the first thing that does not follow the schema."""
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise ValueError(f"report schema must be {SCHEMA!r}, got {report.get('schema') if isinstance(report, dict) else report!r}")
    for key in TOP_LEVEL:
        if key not in report:
            raise ValueError(f"report lacks {key!r}")
    if not isinstance(report["definitions"], dict) or not all(isinstance(v, str) for v in report["definitions"].values()):
        raise ValueError("report definitions must map field names to strings")
    for entry in report["routing"]:
        if not {"routing", "tokens_per_expert", "normal_rows_per_rank", "low_latency_rows_per_rank"} <= set(entry):
            raise ValueError(f"a routing entry needs routing, tokens_per_expert, normal_rows_per_rank and "
                             f"low_latency_rows_per_rank, got {sorted(entry)}")
    missing = [k for k in REQUIRED_META if k not in report["meta"]]
    if missing:
        raise ValueError(f"report meta lacks {missing}")
    if report["ceiling"] is not None:
        for k in ("kind", "gbps"):
            if k not in report["ceiling"]:
                raise ValueError(f"report ceiling lacks {k!r}")
    for check in report["checks"]:
        if not {"name", "ok"} <= set(check):
            raise ValueError(f"a check needs 'name' and 'ok', got {sorted(check)}")
    for i, row in enumerate(report["results"]):
        if not isinstance(row, dict) or "name" not in row:
            raise ValueError(f"result {i} needs a 'name'")
        for k, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"result {i} ({row['name']}) has a non-finite {k}: {value}")
    json.dumps(report)  # must serialise


def write_json(report: Dict[str, Any], path: str) -> None:
    validate_report(report)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")


def render_meta(meta: Dict[str, Any]) -> str:
    cfg = " ".join(f"{k}={v}" for k, v in meta["config"].items())
    return (f"{meta['benchmark']}: {meta['device']}, backend={meta['backend']}, ranks={meta['ranks']}, "
            f"commit {meta['commit']}, {meta['date']}\n  config: {cfg}")


class Progress:
    """A text bar on stderr (only when stderr is a terminal, or when forced); tqdm is not needed.
    The benchmarks create it on rank 0 only, so R ranks draw one bar."""

    def __init__(self, total: int, label: str = "", enabled: Optional[bool] = None, stream=None) -> None:
        self.total = max(int(total), 1)
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def render(self, what: str = "") -> str:
        width = 30
        filled = int(width * self.done / self.total)
        return f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {what}".rstrip()

    def update(self, what: str = "", step: int = 1) -> None:
        self.done = min(self.total, self.done + step)
        if self.enabled:
            self.stream.write("\r" + self.render(what).ljust(100)[:100])
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def rows_named(results: Iterable[Dict[str, Any]], prefix: str) -> List[Dict[str, Any]]:
    return [r for r in results if str(r.get("name", "")).startswith(prefix)]
