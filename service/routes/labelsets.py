"""Labelsets: list, describe, delete into the trash and restore, and per-image soft labels (one, or a batch)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response

import store
from service.deps import ImageId, JobsDep, LabelsetId, MetricsDep, ReadersDep, ReadKey, SettingsDep, WriteKey
from service.errors import JobStateError, PayloadTooLargeError
from service.labels import read_rows
from service.schemas import (
    TEMPERATURE,
    BatchLabelsIn,
    BatchLabelsOut,
    LabelOut,
    LabelRow,
    LabelsetDetail,
    LabelsetPublic,
    LabelsetsPublic,
    TrashedLabelset,
    TrashPublic,
    error_responses,
)

router = APIRouter(prefix="/v1/labelsets", tags=["labelsets"], dependencies=[ReadKey],
                   responses=error_responses(400, 401, 404, 422))
NPY = "application/octet-stream"
Temperature = Annotated[float | None, Query(**TEMPERATURE)]
TopK = Annotated[int | None, Query(ge=1, le=100_000, description="Keep the k largest probabilities, renormalised")]


@router.get("", summary="List labelsets", response_model=LabelsetsPublic | TrashPublic)
def list_labelsets(settings: SettingsDep, deleted: Annotated[bool, Query(
        description="List the trash instead: deleted labelsets that can still be restored")] = False):
    """Published labelsets in the store, sorted by id (with `deleted=true`: the trash, newest deletion first)."""
    if deleted:
        trashed = [_trashed(e) for e in store.list_trash(settings.store_root)]
        return TrashPublic(data=trashed, count=len(trashed))
    items = [LabelsetPublic(**s.model_dump()) for s in store.list_labelsets(settings.store_root)]
    return LabelsetsPublic(data=items, count=len(items))


@router.get("/{labelset_id:segment}", summary="Describe a labelset")
def describe_labelset(labelset_id: LabelsetId, settings: SettingsDep) -> LabelsetDetail:
    """Provenance of one labelset: teacher hash, dataset, class names and counts, temperature, mode, config."""
    prov = store.describe(settings.store_root, labelset_id)
    return LabelsetDetail(**prov.model_dump(exclude={"checksums"}))


@router.delete("/{labelset_id:segment}", summary="Delete a labelset (into the trash)", dependencies=[WriteKey],
               responses=error_responses(409))
def delete_labelset(labelset_id: LabelsetId, settings: SettingsDep, readers: ReadersDep,
                    jobs: JobsDep) -> TrashedLabelset:
    """Move a published labelset into the store's trash (one atomic rename: readers stop seeing it at once, its
    arrays stay untouched). It can be restored until `purge_after`; a labelset that a queued or running job reads
    or writes cannot be deleted (409 naming the job)."""
    users = [j.id for state in ("queued", "running") for j in jobs.list(state=state, limit=1000)[0]
             if j.request.get("labelset_id") == labelset_id]
    if users:
        raise JobStateError(f"labelset {labelset_id!r} is in use by {len(users)} queued or running job(s): "
                            f"{', '.join(users)}; cancel them or wait for them to finish")
    entry = store.delete(settings.store_root, labelset_id, retention_days=settings.trash_days)
    readers.drop(labelset_id)
    return _trashed(entry)


@router.post("/{labelset_id:segment}:restore", summary="Restore a deleted labelset", dependencies=[WriteKey],
             responses=error_responses(409))
def restore_labelset(labelset_id: LabelsetId, settings: SettingsDep) -> LabelsetDetail:
    """Bring back the most recently deleted copy of a labelset from the trash (409 if the id is published again)."""
    prov = store.restore(settings.store_root, labelset_id)
    return LabelsetDetail(**prov.model_dump(exclude={"checksums"}))


def _trashed(entry: store.TrashEntry) -> TrashedLabelset:
    return TrashedLabelset(**entry.model_dump(), restore=f"POST /v1/labelsets/{entry.labelset_id}:restore")


@router.get("/{labelset_id:segment}/labels/{image_id}", summary="Soft label of one image")
async def get_label(labelset_id: LabelsetId, image_id: ImageId, request: Request,
                    temperature: Temperature = None, top_k: TopK = None) -> LabelOut:
    """The teacher's soft label of training image `image_id` (dense, or its top-k)."""
    start = time.perf_counter()
    # the hottest route: state straight from the request rather than two more dependencies (~40 us of the ~200 us
    # FastAPI spends per request here, bench/service_bench.py); and on the event loop, not the thread pool: one row
    # touches at most two cached chunks (tens of microseconds), less than a thread hop; a cold chunk decodes once
    readers, metrics = request.state.readers, request.state.metrics
    rows = read_rows(readers.get(labelset_id), [image_id], temperature, top_k)
    metrics.label_latency.observe(time.perf_counter() - start)
    metrics.label_rows.labels(labelset_id).inc()
    return LabelOut(labelset_id=labelset_id, temperature=rows.temperature, **rows.as_json_rows()[0])


@router.post("/{labelset_id:segment}/labels:batch", summary="Soft labels of many images",
             responses={200: {"content": {NPY: {"schema": {"type": "string", "format": "binary"}}},
                              "description": "JSON rows, or an npy float16 (n, C) array"},
                        **error_responses(413)})
def batch_labels(labelset_id: LabelsetId, body: BatchLabelsIn, readers: ReadersDep, settings: SettingsDep,
                 metrics: MetricsDep, accept: Annotated[str | None, Header()] = None,
                 format: Annotated[Literal["json", "npy"] | None, Query(description="npy: binary body")] = None,
                 ) -> BatchLabelsOut:
    """Rows for up to LTD_MAX_BATCH_IDS image ids, in the order given."""
    if len(body.image_ids) > settings.max_batch_ids:
        raise PayloadTooLargeError(f"{len(body.image_ids)} image ids; at most {settings.max_batch_ids} per request")
    start = time.perf_counter()
    # a plain def (thread pool): thousands of ids may decode many chunks and serialise 1e5 numbers; on the event
    # loop that would stall every single-label read behind it
    rows = read_rows(readers.get(labelset_id), body.image_ids, body.temperature, body.top_k)
    metrics.label_latency.observe(time.perf_counter() - start)
    metrics.label_rows.labels(labelset_id).inc(len(body.image_ids))
    if format == "npy" or (format is None and NPY in (accept or "")):
        return Response(rows.as_npy(), media_type=NPY)
    # rows are our own numbers: construct without validating 1e5 floats (twice: FastAPI would validate again)
    out = BatchLabelsOut.model_construct(
        labelset_id=labelset_id, temperature=rows.temperature, num_classes=rows.num_classes,
        data=[LabelRow.model_construct(**row) for row in rows.as_json_rows()], count=len(body.image_ids))
    return Response(out.model_dump_json(), media_type="application/json")
