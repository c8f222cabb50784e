"""List, describe and delete labelsets under a store root (published ones, and staging in progress)."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path

import zarr
from pydantic import BaseModel, ConfigDict, ValidationError

from store.errors import LabelsetNotFoundError
from store.layout import DONE_DIR, LABELSET_ID_PATTERN, STAGED_GROUP, STAGING_DIR, TRASH_DIR, published_path
from store.provenance import Provenance

log = logging.getLogger(__name__)


class LabelsetSummary(BaseModel):
    """One line of the catalog: what a published labelset holds, without its checksums and config."""

    model_config = ConfigDict(frozen=True)

    labelset_id: str
    dataset_name: str
    num_images: int
    num_classes: int
    temperature: float
    mode: str
    views_per_image: int
    logits_dtype: str
    top_k: int | None
    teacher_checkpoint_hash: str
    created: datetime
    published: datetime | None
    size_bytes: int


class StagingSummary(BaseModel):
    """A labelset being generated: how many of its chunks are done."""

    model_config = ConfigDict(frozen=True)

    labelset_id: str
    num_chunks: int
    chunks_done: int
    created: datetime


def _read_provenance(group_path: Path) -> Provenance:
    return Provenance.model_validate(zarr.open_group(store=str(group_path), mode="r").attrs.asdict())


def _size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(root: str | Path, labelset_id: str) -> Provenance:
    """Full provenance of a published labelset (LabelsetNotFoundError if absent)."""
    path = published_path(root, labelset_id)
    if not (path / "zarr.json").is_file():
        raise LabelsetNotFoundError(f"no published labelset {labelset_id!r} under {root}")
    return _read_provenance(path)


def list_labelsets(root: str | Path) -> list[LabelsetSummary]:
    """Published labelsets under `root`, sorted by id; staging, trash and foreign folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if not (LABELSET_ID_PATTERN.fullmatch(path.name) and (path / "zarr.json").is_file()):
            continue
        try:
            prov = _read_provenance(path)
        except (ValidationError, ValueError, OSError) as exc:  # a foreign zarr group is not ours to list
            log.warning("skipping %s: not a readable labelset (%s)", path, exc)
            continue
        fields = prov.model_dump(include=set(LabelsetSummary.model_fields))
        out.append(LabelsetSummary(**fields, size_bytes=_size_bytes(path)))
    return out


def list_staging(root: str | Path) -> list[StagingSummary]:
    """Labelsets being generated (or abandoned mid-way) under `root/.staging`, sorted by id."""
    staging = Path(root) / STAGING_DIR
    if not staging.is_dir():
        return []
    out = []
    for path in sorted(staging.iterdir()):
        group = path / STAGED_GROUP
        if not (LABELSET_ID_PATTERN.fullmatch(path.name) and (group / "zarr.json").is_file()):
            continue
        prov = _read_provenance(group)
        done = len(list((path / DONE_DIR).glob("*.json")))
        out.append(StagingSummary(labelset_id=prov.labelset_id, num_chunks=prov.num_chunks, chunks_done=done,
                                  created=prov.created))
    return out


def delete(root: str | Path, labelset_id: str) -> None:
    """Delete a published labelset: one rename into `.trash` (readers never see half a set), then removal."""
    path = published_path(root, labelset_id)
    if not (path / "zarr.json").is_file():
        raise LabelsetNotFoundError(f"no published labelset {labelset_id!r} under {root}")
    trash = Path(root) / TRASH_DIR
    trash.mkdir(exist_ok=True)
    gone = trash / f"{labelset_id}-{uuid.uuid4().hex}"
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)
