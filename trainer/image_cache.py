"""Decode once: a split's image files resized to one square size, kept as a memory-mapped uint8 array on local disk.

The first pass decodes every file with PIL (a thread pool: Pillow releases the GIL while it decodes and resizes),
resizes it so its shorter side is `size` (torchvision's Resize on the PIL image, bilinear with PIL's antialias) and
keeps the centred `size` x `size` square (CenterCrop), so the whole split is one (N, size, size, 3) uint8 `.npy`.
Later epochs, label generation and evaluation read rows of it through the page cache (np.load(mmap_mode="r")), and
training draws its random-resized-crop and flip on the device from these rows (trainer/batches.py CachedBatches),
as FFCV's `.beton` files and airbench's GPU-resident loader do. What is lost: the parts of a non-square image
outside its centred square, and the resolution above `size` (a random-resized crop upsamples more).

The file is keyed by the split's fingerprint (labels and paths in id order, trainer/datasets.py `fingerprint`), the
image root, every file's byte size and mtime, and `size`: a changed folder, an edited file or another size builds a
new file, and an unchanged one is reused without a decode. It is written to a temporary name and renamed into place
(os.replace), so a reader never sees a half-written cache and two processes building the same one both end whole.

A file that fails to decode here is handled as ListFileImages (trainer/batches.py) handles it: the next decodable
image of the same class (in id order, wrapping around) stands in for it, its id keeps its row, and it is logged; the
sidecar `<key>.json` lists the stand-ins, so a reopened cache reports them too. A class none of whose images decode is
an error naming it. (The folder scan, trainer/folder.py, already skips the files it finds unreadable.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when decode_resized changes its pixels: old files are then never read again
_CHUNK = 256  # images per task of the decode pool (and per progress update)


def default_cache_dir() -> Path:
    """$LTD_CACHE/images, else ~/.cache/ltd/images (where trainer/datasets.py keeps its decoded CIFAR copy too)."""
    return Path(os.environ.get("LTD_CACHE", Path.home() / ".cache" / "ltd")) / "images"


def decode_resized(path: str | os.PathLike, size: int) -> np.ndarray:
    """uint8 (size, size, 3): the file as RGB, shorter side resized to `size`, centre square; what the cache stores."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as image:
        rgb = image.convert("RGB")  # grayscale, CMYK, palette and alpha to RGB, as ListFileImages' read_rgb does
    return np.asarray(TF.center_crop(TF.resize(rgb, size), size))


def fingerprint(images: np.ndarray | None, labels: np.ndarray, paths: tuple[str, ...] | None = None) -> str:
    """sha256 over the training list's content in image-id order: the key the label store checks."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if images is not None:
        h.update(np.ascontiguousarray(images).tobytes())
    for p in paths or ():
        h.update(p.encode() + b"\n")
    return h.hexdigest()[:16]


def cache_key(root: Path, paths: tuple[str, ...], labels: np.ndarray, size: int) -> str:
    """What the cache's pixels depend on: the split's fingerprint, its root, each file's bytes and mtime, the size."""
    root = Path(root).resolve()
    h = hashlib.sha256(f"v{CACHE_VERSION} size={size} root={root} list={fingerprint(None, labels, paths)}".encode())
    stats = np.zeros((len(paths), 2), dtype=np.int64)
    for i, rel in enumerate(paths):  # one stat per file: ~5 µs each from the dentry cache, 0.5 s per 100k files
        st = os.stat(root / rel)
        stats[i] = st.st_size, st.st_mtime_ns
    h.update(stats.tobytes())
    return h.hexdigest()[:24]


def cache_bytes(count: int, size: int) -> int:
    """Bytes the pixel array of `count` images at `size` takes on disk (plus a 128-byte .npy header)."""
    return count * size * size * 3


def open_cached(path: Path) -> np.ndarray:
    """The cache's (N, S, S, 3) uint8 rows, memory-mapped read-only (pages come from the OS page cache)."""
    return np.load(path, mmap_mode="r")


