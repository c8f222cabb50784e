"""Versioned soft-label store: teacher outputs per training image as plain Zarr v3 labelsets (no torch needed)."""

from store.catalog import (LabelsetSummary, StagingSummary, TrashEntry, delete, describe, list_labelsets, list_staging,
                           list_trash, purge, restore)
from store.errors import (
    CorruptChunkError,
    DenseNotStoredError,
    ImageIdError,
    IncompleteLabelsetError,
    InvalidLabelsetIdError,
    LabelsetExistsError,
    LabelsetNotFoundError,
    StoreError,
)
from store.layout import VIEW_PARAM_COLUMNS, validate_labelset_id
from store.provenance import LabelsetSpec, Provenance
from store.reader import LabelsetReader
from store.tempering import dense_from_topk, dense_from_topk_mass, softmax, top_k, top_k_mass
from store.writer import LabelsetWriter

__all__ = [
    "CorruptChunkError",
    "DenseNotStoredError",
    "ImageIdError",
    "IncompleteLabelsetError",
    "InvalidLabelsetIdError",
    "LabelsetExistsError",
    "LabelsetNotFoundError",
    "LabelsetReader",
    "LabelsetSpec",
    "LabelsetSummary",
    "LabelsetWriter",
    "Provenance",
    "StagingSummary",
    "StoreError",
    "TrashEntry",
    "VIEW_PARAM_COLUMNS",
    "delete",
    "dense_from_topk",
    "dense_from_topk_mass",
    "describe",
    "list_labelsets",
    "list_staging",
    "list_trash",
    "purge",
    "restore",
    "softmax",
    "top_k",
    "top_k_mass",
    "validate_labelset_id",
]
