"""Chunk checksums and checked chunk reads: damaged bytes raise CorruptChunkError, never return wrong numbers."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import zarr

from store.errors import CorruptChunkError
from store.layout import chunk_bounds

# chunks decoded per zarr call when scanning a whole array (zarr decodes the chunks of one call concurrently)
SCAN_CHUNKS = 16


def chunk_checksum(values: np.ndarray) -> str:
    """sha256 (hex) of a chunk's numbers: C order, little-endian, in the stored dtype (store/layout.py)."""
    data = np.ascontiguousarray(values)
    return hashlib.sha256(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


def read_chunks(array: zarr.Array, name: str, first: int, last: int, chunk_rows: int) -> np.ndarray:
    """Decoded rows of chunks first..last-1 of `array`; a chunk that fails to decode raises CorruptChunkError."""
    start, stop = first * chunk_rows, min(last * chunk_rows, array.shape[0])
    try:
        return array[start:stop]
    except OSError:
        raise  # a missing disk or permission problem is not chunk corruption
    except Exception as exc:  # codec errors come as ValueError (crc32c), RuntimeError (blosc/zstd) and others
        if last - first == 1:
            raise CorruptChunkError(
                f"array {name!r} chunk {first} (images {start}..{stop - 1}) cannot be decoded: {exc}",
                array=name, chunk=first,
            ) from exc
        for chunk in range(first, last):  # find which chunk of the range is bad
            read_chunks(array, name, chunk, chunk + 1, chunk_rows)
        raise


def check_chunk(name: str, chunk: int, values: np.ndarray, expected: str) -> None:
    """Raise CorruptChunkError unless the chunk's decoded numbers hash to the recorded checksum."""
    actual = chunk_checksum(values)
    if actual != expected:
        raise CorruptChunkError(
            f"array {name!r} chunk {chunk}: checksum mismatch (recorded sha256 {expected[:12]}..., "
            f"read {actual[:12]}...)",
            array=name, chunk=chunk,
        )


def iter_chunk_problems(
    arrays: Mapping[str, zarr.Array], checksums: Mapping[str, list[str]], chunk_rows: int
) -> Iterator[tuple[str, int, CorruptChunkError | None]]:
    """Read every chunk of every array once and yield (array, chunk, error or None) against `checksums`."""
    for name, array in arrays.items():
        n = array.shape[0]
        expected = checksums[name]
        for first in range(0, len(expected), SCAN_CHUNKS):
            last = min(first + SCAN_CHUNKS, len(expected))
            try:
                block = read_chunks(array, name, first, last, chunk_rows)
            except CorruptChunkError:
                # re-read chunk by chunk so every bad chunk of the range is reported, not just the first
                block = None
            for chunk in range(first, last):
                start, stop = chunk_bounds(chunk, chunk_rows, n)
                try:
                    if block is None:
                        values = read_chunks(array, name, chunk, chunk + 1, chunk_rows)
                    else:
                        values = block[start - first * chunk_rows: stop - first * chunk_rows]
                    check_chunk(name, chunk, values, expected[chunk])
                    yield name, chunk, None
                except CorruptChunkError as err:
                    yield name, chunk, err


def raise_problems(problems: list[CorruptChunkError], what: str) -> None:
    """Raise one CorruptChunkError listing every bad chunk (first one's array/chunk as attributes), if any."""
    if not problems:
        return
    listed = "; ".join(str(p) for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CorruptChunkError(
        f"{what}: {len(problems)} corrupt chunk(s): {listed}{more}",
        array=problems[0].array, chunk=problems[0].chunk, problems=[(p.array, p.chunk) for p in problems],
    )
