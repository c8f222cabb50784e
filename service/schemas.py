"""Request and response schemas of the HTTP API, per resource, with the examples /docs shows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from trainer.config import RunConfig
from store.catalog import LabelsetSummary
from store.layout import LABELSET_ID_PATTERN

LABELSET_ID = Field(pattern=LABELSET_ID_PATTERN.pattern, description="Labelset id (a folder name)",
                    examples=["fmnist-ssd-t2"])
TEMPERATURE = dict(ge=0.05, le=100.0, description="Re-temper at T' from the stored logits (default: the stored T)")
TINY_CONFIG = {"method": "ssd", "data": {"name": "synthetic", "imbalance_factor": 20, "max_per_class": 60},
               "model": {"arch": "resnet8"}, "stage1": {"optim": {"epochs": 2, "warmup_epochs": 0}},
               "stage3": {"optim": {"epochs": 2, "warmup_epochs": 0}}}


def _integral(value):
    """7.0 -> 7: JSON Schema counts a number with no fractional part as an integer; strict pydantic does not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds):
    """An integer in a strict request body as JSON Schema defines one (7 or 7.0; not "7", true or 7.5). The bounds
    go before the validator: pydantic documents them as minimum/maximum only in that order."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


class Schema(BaseModel):
    """A request body: unknown fields are refused, and values are taken as their JSON types, never coerced (a
    boolean is not an image id, nor a temperature). A run config inside keeps its own, YAML-friendly parsing."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: what went wrong and the error's type (the typed exception, or validation_error)."""

    detail: str | list[dict[str, Any]] = Field(description="Message, or the list of validation errors")
    type: str = Field(description="Error type, e.g. labelset_not_found, image_id, validation_error")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "no published labelset 'nope' under store", "type": "labelset_not_found"}]})


def error_responses(*codes: int) -> dict:
    """OpenAPI `responses` entries for these status codes, all with the ErrorBody schema."""
    text = {400: "Malformed input (an unreadable image, a body that is not UTF-8 JSON)",
            401: "Missing or wrong X-API-Key",
            404: "Unknown id", 409: "Conflicts with the current state", 413: "Too large (body, image or id list)",
            422: "Invalid parameters or config"}
    return {code: {"model": ErrorBody, "description": text[code]} for code in codes}


# ---- health ---------------------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="Each dependency and its state", examples=[
        {"job_db": "ok", "store_root": "ok", "ray": "not started (joins on the first job)"}])


# ---- labelsets ------------------------------------------------------------------------------------------------------


class LabelsetPublic(LabelsetSummary):
    """One published labelset: what it holds and how it was made (the store's catalog line, as the API shows it)."""

    size_bytes: int | None = None

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "labelset_id": "fmnist-ssd-t2", "dataset_name": "fashion_mnist", "num_images": 12406, "num_classes": 10,
        "temperature": 2.0, "mode": "clean", "views_per_image": 1, "logits_dtype": "float16", "top_k": None,
        "teacher_checkpoint_hash": "9b1f...", "created": "2026-11-23T10:00:00Z",
        "published": "2026-11-23T10:01:00Z", "size_bytes": 310000}]})


class LabelsetDetail(LabelsetPublic):
    """A labelset's full provenance, minus per-chunk checksums."""

    class_names: list[str] | None
    class_counts: list[int] | None
    dataset_fingerprint: str
    chunk_rows: int
    code_version: str
    layout_version: int
    config: dict[str, Any] = Field(description="The resolved run config that generated the labels")
    content: dict[str, Any] | None = Field(None, description=(
        "What the soft labels carry, by many/medium/few group and teacher right/wrong: mean max-probability, "
        "entropy (nats; uniform = uniform_entropy), mass off the argmax and off the hard label, and how often the "
        "argmax differs from the hard label. None for labelsets published before it was recorded"))


class LabelsetsPublic(BaseModel):
    data: list[LabelsetPublic]
    count: int


class TrashedLabelset(BaseModel):
    """A deleted labelset waiting in the store's trash: restorable until `purge_after`."""

    labelset_id: str
    trash_id: str = Field(description="Its folder in the trash (each deletion of an id is kept apart)")
    deleted: datetime
    purge_after: datetime = Field(description="After this time the service erases it (LTD_TRASH_DAYS)")
    size_bytes: int
    restore: str = Field(description="The request that brings it back")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "labelset_id": "fmnist-ssd-t2", "trash_id": "fmnist-ssd-t2--20261207T120000000000Z-1a2b3c",
        "deleted": "2026-12-07T12:00:00Z", "purge_after": "2026-12-14T12:00:00Z", "size_bytes": 310000,
        "restore": "POST /v1/labelsets/fmnist-ssd-t2:restore"}]})


class TrashPublic(BaseModel):
    data: list[TrashedLabelset]
    count: int


class LabelRow(BaseModel):
    """One image's soft label: dense probabilities, or with top_k the k largest (renormalised) and their classes."""

    image_id: int
    hard_label: int = Field(description="Ground-truth training label")
    classes: list[int] | None = Field(None, description="Top-k class ids, largest first (None: dense row)")
    probs: list[float] = Field(description="Probabilities (6 decimals): all C classes, or the top-k of `classes`")


class LabelOut(LabelRow):
    labelset_id: str
    temperature: float = Field(description="T of these probabilities")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "labelset_id": "fmnist-ssd-t2", "temperature": 2.0, "image_id": 7, "hard_label": 3, "classes": [3, 6],
        "probs": [0.81, 0.19]}]})


