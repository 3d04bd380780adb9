"""Training figures: learning curves and the validation confusion matrix (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    """Accuracy and loss per epoch, train vs validation; the towers of a multi-tower run one after another."""
    epochs = list(range(1, len(history) + 1))
    starts = [i + 1 for i, h in enumerate(history) if i and h.get("tower", 1) != history[i - 1].get("tower", 1)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key in zip(axes, ("accuracy", "loss")):
        for start in starts:  # where the next tower's training begins
            ax.axvline(start - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.plot(epochs, [h[key] for h in history], label="train", color="#1f77b4")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation", color="#d62728")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("accuracy")
    axes[1].set_title("loss")
    axes[1].set_yscale("log")  # an early validation spike would otherwise flatten the rest
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "validation") -> None:
    """Confusion matrix heatmap, rows = true class, with counts in the cells."""
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({title})")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="black" if v > top / 2 else "white")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
