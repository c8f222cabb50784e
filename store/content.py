"""What a labelset's soft labels carry: confidence, entropy and disagreement with the hard labels, by shot group.

A labelset can be near one-hot (a teacher that memorised its training images: nothing beyond the hard label to
distil) or soft and partly wrong (knowledge and noise). These numbers tell which, per many/medium/few group and
separately for the images the teacher gets right and wrong. Pure numpy; the writer computes them at publish.
"""

from __future__ import annotations

import math

import numpy as np

MANY_SHOT = 100  # classes with more than this many training images are "many"
FEW_SHOT = 20  # classes with fewer than this many are "few"; the rest (20..100 inclusive) are "medium"
STATS = ("max_prob", "entropy", "off_argmax_mass", "off_label_mass")
MAX_CLASSES_LISTED = 100  # per-class lines are kept for up to this many classes (attributes stay small)


def shot_groups(class_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Class indices of the many (>100), medium (20..100) and few (<20) groups, by training counts."""
    counts = np.asarray(class_counts)
    return {
        "many": np.where(counts > MANY_SHOT)[0],
        "medium": np.where((counts >= FEW_SHOT) & (counts <= MANY_SHOT))[0],
        "few": np.where(counts < FEW_SHOT)[0],
    }


def class_sums(probs: np.ndarray, hard_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Sums (C, 2, 1 + len(STATS)) by hard-label class and by teacher wrong (0) / right (1): [rows, *STATS].

    `probs` is (N, C) or, for a views labelset, (N, K, C): each view counts as one row with its image's label.
    Sums (not means) so chunks can be added up in any order.
    """
    p = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(hard_labels, dtype=np.int64)
    if p.ndim == 3:
        labels = np.repeat(labels, p.shape[1])
        p = p.reshape(-1, p.shape[-1])
    top = p.max(axis=1)
    right = (p.argmax(axis=1) == labels).astype(np.int64)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    values = np.stack([np.ones_like(top), top, entropy, 1 - top, 1 - p[np.arange(len(p)), labels]], axis=1)
    out = np.zeros((num_classes, 2, values.shape[1]), dtype=np.float64)
    np.add.at(out, (labels, right), values)
    return out


def _means(sums: np.ndarray) -> dict:
    """{rows, *STATS, argmax_differs} of summed [rows, *STATS] rows (shape (2, 5): wrong, right)."""
    total = sums.sum(axis=0)
    rows = int(round(total[0]))
    if rows == 0:
        return {"rows": 0, **{name: None for name in STATS}, "argmax_differs": None}
    means = {name: round(float(total[i + 1] / rows), 4) for i, name in enumerate(STATS)}
    return {"rows": rows, **means, "argmax_differs": round(float(sums[0, 0] / rows), 4)}


def summarize(sums: np.ndarray, views_per_image: int = 1, class_names: list[str] | None = None) -> dict:
    """The content summary of a labelset from its `class_sums` added over all chunks.

    Shot groups follow the training images per class, which the sums hold (rows / views per image).
    """
    counts = sums[:, :, 0].sum(axis=1) / views_per_image
    out = {"uniform_entropy": round(math.log(sums.shape[0]), 4), "overall": _means(sums.sum(axis=0)), "groups": {}}
    for group, classes in shot_groups(counts).items():
        g = sums[classes].sum(axis=0) if len(classes) else np.zeros(sums.shape[1:])
        out["groups"][group] = {"classes": int(len(classes)), "all": _means(g),
                                "teacher_right": _means(g * np.array([[0], [1]])),
                                "teacher_wrong": _means(g * np.array([[1], [0]]))}
    if sums.shape[0] <= MAX_CLASSES_LISTED:
        names = class_names or [str(c) for c in range(sums.shape[0])]
        out["classes"] = [{"class": name, **_means(sums[c])} for c, name in enumerate(names)]
    return out


def label_content(probs: np.ndarray, hard_labels: np.ndarray, class_names: list[str] | None = None) -> dict:
    """The content summary of soft labels held in memory (N, C) or (N, K, C); see `summarize`."""
    views = np.shape(probs)[1] if np.ndim(probs) == 3 else 1
    return summarize(class_sums(probs, hard_labels, np.shape(probs)[-1]), views, class_names)
