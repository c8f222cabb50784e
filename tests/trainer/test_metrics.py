"""Shot-group accuracy by training counts; an empty group is None, never 0."""

import numpy as np
import pytest
import torch

from trainer.metrics import per_class_accuracy, summarize


def test_summarize_groups_and_empty_few():
    counts = np.array([500, 150, 60, 30])  # many, many, medium, medium: no few-shot class (as CIFAR IF10)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    preds = torch.tensor([0, 0, 1, 0, 2, 0, 0, 0])
    out = summarize(preds, labels, counts)
    assert out["overall"] == pytest.approx(50.0)
    assert out["many"] == pytest.approx(75.0) and out["medium"] == pytest.approx(25.0)
    assert out["few"] is None
    assert out["per_class"] == [100.0, 50.0, 50.0, 0.0]


def test_per_class_nan_for_absent_class():
    acc = per_class_accuracy(torch.tensor([1, 1]), torch.tensor([1, 1]), 3)
    assert np.isnan(acc[0]) and acc[1] == 1.0 and np.isnan(acc[2])
