"""Soft-label reads for the API: one open reader per labelset (it caches decoded chunks), rows shaped for answers."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store import LabelsetNotFoundError, LabelsetReader, dense_from_topk, top_k
from store.layout import published_path


class ReaderCache:
    """LRU of open LabelsetReaders keyed by id and the publish file's mtime, so a re-published id is re-opened.

    One stat per request is the whole cost of a hit; a deleted labelset is a 404 on the next request.
    """

    def __init__(self, root: Path, size: int = 16, cache_mib: float = 256):
        self.root = Path(root)
        self.size = size
        self.cache_mib = cache_mib
        self._readers: OrderedDict[str, tuple[int, LabelsetReader]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, labelset_id: str) -> LabelsetReader:
        marker = published_path(self.root, labelset_id) / "zarr.json"  # InvalidLabelsetIdError for unsafe ids
        try:
            mtime = marker.stat().st_mtime_ns
        except FileNotFoundError:
            self.drop(labelset_id)
            raise LabelsetNotFoundError(f"no published labelset {labelset_id!r}") from None
        with self._lock:
            hit = self._readers.get(labelset_id)
            if hit is not None and hit[0] == mtime:
                self._readers.move_to_end(labelset_id)
                return hit[1]
        reader = LabelsetReader(self.root, labelset_id, cache_mib=self.cache_mib)  # outside the lock: it does I/O
        with self._lock:
            self._readers[labelset_id] = (mtime, reader)
            self._readers.move_to_end(labelset_id)
            while len(self._readers) > self.size:
                self._readers.popitem(last=False)
        return reader

    def drop(self, labelset_id: str) -> None:
        with self._lock:
            self._readers.pop(labelset_id, None)


@dataclass(frozen=True)
class LabelRows:
    """Rows for an answer: `probs` (n, C) dense, or (n, k) with `classes` (n, k) when top-k was asked for."""

    image_ids: np.ndarray
    hard_labels: np.ndarray
    probs: np.ndarray
    classes: np.ndarray | None
    temperature: float
    num_classes: int

    def as_json_rows(self) -> list[dict]:
        """Rows as plain dicts; 6 decimals (the stored float16 has about 3) keep answers short."""
        probs = np.round(self.probs.astype(np.float64), 6).tolist()
        classes = self.classes.tolist() if self.classes is not None else [None] * len(probs)
        return [{"image_id": i, "hard_label": h, "classes": c, "probs": p}
                for i, h, c, p in zip(self.image_ids.tolist(), self.hard_labels.tolist(), classes, probs)]

    def as_npy(self) -> bytes:
        """npy float16 (n, C): dense rows (zeros outside the top-k when top-k was asked for)."""
        dense = self.probs if self.classes is None else dense_from_topk(self.classes, self.probs, self.num_classes)
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.ascontiguousarray(dense, dtype=np.float16), allow_pickle=False)
        return buffer.getvalue()


def read_rows(reader: LabelsetReader, image_ids, temperature: float | None = None, k: int | None = None) -> LabelRows:
    """Stored soft labels (or re-tempered from the logits at T') of these ids; views mode answers view 0."""
    ids = np.atleast_1d(np.asarray(image_ids))
    if temperature is None:
        probs, temperature = reader.soft_labels(ids), reader.temperature
    else:
        probs = reader.retempered(ids, temperature)
        if probs.ndim == 3:  # views mode: (n, K, C); the first view, as soft_labels() answers
            probs = probs[:, 0]
    classes = None
    if k is not None:
        classes, probs = top_k(probs, min(k, reader.num_classes))
    return LabelRows(ids.astype(np.int64), reader.hard_labels(ids), probs, classes, float(temperature),
                     reader.num_classes)
