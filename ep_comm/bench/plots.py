"""PNG charts from benchmark rows. matplotlib is optional (`pip install .[bench]`): imported only
here, and only when a chart is asked for.

Conventions of every chart: the title names backend, device and world size; one colour per
operation (a row's "op" label); ep_comm solid, the baseline dashed; byte axes in KiB/MiB/GiB.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple


class PlotsUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailable("--plot needs matplotlib, which is not installed: pip install .[bench] "
                               "(or pip install matplotlib)") from e
    return plt


def require_matplotlib() -> None:
    """Raise PlotsUnavailable now, before minutes of measuring, if charts cannot be drawn."""
    _pyplot()


def human_bytes(num_bytes: float) -> str:
    """4096 -> '4 KiB', 1.5 * 2**20 -> '1.5 MiB'; binary units, as message sizes are powers of two."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes:g} B"


def chart_title(meta: dict) -> str:
    """'<backend> backend, <device>, <ranks> ranks' from a report's meta."""
    return f"{meta['backend']} backend, {meta['device']}, {meta['ranks']} ranks"


def _series(rows: Sequence[dict], x_key: str, y_key: str) -> Dict[Tuple[str, str], List[Tuple]]:
    series: Dict[Tuple[str, str], List[Tuple]] = {}
    for r in rows:
        if r.get(y_key) is None or r.get(x_key) is None:
            continue
        series.setdefault((str(r["op"]), str(r.get("impl") or "ep_comm")), []).append((r[x_key], r[y_key]))
    return {k: sorted(v) for k, v in series.items()}


def line_chart(rows: Sequence[dict], x_key: str, y_key: str, path: str, title: str, x_label: str, y_label: str,
               x_bytes: bool = False, log_x: bool = True, log_y: bool = False) -> str:
    """One line per (row['op'], row['impl']): the colour follows op, the style impl (baseline dashed)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter
    fig, ax = plt.subplots(figsize=(8, 5))
    series = _series(rows, x_key, y_key)
    ops = list(dict.fromkeys(op for op, _ in series))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (op, impl), points in sorted(series.items(), key=lambda kv: (ops.index(kv[0][0]), kv[0][1] == "baseline")):
        colour = colours[ops.index(op) % len(colours)]
        style = "--" if impl == "baseline" else "-"
        label = op if impl == "ep_comm" else f"{op} ({impl})"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, color=colour, marker="o", markersize=3,
                label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    if x_bytes:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
