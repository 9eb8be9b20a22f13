"""The eval pictures: loss by position (mean eval loss against position in the document, log axis, one
line per eval step) and the passkey heatmap (accuracy by prompt length and key depth)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node
import matplotlib.pyplot as plt  # noqa: E402 (after the backend choice)


def plot_loss_by_position(history: dict[int, dict[tuple[int, int], float]], path: Path) -> None:
    """Write a PNG of `history` (eval step -> (first, last) position -> mean loss) to `path`."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for step, buckets in sorted(history.items()):
        bounds = sorted(buckets)
        # each bucket drawn at its middle position (+1: the first bucket starts at 0, which a log axis cannot show)
        ax.plot([(lo + hi) / 2 + 1 for lo, hi in bounds], [buckets[b] for b in bounds], marker="o",
                label=f"step {step}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in document (bucket middle + 1)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("Eval loss by position")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_passkey(accuracy: dict[tuple[int, int], float], step: int, path: Path) -> None:
    """Write a heatmap PNG of passkey accuracy ((prompt length, depth %) -> share retrieved) to `path`."""
    lengths = sorted({n for n, _ in accuracy})
    depths = sorted({d for _, d in accuracy})
    grid = [[accuracy[(n, d)] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 4.5))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"Passkey retrieval, step {step}")
    fig.colorbar(image, ax=ax, label="share of keys retrieved")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
