"""Where a student's soft targets come from: the SoftLabelSource contract and an in-memory implementation.

The Zarr labelset reader (`store.reader.LabelsetReader`) meets this protocol structurally, so `store` never
imports `trainer` and Stage III runs unchanged on either source.
"""

from __future__ import annotations

import copy
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
    """Teacher logits held in memory: SSD in one process, without a store."""

    mode = "clean"

    def __init__(self, logits: torch.Tensor | np.ndarray, temperature: float):
        logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
        self.num_classes = int(logits.shape[1])
        self.temperature = float(temperature)
        self._probs = torch.softmax(logits / self.temperature, dim=1).numpy()

    def __len__(self) -> int:
        return len(self._probs)

    @property
    def probs(self) -> np.ndarray:
        """Every stored row, (N, C) float32 (views: (N, K, C)), for summaries such as `store.content`."""
        return self._probs

    def soft_labels(self, image_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(image_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._probs)):
            bad = ids[(ids < 0) | (ids >= len(self._probs))][:5].tolist()
            raise IndexError(f"image ids {bad} are outside 0..{len(self._probs) - 1}")
        return self._probs[ids]


class InMemoryViewLabels(InMemorySoftLabels):
    """K teacher outputs per image, each for a recorded augmented view (FKD-style), held in memory.

    `view_params` (N, K, 5) are the store's view records [x0, y0, x1, y1, flip] in image pixels.
    """

    mode = "views"

    def __init__(self, logits, view_params, temperature: float):
        logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
        super().__init__(logits[:, 0], temperature)
        self._view_probs = torch.softmax(logits / self.temperature, dim=-1).numpy()
        self._view_params = np.asarray(view_params, dtype=np.float32)

    def view_soft_labels(self, image_ids: np.ndarray, view_indices: np.ndarray) -> np.ndarray:
        self.soft_labels(image_ids)  # same id checks
        return self._view_probs[np.asarray(image_ids), np.asarray(view_indices)]

    def view_params(self, image_ids: np.ndarray) -> np.ndarray:
        return self._view_params[np.asarray(image_ids)]

    @property
    def probs(self) -> np.ndarray:
        return self._view_probs


def read_all_rows(source: SoftLabelSource, num_images: int, block: int = 65536) -> np.ndarray:
    """Every row in image-id order, read in large id blocks (chunk-aligned for the store, one call in memory)."""
    rows = [source.soft_labels(np.arange(s, min(s + block, num_images))) for s in range(0, num_images, block)]
    return np.concatenate(rows).astype(np.float32, copy=False)


