"""Tempered softmax and top-k compression of teacher outputs (pure numpy, no files)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) over the last axis, float32; the row max is subtracted first so exp never overflows.

    This is the KD soft target p_i = exp(z_i/T) / sum_j exp(z_j/T) (Hinton et al. 2015; SSD eq. for the
    distillation target). Any leading shape is kept: (N, C) or (N, K, C).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row (last axis), largest first, with values renormalised to sum to 1.

    Returns (indices int32 (..., k), values float32 (..., k)); ties keep the lower class index first.
    This is FKD's `marginal_renorm` label format.
    """
    p = np.asarray(probs, dtype=np.float32)
    num_classes = p.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in 1..{num_classes}, got {k}")
    # a stable descending sort gives a deterministic order for ties, which keeps resumed runs byte-identical
    idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(p, idx, axis=-1)
    vals = vals / vals.sum(axis=-1, keepdims=True)
    return idx.astype(np.int32), vals.astype(np.float32)


def dense_from_topk(indices: np.ndarray, values: np.ndarray, num_classes: int) -> np.ndarray:
    """Scatter top-k (indices, values) back into dense float32 rows of width `num_classes` (zeros elsewhere)."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"top-k indices must lie in 0..{num_classes - 1}")
    dense = np.zeros(idx.shape[:-1] + (num_classes,), dtype=np.float32)
    np.put_along_axis(dense, idx, np.asarray(values, dtype=np.float32), axis=-1)
    return dense


def top_k_mass(probs: np.ndarray, k: int, index_dtype: str = "int32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest probabilities of each row (largest first, not renormalised) and the mass of the rest.

    Returns (classes (..., k) `index_dtype`, probs float32 (..., k), rest float32 (...,) = 1 - sum of the k).
    argpartition keeps this O(C) per row, so wide rows (C = 8,142) stay cheap; equal probabilities are ordered by
    class index, so the result is deterministic and a resumed generation stays byte-identical.
    """
    p = np.asarray(probs, dtype=np.float32)
    num_classes = p.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in 1..{num_classes}, got {k}")
    idx = np.argpartition(-p, k - 1, axis=-1)[..., :k] if k < num_classes else np.broadcast_to(
        np.arange(num_classes), p.shape).copy()
    idx.sort(axis=-1)  # class order first, so the stable sort below breaks ties by class index
    vals = np.take_along_axis(p, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, axis=-1), np.take_along_axis(vals, order, axis=-1)
    rest = np.clip(1.0 - vals.sum(axis=-1), 0.0, 1.0).astype(np.float32)
    return idx.astype(index_dtype), vals, rest


def dense_from_topk_mass(classes: np.ndarray, probs: np.ndarray, rest: np.ndarray, num_classes: int) -> np.ndarray:
    """Dense float32 rows from a top-k labelset: `probs` on the k classes, `rest` spread evenly over the other
    C - k (FKD's soft-label recovery), each row renormalised to sum to 1 (float16 storage rounds the sums)."""
    idx = np.asarray(classes, dtype=np.int64)
    k = idx.shape[-1]
    fill = np.asarray(rest, dtype=np.float32)[..., None] / max(num_classes - k, 1)
    dense = np.broadcast_to(fill, idx.shape[:-1] + (num_classes,)).copy()
    np.put_along_axis(dense, idx, np.asarray(probs, dtype=np.float32), axis=-1)
    return dense / dense.sum(axis=-1, keepdims=True)