def open_or_build(split, size: int, cache_dir: Path | None = None, threads: int | None = None) -> Path:
    """The cache file of an ImageSet with paths (trainer/datasets.py) at `size`: reused when its key exists, else built.

    Returns the `.npy` path (ImageSet.cache). Building takes one decode per file: `threads` decoders (default: the
    CPUs this process may use), a progress bar, and the stand-ins of undecodable files (module doc).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    labels = split.labels.numpy() if hasattr(split.labels, "numpy") else np.asarray(split.labels)
    key = cache_key(split.root, split.paths, labels, size)
    path = cache_dir / f"{key}.npy"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("substituted"):
            log.warning("image cache %s: %d undecodable files stand in as another image of their class (listed in %s)",
                        path, len(meta["substituted"]), meta_path)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    need, free = cache_bytes(len(split.paths), size), shutil.disk_usage(cache_dir).free
    if need > free:
        raise OSError(f"the image cache of {split.root} at data.cache_size={size} needs {need / 2**30:.1f} GiB and "
                      f"{cache_dir} has {free / 2**30:.1f} GiB free; FIX THIS by lowering data.cache_size or pointing "
                      f"data.cache_dir (or LTD_CACHE) at a larger local disk")
    tic = time.perf_counter()
    tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npy")
    try:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split.paths), size, size, 3))
        broken = _decode_into(pixels, Path(split.root), split.paths, size, threads)
        substituted = _stand_in(pixels, labels, broken, Path(split.root), split.paths)
        pixels.flush()
        del pixels
        seconds = time.perf_counter() - tic
        meta = {"version": CACHE_VERSION, "root": str(Path(split.root).resolve()), "count": len(split.paths),
                "size": size, "bytes_per_image": size * size * 3, "build_seconds": round(seconds, 2),
                "substituted": {str(i): {"path": split.paths[i], "by": split.paths[j], "reason": broken[i]}
                                for i, j in substituted.items()}}
        meta_tmp = meta_path.with_name(f"{key}.{os.getpid()}.tmp.json")
        meta_tmp.write_text(json.dumps(meta, indent=1))
        # The sidecar first, then the pixels: a cache counts as present only once its .npy is, and is then whole.
        os.replace(meta_tmp, meta_path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("image cache of %s: %d images at %d px decoded in %.1f s (%.0f img/s), %.1f MiB at %s", split.root,
             len(split.paths), size, seconds, len(split.paths) / max(seconds, 1e-9), need / 2**20, path)
    return path


def _decode_into(pixels: np.ndarray, root: Path, paths: tuple[str, ...], size: int, threads: int | None
                 ) -> dict[int, str]:
    """Decode every file into its row of `pixels` from a thread pool; returns {row: why} of the files that failed."""
    def decode_chunk(start: int) -> dict[int, str]:
        failed = {}
        for i in range(start, min(start + _CHUNK, len(paths))):
            try:
                pixels[i] = decode_resized(root / paths[i], size)
            except Exception as err:  # noqa: BLE001 - any undecodable file is stood in for (module doc)
                failed[i] = f"{type(err).__name__}: {err}"
        return failed

    threads = threads or len(os.sched_getaffinity(0))
    broken: dict[int, str] = {}
    step = max(len(paths) // 10, _CHUNK)  # a log line per ~10 %: trainer.engine's bar would import in a circle
    with ThreadPoolExecutor(threads) as pool:
        for start, failed in zip(range(0, len(paths), _CHUNK), pool.map(decode_chunk, range(0, len(paths), _CHUNK))):
            broken.update(failed)
            done = min(start + _CHUNK, len(paths))
            if done == len(paths) or done // step != start // step:
                log.info("decoding %s once: %d/%d images", root.name, done, len(paths))
    return broken


def _stand_in(pixels: np.ndarray, labels: np.ndarray, broken: dict[int, str], root: Path, paths: tuple[str, ...]
              ) -> dict[int, int]:
    """Fill each broken row with the next decoded image of its class (ListFileImages' rule); returns {row: donor}."""
    substituted = {}
    for i in sorted(broken):
        same = np.flatnonzero(labels == labels[i])
        start = int(np.searchsorted(same, i))
        donor = next((j for j in np.roll(same, -start - 1).tolist() if j not in broken), None)
        if donor is None:
            raise RuntimeError(f"no image of class {int(labels[i])} in {root} can be decoded (e.g. {paths[i]}: "
                               f"{broken[i]})")
        pixels[i] = pixels[donor]
        substituted[i] = donor
        log.warning("cannot decode %s (%s): %s stands in for it in the image cache", root / paths[i], broken[i],
                    paths[donor])
    return substituted
