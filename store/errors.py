"""Typed store errors; each also inherits the builtin a caller would expect (zarr's habit in `zarr.errors`)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by `store`."""


class InvalidLabelsetIdError(StoreError, ValueError):
    """A labelset id that is not `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` (ids become folder names under the root)."""


class LabelsetNotFoundError(StoreError, FileNotFoundError):
    """No published (or, for writers, no staged) labelset with this id under the root."""


class LabelsetExistsError(StoreError, FileExistsError):
    """A labelset with this id is already published or staged; labelsets are never silently overwritten."""


class IncompleteLabelsetError(StoreError):
    """Publishing was asked for while some chunks are still unwritten."""

    def __init__(self, message: str, *, missing: list[int] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


class ImageIdError(StoreError, IndexError):
    """Image ids (or view indices) that are negative, out of range or not integers."""


class CorruptChunkError(StoreError, ValueError):
    """A chunk whose bytes do not decode or whose checksum does not match its provenance record."""

    def __init__(self, message: str, *, array: str | None = None, chunk: int | None = None,
                 problems: list[tuple[str, int]] | None = None):
        super().__init__(message)
        self.array = array
        self.chunk = chunk
        # every (array, chunk) found bad; `verify()` reports them all, not only the first
        self.problems = list(problems or ([(array, chunk)] if array is not None else []))


class DenseNotStoredError(StoreError):
    """A top-k labelset asked for what only dense storage holds: logits, or soft labels at another temperature
    (softmax(logits / T') needs every logit; the top-k form keeps k probabilities and the rest's total mass)."""
