"""Catalog: list, describe and delete published labelsets; list staging ones."""

from __future__ import annotations

import pytest

from store import (
    LabelsetExistsError,
    LabelsetNotFoundError,
    LabelsetReader,
    LabelsetWriter,
    delete,
    describe,
    list_labelsets,
    list_staging,
    list_trash,
    purge,
    restore,
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

    entry = delete(root, "a-clean")
    assert [s.labelset_id for s in list_labelsets(root)] == ["b-views"]
    assert not (root / "a-clean").exists() and [e.trash_id for e in list_trash(root)] == [entry.trash_id]
    with pytest.raises(LabelsetNotFoundError):
        LabelsetReader(root, "a-clean")
    with pytest.raises(LabelsetNotFoundError):
        delete(root, "a-clean")
    with pytest.raises(LabelsetNotFoundError):
        describe(root, "a-clean")
    # a deleted id can be generated again
    make_labelset("a-clean", clean_spec, clean_data)
    assert LabelsetReader(root, "a-clean").verify() == 25


def test_a_deleted_labelset_is_restored_bit_for_bit_until_it_is_purged(root, clean_spec, clean_data, make_labelset):
    make_labelset("keep-me", clean_spec, clean_data)
    files = {p.relative_to(root / "keep-me"): p.read_bytes() for p in (root / "keep-me").rglob("*") if p.is_file()}
    entry = delete(root, "keep-me", retention_days=7)
    assert entry.labelset_id == "keep-me" and entry.size_bytes > 0
    assert (entry.purge_after - entry.deleted).days == 7
    assert list_labelsets(root) == [] and purge(root) == []  # not yet due
    restored = restore(root, "keep-me")
    assert restored.labelset_id == "keep-me" and list_trash(root) == []
    again = {p.relative_to(root / "keep-me"): p.read_bytes() for p in (root / "keep-me").rglob("*") if p.is_file()}
    assert again == files and LabelsetReader(root, "keep-me").verify() == 25
    with pytest.raises(LabelsetNotFoundError, match="no deleted labelset"):
        restore(root, "keep-me")

    first = delete(root, "keep-me")
    make_labelset("keep-me", clean_spec, clean_data)  # the id published again: the old copy waits in the trash
    with pytest.raises(LabelsetExistsError, match="published again"):
        restore(root, "keep-me")
    second = delete(root, "keep-me", retention_days=0)
    assert [e.trash_id for e in list_trash(root)] == [second.trash_id, first.trash_id]  # newest first
    assert [e.trash_id for e in purge(root)] == [second.trash_id]  # only the one past its retention
    assert restore(root, "keep-me").labelset_id == "keep-me"  # the older copy is still whole
    delete(root, "keep-me")
    assert len(purge(root, everything=True)) == 1 and list_trash(root) == []
    assert not any((root / ".trash").iterdir())


def test_list_staging_reports_progress(root, clean_spec, clean_data, write_chunks):
    w = LabelsetWriter.create(root, "in-progress", clean_spec)
    write_chunks(w, clean_data, [4, 0])
    [s] = list_staging(root)
    assert (s.labelset_id, s.chunks_done, s.num_chunks) == ("in-progress", 2, 5)
    assert list_labelsets(root) == []
