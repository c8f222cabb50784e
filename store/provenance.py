"""The provenance record of a labelset: what produced it and how it is laid out (the Zarr group's attributes)."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from store.layout import (CODECS, DEFAULT_CODEC, DENSE_CHUNK_BYTES, LAYOUT_VERSION, LEGACY_CODEC, TARGET_CHUNK_BYTES,
                          array_specs, class_index_dtype, default_chunk_rows, num_chunks, validate_labelset_id)


def _code_version() -> str:
    """Installed `ltd` version (the generating code), or "unknown" when run from an uninstalled tree."""
    try:
        return metadata.version("ltd")
    except metadata.PackageNotFoundError:
        return "unknown"


class LabelsetSpec(BaseModel):
    """What a caller states when it creates a labelset: the teacher, the data, T and the storage options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher_checkpoint_hash: str = Field(description="sha256 of the teacher checkpoint file")
    config: dict[str, Any] = Field(default_factory=dict, description="resolved run config (JSON) that made the set")
    dataset_name: str = Field(description="dataset name, e.g. cifar100_lt")
    dataset_fingerprint: str = Field(description="fingerprint of the training list (ids, labels, files)")
    num_images: int = Field(ge=1, description="N, training images; rows are image_id 0..N-1")
    num_classes: int = Field(ge=2, description="C, classes per row")
    class_names: list[str] | None = Field(default=None, description="C class names, in label order")
    class_counts: list[int] | None = Field(default=None, description="training images per class, in label order")
    temperature: float = Field(gt=0, description="T of soft_labels = softmax(logits / T)")
    mode: Literal["clean", "views"] = Field(default="clean", description="clean: one row per image; views: K views")
    views_per_image: int = Field(default=1, ge=1, description="K, stored augmented views per image (1 if clean)")
    logits_dtype: Literal["float16", "float32"] = Field(default="float16", description="stored dtype of logits")
    top_k: int | None = Field(default=None, ge=1, description="k of the top-k form: stored next to the dense arrays, "
                              "or alone with dense=False (None: the config's labels.top_k, else not stored)")
    dense: bool | None = Field(default=None, description="store logits and dense soft_labels; False keeps only the "
                               "top-k classes, probabilities and rest mass (None: the config's labels.dense, else True)")
    codec: Literal[tuple(CODECS)] | None = Field(default=None, description="chunk compression, store/layout.py "
                                                 f"CODECS (None: {DEFAULT_CODEC})")
    chunk_rows: int | None = Field(default=None, ge=1, description="images per chunk (None: store/layout.py default)")
    inner_chunk_rows: int | None = Field(default=None, ge=1, description="Zarr v3 sharding: each chunk_rows chunk "
                                         "is one shard of inner chunks this tall (None: no sharding)")
    code_version: str | None = Field(default=None, description="version of the generating code (None: installed)")

    @model_validator(mode="before")
    @classmethod
    def _from_config(cls, data):
        """top_k and dense default to the run config's `labels` section, so a run's labels settings reach the store."""
        if isinstance(data, dict):
            labels = (data.get("config") or {}).get("labels") or {}
            data = dict(data)
            if data.get("top_k") is None and labels.get("top_k") is not None:
                data["top_k"] = labels["top_k"]
            if data.get("dense") is None and labels.get("dense") is not None:
                data["dense"] = labels["dense"]
        return data

    @model_validator(mode="after")
    def _check(self) -> LabelsetSpec:
        c = self.num_classes
        if self.class_names is not None and len(self.class_names) != c:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes={c}; pass one per class")
        if self.class_counts is not None and len(self.class_counts) != c:
            raise ValueError(f"class_counts has {len(self.class_counts)} entries but num_classes={c}")
        if self.mode == "clean" and self.views_per_image != 1:
            raise ValueError("mode='clean' stores one row per image: set views_per_image=1 or mode='views'")
        if self.top_k is not None and self.top_k > c:
            raise ValueError(f"top_k={self.top_k} exceeds num_classes={c}")
        if self.dense is False and self.top_k is None:
            raise ValueError("dense=False stores only the top-k form: set top_k (e.g. labels.top_k=10)")
        if self.inner_chunk_rows is not None and self.chunk_rows is not None and self.chunk_rows % self.inner_chunk_rows:
            raise ValueError(f"chunk_rows={self.chunk_rows} must be a multiple of inner_chunk_rows="
                             f"{self.inner_chunk_rows} (each chunk is one shard of whole inner chunks)")
        return self


