"""Where a student's soft targets come from: the SoftLabelSource contract and an in-memory implementation.

The Zarr labelset reader (`store.reader.LabelsetReader`) meets this protocol structurally, so `store` never
imports `trainer` and Stage III runs unchanged on either source.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class SoftLabelSource(Protocol):
    """Soft labels keyed by training `image_id`.

    Attributes
    ----------
    num_classes : int
        C, the width of every row.
    temperature : float
        T at which rows are returned: row = softmax(teacher_logits / T).

    Methods
    -------
    soft_labels(image_ids) -> np.ndarray
        float32 array (len(image_ids), C) whose rows sum to 1, in the order of `image_ids`.
        Unknown or out-of-range ids raise (IndexError or KeyError subclasses), never return wrong rows.
    """

    num_classes: int
    temperature: float

    def soft_labels(self, image_ids: np.ndarray) -> np.ndarray: ...


class InMemorySoftLabels:
    """Teacher logits held in memory (tests, and the `online`-free fallback before a store exists)."""

    def __init__(self, logits: torch.Tensor | np.ndarray, temperature: float):
        logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
        self.num_classes = int(logits.shape[1])
        self.temperature = float(temperature)
        self._probs = torch.softmax(logits / self.temperature, dim=1).numpy()

    def __len__(self) -> int:
        return len(self._probs)

    def soft_labels(self, image_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(image_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._probs)):
            bad = ids[(ids < 0) | (ids >= len(self._probs))][:5].tolist()
            raise IndexError(f"image ids {bad} are outside 0..{len(self._probs) - 1}")
        return self._probs[ids]
