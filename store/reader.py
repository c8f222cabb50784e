"""Read a published labelset by image id: checked, cached chunk reads and a prefetching block stream."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from store import tempering
from store.errors import DenseNotStoredError, ImageIdError, IncompleteLabelsetError, LabelsetNotFoundError, StoreError
from store.integrity import check_chunk, iter_chunk_problems, raise_problems, read_chunks
from store.layout import chunk_bounds, num_chunks, published_path
from store.provenance import Provenance

DEFAULT_BLOCK_ARRAYS = ("soft_labels", "hard_labels")
TOPK_BLOCK_ARRAYS = ("topk_classes", "topk_probs", "topk_rest", "hard_labels")


class LabelsetReader:
    """A published labelset, read by training image id; meets `trainer.soft_targets.SoftLabelSource`.

    Parameters
    ----------
    root : str | Path
        Store root.
    labelset_id : str
        Id of a published labelset; a missing or unpublished one raises LabelsetNotFoundError.
    cache_mib : float
        Decoded chunks kept per array (LRU), so repeated random reads skip decoding. Default 256 MiB.

    Attributes
    ----------
    num_classes, temperature, num_images, labelset_id, provenance, mode, views_per_image, chunk_rows,
    layout ("dense", or "topk" for a labelset stored as top-k only), top_k (k, or None)

    Every chunk is checked against its provenance sha256 the first time this reader decodes it; a chunk that
    fails to decode or to match raises CorruptChunkError (naming array and chunk) instead of returning numbers.
    Ids must be integers in 0..num_images-1, else ImageIdError (an IndexError). Returned rows follow the
    order of the ids given. Safe to share between threads; pickles as (root, id), e.g. into DataLoader workers.
    """

    def __init__(self, root: str | Path, labelset_id: str, *, cache_mib: float = 256):
        self.root = Path(root)
        self.labelset_id = labelset_id
        self._cache_mib = cache_mib
        path = published_path(root, labelset_id)
        if not (path / "zarr.json").is_file():
            raise LabelsetNotFoundError(f"no published labelset {labelset_id!r} under {self.root}")
        group = zarr.open_group(store=str(path), mode="r")
        self.provenance = Provenance.model_validate(group.attrs.asdict())
        if self.provenance.status != "complete":
            raise IncompleteLabelsetError(f"labelset {labelset_id!r} has status {self.provenance.status!r}")
        p = self.provenance
        self.num_classes, self.temperature, self.num_images = p.num_classes, p.temperature, p.num_images
        self.mode, self.views_per_image, self.chunk_rows = p.mode, p.views_per_image, p.chunk_rows
        self.layout, self.top_k_stored = p.layout, p.top_k
        self._specs = p.arrays()
        self._arrays = {name: group[name] for name in self._specs}
        self._verified: set[tuple[str, int]] = set()
        # one LRU of decoded chunks per array, sized in chunks from the byte budget
        self._chunk = {}
        for name, spec in self._specs.items():
            chunk_bytes = p.chunk_rows * int(np.prod(spec.row_shape)) * np.dtype(spec.dtype).itemsize
            maxsize = max(1, int(cache_mib * 2**20) // chunk_bytes)
            self._chunk[name] = functools.lru_cache(maxsize=maxsize)(functools.partial(self._load_chunk, name))

    def __reduce__(self):
        return (_reopen, (str(self.root), self.labelset_id, self._cache_mib))

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"LabelsetReader({self.labelset_id!r}, N={self.num_images}, C={self.num_classes}, "
                f"T={self.temperature}, mode={self.mode!r})")

    # ---- rows by id ---------------------------------------------------------------------------------------

    def soft_labels(self, image_ids) -> np.ndarray:
        """float32 (n, C) rows softmax(logits/T) summing to 1; in views mode the row of view 0 (the first view).

        Stored as float16; rows are renormalised in float32 so each sums to 1 up to float32 rounding. A top-k
        labelset answers dense rows recovered from its top-k form (`rest` spread evenly over the other classes).
        """
        if self.layout == "topk":
            classes, probs, rest = self.topk(image_ids)
            if self.mode == "views":
                classes, probs, rest = classes[:, 0], probs[:, 0], rest[:, 0]
            return tempering.dense_from_topk_mass(classes, probs, rest, self.num_classes)
        probs = self._rows("soft_labels", image_ids)
        if self.mode == "views":
            probs = probs[:, 0]
        return _renormalise(probs)

    def view_soft_labels(self, image_ids, view_indices) -> np.ndarray:
        """float32 (n, C): soft labels of view `view_indices[i]` of image `image_ids[i]` (a scalar view broadcasts)."""
        ids = self._check_ids(image_ids)
        views = np.broadcast_to(np.asarray(view_indices), ids.shape)
        if views.dtype.kind not in "iu" or (views.size and (views.min() < 0 or views.max() >= self.views_per_image)):
            raise ImageIdError(f"view indices must be integers in 0..{self.views_per_image - 1}")
        if self.layout == "topk":
            classes, probs, rest = self.topk(ids)
            if self.mode == "views":
                sel = np.arange(len(ids)), views
                classes, probs, rest = classes[sel], probs[sel], rest[sel]
            return tempering.dense_from_topk_mass(classes, probs, rest, self.num_classes)
        probs = self._rows("soft_labels", ids)
        if self.mode == "views":
            probs = probs[np.arange(len(ids)), views]
        return _renormalise(probs)

    def topk(self, image_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A top-k labelset's rows: classes int64 (n, [K,] k), probs float32 (n, [K,] k) and rest float32 (n, [K])
        (the mass of the other C - k classes), as stored; StoreError on a dense labelset."""
        if self.layout != "topk":
            raise StoreError(f"labelset {self.labelset_id!r} is dense; use soft_labels() or top_k()")
        ids = self._check_ids(image_ids)
        return (self._rows("topk_classes", ids).astype(np.int64), self._rows("topk_probs", ids).astype(np.float32),
                self._rows("topk_rest", ids).astype(np.float32))

    def view_params(self, image_ids) -> np.ndarray:
        """float32 (n, K, 5) replay parameters per view: crop x0, y0, x1, y1 (pixels), flip (views mode only)."""
        if self.mode != "views":
            raise StoreError(f"labelset {self.labelset_id!r} is mode 'clean' and has no view_params")
        return self._rows("view_params", image_ids)

    def logits(self, image_ids) -> np.ndarray:
        """float32 teacher logits, (n, C) or (n, K, C) in views mode."""
        self._need_dense("logits")
        return self._rows("logits", image_ids).astype(np.float32)

    def hard_labels(self, image_ids) -> np.ndarray:
        """int64 (n,) ground-truth labels (int64 so they feed torch losses directly)."""
        return self._rows("hard_labels", image_ids).astype(np.int64)

    def retempered(self, image_ids, temperature: float) -> np.ndarray:
        """float32 softmax(logits / T') at a new temperature T', (n, C) or (n, K, C), from the stored logits.

        A top-k labelset has no logits and raises DenseNotStoredError (the HTTP API answers 409): the k stored
        probabilities fix only the top-k logits' differences, and the rest's total mass says nothing about how it
        splits, so softmax at T' != T cannot be recovered without guessing.
        """
        if self.layout == "topk" and abs(temperature - self.temperature) > 1e-9:
            self._need_dense(f"soft labels at T'={temperature}")
        if self.layout == "topk":
            return self._all_views_dense(image_ids)
        return tempering.softmax(self._rows("logits", image_ids), temperature)

    def top_k(self, image_ids, k: int, temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (indices int32, values float32 renormalised), (n, [K,] k); at T' from the logits if given."""
        if self.layout == "topk" and temperature is None:
            probs = self._all_views_dense(image_ids)
        elif temperature is None:
            probs = self._rows("soft_labels", image_ids)
        else:
            probs = self.retempered(image_ids, temperature)
        return tempering.top_k(probs, k)

    # ---- bulk and streaming -------------------------------------------------------------------------------

    def read_block(self, start: int, stop: int, arrays: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows start..stop-1 of `arrays` in one pass, plus "image_ids"; fastest when start/stop are chunk-aligned.

        Arrays come back in their stored layout ((n, K, C) in views mode, soft_labels renormalised float32,
        logits float32, hard_labels int64; topk_classes int64, topk_probs/topk_rest float32); the chunk cache is
        bypassed so a stream does not evict random reads. Default arrays: soft and hard labels, or a top-k set's form.
        """
        arrays = arrays or self._block_arrays()
        if not 0 <= start < stop <= self.num_images:
            raise ImageIdError(f"block {start}..{stop} is outside 0..{self.num_images}")
        first, last = start // self.chunk_rows, num_chunks(stop, self.chunk_rows)
        offset = first * self.chunk_rows
        out = {"image_ids": np.arange(start, stop, dtype=np.int64)}
        for name in arrays:
            data = read_chunks(self._array(name), name, first, last, self.chunk_rows)
            for chunk in range(first, last):
                a, b = chunk_bounds(chunk, self.chunk_rows, self.num_images)
                self._check_once(name, chunk, data[a - offset: b - offset])
            out[name] = _present(name, data[start - offset: stop - offset])
        return out

    def iter_blocks(self, block_rows: int | None = None, prefetch: int = 2,
                    arrays: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Stream the whole labelset in id order as `read_block` dicts; a background thread reads `prefetch` ahead.

        `block_rows` is rounded up to whole chunks (default 8 chunks per block).
        """
        arrays = arrays or self._block_arrays()
        rows = self.chunk_rows * max(1, -(-(block_rows or 8 * self.chunk_rows) // self.chunk_rows))
        starts = iter(range(0, self.num_images, rows))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelset-prefetch")
        try:
            pending = deque()
            for _ in range(prefetch + 1):
                start = next(starts, None)
                if start is not None:
                    pending.append(pool.submit(self.read_block, start, min(start + rows, self.num_images), arrays))
            while pending:
                block = pending.popleft().result()
                start = next(starts, None)
                if start is not None:
                    pending.append(pool.submit(self.read_block, start, min(start + rows, self.num_images), arrays))
                yield block
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def verify(self) -> int:
        """Decode and checksum every chunk of every array; raise CorruptChunkError listing all bad chunks.

        Returns the number of chunks checked.
        """
        problems, checked = [], 0
        for name, chunk, err in iter_chunk_problems(self._arrays, self.provenance.checksums, self.chunk_rows):
            checked += 1
            if err is None:
                self._verified.add((name, chunk))
            else:
                problems.append(err)
        raise_problems(problems, f"labelset {self.labelset_id!r}")
        return checked

    # ---- internals ----------------------------------------------------------------------------------------

    def _block_arrays(self) -> tuple[str, ...]:
        return TOPK_BLOCK_ARRAYS if self.layout == "topk" else DEFAULT_BLOCK_ARRAYS

    def _need_dense(self, what: str) -> None:
        if self.layout == "topk":
            raise DenseNotStoredError(
                f"labelset {self.labelset_id!r} stores only the top-{self.top_k_stored} form at "
                f"T={self.temperature} (no logits), so {what} cannot be computed: the rest's mass says nothing "
                "about how it splits over the other classes. Generate a labelset at that temperature, or one with "
                "dense storage (labels.dense=true)")

    def _all_views_dense(self, image_ids) -> np.ndarray:
        """Dense rows (n, [K,] C) of a top-k labelset at its own T."""
        return tempering.dense_from_topk_mass(*self.topk(image_ids), self.num_classes)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            raise StoreError(f"labelset {self.labelset_id!r} has no array {name!r}; it has {sorted(self._arrays)}")
        return self._arrays[name]

    def _check_ids(self, image_ids) -> np.ndarray:
        """Ids as a 1-D int64 array, or ImageIdError naming a few bad ones."""
        ids = np.asarray(image_ids)
        if ids.ndim > 1:
            raise ImageIdError(f"image ids must be 1-D, got shape {ids.shape}")
        ids = ids.reshape(-1)
        if ids.size == 0:
            return ids.astype(np.int64)
        if ids.dtype.kind not in "iu":
            raise ImageIdError(f"image ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.num_images)
        if bad.any():
            raise ImageIdError(f"image ids {ids[bad][:5].tolist()} are outside 0..{self.num_images - 1} "
                               f"({int(bad.sum())} bad) for labelset {self.labelset_id!r}")
        return ids.astype(np.int64)

    def _rows(self, name: str, image_ids) -> np.ndarray:
        """Stored rows of `name` for the ids, reading each needed chunk once (through the chunk cache)."""
        ids = self._check_ids(image_ids)
        spec = self._specs[name]
        self._array(name)  # raises a clear StoreError for an array this labelset does not store
        out = np.empty((len(ids),) + spec.row_shape, dtype=spec.dtype)
        chunks = ids // self.chunk_rows
        order = np.argsort(chunks, kind="stable")
        unique, firsts = np.unique(chunks[order], return_index=True)
        for chunk, sel in zip(unique.tolist(), np.split(order, firsts[1:])):
            out[sel] = self._chunk[name](chunk)[ids[sel] - chunk * self.chunk_rows]
        return out

    def _load_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Decode and check one chunk (read-only array); cached by the per-array LRU."""
        data = read_chunks(self._arrays[name], name, chunk, chunk + 1, self.chunk_rows)
        self._check_once(name, chunk, data)
        data.flags.writeable = False
        return data

    def _check_once(self, name: str, chunk: int, data: np.ndarray) -> None:
        if (name, chunk) not in self._verified:
            check_chunk(name, chunk, data, self.provenance.checksums[name][chunk])
            self._verified.add((name, chunk))


def _renormalise(probs: np.ndarray) -> np.ndarray:
    """float16 probabilities as float32 rows that sum to 1 (float16 rounding leaves sums off by ~1e-3)."""
    p = probs.astype(np.float32)
    return p / p.sum(axis=-1, keepdims=True)


def _present(name: str, data: np.ndarray) -> np.ndarray:
    """Stored arrays in the dtypes callers compute with."""
    if name == "soft_labels":
        return _renormalise(data)
    if name == "hard_labels":
        return data.astype(np.int64)
    if name == "topk_classes":
        return data.astype(np.int64)
    if name in ("logits", "topk_values", "topk_probs", "topk_rest"):
        return data.astype(np.float32)
    return data


def _reopen(root: str, labelset_id: str, cache_mib: float) -> LabelsetReader:
    return LabelsetReader(root, labelset_id, cache_mib=cache_mib)
