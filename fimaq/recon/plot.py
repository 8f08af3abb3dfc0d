"""A picture of the reconstruction: every unit's output error before and after, on a log scale."""

from __future__ import annotations

from pathlib import Path

from fimaq.files import atomic_write_bytes
from fimaq.recon.driver import ReconReport


def plot_unit_errors(report: ReconReport, path: str | Path, title: str = "") -> Path:
    """Save a bar chart of the per-unit output MSE (calibrated vs reconstructed) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report.error_before if n in report.error_after]
    before = [report.error_before[n] for n in names]
    after = [report.error_after[n] for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.0))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="calibrated")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="reconstructed")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("unit output MSE (quantized input)")
    ax.set_title(title or "per-unit output error")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
