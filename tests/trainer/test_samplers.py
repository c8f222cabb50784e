"""Sampler class distributions by hand, and drawn epochs checked statistically against them."""

from __future__ import annotations

import pytest
import torch

from trainer.samplers import SAMPLER_KINDS, class_sampling_probs, epoch_indices, sampler_class_probs

COUNTS = [400, 100, 25, 4]  # n^0.5 = 20, 10, 5, 2
LABELS = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))
DRAWS = 40_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_class_sampling_probs_hand_values():
    torch.testing.assert_close(class_sampling_probs([4, 1, 0], 1.0), torch.tensor([0.8, 0.2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(class_sampling_probs([4, 1, 0], 0.0), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        class_sampling_probs([4, 1, 0], 0.5), torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        sampler_class_probs("sqrt", COUNTS, 0.0), torch.tensor([20, 10, 5, 2], dtype=torch.float64) / 37
    )


def test_progressive_interpolates_instance_to_class():
    ib, cb = sampler_class_probs("instance", COUNTS, 0.3), sampler_class_probs("class", COUNTS, 0.3)
    torch.testing.assert_close(sampler_class_probs("progressive", COUNTS, 0.0), ib)
    torch.testing.assert_close(sampler_class_probs("progressive", COUNTS, 1.0), cb)
    torch.testing.assert_close(sampler_class_probs("progressive", COUNTS, 0.5), (ib + cb) / 2)
    with pytest.raises(ValueError, match="progress"):
        sampler_class_probs("progressive", COUNTS, 1.5)


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(ValueError, match="progressive"):
        epoch_indices(LABELS, "reverse", 0.0, _gen(0))


def _class_frequencies_fit(indices: torch.Tensor, expected: torch.Tensor) -> None:
    """Every class count within 5 binomial sigmas, and Pearson's chi-square (3 dof) below 30 (p ≈ 1e-6)."""
    observed = torch.bincount(LABELS[indices], minlength=4).double()
    n = len(indices)
    mean, sigma = n * expected, (n * expected * (1 - expected)).sqrt()
    assert torch.all((observed - mean).abs() <= 5 * sigma + 1e-9), (observed, mean)
    chi2 = ((observed - mean) ** 2 / mean).sum().item()
    assert chi2 < 30.0, chi2


@pytest.mark.parametrize(
    ("kind", "progress"),
    [("instance", 0.0), ("class", 0.0), ("sqrt", 0.0)] + [("progressive", t) for t in (0.0, 0.5, 1.0)],
)
def test_epoch_class_frequencies_match_the_kind(kind, progress):
    indices = epoch_indices(LABELS, kind, progress, _gen(1), num_samples=DRAWS)
    assert indices.dtype == torch.long and indices.device.type == "cpu" and len(indices) == DRAWS
    _class_frequencies_fit(indices, sampler_class_probs(kind, COUNTS, progress))


def test_class_balanced_epoch_is_not_instance_balanced():
    # Guards the fit test itself: instance frequencies are far outside the class-balanced band.
    indices = epoch_indices(LABELS, "instance", 0.0, _gen(2), num_samples=DRAWS)
    with pytest.raises(AssertionError):
        _class_frequencies_fit(indices, sampler_class_probs("class", COUNTS, 0.0))


def test_images_within_a_class_are_drawn_uniformly():
    indices = epoch_indices(LABELS, "class", 0.0, _gen(3), num_samples=DRAWS)
    tail = indices[LABELS[indices] == 3]  # 4 images sharing 1/4 of the draws
    per_image = torch.bincount(tail - 525, minlength=4).double()
    expected = len(tail) / 4
    assert torch.all((per_image - expected).abs() <= 5 * (expected * 0.75) ** 0.5)


def test_instance_epoch_is_a_permutation_and_longer_epochs_chain_them():
    indices = epoch_indices(LABELS, "instance", 0.0, _gen(4))
    assert torch.equal(indices.sort().values, torch.arange(len(LABELS)))
    assert not torch.equal(indices, torch.arange(len(LABELS)))
    double = epoch_indices(LABELS, "instance", 0.0, _gen(4), num_samples=2 * len(LABELS))
    assert torch.equal(torch.bincount(double), torch.full((len(LABELS),), 2))


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_same_seed_same_epoch_and_default_length(kind):
    first = epoch_indices(LABELS.numpy(), kind, 0.5, _gen(7))
    assert len(first) == len(LABELS)
    assert torch.equal(first, epoch_indices(LABELS, kind, 0.5, _gen(7)))
    assert not torch.equal(first, epoch_indices(LABELS, kind, 0.5, _gen(8)))
