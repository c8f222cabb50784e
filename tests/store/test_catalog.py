"""Catalog: list, describe and delete published labelsets; list staging ones."""

from __future__ import annotations

import pytest

from store import (
    LabelsetNotFoundError,
    LabelsetReader,
    LabelsetWriter,
    delete,
    describe,
    list_labelsets,
    list_staging,
)


def test_list_describe_and_delete(root, clean_spec, clean_data, views_spec, views_data, make_labelset):
    assert list_labelsets(root) == [] and list_staging(root) == []  # a root that does not exist yet
    make_labelset("b-views", views_spec, views_data)
    make_labelset("a-clean", clean_spec, clean_data)
    (root / "notes").mkdir()  # foreign folders are not labelsets
    listed = list_labelsets(root)
    assert [s.labelset_id for s in listed] == ["a-clean", "b-views"]
    a, b = listed
    assert (a.num_images, a.num_classes, a.temperature, a.mode, a.top_k) == (300, 10, 2.0, "clean", 3)
    assert (b.mode, b.views_per_image, b.logits_dtype) == ("views", 3, "float32")
    assert a.size_bytes > 0
    prov = describe(root, "a-clean")
    assert prov.class_counts[0] == 100 and prov.dataset_fingerprint == "fp:300" and prov.status == "complete"
    assert len(prov.checksums["logits"]) == 5

    delete(root, "a-clean")
    assert [s.labelset_id for s in list_labelsets(root)] == ["b-views"]
    assert not (root / "a-clean").exists() and not any((root / ".trash").iterdir())
    with pytest.raises(LabelsetNotFoundError):
        LabelsetReader(root, "a-clean")
    with pytest.raises(LabelsetNotFoundError):
        delete(root, "a-clean")
    with pytest.raises(LabelsetNotFoundError):
        describe(root, "a-clean")
    # a deleted id can be generated again
    make_labelset("a-clean", clean_spec, clean_data)
    assert LabelsetReader(root, "a-clean").verify() == 25


def test_list_staging_reports_progress(root, clean_spec, clean_data, write_chunks):
    w = LabelsetWriter.create(root, "in-progress", clean_spec)
    write_chunks(w, clean_data, [4, 0])
    [s] = list_staging(root)
    assert (s.labelset_id, s.chunks_done, s.num_chunks) == ("in-progress", 2, 5)
    assert list_labelsets(root) == []
