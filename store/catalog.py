"""List, describe, delete (into a trash), restore and purge labelsets under a store root."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import zarr
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from store.errors import LabelsetExistsError, LabelsetNotFoundError
from store.layout import (DONE_DIR, LABELSET_ID_PATTERN, STAGED_GROUP, STAGING_DIR, TRASH_DIR, TRASH_RECORD,
                          published_path)
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


class TrashEntry(BaseModel):
    """A deleted labelset kept in `<root>/.trash` until it is purged: its arrays untouched, restorable."""

    model_config = ConfigDict(frozen=True)

    labelset_id: str
    trash_id: str = Field(description="Folder under .trash; several deletions of one id keep separate copies")
    deleted: datetime
    purge_after: datetime
    size_bytes: int


def _trash_entry(path: Path) -> TrashEntry | None:
    try:
        record = json.loads((path / TRASH_RECORD).read_text())
    except (OSError, ValueError):
        return None  # a staging discard, or a folder half-moved by a crash: not a restorable labelset
    return TrashEntry(**record, trash_id=path.name, size_bytes=_size_bytes(path))


def delete(root: str | Path, labelset_id: str, retention_days: float = 7.0) -> TrashEntry:
    """Move a published labelset into `.trash` in one rename: readers stop seeing it at once, nothing is erased.

    `restore` brings it back; `purge` erases trashed sets older than their `purge_after`.
    """
    path = published_path(root, labelset_id)
    if not (path / "zarr.json").is_file():
        raise LabelsetNotFoundError(f"no published labelset {labelset_id!r} under {root}")
    trash = Path(root) / TRASH_DIR
    trash.mkdir(exist_ok=True)
    now = datetime.now(timezone.utc)
    target = trash / f"{labelset_id}--{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}"
    os.rename(path, target)
    record = {"labelset_id": labelset_id, "deleted": now.isoformat(),
              "purge_after": (now + timedelta(days=retention_days)).isoformat()}
    (target / TRASH_RECORD).write_text(json.dumps(record))
    return _trash_entry(target)


def list_trash(root: str | Path) -> list[TrashEntry]:
    """Deleted labelsets still restorable, newest deletion first."""
    trash = Path(root) / TRASH_DIR
    entries = [e for p in trash.iterdir() if p.is_dir() and (e := _trash_entry(p))] if trash.is_dir() else []
    return sorted(entries, key=lambda e: e.deleted, reverse=True)


def restore(root: str | Path, labelset_id: str) -> Provenance:
    """Bring back the most recently deleted copy of `labelset_id` (LabelsetExistsError if that id is published)."""
    entry = next((e for e in list_trash(root) if e.labelset_id == labelset_id), None)
    if entry is None:
        raise LabelsetNotFoundError(f"no deleted labelset {labelset_id!r} in the trash of {root}")
    target = published_path(root, labelset_id)
    if target.exists():
        raise LabelsetExistsError(f"labelset {labelset_id!r} is published again; delete it first to restore the "
                                  "older copy")
    source = Path(root) / TRASH_DIR / entry.trash_id
    (source / TRASH_RECORD).unlink()
    os.rename(source, target)
    return describe(root, labelset_id)


def purge(root: str | Path, now: datetime | None = None, everything: bool = False) -> list[TrashEntry]:
    """Erase trashed labelsets past their `purge_after` (or all of them); returns what was erased."""
    now = now or datetime.now(timezone.utc)
    gone = [e for e in list_trash(root) if everything or e.purge_after <= now]
    for entry in gone:
        shutil.rmtree(Path(root) / TRASH_DIR / entry.trash_id, ignore_errors=True)
    return gone
