"""Tempered softmax, top-k compression and its dense inverse, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from store.tempering import dense_from_topk, softmax, top_k


def test_softmax_hand_values_and_temperature():
    # logits (0, ln 3): at T=1 the odds are 1:3; at T=2 they are 1:sqrt(3)
    z = np.array([[0.0, np.log(3.0)]])
    np.testing.assert_allclose(softmax(z, 1.0), [[0.25, 0.75]], rtol=1e-6)
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(softmax(z, 2.0), [[1 / (1 + s3), s3 / (1 + s3)]], rtol=1e-6)
    assert softmax(z).dtype == np.float32


def test_softmax_is_stable_for_huge_logits_and_keeps_leading_shape():
    z = np.array([[1000.0, 1000.0, -1000.0]])
    np.testing.assert_allclose(softmax(z, 0.5), [[0.5, 0.5, 0.0]], atol=1e-7)
    views = np.random.default_rng(0).standard_normal((4, 3, 6))
    p = softmax(views, 3.0)
    assert p.shape == (4, 3, 6)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan")])
def test_softmax_rejects_non_positive_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        softmax(np.zeros((1, 3)), t)


def test_top_k_picks_largest_and_renormalises():
    probs = np.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.05, 0.05, 0.4]])
    idx, vals = top_k(probs, 2)
    np.testing.assert_array_equal(idx, [[1, 3], [0, 3]])
    np.testing.assert_allclose(vals, [[0.4 / 0.7, 0.3 / 0.7], [0.5 / 0.9, 0.4 / 0.9]], rtol=1e-6)
    assert idx.dtype == np.int32 and vals.dtype == np.float32


def test_top_k_ties_keep_lower_class_first_and_k_is_checked():
    idx, vals = top_k(np.array([0.25, 0.25, 0.25, 0.25]), 3)
    np.testing.assert_array_equal(idx, [0, 1, 2])
    np.testing.assert_allclose(vals, [1 / 3] * 3, rtol=1e-6)
    with pytest.raises(ValueError):
        top_k(np.ones((2, 3)) / 3, 4)


def test_dense_from_topk_inverts_top_k_with_zeros_elsewhere():
    probs = np.array([[[0.1, 0.6, 0.3]], [[0.7, 0.2, 0.1]]])  # (N=2, K=1, C=3)
    idx, vals = top_k(probs, 2)
    dense = dense_from_topk(idx, vals, 3)
    np.testing.assert_allclose(dense, [[[0.0, 0.6 / 0.9, 0.3 / 0.9]], [[0.7 / 0.9, 0.2 / 0.9, 0.0]]], rtol=1e-6)
    np.testing.assert_allclose(dense_from_topk(*top_k(probs, 3), 3), probs, rtol=1e-6)
    with pytest.raises(ValueError):
        dense_from_topk(np.array([[3]]), np.array([[1.0]]), 3)