def topk_targets(classes: torch.Tensor, probs: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense KD targets (..., C) from a top-k form, built on the tensors' device (FKD's soft-label recovery).

    classes (..., k) int, probs (..., k), rest (...): target_c = probs_j where c = classes_j, else rest / (C - k);
    each row is then renormalised to sum to 1 (float16 storage leaves sums off by ~1e-3).
    """
    k = classes.shape[-1]
    fill = (rest.float() / max(num_classes - k, 1)).unsqueeze(-1)
    out = fill.expand(*classes.shape[:-1], num_classes).clone()
    out.scatter_(-1, classes.long(), probs.float())
    return out / out.sum(dim=-1, keepdim=True)


def _is_topk(source) -> bool:
    return getattr(source, "layout", "dense") == "topk"


class _TopKTable:
    """A top-k labelset's rows held on the training device (k classes, k probs, rest per row, never C wide);
    indexing gives dense targets for just the batch."""

    def __init__(self, source, num_images: int, device: torch.device, block: int = 65536):
        parts = [source.topk(np.arange(s, min(s + block, num_images))) for s in range(0, num_images, block)]
        classes, probs, rest = (np.concatenate(p) for p in zip(*parts))
        self.num_classes = source.num_classes
        self.classes = torch.as_tensor(classes.astype(np.int32), device=device)  # int32: half of int64 on device
        self.probs = torch.as_tensor(probs, device=device)
        self.rest = torch.as_tensor(rest, device=device)

    def __getitem__(self, index) -> torch.Tensor:
        return topk_targets(self.classes[index], self.probs[index], self.rest[index], self.num_classes)

    def class_mass(self) -> torch.Tensor:
        """Column sums (C,) of the dense rows, without building them (before the ~1e-3 renormalisation)."""
        k = self.classes.shape[-1]
        classes = self.classes.reshape(-1).long()
        fill = self.rest.float().reshape(-1) / max(self.num_classes - k, 1)
        mass = torch.full((self.num_classes,), float(fill.sum()), device=self.rest.device)
        # each row adds its probs on its k classes instead of its fill there
        return mass.index_add_(0, classes, self.probs.reshape(-1).float() - fill.repeat_interleave(k))


class TableTargets:
    """Clean mode: one soft label per image, loaded once onto the training device and indexed by the batch's ids.

    Rows are small next to the images (N × C float32: 2 MB for CIFAR-100-LT), so one bulk read keeps every training
    step free of storage I/O; a labelset too large for device memory would stream blocks instead. A top-k labelset
    (`source.layout == "topk"`) stays in its top-k form on the device and each batch's dense targets are scattered
    there (`topk_targets`), so no N × C rows exist on the host or the device.
    """

    def __init__(self, source: SoftLabelSource, num_images: int, device: torch.device):
        from trainer.distributed import is_distributed, read_rows_sharded

        self._topk = None
        if _is_topk(source):  # every rank reads the whole (small) top-k form
            self._topk = _TopKTable(source, num_images, device)
            return

        if is_distributed():  # each worker reads its own block of ids from the source, then they share the rows
            rows = read_rows_sharded(lambda ids: torch.as_tensor(source.soft_labels(ids.numpy())).float(), num_images)
        else:
            rows = torch.as_tensor(read_all_rows(source, num_images))
        self._table = rows.to(device)

    @property
    def table(self) -> torch.Tensor:
        """Every dense row (N, C); for a top-k source built on request (tests, small sets), never during training."""
        if self._topk is not None:
            return self._topk[torch.arange(self._topk.rest.shape[0], device=self._topk.rest.device)]
        return self._table

    def class_mass(self) -> torch.Tensor:
        """Sum of the soft labels over images, (C,) (the distilled label distribution)."""
        return self._topk.class_mass() if self._topk is not None else self._table.sum(0)

    def __call__(self, batch) -> torch.Tensor:
        if self._topk is not None:
            return self._topk[batch.ids]
        return self._table[batch.ids]


class ViewTargets:
    """Views mode: the batch replays one stored view per image (batch.views) and gets that view's soft label."""

    def __init__(self, source, num_images: int, device: torch.device):
        ids = np.arange(num_images)
        self.params = torch.as_tensor(source.view_params(ids), device=device)
        if _is_topk(source):  # (N, K, k) on the device; a batch's targets are scattered per step
            self.table = _TopKTable(source, num_images, device)
            return
        views = self.params.shape[1]
        rows = [source.view_soft_labels(ids, np.full(num_images, v)) for v in range(views)]
        self.table = torch.as_tensor(np.stack(rows, axis=1).astype(np.float32), device=device)

    def __call__(self, batch) -> torch.Tensor:
        return self.table[batch.ids, batch.views]


class OnlineTargets:
    """Online mode: the frozen teacher labels the very view the student sees (the official SSD code's regime).

    `batchnorm="eval"` normalises with the teacher's running statistics (the clean choice). `"train"` reproduces
    the reference code, whose stage III calls `model.train()` on the wrapper holding the teacher: BatchNorm uses
    each batch's statistics and updates running statistics, here of a private copy so the saved teacher is untouched.
    """

    def __init__(self, teacher: torch.nn.Module, temperature: float, batchnorm: str = "eval"):
        if batchnorm not in ("eval", "train"):
            raise ValueError(f"batchnorm must be 'eval' or 'train', got {batchnorm!r}")
        self.teacher = copy.deepcopy(teacher).train() if batchnorm == "train" else teacher.eval()
        self.temperature, self.mode = temperature, "official" if batchnorm == "train" else "online"

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        return torch.softmax(self.teacher(batch.images).float() / self.temperature, dim=1)
