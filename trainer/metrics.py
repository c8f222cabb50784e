"""Top-1, per-class and many/medium/few-shot accuracy (empty groups are None, never 0)."""

from __future__ import annotations

import numpy as np
import torch

from trainer.longtail import shot_groups


def per_class_accuracy(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C,) accuracy of each class on the evaluation set; NaN for a class with no evaluation images."""
    preds, labels = preds.cpu().long(), labels.cpu().long()
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).double()
    acc = (correct / total).numpy()
    acc[total.numpy() == 0] = np.nan
    return acc


def summarize(preds: torch.Tensor, labels: torch.Tensor, train_counts: np.ndarray) -> dict:
    """Overall top-1 plus the shot groups by training counts (mean per-class accuracy, as classifier-balancing)."""
    num_classes = len(train_counts)
    per_class = per_class_accuracy(preds, labels, num_classes)
    out = {"overall": 100.0 * float((preds.cpu() == labels.cpu()).double().mean())}
    for group, classes in shot_groups(train_counts).items():
        values = per_class[classes]
        values = values[~np.isnan(values)]
        out[group] = None if len(values) == 0 else 100.0 * float(values.mean())
    out["per_class"] = [None if np.isnan(a) else round(100.0 * float(a), 2) for a in per_class]
    return out
