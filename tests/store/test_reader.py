"""Reading published labelsets: typed errors, corruption checks, views mode, streaming, SoftLabelSource."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from store import CorruptChunkError, ImageIdError, LabelsetNotFoundError, LabelsetReader, StoreError, softmax


@pytest.fixture
def clean(root, clean_spec, clean_data, make_labelset):
    make_labelset("clean", clean_spec, clean_data)
    return LabelsetReader(root, "clean")


def test_unknown_labelset_is_not_found_and_also_a_file_not_found_error(root, clean):
    with pytest.raises(LabelsetNotFoundError, match="nope"):
        LabelsetReader(root, "nope")
    with pytest.raises(FileNotFoundError):
        LabelsetReader(root / "elsewhere", "clean")


@pytest.mark.parametrize("ids, shown", [([0, -1, 5], "[-1]"), ([300, 2, 301], "[300, 301]"), ([10**9], "[1000000000]")])
def test_out_of_range_ids_raise_image_id_error_listing_them(clean, ids, shown):
    with pytest.raises(ImageIdError, match=rf"image ids {re_escape(shown)} are outside 0..299"):
        clean.soft_labels(np.array(ids))
    with pytest.raises(IndexError):  # the SoftLabelSource contract: an IndexError subclass
        clean.hard_labels(ids)


def re_escape(text: str) -> str:
    return text.replace("[", r"\[").replace("]", r"\]")


def test_non_integer_or_2d_ids_are_rejected_and_empty_ids_give_empty_rows(clean):
    with pytest.raises(ImageIdError, match="integers"):
        clean.soft_labels(np.array([1.0, 2.0]))
    with pytest.raises(ImageIdError, match="1-D"):
        clean.soft_labels(np.zeros((2, 2), dtype=np.int64))
    assert clean.soft_labels(np.array([], dtype=np.int64)).shape == (0, 10)


def test_rows_follow_the_order_of_ids_across_chunks(clean, clean_data):
    ids = np.array([299, 5, 64, 63, 5, 200])
    np.testing.assert_array_equal(clean.hard_labels(ids), clean_data["hard_labels"][ids])
    np.testing.assert_array_equal(clean.logits(ids), clean_data["logits"][ids].astype(np.float16))
    assert clean.num_classes == 10 and clean.temperature == 2.0 and len(clean) == 300


def _chunk_file(root, labelset_id, array, chunk):
    """The file zarr wrote for image chunk `chunk`: `c/<chunk>` (1-D) or `c/<chunk>/0[/0]` (2-D, 3-D)."""
    path = root / labelset_id / array / "c" / str(chunk)
    return path if path.is_file() else next(f for f in sorted(path.rglob("*")) if f.is_file())


def test_flipped_bytes_raise_corrupt_chunk_error_on_read_and_verify(root, clean):
    path = _chunk_file(root, "clean", "soft_labels", 2)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = LabelsetReader(root, "clean")
    np.testing.assert_allclose(fresh.soft_labels([0, 127]).sum(1), 1.0, atol=1e-6)  # other chunks still read
    with pytest.raises(CorruptChunkError, match="'soft_labels' chunk 2") as err:
        fresh.soft_labels([130])
    assert (err.value.array, err.value.chunk) == ("soft_labels", 2)
    with pytest.raises(CorruptChunkError) as err:
        fresh.verify()
    assert err.value.problems == [("soft_labels", 2)]
    with pytest.raises(CorruptChunkError):
        fresh.read_block(128, 192, arrays=("soft_labels",))


def test_valid_but_wrong_chunk_bytes_fail_the_checksum(root, clean):
    # chunk 1 replaced by chunk 0's file: it decodes cleanly, only the recorded sha256 can tell
    shutil.copyfile(_chunk_file(root, "clean", "logits", 0), _chunk_file(root, "clean", "logits", 1))
    fresh = LabelsetReader(root, "clean")
    with pytest.raises(CorruptChunkError, match="checksum mismatch"):
        fresh.logits([70])
    with pytest.raises(CorruptChunkError, match="logits"):
        fresh.retempered([70], 1.0)


def test_a_deleted_chunk_file_is_reported_not_read_as_fill_values(root, clean):
    _chunk_file(root, "clean", "hard_labels", 4).unlink()
    fresh = LabelsetReader(root, "clean")
    with pytest.raises(CorruptChunkError, match="'hard_labels' chunk 4"):
        fresh.hard_labels([299])
    with pytest.raises(CorruptChunkError) as err:
        fresh.verify()
    assert err.value.problems == [("hard_labels", 4)]


def test_verify_counts_every_chunk_of_every_array(clean):
    assert clean.verify() == 5 * 5


def test_views_mode_shapes_and_view_params_round_trip(root, views_spec, views_data, make_labelset):
    make_labelset("views", views_spec, views_data)
    r = LabelsetReader(root, "views")
    ids = np.array([49, 0, 17])
    z = views_data["logits"][ids]  # float32 storage: exact logits
    np.testing.assert_array_equal(r.logits(ids), z)
    assert r.logits(ids).shape == (3, 3, 7)
    np.testing.assert_array_equal(r.view_params(ids), views_data["view_params"][ids])
    np.testing.assert_allclose(r.soft_labels(ids), softmax(z[:, 0], 4.0), atol=1e-3)
    np.testing.assert_allclose(r.view_soft_labels(ids, [2, 0, 1]), softmax(z[[0, 1, 2], [2, 0, 1]], 4.0), atol=1e-3)
    np.testing.assert_allclose(r.view_soft_labels(ids, 1), softmax(z[:, 1], 4.0), atol=1e-3)
    idx, vals = r.top_k(ids, 2)
    assert idx.shape == vals.shape == (3, 3, 2)
    with pytest.raises(ImageIdError, match="view indices"):
        r.view_soft_labels(ids, 3)
    block = r.read_block(10, 40, arrays=("soft_labels", "view_params"))
    assert block["soft_labels"].shape == (30, 3, 7) and block["view_params"].shape == (30, 3, 5)


def test_clean_labelsets_have_no_view_params(clean):
    with pytest.raises(StoreError, match="no view_params"):
        clean.view_params([0])


def test_read_block_and_iter_blocks_stream_everything_in_order(clean, clean_data):
    block = clean.read_block(60, 130, arrays=("hard_labels", "logits"))
    np.testing.assert_array_equal(block["image_ids"], np.arange(60, 130))
    np.testing.assert_array_equal(block["hard_labels"], clean_data["hard_labels"][60:130])
    blocks = list(clean.iter_blocks(block_rows=100, prefetch=2))  # rounded up to 2 chunks = 128 rows
    assert [len(b["image_ids"]) for b in blocks] == [128, 128, 44]
    ids = np.concatenate([b["image_ids"] for b in blocks])
    np.testing.assert_array_equal(ids, np.arange(300))
    soft = np.concatenate([b["soft_labels"] for b in blocks])
    np.testing.assert_array_equal(soft, clean.soft_labels(np.arange(300)))
    with pytest.raises(ImageIdError):
        clean.read_block(250, 301)


def test_a_stream_can_stop_early(clean):
    stream = clean.iter_blocks(block_rows=64, prefetch=3)
    first = next(stream)
    stream.close()  # the prefetch thread is shut down, not left reading
    assert len(first["image_ids"]) == 64


def test_reader_pickles_and_meets_the_soft_label_source_protocol(root, clean):
    from trainer.soft_targets import InMemorySoftLabels, SoftLabelSource

    copy = pickle.loads(pickle.dumps(clean))
    ids = np.array([3, 250, 3])
    np.testing.assert_array_equal(copy.soft_labels(ids), clean.soft_labels(ids))
    assert isinstance(clean, SoftLabelSource)
    in_memory = InMemorySoftLabels(clean.logits(np.arange(300)), clean.temperature)
    np.testing.assert_allclose(clean.soft_labels(ids), in_memory.soft_labels(ids), atol=1e-3)
