"""Top-k labelsets (dense=False): writer -> reader -> student target, plain zarr-python, refusal to re-temper."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from store import DenseNotStoredError, LabelsetReader, LabelsetSpec, Provenance, softmax
from trainer.config import RunConfig
from trainer.soft_targets import TableTargets, ViewTargets, topk_targets

K = 3


@pytest.fixture(scope="module")
def topk_spec(clean_spec):
    return clean_spec.model_copy(update={"top_k": K, "dense": False})


def test_topk_spec_stores_only_the_topk_form_and_records_k(topk_spec):
    prov = Provenance.from_spec("t", topk_spec)
    assert prov.layout == "topk" and prov.top_k == K
    assert list(prov.arrays()) == ["topk_classes", "topk_probs", "topk_rest", "hard_labels"]
    assert prov.arrays()["topk_classes"].dtype == "int16"
    wide = topk_spec.model_copy(update={"num_classes": 40_000, "class_names": None, "class_counts": None})
    assert Provenance.from_spec("w", wide).arrays()["topk_classes"].dtype == "int32"


def test_run_config_labels_section_reaches_the_spec(clean_spec):
    cfg = RunConfig.model_validate({"labels": {"top_k": 4, "dense": False}}).model_dump(mode="json")
    spec = LabelsetSpec(**{**clean_spec.model_dump(exclude={"top_k"}), "config": cfg})
    assert spec.top_k == 4 and spec.dense is False
    with pytest.raises(ValueError, match="labels.top_k"):
        RunConfig.model_validate({"labels": {"dense": False}})


def test_round_trip_writer_reader_student_target(make_labelset, root, topk_spec, clean_data):
    make_labelset("top3", topk_spec, clean_data)
    reader = LabelsetReader(root, "top3")
    ids = np.array([5, 0, 299, 64])
    classes, probs, rest = reader.topk(ids)
    expected = softmax(clean_data["logits"][ids].astype(np.float16), topk_spec.temperature)
    order = np.argsort(-expected, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(classes, order)
    np.testing.assert_allclose(probs, np.take_along_axis(expected, order, 1), atol=1e-3)
    np.testing.assert_allclose(rest, 1 - np.take_along_axis(expected, order, 1).sum(1), atol=2e-3)

    target = topk_targets(torch.as_tensor(classes), torch.as_tensor(probs), torch.as_tensor(rest), 10)
    np.testing.assert_allclose(target.sum(1).numpy(), 1, atol=1e-6)
    t = target.numpy()
    np.testing.assert_allclose(np.take_along_axis(t, order, 1), np.take_along_axis(expected, order, 1), atol=2e-3)
    others = np.ones_like(t, dtype=bool)
    np.put_along_axis(others, order, False, 1)
    for row, mask, r in zip(t, others, rest):  # rest spread evenly over the other C - k classes
        np.testing.assert_allclose(row[mask], r / (10 - K), atol=1e-3)
    np.testing.assert_allclose(reader.soft_labels(ids), t, atol=1e-6)

    table = TableTargets(reader, 300, torch.device("cpu"))
    batch = type("B", (), {"ids": torch.as_tensor(ids)})
    np.testing.assert_allclose(table(batch).numpy(), t, atol=1e-6)
    np.testing.assert_allclose(table.class_mass().numpy(), table.table.sum(0).numpy(), atol=1e-2)
    assert reader.verify() == 4 * 5


def test_retempering_a_topk_labelset_is_refused(make_labelset, root, topk_spec, clean_data):
    make_labelset("top3-t", topk_spec, clean_data)
    reader = LabelsetReader(root, "top3-t")
    with pytest.raises(DenseNotStoredError, match="top-3 form"):
        reader.retempered([0], 4.0)
    with pytest.raises(DenseNotStoredError):
        reader.logits([0])
    assert reader.retempered([0], topk_spec.temperature).shape == (1, 10)  # its own T is fine


def test_views_topk_targets_follow_the_view(make_labelset, root, views_spec, views_data):
    spec = views_spec.model_copy(update={"dense": False})
    make_labelset("views-top2", spec, views_data)
    reader = LabelsetReader(root, "views-top2")
    targets = ViewTargets(reader, 50, torch.device("cpu"))
    batch = type("B", (), {"ids": torch.tensor([3, 3]), "views": torch.tensor([0, 2])})
    got = targets(batch).numpy()
    np.testing.assert_allclose(got, reader.view_soft_labels([3, 3], [0, 2]), atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-6)


def test_plain_zarr_python_reads_a_topk_labelset(make_labelset, root, topk_spec, clean_data):
    make_labelset("top3-plain", topk_spec, clean_data)
    code = f"""
import sys, zarr, numpy as np
assert not any(m == "store" or m.startswith(("store.", "trainer", "service")) for m in sys.modules)
g = zarr.open_group({str(root / "top3-plain")!r}, mode="r")
c, p, r = g["topk_classes"][:4], g["topk_probs"][:4], g["topk_rest"][:4]
assert c.dtype == np.int16 and p.dtype == np.float16 and r.shape == (4,)
assert g.attrs["top_k"] == 3 and g.attrs["dense"] is False
assert np.allclose(p.astype(np.float32).sum(1) + r, 1, atol=3e-3)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