class BatchLabelsIn(Schema):
    """Many rows at once; send `Accept: application/octet-stream` (or ?format=npy) for an npy float16 (n, C) body."""

    image_ids: list[json_int()] = Field(min_length=1, description="Training image ids (row order of the answer)")
    temperature: float | None = Field(None, **TEMPERATURE)
    top_k: json_int(ge=1, le=100_000) | None = Field(None, description="Keep the k largest probabilities, renormalised")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"image_ids": [0, 1, 2, 3], "temperature": 4.0, "top_k": 3}]})


class BatchLabelsOut(BaseModel):
    labelset_id: str
    temperature: float
    num_classes: int
    data: list[LabelRow]
    count: int


# ---- jobs -----------------------------------------------------------------------------------------------------------


class JobBase(Schema):
    config: RunConfig | None = Field(None, description="Run config (as in configs/*.yaml); out_dir and "
                                                       "stage1_cache are ignored: outputs go to the job's own run "
                                                       "folder, and the service keeps its own stage-I cache")
    overrides: list[str] = Field(default_factory=list, max_length=64,
                                 description="`a.b=value` overrides applied on top of the config, as `ltd train` takes")


class TrainJobIn(JobBase):
    """Train a model (an SSD run also saves its teacher) from a run config."""

    kind: Literal["train"]
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"kind": "train", "config": TINY_CONFIG}]})


class LabelsJobIn(JobBase):
    """Run a teacher over its training set on Ray workers and publish a labelset."""

    kind: Literal["labels"]
    teacher: str = Field(description="Model id of the teacher, e.g. '<train job id>/teacher'",
                         examples=["3f2a9c01d4e5/teacher"])
    labelset_id: Annotated[str, LABELSET_ID]
    temperature: float | None = Field(None, ge=0.05, le=100.0, description="T (default: config stage3.temperature)")
    mode: Literal["clean", "views"] | None = Field(None, description="Default from config stage3.soft_labels")
    views: json_int(ge=1, le=64) | None = Field(None, description="Views per image in views mode")
    top_k: json_int(ge=1) | None = Field(None, description="Also store a top-k sparse form")
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"kind": "labels", "teacher": "3f2a9c01d4e5/teacher", "labelset_id": "tiny-t2", "temperature": 2.0}]})


class DistillJobIn(JobBase):
    """SSD stages III-IV: a new student learns from a stored labelset (config default: the labelset's own)."""

    kind: Literal["distill"]
    labelset_id: Annotated[str, LABELSET_ID]
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"kind": "distill", "labelset_id": "tiny-t2", "overrides": ["stage3.optim.epochs=2"]}]})


JobIn = Annotated[TrainJobIn | LabelsJobIn | DistillJobIn, Field(discriminator="kind")]


class JobPublic(BaseModel):
    """A job record: state, progress, metrics, error, and where its outputs are."""

    id: str
    kind: Literal["train", "labels", "distill"]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    attempt: int = Field(description="1, plus one per resubmission (:retry)")
    created: datetime
    started: datetime | None
    finished: datetime | None
    error: str | None = Field(description="Why it failed or was cancelled")
    progress: dict[str, Any] | None = Field(description="stage/epoch/epochs/loss, or chunks_done/num_chunks; "
                                                        "`waiting` while a train job waits for a stage I another job "
                                                        "trains (queued: held back by the service)")
    metrics: dict[str, Any] | None = Field(description="Last-epoch test accuracy (percent) per stage; for train "
                                                       "jobs, whether stage I came from a shared one")
    outputs: dict[str, Any] | None = Field(description="Model ids or the labelset a succeeded job made")
    request: dict[str, Any] = Field(description="The request as submitted")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2a9c01d4e5", "kind": "train", "state": "running", "attempt": 1,
        "created": "2026-11-23T10:00:00Z", "started": "2026-11-23T10:00:02Z", "finished": None, "error": None,
        "progress": {"stage": "I", "epoch": 1, "epochs": 2, "loss": 2.1}, "metrics": None, "outputs": None,
        "request": {"kind": "train", "config": TINY_CONFIG}}]})


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="All records matching the filter (the page may hold fewer)")


# ---- models ---------------------------------------------------------------------------------------------------------


class ModelPublic(BaseModel):
    """A trained classifier under the runs root and what its file says about itself."""

    id: str
    role: str = Field(description="teacher | student | classifier")
    method: str
    arch: str
    num_classes: int
    class_names: list[str]
    image_size: int
    in_channels: int
    metrics: dict[str, Any] = Field(description="Its last-epoch test accuracy (percent)")
    size_bytes: int
    modified: datetime

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2a9c01d4e5", "role": "student", "method": "ssd", "arch": "resnet32", "num_classes": 10,
        "class_names": ["t-shirt", "trouser"], "image_size": 28, "in_channels": 1,
        "metrics": {"overall": 81.2, "many": 90.1, "medium": 80.0, "few": 70.3}, "size_bytes": 1900000,
        "modified": "2026-11-23T10:05:00Z"}]})


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class ClassProb(BaseModel):
    class_id: int
    class_name: str
    prob: float


class Prediction(BaseModel):
    file: str = Field(description="The uploaded file's name")
    top_k: list[ClassProb] = Field(description="Most probable classes first")


class PredictOut(BaseModel):
    model_id: str
    data: list[Prediction]
    count: int

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model_id": "3f2a9c01d4e5", "count": 1,
        "data": [{"file": "boot.png", "top_k": [{"class_id": 9, "class_name": "boot", "prob": 0.93}]}]}]})
