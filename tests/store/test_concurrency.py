"""Several processes on one store: disjoint chunk writers, a crash mid-generation, readers beside a stager."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import zarr

from store import LabelsetNotFoundError, LabelsetReader, LabelsetWriter, list_labelsets, list_staging

SPAWN = mp.get_context("spawn")


def _write(root, labelset_id, data, chunks):
    """Worker body (as a Ray worker would run it): open the staged set and write the given chunks."""
    writer = LabelsetWriter.open(root, labelset_id)
    for chunk in chunks:
        a, b = writer.chunk_bounds(chunk)
        writer.write_chunk(chunk, data["logits"][a:b], data["hard_labels"][a:b])
    return os.getpid()


def _crash_during_chunk_2(root, labelset_id, data):
    """Write chunks 0 and 1, leave chunk 2 half-written (soft_labels only, garbage), then die without cleanup."""
    _write(root, labelset_id, data, [0, 1])
    group = root / ".staging" / labelset_id / "labelset"
    zarr.open_array(store=str(group), path="soft_labels", mode="r+")[128:192] = np.float16(0.5)
    os._exit(3)


def _stage_in_two_halves(root, labelset_id, spec, data, half_done, go_on):
    """Create and half-write a labelset, wait for the test to look, then finish and publish it."""
    writer = LabelsetWriter.create(root, labelset_id, spec)
    _write(root, labelset_id, data, [0, 1])
    half_done.set()
    go_on.wait(timeout=60)
    _write(root, labelset_id, data, [2, 3, 4])
    writer.publish()


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(max_workers=2, mp_context=SPAWN) as executor:
        yield executor


def test_two_processes_write_disjoint_chunks_then_publish(root, pool, clean_spec, clean_data, make_labelset):
    make_labelset("single", clean_spec, clean_data)
    writer = LabelsetWriter.create(root, "parallel", clean_spec)
    jobs = [pool.submit(_write, root, "parallel", clean_data, chunks) for chunks in ([0, 2, 4], [1, 3])]
    pids = {job.result(timeout=120) for job in jobs}
    assert os.getpid() not in pids
    assert writer.missing_chunks() == []
    writer.publish()
    single, parallel = LabelsetReader(root, "single"), LabelsetReader(root, "parallel")
    assert parallel.verify() == 25
    assert parallel.provenance.checksums == single.provenance.checksums


def test_a_crashed_writer_resumes_with_only_the_missing_chunks(root, clean_spec, clean_data, make_labelset):
    make_labelset("reference", clean_spec, clean_data)
    LabelsetWriter.create(root, "crashed", clean_spec)
    proc = SPAWN.Process(target=_crash_during_chunk_2, args=(root, "crashed", clean_data))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 3
    assert list_labelsets(root)[0].labelset_id == "reference" and len(list_labelsets(root)) == 1
    writer = LabelsetWriter.open(root, "crashed")
    assert writer.missing_chunks() == [2, 3, 4]
    _write(root, "crashed", clean_data, writer.missing_chunks())
    writer.publish()
    crashed, reference = LabelsetReader(root, "crashed"), LabelsetReader(root, "reference")
    assert crashed.provenance.checksums == reference.provenance.checksums
    np.testing.assert_array_equal(crashed.soft_labels(np.arange(300)), reference.soft_labels(np.arange(300)))


def test_readers_see_published_sets_only_while_another_is_staged(root, clean_spec, clean_data, views_spec,
                                                                 views_data, make_labelset):
    make_labelset("live", views_spec, views_data)
    half_done, go_on = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(target=_stage_in_two_halves,
                         args=(root, "next", clean_spec, clean_data, half_done, go_on))
    proc.start()
    try:
        assert half_done.wait(timeout=120)
        assert [s.labelset_id for s in list_labelsets(root)] == ["live"]
        assert [(s.labelset_id, s.chunks_done) for s in list_staging(root)] == [("next", 2)]
        with pytest.raises(LabelsetNotFoundError):
            LabelsetReader(root, "next")
        live = LabelsetReader(root, "live")
        assert live.verify() == 6 * 4
        np.testing.assert_array_equal(live.logits(np.arange(50)), views_data["logits"])
    finally:
        go_on.set()
        proc.join(timeout=120)
    assert proc.exitcode == 0
    assert [s.labelset_id for s in list_labelsets(root)] == ["live", "next"]
    np.testing.assert_array_equal(LabelsetReader(root, "next").hard_labels(np.arange(300)), clean_data["hard_labels"])
