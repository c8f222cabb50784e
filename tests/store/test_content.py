"""The label-content summary: hand-checked numbers on small tables, and the same summary published with a labelset."""

from __future__ import annotations

import math

import numpy as np
import pytest

from store import LabelsetReader, describe
from store.content import class_sums, label_content, summarize


def test_one_hot_labels_carry_nothing_beyond_the_hard_label():
    labels = np.repeat(np.arange(3), [150, 50, 5])
    probs = np.eye(3, dtype=np.float32)[labels]
    c = label_content(probs, labels)
    assert c["overall"] == {"rows": 205, "max_prob": 1.0, "entropy": 0.0, "off_argmax_mass": 0.0,
                            "off_label_mass": 0.0, "argmax_differs": 0.0}
    assert [c["groups"][g]["classes"] for g in ("many", "medium", "few")] == [1, 1, 1]
    assert c["groups"]["few"]["teacher_wrong"]["rows"] == 0 and c["groups"]["few"]["teacher_wrong"]["entropy"] is None
    assert c["uniform_entropy"] == round(math.log(3), 4)


def test_right_and_wrong_rows_are_summarised_apart():
    # two images of class 0: one the teacher gets right (0.7 on class 0), one it gets wrong (0.6 on class 1)
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]], dtype=np.float32)
    c = label_content(probs, np.array([0, 0]), class_names=["cat", "dog", "car"])
    right, wrong = c["groups"]["few"]["teacher_right"], c["groups"]["few"]["teacher_wrong"]
    assert (right["rows"], right["max_prob"], right["off_label_mass"], right["argmax_differs"]) == (1, 0.7, 0.3, 0.0)
    assert (wrong["rows"], wrong["max_prob"], wrong["off_label_mass"], wrong["argmax_differs"]) == (1, 0.6, 0.7, 1.0)
    entropy = -sum(p * math.log(p) for p in (0.7, 0.2, 0.1))
    assert right["entropy"] == pytest.approx(entropy, abs=1e-4)
    assert c["overall"]["off_label_mass"] == 0.5 and c["overall"]["argmax_differs"] == 0.5
    assert c["classes"][0]["class"] == "cat" and c["classes"][1]["rows"] == 0


def test_chunk_sums_add_up_to_the_whole_and_views_count_images_once():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 90)
    probs = rng.dirichlet(np.ones(4), size=(90, 3)).astype(np.float32)
    whole = class_sums(probs, labels, 4)
    parts = class_sums(probs[:40], labels[:40], 4) + class_sums(probs[40:], labels[40:], 4)
    np.testing.assert_allclose(parts, whole)
    c = label_content(probs, labels)
    assert c["overall"]["rows"] == 270  # every view is a row
    assert sum(g["classes"] for g in c["groups"].values()) == 4
    assert summarize(whole, views_per_image=3)["groups"] == c["groups"]


def test_a_published_labelset_records_what_its_rows_contain(root, clean_spec, clean_data, make_labelset):
    make_labelset("content-t2", clean_spec, clean_data)
    stored = describe(root, "content-t2").content
    reader = LabelsetReader(root, "content-t2")
    ids = np.arange(clean_spec.num_images)
    expected = label_content(reader.soft_labels(ids), clean_data["hard_labels"], clean_spec.class_names)
    assert _flat(stored).keys() == _flat(expected).keys()
    for key, value in _flat(stored).items():  # the reader renormalises fp16 rows: equal to the 4th decimal
        assert value == pytest.approx(_flat(expected)[key], abs=2e-4), key
    assert stored["classes"][0]["class"] == "c0" and stored["overall"]["rows"] == clean_spec.num_images


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}/{i}").items()}
    return {prefix: tree}
