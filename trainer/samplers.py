"""Instance-, class-, square-root- and progressively-balanced sampling (Kang et al. 2020, eqs. 1-2) as epoch indices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

SAMPLER_EXPONENTS = {"instance": 1.0, "class": 0.0, "sqrt": 0.5, "reversed": -1.0}  # q of p_j ∝ n_j^q (reversed: BBN)
SAMPLER_KINDS = (*SAMPLER_EXPONENTS, "progressive")


def class_sampling_probs(class_counts: torch.Tensor | np.ndarray | Sequence[int], q: float) -> torch.Tensor:
    """(C,) float64 p_j = n_j^q / Σ_i n_i^q (Kang et al. eq. 1); an empty class gets 0, not 0^0 = 1."""
    counts = class_counts.detach().cpu() if isinstance(class_counts, torch.Tensor) else np.asarray(class_counts)
    n = torch.as_tensor(counts, dtype=torch.float64)
    mass = torch.where(n > 0, n.pow(q), torch.zeros_like(n))
    return mass / mass.sum()


def sampler_class_probs(
    kind: str, class_counts: torch.Tensor | np.ndarray | Sequence[int], progress: float
) -> torch.Tensor:
    """(C,) class distribution of one sampler kind; progressive = (1-t/T)·p_IB + (t/T)·p_CB (Kang et al. eq. 2)."""
    if kind == "progressive":
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must lie in [0, 1] (the fraction of epochs done), got {progress}")
        return (1.0 - progress) * class_sampling_probs(class_counts, 1.0) + progress * class_sampling_probs(
            class_counts, 0.0
        )
    if kind not in SAMPLER_EXPONENTS:
        raise ValueError(f"unknown sampler kind {kind!r}; known kinds: {', '.join(SAMPLER_KINDS)}")
    return class_sampling_probs(class_counts, SAMPLER_EXPONENTS[kind])


def epoch_indices(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    kind: str,
    progress: float,
    generator: torch.Generator,
    num_samples: int | None = None,
) -> torch.Tensor:
    """CPU LongTensor of dataset indices for one epoch (default length len(labels)) drawn by sampler `kind`.

    "instance" is a random permutation (without replacement, the standard epoch; longer epochs chain permutations).
    The other kinds draw i.i.d. with replacement, image i with weight p_{y_i} / n_{y_i}, so class j comes up with
    probability p_j and its images uniformly. Unlike classifier-balancing's ClassAwareSampler (round-robin over
    classes, epoch = n_max × C), a class-balanced epoch here has the dataset's length, as SSD's distributed sampler.
    """
    labels = labels.cpu().long() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels)).long()
    size = len(labels)
    num_samples = size if num_samples is None else num_samples
    if kind == "instance":
        rounds = max(1, math.ceil(num_samples / size))
        return torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])[:num_samples]
    counts = torch.bincount(labels).double()
    probs = sampler_class_probs(kind, counts, progress)
    # Every class present in `labels` has n > 0, so the division is safe for the classes that are indexed.
    weights = (probs / counts.clamp(min=1.0))[labels]
    sampler = WeightedRandomSampler(weights, num_samples, replacement=True, generator=generator)
    return torch.tensor(list(sampler), dtype=torch.long)
