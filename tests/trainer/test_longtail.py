"""The LT split is LDAM-DRW's, to the index: golden totals, the seeded pick, and the shot groups."""

import numpy as np
import pytest

from trainer.longtail import carve_validation, lt_class_sizes, lt_indices, shot_groups


@pytest.mark.parametrize(
    "classes, n_max, totals",
    [(100, 500, {100: 10847, 50: 12608, 10: 19573}), (10, 5000, {100: 12406, 50: 13996, 10: 20431})],
)
def test_golden_totals(classes, n_max, totals):
    labels = np.repeat(np.arange(classes), n_max)
    for factor, total in totals.items():
        assert sum(lt_class_sizes(n_max, classes, factor)) == total
        assert len(lt_indices(labels, factor)) == total


def ldam_reference(labels, imb_factor, rand_number=0):
    """IMBALANCECIFAR as LDAM-DRW writes it (global legacy seed, per-class shuffle), for comparison."""
    np.random.seed(rand_number)
    cls_num = len(np.unique(labels))
    img_max = len(labels) / cls_num
    counts = [int(img_max * (imb_factor ** (i / (cls_num - 1.0)))) for i in range(cls_num)]
    picked = []
    for the_class, the_img_num in zip(np.unique(labels), counts):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        picked.append(idx[:the_img_num])
    return np.concatenate(picked)


@pytest.mark.parametrize("seed", [0, 3])
def test_same_indices_as_ldam(seed):
    labels = np.random.RandomState(7).permutation(np.repeat(np.arange(10), 300))
    ours = lt_indices(labels, 50, seed=seed)
    np.testing.assert_array_equal(ours, ldam_reference(labels, 1 / 50, seed))
    assert not np.array_equal(ours, lt_indices(labels, 50, seed=seed + 1))


def test_shot_groups_cifar100():
    for factor, expected in {100: (35, 35, 30), 50: (41, 41, 18), 10: (69, 31, 0)}.items():
        groups = shot_groups(np.array(lt_class_sizes(500, 100, factor)))
        assert tuple(len(groups[g]) for g in ("many", "medium", "few")) == expected


def test_validation_comes_from_images_outside_the_lt_split():
    labels = np.repeat(np.arange(5), 100)
    keep = lt_indices(labels, 10, n_max=50)
    train, val = carve_validation(labels, keep, per_class=20, seed=0)
    np.testing.assert_array_equal(train, keep)  # every class had 20 to spare: the LT split is untouched
    assert not set(val) & set(keep)
    assert np.bincount(labels[val]).tolist() == [20] * 5


def test_a_head_class_with_nothing_to_spare_lends_its_last_lt_images():
    """CIFAR-10-LT keeps every image of class 0: its validation images must come out of its LT images, the rest stay."""
    labels = np.repeat(np.arange(5), 100)
    keep = lt_indices(labels, 10)  # class 0 keeps all 100, class 1 keeps 56
    train, val = carve_validation(labels, keep, per_class=50, seed=0)
    assert not set(val) & set(train)
    assert np.bincount(labels[val]).tolist() == [50] * 5
    sizes = np.bincount(labels[keep])
    assert np.bincount(labels[train]).tolist() == [50, 56 - 6, *sizes[2:]]  # class 1 had 44 outside, lends 6
    np.testing.assert_array_equal(train, [i for i in keep if i in set(train)])  # image order kept
    lent = set(keep) - set(train)
    assert lent == set(keep[labels[keep] == 0][-50:]) | set(keep[labels[keep] == 1][-6:])
    with pytest.raises(ValueError, match="lower data.val_per_class to < 100"):
        carve_validation(labels, keep, per_class=100, seed=0)
