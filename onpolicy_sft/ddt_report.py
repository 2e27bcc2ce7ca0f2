"""A readable DDT report for one or more scored corpora: a markdown table and two figures.

Corpora sit side by side (e.g. original vs rewritten): one column each in the table, one
colour each in the figures. The figures: a histogram of per-sequence mean φ, and the Z values
against N(0, 1), which is where Z lies for the model's own temperature-1 samples
(docs/methods.md §1; Zhang et al., arXiv 2602.12222).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import norm

from onpolicy_sft.ddt import PREFIX, REJECT_LEVEL, summarize
from onpolicy_sft.rundir import replace_with, write_text

PHI_HIST = "phi_mean_hist.png"
Z_PLOT = "z_vs_normal.png"
# The authors read a corpus with mean φ below about −0.1 as out of distribution.
OOD_THRESHOLD = -0.1

_ROWS = (
    ("n", "rows", "{:d}"),
    ("n_truncated", "rows cut to the length limit", "{:d}"),
    ("n_skipped", "rows not scored (over the length limit)", "{:d}"),
    ("n_tokens", "response tokens", "{:d}"),
    ("phi_mean", "mean φ (mean over rows of per-row mean)", "{:+.4f}"),
    ("phi_median", "median of per-row mean φ", "{:+.4f}"),
    ("phi_token_mean", "mean φ over all tokens", "{:+.4f}"),
    ("z_mean", "mean Z", "{:+.2f}"),
    ("frac_below_1", "tokens with φ < −1", "{:.2%}"),
    ("frac_below_3", "tokens with φ < −3", "{:.2%}"),
    ("frac_below_5", "tokens with φ < −5", "{:.2%}"),
    ("frac_positive", "tokens with φ > 0", "{:.2%}"),
    ("reject_rate_1pct", f"rows rejected at {REJECT_LEVEL:.0%} (p = Φ(Z) < {REJECT_LEVEL})", "{:.1%}"),
    ("corpus_z", "corpus Z (Stouffer: ΣZ / sqrt(rows))", "{:+.2f}"),
    ("corpus_pvalue", "corpus p-value Φ(corpus Z)", "{:.2e}"),
)


def _fmt(template: str, value) -> str:
    if isinstance(value, float) and np.isnan(value):
        return "n/a"
    return template.format(value)


def summary_table(summaries: dict[str, dict]) -> str:
    """Markdown table: one row per statistic, one column per corpus."""
    names = list(summaries)
    lines = ["| statistic | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, template in _ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(template, summaries[n].get(key, float("nan"))) for n in names) + " |")
    return "\n".join(lines)


def _finite(dataset, column: str) -> np.ndarray:
    values = np.asarray(dataset[PREFIX + column], dtype=np.float64)
    return values[np.isfinite(values)]


def _plot_phi_hist(path: Path, corpora: dict) -> None:
    import matplotlib.pyplot as plt

    values = {name: _finite(d, "phi_mean") for name, d in corpora.items()}
    pooled = np.concatenate([v for v in values.values()] + [np.array([OOD_THRESHOLD, 0.0])])
    bins = np.linspace(pooled.min(), pooled.max(), 41)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in values.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (mean {v.mean():+.3f})" if len(v) else name)
    ax.axvline(0.0, color="black", lw=1, label="0 (own samples)")
    ax.axvline(OOD_THRESHOLD, color="red", ls="--", lw=1, label=f"{OOD_THRESHOLD} (out-of-distribution line)")
    ax.set_xlabel("per-sequence mean φ")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def _plot_z(path: Path, corpora: dict) -> None:
    import matplotlib.pyplot as plt

    values = {name: np.sort(_finite(d, "z")) for name, d in corpora.items()}
    fig, (dens, qq) = plt.subplots(1, 2, figsize=(11, 4))
    pooled = np.concatenate([v for v in values.values()] + [np.array([-4.0, 4.0])])
    bins = np.linspace(pooled.min(), pooled.max(), 51)
    grid = np.linspace(pooled.min(), pooled.max(), 400)
    for name, v in values.items():
        dens.hist(v, bins=bins, density=True, alpha=0.5, label=name)
        theoretical = norm.ppf((np.arange(1, len(v) + 1) - 0.5) / max(len(v), 1))
        qq.plot(theoretical, v, ".", ms=4, label=name)
    dens.plot(grid, norm.pdf(grid), "k-", lw=1, label="N(0, 1)")
    dens.set_xlabel("Z = Σφ / sqrt(Σ varentropy)")
    dens.set_ylabel("density")
    dens.legend(fontsize=8)
    lim = np.array([-4.0, 4.0])
    qq.plot(lim, lim, "k-", lw=1, label="y = x (N(0, 1))")
    qq.set_xlabel("N(0, 1) quantile")
    qq.set_ylabel("observed Z quantile")
    qq.legend(fontsize=8)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def write_report(out_dir, corpora: dict) -> Path:
    """Write report.md plus its PNGs into ``out_dir``; returns the report's path.

    ``corpora`` maps a display name to a dataset scored by ``ddt.score``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    if not corpora:
        raise ValueError("write_report needs at least one scored corpus")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(d) for name, d in corpora.items()}
    _plot_phi_hist(out / PHI_HIST, corpora)
    _plot_z(out / Z_PLOT, corpora)
    text = "\n".join([
        "# DDT report",
        "",
        "φ_t = log p(y_t) + H(p_t) per response token, under the scoring model (Zhang et al., "
        "arXiv 2602.12222). For the model's own temperature-1 samples mean φ is 0 and "
        "Z = Σφ / sqrt(Σ varentropy) is about N(0, 1); the authors read a corpus with mean φ "
        f"below about {OOD_THRESHOLD} as out of distribution.",
        "",
        summary_table(summaries),
        "",
        "## Per-sequence mean φ",
        "",
        f"![per-sequence mean φ]({PHI_HIST})",
        "",
        "## Z against N(0, 1)",
        "",
        f"![Z against N(0, 1)]({Z_PLOT})",
        "",
    ])
    return write_text(out / "report.md", text)
