"""The on-disk contract of a labelset: folders, array names, shapes, dtypes, chunking and codecs, in one place.

A labelset is one teacher x one dataset x one temperature. It is a plain Zarr v3 group, readable with
`zarr.open_group(path, mode="r")` and no `ltd` code::

    <root>/<labelset_id>/            published labelset (appears only by an atomic directory rename)
        zarr.json                    group metadata; attributes = the provenance record (store/provenance.py):
                                     temperature, num_classes, mode, chunk_rows, per-chunk sha256 checksums, ...
        logits/        (N, C) or (N, K, C)  float16 | float32   teacher logits, as generated
        soft_labels/   (N, C) or (N, K, C)  float16             softmax(logits / T), T = attrs["temperature"]
        hard_labels/   (N,)                 int32               ground-truth training labels
        topk_indices/  (N, k) or (N, K, k)  int32               optional: top-k classes of soft_labels, largest first
        topk_values/   (N, k) or (N, K, k)  float16             optional: their probabilities renormalised to sum 1
      top-k labelsets (dense=False) hold, instead of logits, soft_labels and topk_indices/values:
        topk_classes/  (N, k) or (N, K, k)  int16 | int32       the k most probable classes, largest first
                                                                (int16 while C <= 32,767)
        topk_probs/    (N, k) or (N, K, k)  float16             their probabilities softmax(logits / T), not renormalised
        topk_rest/     (N,) or (N, K)       float16             1 - sum(topk_probs): the mass of the other C - k classes
        view_params/   (N, K, 5)            float32             views mode only: crop x0, y0, x1, y1 (pixels), flip 0|1
    <root>/.staging/<labelset_id>/   generation in progress (invisible to readers and to the catalog)
        labelset/                    the group above, being filled chunk by chunk
        done/<chunk>.json            one marker per finished chunk with its checksums (written atomically)
    <root>/.trash/<id>--<time>/      deleted labelsets, arrays untouched, with trashed.json (restorable until purged)

Row i of every array is training image `image_id = i`. Modes: `clean` = one teacher output per image;
`views` = K augmented views per image with the crop/flip replay parameters of each view (FKD-style storage).
Every array is chunked along images only, with the same `chunk_rows` (chosen so the widest array's chunk is about
512 KiB, or `DENSE_CHUNK_BYTES` for dense sets), so one writer owns whole chunks of every array. With
`inner_chunk_rows` each such chunk is a Zarr v3 shard of smaller inner chunks (a random read decodes one inner
chunk). Chunks are compressed with the provenance's `codec` (CODECS below; Blosc-zstd level 3 by default, as in
layout 1) followed by a crc32c codec, so plain zarr readers also
detect damaged bytes; zarr records every array's codecs in its own metadata, so older stores read unchanged. The chunk checksum stored in the
provenance is sha256 over the chunk's decoded numbers (C order, little-endian, stored dtype).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from store.errors import InvalidLabelsetIdError

LAYOUT_VERSION = 2  # 2: codec choice, sharding, top-k-only labelsets (dense=False)
LABELSET_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
TRASH_RECORD = "trashed.json"  # inside a trashed labelset: id, deletion time, purge-after time
STAGED_GROUP = "labelset"
DONE_DIR = "done"
TARGET_CHUNK_BYTES = 512 * 1024
DENSE_CHUNK_BYTES = TARGET_CHUNK_BYTES  # dense sets; kept at layout 1's size until bench/label_store.py measures others
TOPK_ARRAYS = ("topk_classes", "topk_probs", "topk_rest")
# codec name -> Blosc settings (None: no compression); crc32c always follows
CODECS = {
    "none": None,
    "lz4": {"cname": "lz4", "clevel": 5},
    "zstd1": {"cname": "zstd", "clevel": 1},
    "zstd3": {"cname": "zstd", "clevel": 3},
    "zstd5": {"cname": "zstd", "clevel": 5},
}
DEFAULT_CODEC = "zstd3"  # layout 1's codec; not re-chosen yet (no codec sweep on the real code path so far)
LEGACY_CODEC = "zstd3"  # what layout 1 wrote
VIEW_PARAM_COLUMNS = ("x0", "y0", "x1", "y1", "flip")
MODES = ("clean", "views")


@dataclass(frozen=True)
class ArraySpec:
    """One array of a labelset: its shape, stored dtype, dimension names, fill value and a description."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    fill_value: float | int
    description: str

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one image's row (everything after the image axis)."""
        return self.shape[1:]


