"""PNG charts from benchmark rows. matplotlib is optional: imported only here, and only when asked."""
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
        raise PlotsUnavailable("--plot needs matplotlib, which is not installed: pip install matplotlib "
                               "(or the 'bench' extra)") from e
    return plt


def _series(rows: Sequence[dict], x_key: str, y_key: str, group_keys: Sequence[str]) -> Dict[Tuple, List[Tuple]]:
    series: Dict[Tuple, List[Tuple]] = {}
    for r in rows:
        if r.get(y_key) is None or r.get(x_key) is None:
            continue
        series.setdefault(tuple(r.get(k) for k in group_keys), []).append((r[x_key], r[y_key]))
    return {k: sorted(v) for k, v in series.items()}


def line_chart(rows: Sequence[dict], x_key: str, y_key: str, group_keys: Sequence[str], path: str, title: str,
               x_label: str, y_label: str, log_x: bool = True, log_y: bool = False) -> str:
    """One line per distinct value of group_keys; a baseline series (impl == 'baseline') is dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, points in sorted(_series(rows, x_key, y_key, group_keys).items(), key=lambda kv: str(kv[0])):
        label = " ".join(str(k) for k in key if k is not None)
        style = "--" if "baseline" in key else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
