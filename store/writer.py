"""Staged, resumable, concurrent labelset writing with checksums and an atomic publish.

Generation writes into `<root>/.staging/<id>/labelset` one chunk at a time. Each finished chunk leaves a small
marker `done/<chunk>.json` (temp file + os.replace), so several processes can fill disjoint chunks of one labelset
without sharing any mutable file, and a crashed run resumes by writing only `missing_chunks()`. `publish()`
re-reads every chunk against its marker checksum, records the checksums in the group attributes and renames the
group to `<root>/<id>` in one step, so readers see either nothing or the complete labelset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from store import content, tempering
from store.errors import IncompleteLabelsetError, LabelsetExistsError, LabelsetNotFoundError
from store.integrity import chunk_checksum, iter_chunk_problems, raise_problems
from store.layout import (
    DONE_DIR, STAGED_GROUP, TRASH_DIR, VIEW_PARAM_COLUMNS, chunk_bounds, compressors, published_path,
    staging_path, validate_labelset_id,
)
from store.provenance import LabelsetSpec, Provenance


class LabelsetWriter:
    """Writer of one staged labelset; get one with `create` (once, by the coordinator) or `open` (each worker).

    Parameters
    ----------
    root : str | Path
        Store root; the labelset is staged under `<root>/.staging/<labelset_id>` until `publish()`.
    labelset_id : str
        Folder-safe id (store/layout.py `LABELSET_ID_PATTERN`).

    Attributes
    ----------
    provenance : Provenance
        The staging record (status "staging"); `chunk_rows` and `num_chunks` tell workers how to split work.
    """

    def __init__(self, root: str | Path, labelset_id: str):
        self.root = Path(root)
        self.labelset_id = labelset_id
        self._staging = staging_path(root, labelset_id)
        self._group_path = self._staging / STAGED_GROUP
        self._done = self._staging / DONE_DIR
        if not (self._group_path / "zarr.json").is_file():
            raise LabelsetNotFoundError(
                f"no staged labelset {labelset_id!r} under {self.root}; create it with LabelsetWriter.create"
            )
        self._group = zarr.open_group(store=str(self._group_path), mode="r+")
        self.provenance = Provenance.model_validate(self._group.attrs.asdict())
        # write_empty_chunks: every chunk becomes a file, so checksums always cover real bytes
        self._arrays = {
            name: zarr.open_array(store=str(self._group_path), path=name, mode="r+",
                                  config={"write_empty_chunks": True})
            for name in self.provenance.arrays()
        }

    def __reduce__(self):
        # ship (root, id), not open zarr handles: a Ray worker or spawned process re-opens the staged set
        return (LabelsetWriter, (str(self.root), self.labelset_id))

    @classmethod
    def create(cls, root: str | Path, labelset_id: str, spec: LabelsetSpec, *, exist_ok: bool = False
               ) -> LabelsetWriter:
        """Create the staged labelset (empty arrays + staging provenance); `exist_ok` resumes an identical one.

        Raises LabelsetExistsError if the id is already published, or staged with a different spec (or staged at
        all when `exist_ok` is False).
        """
        root = Path(root)
        validate_labelset_id(labelset_id)
        provenance = Provenance.from_spec(labelset_id, spec)
        if published_path(root, labelset_id).exists():
            raise LabelsetExistsError(f"labelset {labelset_id!r} is already published under {root}; pick a new id")
        staging = staging_path(root, labelset_id)
        if staging.exists() and not (staging / STAGED_GROUP).exists():
            shutil.rmtree(staging, ignore_errors=True)  # leftover of a publish that crashed after its rename
        created_here = False
        if not staging.exists():
            tmp = staging.parent / f".tmp-{labelset_id}-{uuid.uuid4().hex}"
            _build_staging(tmp, provenance)
            try:
                # renaming a complete folder makes creation atomic: a concurrent creator gets an OSError
                os.rename(tmp, staging)
                created_here = True
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        if not created_here and not exist_ok:
            raise LabelsetExistsError(
                f"labelset {labelset_id!r} is already staged; resume it with LabelsetWriter.open or discard() it"
            )
        writer = cls(root, labelset_id)
        if not created_here and not writer.provenance.same_data_as(spec):
            raise LabelsetExistsError(
                f"labelset {labelset_id!r} is already staged with a different spec; discard it or pick a new id"
            )
        return writer

    @classmethod
    def open(cls, root: str | Path, labelset_id: str) -> LabelsetWriter:
        """Open an existing staged labelset (a worker writing its chunks, or a resume after a crash)."""
        return cls(root, labelset_id)

    @property
    def num_chunks(self) -> int:
        """Chunks along the image axis; `write_chunk` takes 0..num_chunks-1."""
        return self.provenance.num_chunks

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        """Image ids [start, stop) that chunk `chunk_index` holds."""
        if not 0 <= chunk_index < self.num_chunks:
            raise ValueError(f"chunk_index must be in 0..{self.num_chunks - 1}, got {chunk_index}")
        return chunk_bounds(chunk_index, self.provenance.chunk_rows, self.provenance.num_images)

    def write_chunk(self, chunk_index: int, logits: np.ndarray, hard_labels: np.ndarray,
                    view_params: np.ndarray | None = None) -> dict[str, str]:
        """Write every array of one chunk from the teacher logits of its images, then mark the chunk done.

        Parameters
        ----------
        chunk_index : int
            Which chunk; its rows are `chunk_bounds(chunk_index)`. Rewriting a chunk overwrites it.
        logits : array (rows, C) or, in views mode, (rows, K, C)
            Teacher logits of images start..stop-1 in id order. soft_labels and top-k are computed from the
            logits as stored (after the cast to `logits_dtype`), so `softmax(stored logits / T)` reproduces them.
        hard_labels : array (rows,)
            Ground-truth labels in 0..C-1.
        view_params : array (rows, K, 5), views mode only
            Per view: crop x0, y0, x1, y1 in pixels and flip (0 or 1).

        Returns the chunk's checksums {array name: sha256}.
        """
        start, stop = self.chunk_bounds(chunk_index)
        values = self._encode(chunk_index, stop - start, logits, hard_labels, view_params)
        for name, data in values.items():
            self._arrays[name][start:stop] = data  # chunk-aligned: zarr replaces whole chunk files, no read-back
        checksums = {name: chunk_checksum(data) for name, data in values.items()}
        self._mark_done(chunk_index, start, stop, checksums)
        return checksums

    def done_chunks(self) -> list[int]:
        """Chunk indices whose marker exists (written completely at least once)."""
        return sorted(int(p.stem) for p in self._done.glob("*.json"))

    def missing_chunks(self) -> list[int]:
        """Chunk indices not yet written: after a crash, write exactly these and publish."""
        return sorted(set(range(self.num_chunks)) - set(self.done_chunks()))

    def publish(self) -> Provenance:
        """Verify all chunks against their markers, record checksums, and atomically rename the set into view.

        Raises IncompleteLabelsetError if chunks are missing, CorruptChunkError if a chunk's bytes do not match
        the checksum computed when it was written (rewrite it with `write_chunk`), LabelsetExistsError if the id
        got published meanwhile. Returns the final provenance (status "complete").
        """
        missing = self.missing_chunks()
        if missing:
            raise IncompleteLabelsetError(
                f"labelset {self.labelset_id!r} misses {len(missing)} of {self.num_chunks} chunks "
                f"(first: {missing[:10]}); write them with write_chunk, then publish", missing=missing)
        checksums: dict[str, list[str]] = {name: [""] * self.num_chunks for name in self._arrays}
        for chunk in range(self.num_chunks):
            marker = json.loads((self._done / f"{chunk}.json").read_text())
            for name in self._arrays:
                checksums[name][chunk] = marker["checksums"][name]
        problems = [err for _, _, err in iter_chunk_problems(self._arrays, checksums, self.provenance.chunk_rows)
                    if err is not None]
        raise_problems(problems, f"publishing {self.labelset_id!r}")
        final = self.provenance.model_copy(update={"status": "complete", "checksums": checksums,
                                                   "published": datetime.now(timezone.utc),
                                                   "content": self._content()})
        self._group.attrs.put(final.model_dump(mode="json"))
        target = published_path(self.root, self.labelset_id)
        # os.rename would silently replace an *empty* target folder, so refuse any existing target first
        if target.exists():
            raise LabelsetExistsError(f"labelset {self.labelset_id!r} is already published under {self.root}")
        try:
            os.rename(self._group_path, target)
        except OSError as exc:  # a concurrent publish of the same id won the race
            raise LabelsetExistsError(f"labelset {self.labelset_id!r} was published concurrently") from exc
        shutil.rmtree(self._staging, ignore_errors=True)
        self.provenance = final
        return final

    def _content(self) -> dict:
        """The labelset's content summary (store/content.py), read back chunk by chunk from the written arrays."""
        p = self.provenance
        sums = 0
        for chunk in range(self.num_chunks):
            start, stop = self.chunk_bounds(chunk)
            if p.dense:
                probs = self._arrays["soft_labels"][start:stop]
            else:  # one chunk of dense rows at a time, FKD's recovery of the top-k form
                probs = tempering.dense_from_topk_mass(self._arrays["topk_classes"][start:stop],
                                                       self._arrays["topk_probs"][start:stop],
                                                       self._arrays["topk_rest"][start:stop], p.num_classes)
            sums = sums + content.class_sums(probs, self._arrays["hard_labels"][start:stop], p.num_classes)
        return content.summarize(sums, p.views_per_image, p.class_names)

    def discard(self) -> None:
        """Remove the staged labelset (a cancelled generation); moved to the trash first, then deleted."""
        trash = self.root / TRASH_DIR
        trash.mkdir(parents=True, exist_ok=True)
        gone = trash / f"staging-{self.labelset_id}-{uuid.uuid4().hex}"
        os.rename(self._staging, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def _encode(self, chunk_index: int, rows: int, logits, hard_labels, view_params) -> dict[str, np.ndarray]:
        """Validate one chunk's inputs and derive every stored array, cast to its stored dtype."""
        p = self.provenance
        lead = (rows, p.views_per_image) if p.mode == "views" else (rows,)
        logits = np.asarray(logits)
        if logits.shape != lead + (p.num_classes,):
            raise ValueError(f"chunk {chunk_index} needs logits of shape {lead + (p.num_classes,)}, "
                             f"got {logits.shape}")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, with the fix
            stored = logits.astype(p.logits_dtype)
        if not np.isfinite(stored).all():
            raise ValueError(f"chunk {chunk_index}: logits are NaN/inf (or overflow {p.logits_dtype}; "
                             "FIX THIS by logits_dtype='float32')")
        labels = np.asarray(hard_labels)
        if (labels.shape != (rows,) or labels.dtype.kind not in "iu"
                or labels.min() < 0 or labels.max() >= p.num_classes):
            raise ValueError(f"chunk {chunk_index} needs {rows} integer hard labels in 0..{p.num_classes - 1}")
        probs = tempering.softmax(stored, p.temperature)
        if not p.dense:
            classes, top, rest = tempering.top_k_mass(probs, p.top_k, self._arrays["topk_classes"].dtype.name)
            out = {"topk_classes": classes, "topk_probs": top.astype(np.float16),
                   "topk_rest": rest.astype(np.float16), "hard_labels": labels.astype(np.int32)}
        else:
            out = {"logits": stored, "soft_labels": probs.astype(np.float16), "hard_labels": labels.astype(np.int32)}
        if p.dense and p.top_k:
            idx, vals = tempering.top_k(probs, p.top_k)
            out["topk_indices"], out["topk_values"] = idx, vals.astype(np.float16)
        if p.mode == "views":
            shape = (rows, p.views_per_image, len(VIEW_PARAM_COLUMNS))
            if view_params is None or np.shape(view_params) != shape:
                raise ValueError(f"chunk {chunk_index} (views mode) needs view_params of shape {shape}")
            out["view_params"] = np.asarray(view_params, dtype=np.float32)
        elif view_params is not None:
            raise ValueError("view_params are only stored in mode='views'")
        return out

    def _mark_done(self, chunk_index: int, start: int, stop: int, checksums: dict[str, str]) -> None:
        """Record a finished chunk; temp file + os.replace, so a marker is either absent or complete."""
        payload = json.dumps({"chunk": chunk_index, "rows": [start, stop], "checksums": checksums})
        fd, tmp = tempfile.mkstemp(dir=self._done, prefix=f".{chunk_index}-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, self._done / f"{chunk_index}.json")


def _build_staging(folder: Path, provenance: Provenance) -> None:
    """Make `folder/labelset` (group + empty arrays, attrs = staging provenance) and `folder/done`."""
    (folder / DONE_DIR).mkdir(parents=True)
    group = zarr.create_group(store=str(folder / STAGED_GROUP), attributes=provenance.model_dump(mode="json"))
    for spec in provenance.arrays().values():
        attributes = {"description": spec.description}
        if spec.name == "view_params":
            attributes["columns"] = list(VIEW_PARAM_COLUMNS)
        outer = (provenance.chunk_rows,) + spec.row_shape
        # sharded: the writer still owns whole chunk_rows blocks (one shard file each); inner chunks decode alone
        inner = (provenance.inner_chunk_rows,) + spec.row_shape if provenance.inner_chunk_rows else None
        group.create_array(
            spec.name, shape=spec.shape, dtype=spec.dtype, chunks=inner or outer, shards=outer if inner else None,
            compressors=compressors(spec.dtype, provenance.codec), fill_value=spec.fill_value,
            dimension_names=spec.dims, attributes=attributes,
        )