def validate_labelset_id(labelset_id: str) -> str:
    """Return the id unchanged if it is a safe folder name, else raise InvalidLabelsetIdError (no path escapes)."""
    if not isinstance(labelset_id, str) or not LABELSET_ID_PATTERN.fullmatch(labelset_id):
        raise InvalidLabelsetIdError(
            f"invalid labelset id {labelset_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ - starting with a "
            "letter or digit"
        )
    return labelset_id


def published_path(root: str | Path, labelset_id: str) -> Path:
    """Folder of a published labelset: `<root>/<labelset_id>`."""
    return Path(root) / validate_labelset_id(labelset_id)


def staging_path(root: str | Path, labelset_id: str) -> Path:
    """Folder of a labelset being generated: `<root>/.staging/<labelset_id>` (holds `labelset/` and `done/`)."""
    return Path(root) / STAGING_DIR / validate_labelset_id(labelset_id)


def default_chunk_rows(num_images: int, views_per_image: int, num_classes: int, itemsize: int,
                       target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk: the largest power of two keeping one chunk of a row of `num_classes` x `itemsize` bytes
    per view <= `target_bytes`."""
    row_bytes = views_per_image * num_classes * itemsize
    rows = max(1, target_bytes // row_bytes)
    return int(min(2 ** int(np.log2(rows)), num_images))


def class_index_dtype(num_classes: int) -> str:
    """Smallest signed dtype holding every class index: int16 while C <= 32,767, else int32."""
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def num_chunks(num_images: int, chunk_rows: int) -> int:
    """How many image chunks an array of `num_images` rows has."""
    return -(-num_images // chunk_rows)


def chunk_bounds(chunk_index: int, chunk_rows: int, num_images: int) -> tuple[int, int]:
    """Image rows [start, stop) covered by chunk `chunk_index` (the last chunk may be short)."""
    start = chunk_index * chunk_rows
    return start, min(start + chunk_rows, num_images)


def array_specs(
    num_images: int, num_classes: int, mode: str, views_per_image: int, logits_dtype: str, top_k: int | None,
    dense: bool = True,
) -> dict[str, ArraySpec]:
    """Every array a labelset with these settings holds, in write order (`dense=False`: the top-k form only)."""
    n, c, k = num_images, num_classes, views_per_image
    lead = (n, k) if mode == "views" else (n,)
    lead_dims = ("image", "view") if mode == "views" else ("image",)
    hard = ArraySpec("hard_labels", (n,), "int32", ("image",), -1, "ground-truth training label")
    if not dense:
        specs = [
            ArraySpec("topk_classes", lead + (top_k,), class_index_dtype(c), lead_dims + ("rank",), -1,
                      "the top-k classes of softmax(logits / temperature), largest first"),
            ArraySpec("topk_probs", lead + (top_k,), "float16", lead_dims + ("rank",), float("nan"),
                      "their probabilities (not renormalised)"),
            ArraySpec("topk_rest", lead, "float16", lead_dims, float("nan"),
                      "1 - sum(topk_probs): probability mass of the other classes"),
            hard,
        ]
        if mode == "views":
            specs.append(_view_params_spec(n, k))
        return {s.name: s for s in specs}
    specs = [
        ArraySpec("logits", lead + (c,), logits_dtype, lead_dims + ("class",), float("nan"), "teacher logits"),
        ArraySpec("soft_labels", lead + (c,), "float16", lead_dims + ("class",), float("nan"),
                  "softmax(logits / temperature)"),
        hard,
    ]
    if top_k:
        specs += [
            ArraySpec("topk_indices", lead + (top_k,), "int32", lead_dims + ("rank",), -1,
                      "classes of the top-k soft labels, largest first"),
            ArraySpec("topk_values", lead + (top_k,), "float16", lead_dims + ("rank",), float("nan"),
                      "top-k soft labels renormalised to sum to 1"),
        ]
    if mode == "views":
        specs.append(_view_params_spec(n, k))
    return {s.name: s for s in specs}


def _view_params_spec(n: int, k: int) -> ArraySpec:
    return ArraySpec("view_params", (n, k, len(VIEW_PARAM_COLUMNS)), "float32", ("image", "view", "param"),
                     float("nan"), "replay parameters per view: " + ", ".join(VIEW_PARAM_COLUMNS))


def compressors(dtype: str, codec: str = DEFAULT_CODEC) -> list:
    """Codec chain after serialisation: Blosc `codec` (CODECS) with byte shuffle (floats compress better), then
    crc32c, so a damaged chunk fails to decode in any zarr reader."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; pick one of {sorted(CODECS)}")
    blosc = CODECS[codec]
    if blosc is None:
        return [Crc32cCodec()]
    typesize = np.dtype(dtype).itemsize
    return [BloscCodec(shuffle="shuffle", typesize=typesize, **blosc), Crc32cCodec()]
