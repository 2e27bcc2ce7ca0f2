"""What a recipe reports: tables and plots of its results, and summaries of a training corpus by
where its rows came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy_sft.rundir import replace_with


def duration(seconds: float | None) -> str:
    """A stage's wall time for the console: seconds, or minutes and seconds past a minute and a half."""
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def num(value, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def pm(value, se, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f} ± {(se or 0.0):.{digits}f}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported here: slow, and only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(panels: dict[str, dict[str, list[float]]], path: Path, xlabel: str) -> Path:
    """One panel per title, overlaid histograms per label, on shared bins; a line at 0."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        values = [v for vs in series.values() for v in vs if v == v]
        lo, hi = (min(values), max(values)) if values else (-1.0, 1.0)
        bins = [lo + (hi - lo) * i / 24 for i in range(25)] if hi > lo else 10
        for label, vs in series.items():
            ax.hist([v for v in vs if v == v], bins=bins, alpha=0.55, label=f"{label} (n={len(vs)})")
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set(title=title, xlabel=xlabel, ylabel="rows")
        ax.legend(fontsize=8)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def plot_lines(panels: list[tuple[str, dict[str, list[tuple[float, float, float]]]]], path: Path, xlabel: str) -> Path:
    """One panel per (title, {series: [(x, y, se)]}), error bars of one standard error."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, points in series.items():
            if points:
                x, y, e = zip(*points)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
        ax.set(title=title, xlabel=xlabel)
        ticks = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(ticks)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Corpus summaries

# Where a training row came from (onpolicy_sft.rewrite): the model's own answer, a hinted attempt, the
# demonstration as it was (fallback), or a demonstration the triage found in distribution.
SOURCES = ("self", "hinted", "original", "in_distribution")


def source_counts(corpus) -> dict[str, int]:
    sources = corpus["source"] if "source" in corpus.column_names else ["original"] * len(corpus)
    return {s: sources.count(s) for s in SOURCES}


def phi_by_source(corpus) -> dict[str, Any]:
    """Mean φ of a scored corpus, and per source the rows and the mean of |φ̄| (a corpus can average
    to zero with every row far from it, so the distance per row is reported too)."""
    phis = [float(v) for v in corpus["ddt_phi_mean"]]
    sources = corpus["source"] if "source" in corpus.column_names else ["original"] * len(corpus)
    result: dict[str, Any] = {"phi_mean": sum(phis) / len(phis) if phis else None, "rows": len(phis)}
    for s in SOURCES:
        values = [abs(p) for p, src in zip(phis, sources) if src == s and p == p]
        result[f"abs_phi_{s}"] = sum(values) / len(values) if values else None
        result[f"rows_{s}"] = len(values)
    return result
