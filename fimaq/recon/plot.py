"""A picture of the reconstruction: every unit's output error and its own objective (the loss it
minimised), before and after, on log scales."""

from __future__ import annotations

from pathlib import Path

from fimaq.files import atomic_write_bytes
from fimaq.recon.report import ReconReport


def plot_unit_errors(report: ReconReport, path: str | Path, title: str = "", loss: str = "") -> Path:
    """Save bar charts of the per-unit output MSE and objective (calibrated vs reconstructed) as a PNG.

    Args:
        report: the reconstruction's report.
        path: the PNG to write.
        title: the figure's title.
        loss: the reconstruction loss, as the objective's label names it (the head minimises its KL).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("unit output MSE (quantized input)", report.error_before, report.error_after)]
    if report.objective_after:
        label = f"unit objective ({loss}; head: KL)" if loss else "unit objective"
        panels.append((label, report.objective_before, report.objective_after))
    names = [n for n in report.error_before if n in report.error_after]
    xs = list(range(len(names)))
    width = max(6.0, 0.45 * len(names) + 2)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(width, 3.2 * len(panels) + 0.8), sharex=True, squeeze=False
    )
    for ax, (ylabel, before, after) in zip(axes[:, 0], panels, strict=True):
        shown = [x for x, n in zip(xs, names, strict=True) if n in after]
        ax.bar([x - 0.2 for x in shown], [before[names[x]] for x in shown], width=0.4, label="calibrated")
        ax.bar([x + 0.2 for x in shown], [after[names[x]] for x in shown], width=0.4, label="reconstructed")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
    axes[0, 0].set_title(title or "per-unit reconstruction")
    fig.tight_layout()
    path = Path(path)
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
