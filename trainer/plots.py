"""PNG plots a person would rather look at than read: per-class accuracy vs class size, label distributions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.longtail import FEW_SHOT, MANY_SHOT  # noqa: E402


def plot_per_class_accuracy(class_counts, per_class_acc, class_names, path: Path, title: str = "") -> Path:
    """Bars of test accuracy per class (head to tail) over the training class size on a log axis."""
    counts = np.asarray(class_counts)
    acc = np.array([np.nan if a is None else a for a in per_class_acc], dtype=float)
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(max(6, len(counts) * 0.12 + 4), 4))
    colours = np.where(counts > MANY_SHOT, "tab:blue", np.where(counts < FEW_SHOT, "tab:red", "tab:orange"))
    ax.bar(x, np.nan_to_num(acc), color=colours, alpha=0.8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("class (sorted as trained: head → tail)")
    if len(counts) <= 20:
        ax.set_xticks(x, class_names, rotation=45, ha="right", fontsize=8)
    twin = ax.twinx()
    twin.plot(x, counts, "k.-", label="training images")
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange", "tab:red")]
    ax.legend(handles, [f"many (>{MANY_SHOT})", "medium", f"few (<{FEW_SHOT})"], loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_label_distributions(class_counts, distilled_mass, path: Path) -> Path:
    """SSD Fig. 5: label mass per class for the original labels, class-balanced re-sampling, and the soft labels."""
    counts = np.asarray(class_counts, dtype=float)
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, counts / counts.sum(), "k-", label="original (hard labels)")
    ax.plot(x, np.full(len(counts), 1.0 / len(counts)), "b--", label="re-balanced (class-balanced sampling)")
    if distilled_mass is not None:
        mass = np.asarray(distilled_mass, dtype=float)
        ax.plot(x, mass / mass.sum(), "r-", label="distilled (sum of soft labels)")
    ax.set_yscale("log")
    ax.set_xlabel("class (head → tail)")
    ax.set_ylabel("share of label mass (log)")
    ax.legend(fontsize=8)
    ax.set_title("Label distributions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_class_sizes(sorted_counts, path: Path, title: str = "") -> Path:
    """The class-size curve of a training set (`ltd data inspect`): images per class, largest first, on a log axis,
    coloured by shot group with the many/few thresholds drawn."""
    counts = np.asarray(sorted_counts, dtype=float)
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = np.where(counts > MANY_SHOT, "tab:blue", np.where(counts < FEW_SHOT, "tab:red", "tab:orange"))
    if len(counts) <= 200:
        ax.bar(x, np.maximum(counts, 0.8), color=colours, width=1.0, alpha=0.8)
    else:  # a thousand bars are a blur: the curve, filled by group
        for colour in ("tab:blue", "tab:orange", "tab:red"):
            ax.fill_between(x, 0.8, np.maximum(counts, 0.8), where=colours == colour, color=colour, alpha=0.8, step="mid")
    ax.plot(x, np.maximum(counts, 0.8), "k-", linewidth=0.8)
    for level in (MANY_SHOT, FEW_SHOT):
        ax.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("class (sorted by size: head → tail)")
    ax.set_ylabel("training images (log)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange", "tab:red")]
    ax.legend(handles, [f"many (>{MANY_SHOT})", "medium", f"few (<{FEW_SHOT})"], loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
