"""Long-tailed splits as LDAM-DRW builds them, and the many/medium/few class groups."""

from __future__ import annotations

import numpy as np

from store.content import FEW_SHOT, MANY_SHOT, shot_groups  # one definition, shared with the labelset summaries

__all__ = ["FEW_SHOT", "MANY_SHOT", "carve_validation", "lt_class_sizes", "lt_indices", "shot_groups"]


def lt_class_sizes(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """n_i = int(n_max * (1/IF)^(i/(C-1))), class 0 the head (Cao et al. 2019, IMBALANCECIFAR)."""
    if num_classes == 1:
        return [n_max]
    ratio = 1.0 / imbalance_factor
    return [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def lt_indices(labels: np.ndarray, imbalance_factor: float, seed: int = 0, n_max: int | None = None) -> np.ndarray:
    """Indices of the long-tailed subset, exactly as LDAM-DRW picks them.

    The legacy NumPy RNG is seeded once; for each class in class order its indices (file order) are shuffled with it
    and the first n_i are kept. `n_max` defaults to len(labels)/C as in LDAM; a smaller value shrinks the whole split.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    img_max = len(labels) // len(classes) if n_max is None else n_max
    sizes = lt_class_sizes(img_max, len(classes), imbalance_factor)
    rng = np.random.RandomState(seed)  # same stream as LDAM's np.random.seed(rand_number)
    kept = []
    for cls, size in zip(classes, sizes):
        idx = np.where(labels == cls)[0]
        rng.shuffle(idx)
        kept.append(idx[:size])
    return np.concatenate(kept)


def carve_validation(labels: np.ndarray, keep: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced validation split, and the LT training indices it leaves: `(keep, val)`.

    Validation images come from the training images the LT subset left out, as ImageNet-LT's val is built. A head
    class may have none to spare (CIFAR-10-LT keeps all 5,000 of class 0), so its shortfall comes from the last of
    its own LT images, which leave training: the split then differs from LDAM-DRW's in those classes only.
    """
    labels = np.asarray(labels)
    free = np.ones(len(labels), dtype=bool)
    free[keep] = False
    rng = np.random.RandomState(seed + 1)
    picked, lent = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.where(free & (labels == cls))[0])[:per_class]
        short = per_class - len(idx)
        if short:
            own = np.where(labels[keep] == cls)[0]  # positions in keep, LDAM's shuffled order
            if short >= len(own):
                raise ValueError(
                    f"class {cls} has {len(idx) + len(own)} training images in all, too few to hold out {per_class}"
                    f" and still train on it; lower data.val_per_class to < {len(idx) + len(own)}"
                )
            lent.append(own[-short:])
            idx = np.concatenate([idx, keep[own[-short:]]])
        picked.append(idx)
    if lent:
        keep = np.delete(keep, np.concatenate(lent))
    return keep, np.sort(np.concatenate(picked))