class Provenance(LabelsetSpec):
    """The full record kept in the group attributes: the spec plus id, layout, times, checksums and status."""

    labelset_id: str = Field(description="folder name under the store root")
    chunk_rows: int = Field(ge=1, description="images per chunk, shared by every array")
    code_version: str = Field(description="version of the generating code")
    dense: bool = Field(default=True, description="logits and dense soft_labels stored (False: top-k form only)")
    codec: Literal[tuple(CODECS)] = Field(default=DEFAULT_CODEC, description="chunk compression (store/layout.py)")
    layout_version: int = Field(default=LAYOUT_VERSION, description="store/layout.py contract version")
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc), description="staging created (UTC)")
    published: datetime | None = Field(default=None, description="publish time (UTC); None while staging")
    status: Literal["staging", "complete"] = Field(default="staging", description="complete once published")
    checksums: dict[str, list[str]] = Field(
        default_factory=dict, description="array name -> sha256 of each chunk's decoded numbers, by chunk index"
    )
    content: dict[str, Any] | None = Field(
        default=None, description="what the soft labels carry (store/content.py), by shot group and teacher "
        "right/wrong: mean max-probability, entropy, mass off the argmax and off the hard label; set at publish")

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data):
        """Records written before layout 2 have no codec (they used Blosc-zstd level 3) and are dense."""
        if isinstance(data, dict) and data.get("layout_version", LAYOUT_VERSION) < 2 and data.get("codec") is None:
            data = {**data, "codec": LEGACY_CODEC}
        return data

    @model_validator(mode="after")
    def _check_id(self) -> Provenance:
        validate_labelset_id(self.labelset_id)
        return self

    @classmethod
    def from_spec(cls, labelset_id: str, spec: LabelsetSpec) -> Provenance:
        """Resolve a spec's defaults (chunk rows, code version) into a staging record."""
        fields = spec.model_dump()
        fields["dense"] = spec.dense is not False
        fields["codec"] = spec.codec or DEFAULT_CODEC
        if fields["chunk_rows"] is None:
            if fields["dense"]:  # the widest array: logits
                width, itemsize, target = spec.num_classes, np.dtype(spec.logits_dtype).itemsize, DENSE_CHUNK_BYTES
            else:  # per view: k classes + k float16 probs + one float16 rest
                width, target = 1, TARGET_CHUNK_BYTES
                itemsize = spec.top_k * (np.dtype(class_index_dtype(spec.num_classes)).itemsize + 2) + 2
            fields["chunk_rows"] = default_chunk_rows(spec.num_images, spec.views_per_image, width, itemsize, target)
            if spec.inner_chunk_rows:  # whole inner chunks per shard
                fields["chunk_rows"] = max(spec.inner_chunk_rows,
                                           fields["chunk_rows"] // spec.inner_chunk_rows * spec.inner_chunk_rows)
        fields["chunk_rows"] = min(fields["chunk_rows"], spec.num_images)
        if spec.inner_chunk_rows:
            fields["inner_chunk_rows"] = min(spec.inner_chunk_rows, fields["chunk_rows"])
        fields["code_version"] = fields["code_version"] or _code_version()
        return cls(labelset_id=labelset_id, **fields)

    @property
    def num_chunks(self) -> int:
        """Chunks along the image axis."""
        return num_chunks(self.num_images, self.chunk_rows)

    def arrays(self):
        """The ArraySpec of every stored array (store/layout.py), keyed by name."""
        return array_specs(self.num_images, self.num_classes, self.mode, self.views_per_image,
                           self.logits_dtype, self.top_k, self.dense)

    @property
    def layout(self) -> str:
        """"dense" (logits and soft_labels stored) or "topk" (the top-k form only)."""
        return "dense" if self.dense else "topk"

    def same_data_as(self, other: LabelsetSpec) -> bool:
        """True if `other` asks for the same labelset (ignores times, status, checksums and code version)."""
        keys = set(LabelsetSpec.model_fields) - {"code_version", "chunk_rows", "dense", "codec", "inner_chunk_rows"}
        mine, theirs = self.model_dump(include=keys), other.model_dump(include=keys)
        if (other.dense is not False) != self.dense or (other.codec or DEFAULT_CODEC) != self.codec:
            return False
        chunk_ok = other.chunk_rows is None or min(other.chunk_rows, self.num_images) == self.chunk_rows
        return mine == theirs and chunk_ok
