"""Staged writing: round trip of every array, plain-zarr readability, atomic publish, resume, typed errors."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from store import (
    CorruptChunkError,
    IncompleteLabelsetError,
    InvalidLabelsetIdError,
    LabelsetExistsError,
    LabelsetNotFoundError,
    LabelsetReader,
    LabelsetWriter,
    list_labelsets,
    list_staging,
)


def _softmax64(z, t):
    """Reference tempered softmax in float64, written out independently of store.tempering."""
    e = np.exp((z - z.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


def _chunk_files(group: Path) -> dict[str, bytes]:
    return {str(p.relative_to(group)): p.read_bytes() for p in sorted(group.rglob("c/**/*")) if p.is_file()}


def test_round_trip_soft_labels_retempering_and_topk(root, clean_spec, clean_data, make_labelset):
    make_labelset("cifar-t2", clean_spec, clean_data)
    r = LabelsetReader(root, "cifar-t2")
    ids = np.array([299, 0, 63, 64, 150, 0])
    z = clean_data["logits"][ids].astype(np.float64)
    soft = r.soft_labels(ids)
    assert soft.dtype == np.float32 and soft.shape == (6, 10)
    np.testing.assert_allclose(soft, _softmax64(z, 2.0), atol=5e-3)  # fp16 logits and fp16 storage
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    stored = r.logits(ids).astype(np.float64)
    np.testing.assert_array_equal(stored, clean_data["logits"][ids].astype(np.float16))
    np.testing.assert_allclose(soft, _softmax64(stored, 2.0), atol=1e-3)
    np.testing.assert_allclose(r.retempered(ids, 5.0), _softmax64(stored, 5.0), atol=1e-6)
    np.testing.assert_array_equal(r.hard_labels(ids), clean_data["hard_labels"][ids])
    idx, vals = r.top_k(ids, 3)
    ref = _softmax64(stored, 2.0)
    np.testing.assert_array_equal(idx, np.argsort(-ref, axis=1)[:, :3])
    top = np.take_along_axis(ref, idx.astype(np.int64), 1)
    np.testing.assert_allclose(vals, top / top.sum(1, keepdims=True), atol=2e-3)
    idx1, _ = r.top_k(ids, 1, temperature=0.5)
    np.testing.assert_array_equal(idx1[:, 0], np.argmax(stored, 1))


def test_plain_zarr_reads_arrays_and_provenance_without_ltd(root, clean_spec, clean_data, make_labelset):
    make_labelset("plain", clean_spec, clean_data)
    g = zarr.open_group(str(root / "plain"), mode="r")
    attrs = g.attrs.asdict()
    assert attrs["status"] == "complete" and attrs["temperature"] == 2.0 and attrs["num_classes"] == 10
    assert attrs["class_counts"][0] == 100 and attrs["config"]["teacher"]["arch"] == "resnet32"
    assert sorted(g.array_keys()) == ["hard_labels", "logits", "soft_labels", "topk_indices", "topk_values"]
    soft, logits = g["soft_labels"][:], g["logits"][:]
    assert soft.dtype == np.float16 and soft.shape == (300, 10) and g["soft_labels"].chunks == (64, 10)
    np.testing.assert_allclose(soft, _softmax64(clean_data["logits"].astype(np.float64), 2.0), atol=5e-3)
    np.testing.assert_array_equal(g["hard_labels"][:], clean_data["hard_labels"])
    # the recorded checksum of chunk 4 (rows 256..299) is sha256 of its decoded little-endian numbers
    assert hashlib.sha256(logits[256:].tobytes()).hexdigest() == attrs["checksums"]["logits"][4]
    assert len(attrs["checksums"]["soft_labels"]) == 5


def test_nothing_is_visible_before_publish_and_everything_after(root, clean_spec, clean_data, write_chunks):
    w = LabelsetWriter.create(root, "atomic", clean_spec)
    write_chunks(w, clean_data)
    assert not (root / "atomic").exists()
    assert list_labelsets(root) == []
    with pytest.raises(LabelsetNotFoundError):
        LabelsetReader(root, "atomic")
    assert [(s.labelset_id, s.chunks_done, s.num_chunks) for s in list_staging(root)] == [("atomic", 5, 5)]
    prov = w.publish()
    assert prov.status == "complete" and prov.published is not None
    assert [s.labelset_id for s in list_labelsets(root)] == ["atomic"]
    assert list_staging(root) == [] and not (root / ".staging" / "atomic").exists()
    assert LabelsetReader(root, "atomic").provenance.checksums == prov.checksums


def test_resume_after_dropping_the_writer_equals_an_uninterrupted_run(root, clean_spec, clean_data, write_chunks,
                                                                      make_labelset):
    make_labelset("whole", clean_spec, clean_data)
    w = LabelsetWriter.create(root, "resumed", clean_spec)
    write_chunks(w, clean_data, [0, 2])
    with pytest.raises(IncompleteLabelsetError) as err:
        w.publish()
    assert err.value.missing == [1, 3, 4]
    del w
    w = LabelsetWriter.open(root, "resumed")
    assert pickle.loads(pickle.dumps(w)).missing_chunks() == [1, 3, 4]  # what a Ray task receives
    assert w.missing_chunks() == [1, 3, 4] and w.done_chunks() == [0, 2]
    write_chunks(w, clean_data, w.missing_chunks())
    w.publish()
    whole, resumed = LabelsetReader(root, "whole"), LabelsetReader(root, "resumed")
    assert whole.provenance.checksums == resumed.provenance.checksums
    assert _chunk_files(root / "whole") == _chunk_files(root / "resumed")
    assert len(_chunk_files(root / "whole")) == 5 * 5


def test_create_with_exist_ok_resumes_only_an_identical_spec(root, clean_spec, clean_data, write_chunks):
    w = LabelsetWriter.create(root, "again", clean_spec)
    write_chunks(w, clean_data, [1])
    with pytest.raises(LabelsetExistsError, match="already staged"):
        LabelsetWriter.create(root, "again", clean_spec)
    assert LabelsetWriter.create(root, "again", clean_spec, exist_ok=True).missing_chunks() == [0, 2, 3, 4]
    with pytest.raises(LabelsetExistsError, match="different spec"):
        LabelsetWriter.create(root, "again", clean_spec.model_copy(update={"temperature": 4.0}), exist_ok=True)


def test_published_ids_are_never_overwritten(root, clean_spec, clean_data, make_labelset, write_chunks):
    make_labelset("taken", clean_spec, clean_data)
    with pytest.raises(LabelsetExistsError, match="already published"):
        LabelsetWriter.create(root, "taken", clean_spec)
    # any folder already holding the id's name blocks it too: ids map to folders, never merged into
    (root / "late").mkdir()
    (root / "late" / "marker").write_text("someone else's folder")
    with pytest.raises(LabelsetExistsError):
        LabelsetWriter.create(root, "late", clean_spec)


def test_publish_refuses_a_target_that_appeared_meanwhile(root, clean_spec, clean_data, write_chunks):
    w = LabelsetWriter.create(root, "race", clean_spec)
    write_chunks(w, clean_data)
    (root / "race").mkdir()  # an empty folder would be silently replaced by os.rename
    with pytest.raises(LabelsetExistsError):
        w.publish()
    assert (root / ".staging" / "race" / "labelset" / "zarr.json").is_file()


@pytest.mark.parametrize("bad", ["", "../escape", ".hidden", "a/b", "x" * 129, "sp ace", "é"])
def test_bad_labelset_ids_are_rejected_before_touching_disk(root, clean_spec, bad):
    with pytest.raises(InvalidLabelsetIdError):
        LabelsetWriter.create(root, bad, clean_spec)
    with pytest.raises(InvalidLabelsetIdError):
        LabelsetReader(root, bad)
    assert not root.exists()


def test_write_chunk_validates_its_inputs(root, clean_spec, clean_data):
    w = LabelsetWriter.create(root, "checks", clean_spec)
    logits, labels = clean_data["logits"][:64], clean_data["hard_labels"][:64]
    with pytest.raises(ValueError, match="shape"):
        w.write_chunk(0, logits[:63], labels[:63])
    with pytest.raises(ValueError, match="0..4"):
        w.write_chunk(5, logits, labels)
    with pytest.raises(ValueError, match="NaN"):
        w.write_chunk(0, np.where(np.eye(64, 10) > 0, np.nan, logits), labels)
    with pytest.raises(ValueError, match="float32"):
        w.write_chunk(0, logits * 1e5, labels)  # beyond float16's 65504
    with pytest.raises(ValueError, match="hard labels"):
        w.write_chunk(0, logits, np.full(64, 10))
    with pytest.raises(ValueError, match="views"):
        w.write_chunk(0, logits, labels, view_params=np.zeros((64, 1, 5)))
    assert w.missing_chunks() == [0, 1, 2, 3, 4]


def test_discard_removes_the_staged_labelset(root, clean_spec, clean_data, write_chunks):
    w = LabelsetWriter.create(root, "cancelled", clean_spec)
    write_chunks(w, clean_data, [0])
    w.discard()
    assert list_staging(root) == [] and not any((root / ".trash").iterdir())
    with pytest.raises(LabelsetNotFoundError):
        LabelsetWriter.open(root, "cancelled")


def test_publish_rejects_a_staged_chunk_damaged_after_it_was_written(root, clean_spec, clean_data, write_chunks):
    w = LabelsetWriter.create(root, "damaged", clean_spec)
    write_chunks(w, clean_data)
    # overwrite staged chunk 3 of topk_values behind the writer's back: its marker checksum no longer matches
    staged = zarr.open_array(str(root / ".staging" / "damaged" / "labelset" / "topk_values"), mode="r+")
    staged[192:256] = np.float16(0.25)
    with pytest.raises(CorruptChunkError, match="'topk_values' chunk 3") as err:
        w.publish()
    assert err.value.problems == [("topk_values", 3)]
    assert list_labelsets(root) == []
    write_chunks(w, clean_data, [3])  # rewriting the chunk repairs it
    w.publish()
    assert LabelsetReader(root, "damaged").verify() == 25
