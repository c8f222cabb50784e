"""Store test fixtures: seeded teacher outputs, labelset specs, and a factory that writes real labelsets on disk."""

from __future__ import annotations

import numpy as np
import pytest

from store import LabelsetSpec, LabelsetWriter


def teacher_outputs(seed: int, num_images: int, num_classes: int, views: int = 0) -> dict[str, np.ndarray]:
    """Seeded stand-in teacher outputs: logits (N, C) or (N, K, C), labels (N,), view params (N, K, 5) if views."""
    rng = np.random.default_rng(seed)
    lead = (num_images, views) if views else (num_images,)
    out = {
        "logits": (rng.standard_normal(lead + (num_classes,)) * 4).astype(np.float32),
        "hard_labels": rng.integers(0, num_classes, num_images),
    }
    if views:
        x0 = rng.integers(0, 16, lead)
        y0 = rng.integers(0, 16, lead)
        side = rng.integers(8, 16, lead)
        flip = rng.integers(0, 2, lead)
        out["view_params"] = np.stack([x0, y0, x0 + side, y0 + side, flip], axis=-1).astype(np.float32)
    return out


def write_chunks(writer: LabelsetWriter, data: dict[str, np.ndarray], chunks=None) -> None:
    """Write the given chunks (default: all) of `data` through the writer."""
    for chunk in range(writer.num_chunks) if chunks is None else chunks:
        a, b = writer.chunk_bounds(chunk)
        writer.write_chunk(chunk, data["logits"][a:b], data["hard_labels"][a:b],
                           data["view_params"][a:b] if "view_params" in data else None)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "labels"


@pytest.fixture(scope="session")
def clean_data():
    return teacher_outputs(seed=0, num_images=300, num_classes=10)


@pytest.fixture(scope="session")
def clean_spec():
    # 300 images in chunks of 64: four full chunks and a short last one (44 rows)
    return LabelsetSpec(
        teacher_checkpoint_hash="sha256:teacher", config={"teacher": {"arch": "resnet32"}, "seed": 0},
        dataset_name="synthetic_lt", dataset_fingerprint="fp:300", num_images=300, num_classes=10,
        class_names=[f"c{i}" for i in range(10)], class_counts=[100, 60, 40, 30, 20, 15, 12, 10, 8, 5],
        temperature=2.0, top_k=3, chunk_rows=64,
    )


@pytest.fixture(scope="session")
def views_data():
    return teacher_outputs(seed=1, num_images=50, num_classes=7, views=3)


@pytest.fixture(scope="session")
def views_spec():
    return LabelsetSpec(
        teacher_checkpoint_hash="sha256:teacher", dataset_name="synthetic_lt", dataset_fingerprint="fp:50",
        num_images=50, num_classes=7, temperature=4.0, mode="views", views_per_image=3, top_k=2,
        logits_dtype="float32", chunk_rows=16,
    )


@pytest.fixture
def make_labelset(root):
    """Write (and by default publish) a labelset under the test's root; returns the writer."""

    def make(labelset_id, spec, data, publish=True):
        writer = LabelsetWriter.create(root, labelset_id, spec)
        write_chunks(writer, data)
        if publish:
            writer.publish()
        return writer

    return make


@pytest.fixture(name="write_chunks")
def write_chunks_fixture():
    """The `write_chunks(writer, data, chunks=None)` helper, for tests that stage labelsets by hand."""
    return write_chunks
