"""``shrimpio bench --plot FILE.png``: one small bar chart per row, log scale.

Rows have different units, so each gets its own panel: a horizontal bar per
figure (shrimpio's first, highlighted), its median on a logarithmic axis, the
p99 as a whisker where there is one.  Needs matplotlib (``pip install
'shrimpio[bench]'``); the caller checks that it imports.
"""

from __future__ import annotations

import math
from typing import Any

from .table import Row, fmt, fmt_ratio

__all__ = ["plot"]


def plot(res: dict[str, Any], path: str) -> None:
    """Write the chart of a ``shrimpio bench`` result (``run()``'s dict) to
    ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")                 # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    every = [Row.from_json(r) for r in res["rows"]]
    rows = [r for r in every if all(f.median > 0 for f in r.figures)]   # a log axis has no 0
    left_out = [r for r in every if r not in rows]
    if not rows:
        raise ValueError("nothing to plot: no row with figures above zero")
    cols = 2 if len(rows) > 1 else 1
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 1.0 + 1.25 * nrows * 1.6), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        figs = row.figures
        y = list(range(len(figs)))[::-1]
        med = [max(f.median, 1e-3) for f in figs]
        colors = ["tab:orange"] + ["tab:blue"] * (len(figs) - 1)
        ax.barh(y, med, color=colors)
        for yi, f in zip(y, figs):
            if f.p99 is not None and f.p99 > 0:
                ax.plot([f.median, f.p99], [yi, yi], color="black", linewidth=1)
        ax.set_xscale("log")
        # Minor ticks unlabelled: on a span under a decade matplotlib labels
        # them all, and they overlap.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(y)
        ax.set_yticklabels([f.label for f in figs])
        better = "lower" if row.lower_is_better else "higher"
        ax.set_title(f"{row.title} [{row.unit}, {better} is better]", fontsize=9)
        ends = med + [f.p99 for f in figs if f.p99]
        ax.set_xlim(min(ends) / 2, max(ends) * 6)
        for yi, f in zip(y, figs):
            text = fmt(f.median) if f is figs[0] else f"{fmt(f.median)} ({fmt_ratio(row.ratio(f))})"
            ax.text(max(f.median, 1e-3) * 1.15, yi, text, va="center", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    m = res["machine"]
    fig.suptitle(f"shrimpio bench: {m['cpu']}, {m['cores']} cores, Python {m['python']} "
                 f"(whisker: p99; (Nx): shrimpio's advantage)", fontsize=10)
    if left_out:
        fig.text(0.01, 0.005, "not drawn (a zero on a log axis): " + "; ".join(
            f"{r.title} " + ", ".join(f"{f.label} {fmt(f.median)} {r.unit}" for f in r.figures)
            for r in left_out), fontsize=8)
    fig.tight_layout(rect=(0, 0.02 if left_out else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
