"""Models: trained classifiers (students, teachers) with their metrics, and top-k prediction on uploaded images."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from service.deps import MetricsDep, ModelId, ModelsDep, ReadKey, SettingsDep, WriteKey
from service.errors import PayloadTooLargeError
from service.inference import ModelEntry, decode_image, to_model_input
from service.schemas import ClassProb, ModelPublic, ModelsPublic, Prediction, PredictOut, error_responses

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[ReadKey],
                   responses=error_responses(400, 401, 404, 422))


def _public(entry: ModelEntry) -> ModelPublic:
    spec = entry.spec
    return ModelPublic(id=entry.model_id, role=spec.role, method=spec.method, arch=spec.arch,
                       num_classes=spec.num_classes, class_names=spec.class_names, image_size=spec.image_size,
                       in_channels=spec.in_channels, metrics=spec.metrics, size_bytes=entry.size_bytes,
                       modified=datetime.fromtimestamp(entry.modified, UTC))


@router.get("", summary="List models")
def list_models(models: ModelsDep) -> ModelsPublic:
    """Every model.pt (final classifier or SSD student) and teacher.pt under the runs root, with its metrics."""
    entries = [_public(e) for e in models.list()]
    return ModelsPublic(data=entries, count=len(entries))


@router.get("/{model_id:model_path}", summary="Describe a model")
def describe_model(model_id: ModelId, models: ModelsDep) -> ModelPublic:
    """One model: role, architecture, classes, input size and metrics."""
    return _public(models.entry(model_id))


@router.put("/{model_id:model_path}", summary="Upload a model", status_code=201, dependencies=[WriteKey],
            responses=error_responses(409, 413))
def upload_model(model_id: ModelId, file: Annotated[UploadFile, File(description="A model.pt from `ltd train`")],
                 models: ModelsDep, replace: Annotated[bool, Query(
                     description="Replace an existing model; the replaced file is kept as model.previous.pt")] = False
                 ) -> ModelPublic:
    """Add a classifier trained elsewhere: the file must load (weights only) and run. An existing id is 409 unless
    `replace=true`.

    The body is capped by LTD_MAX_UPLOAD_BYTES (413 beyond it): raise it to accept ResNet-50-sized files.
    """
    return _public(models.add(model_id, file.file.read(), replace=replace))


@router.post("/{model_id:model_path}:predict", summary="Classify images", responses=error_responses(413))
def predict(model_id: ModelId,
            files: Annotated[list[UploadFile], File(description="PNG or JPEG images", min_length=1)],
            models: ModelsDep, settings: SettingsDep, metrics: MetricsDep,
            top_k: Annotated[int, Query(ge=1, le=1000, description="Classes per image")] = 5) -> PredictOut:
    """Top-k classes with probabilities for each uploaded image, all images in one batched forward pass."""
    if len(files) > settings.max_upload_files:
        raise PayloadTooLargeError(f"{len(files)} files; at most {settings.max_upload_files} per request")
    _, spec = models.load(model_id)
    start = time.perf_counter()
    names, images = [], []
    for i, upload in enumerate(files):
        name = upload.filename or f"file {i}"  # the whole body is already within LTD_MAX_UPLOAD_BYTES
        names.append(name)
        images.append(to_model_input(decode_image(upload.file.read(), name, settings.max_image_pixels), spec))
    probs, classes = models.classify(model_id, images, top_k)  # batched with concurrent requests (settings)
    metrics.inference_latency.labels(model_id).observe(time.perf_counter() - start)
    metrics.inference_images.labels(model_id).inc(len(images))
    data = [Prediction(file=name, top_k=[ClassProb(class_id=c, class_name=spec.class_names[c], prob=round(p, 6))
                                         for c, p in zip(row_c, row_p)])
            for name, row_c, row_p in zip(names, classes.tolist(), probs.tolist())]
    return PredictOut(model_id=model_id, data=data, count=len(data))
