"""Dataset readers -> uint8 tensors (or list-file paths), the LT split, stable image ids and a content fingerprint."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.folder import scan_folder_dataset
from trainer.image_cache import fingerprint, open_or_build
from trainer.longtail import carve_validation, lt_indices

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
CIFAR10_NPZ_CANDIDATES = (REPO_ROOT / ".data" / "cifar10_jpeg.npz", REPO_ROOT.parent / "shared/data/cifar10_jpeg.npz")


@dataclass(frozen=True)
class ImageSet:
    """One split. `images` is uint8 (N, C, H, W) for in-memory datasets; list-file datasets carry `paths` instead,
    and with data.cache_size the `.npy` of their decoded images (N, S, S, 3) uint8 (trainer/image_cache.py)."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    paths: tuple[str, ...] | None = None
    root: Path | None = None
    cache: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class LongTailData:
    """A long-tailed training set (image_id = position in `train`) with its balanced test and optional val split."""

    name: str
    class_names: list[str]
    train: ImageSet
    test: ImageSet
    val: ImageSet | None
    class_counts: np.ndarray
    fingerprint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source_indices: np.ndarray  # image_id -> index in the original training file (a folder's full file listing)
    skipped: tuple[dict, ...] = ()  # unreadable files left out (folder datasets): split, path, class, reason

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self.train.images is not None

    @property
    def in_channels(self) -> int:
        return 3 if self.train.images is None else int(self.train.images.shape[1])


Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]  # x_train, y_train, x_test, y_test, names


def read_fashion_mnist(root: Path | None) -> Raw:
    """The original IDX files (as torchvision's FashionMNIST reads them), e.g. Debian's dataset-fashion-mnist."""
    root = Path(root or FASHION_MNIST_ROOT)

    def idx(name: str) -> np.ndarray:
        path = root / name
        if not path.exists() and path.with_suffix("").exists():
            path = path.with_suffix("")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)

    x_train, y_train = idx("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz")
    x_test, y_test = idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz")
    return x_train[:, None], y_train, x_test[:, None], y_test, list(FASHION_MNIST_CLASSES)


def read_cifar(root: Path, num_classes: int) -> Raw:
    """torchvision's layout: `cifar-10-batches-py/` or `cifar-100-python/` pickles (uint8 rows, fine labels)."""
    if num_classes == 10:
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").exists() else root
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta, label_key, names_key = [folder / "test_batch"], folder / "batches.meta", b"labels", b"label_names"
    else:
        folder = root / "cifar-100-python" if (root / "cifar-100-python").exists() else root
        train_files, test_files = [folder / "train"], [folder / "test"]
        meta, label_key, names_key = folder / "meta", b"fine_labels", b"fine_label_names"

    def load(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for path in files:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = load(train_files)
    x_test, y_test = load(test_files)
    with open(meta, "rb") as f:
        names = [n.decode() for n in pickle.load(f, encoding="bytes")[names_key]]
    return x_train, y_train, x_test, y_test, names


def read_cifar10_npz(path: Path | None) -> Raw:
    """Our CIFAR-10 copy as JPEG bytes in one npz (../shared/DATA.md); decoded once, then cached as raw pixels."""
    if path is None:
        path = next((p for p in CIFAR10_NPZ_CANDIDATES if p.exists()), CIFAR10_NPZ_CANDIDATES[-1])
    path = Path(path)
    cache = Path(os.environ.get("LTD_CACHE", Path.home() / ".cache" / "ltd")) / f"cifar10_npz_{path.stat().st_size}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["x_train"], z["y_train"], z["x_test"], z["y_test"], [str(n) for n in z["names"]]
    from PIL import Image

    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}

    def decode(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        images = [np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB")) for a, b in zip(offsets[:-1], offsets[1:])]
        return np.stack(images).transpose(0, 3, 1, 2).copy()

    log.info("decoding %s once (about 10 s); cached at %s", path, cache)
    x_train = decode(arrays["train_jpeg"], arrays["train_offsets"])
    x_test = decode(arrays["test_jpeg"], arrays["test_offsets"])
    y_train, y_test = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    names = [str(n) for n in arrays["class_names"]]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, names=np.array(names))
    os.replace(tmp, cache)
    return x_train, y_train, x_test, y_test, names


def generate_synthetic(seed: int = 0, per_class: int = 1000, test_per_class: int = 200, size: int = 32) -> Raw:
    """Procedural 10-class RGB images: class = grating orientation; phase, frequency, colours and noise are random.

    The fallback embedded dataset when Fashion-MNIST is not installed: learnable by a small CNN in minutes, yet
    neighbouring orientations (18 degrees apart) under noise keep it from being trivial.
    """
    rng = np.random.RandomState(seed)
    num_classes = 10

    def make(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(num_classes), n_per_class)
        n = len(labels)
        theta = labels * np.pi / num_classes + rng.uniform(-0.06, 0.06, n)
        freq = rng.uniform(0.25, 0.6, n)
        phase = rng.uniform(0, 2 * np.pi, n)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
        wave = 0.5 + 0.5 * np.sin(freq[:, None, None] * proj + phase[:, None, None])
        fg, bg = rng.uniform(0, 1, (n, 3, 1, 1)), rng.uniform(0, 1, (n, 3, 1, 1))
        img = bg + (fg - bg) * wave[:, None]
        img += rng.normal(0, 0.15, img.shape)
        return (np.clip(img, 0, 1) * 255).astype(np.uint8), labels

    x_train, y_train = make(per_class)
    x_test, y_test = make(test_per_class)
    return x_train, y_train, x_test, y_test, [f"angle_{18 * c:03d}" for c in range(num_classes)]


def read_list_file(path: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """ImageNet-LT / iNaturalist lists: one `relative/path.jpg label` per line."""
    paths, labels = [], []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'relative/path.jpg label', got {line!r}")
        if Path(parts[0]).is_absolute() or ".." in Path(parts[0]).parts:
            raise ValueError(f"{path}:{lineno}: image paths must stay inside the image root, got {parts[0]!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    return tuple(paths), np.asarray(labels, dtype=np.int64)


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (N, C, H, W) images encoded as JPEG at `quality` (PIL defaults: 4:2:0 chroma for RGB) and decoded."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[images.shape[1]]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image[0] if mode == "L" else image.transpose(1, 2, 0), mode).save(buffer, "JPEG",
                                                                                         quality=quality)
        decoded = np.asarray(Image.open(buffer).convert(mode))
        out[i] = decoded[None] if mode == "L" else decoded.transpose(2, 0, 1)
    return out


def resolve_name(cfg: DataConfig) -> str:
    """'embedded' means real Fashion-MNIST when its files are here, else the procedural images."""
    if cfg.name != "embedded":
        return cfg.name
    root = Path(cfg.root or FASHION_MNIST_ROOT)
    return "fashion_mnist" if (root / "train-images-idx3-ubyte.gz").exists() else "synthetic"


def read_raw(cfg: DataConfig, name: str) -> Raw:
    if name == "fashion_mnist":
        return read_fashion_mnist(cfg.root if cfg.name != "embedded" or cfg.root else None)
    if name == "synthetic":
        return generate_synthetic()
    if name == "cifar10_npz":
        return read_cifar10_npz(cfg.root)
    if name in ("cifar10", "cifar100"):
        if cfg.root is None:
            raise ValueError(f"data.root must point at the folder holding the {name} files (torchvision layout)")
        return read_cifar(Path(cfg.root), 10 if name == "cifar10" else 100)
    raise ValueError(f"unknown dataset {name!r}")


def _cap_per_class(labels: np.ndarray, cap: int | None) -> np.ndarray:
    """First `cap` indices of each class (file order): a smaller balanced test set for quick runs."""
    if cap is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.where(labels == c)[0][:cap] for c in np.unique(labels)]))


def load_dataset(cfg: DataConfig) -> LongTailData:
    """Read, split long-tailed (LDAM rule), carve the optional balanced val split, and fingerprint."""
    name = resolve_name(cfg)
    if name == "list":
        return _with_cache(_load_list_dataset(cfg), cfg)
    if name == "folder":
        return _with_cache(_load_folder_dataset(cfg), cfg)
    x_train, y_train, x_test, y_test, names = read_raw(cfg, name)
    if cfg.jpeg_quality is not None:
        x_train, x_test = jpeg_round_trip(x_train, cfg.jpeg_quality), jpeg_round_trip(x_test, cfg.jpeg_quality)
    keep = lt_indices(y_train, cfg.imbalance_factor, seed=cfg.lt_seed, n_max=cfg.max_per_class)
    val = None
    if cfg.val_per_class:
        lt_counts = np.bincount(y_train[keep], minlength=len(names))
        keep, val_idx = carve_validation(y_train, keep, cfg.val_per_class, cfg.lt_seed)
        lent = np.flatnonzero(np.bincount(y_train[keep], minlength=len(names)) < lt_counts)
        if len(lent):
            log.warning("data.val_per_class=%d: classes %s had too few images outside the LT split, so part of their "
                        "validation images came out of their LT training images", cfg.val_per_class, lent.tolist())
        val = ImageSet(labels=torch.from_numpy(y_train[val_idx]), images=torch.from_numpy(x_train[val_idx]))
    test_idx = _cap_per_class(y_test, cfg.test_per_class)
    train_x, train_y = np.ascontiguousarray(x_train[keep]), y_train[keep]
    pixels = train_x.reshape(len(train_x), train_x.shape[1], -1).astype(np.float64) / 255.0
    return LongTailData(
        name=name,
        class_names=names,
        train=ImageSet(labels=torch.from_numpy(train_y), images=torch.from_numpy(train_x)),
        test=ImageSet(labels=torch.from_numpy(y_test[test_idx]), images=torch.from_numpy(x_test[test_idx])),
        val=val,
        class_counts=np.bincount(train_y, minlength=len(names)),
        fingerprint=fingerprint(train_x, train_y),
        mean=tuple(pixels.mean(axis=(0, 2)).round(4).tolist()),
        std=tuple(pixels.std(axis=(0, 2)).round(4).tolist()),
        source_indices=keep,
    )


def _with_cache(data: LongTailData, cfg: DataConfig) -> LongTailData:
    """With data.cache_size, every split of image files decoded once into its memory-mapped cache (built or reused)."""
    if cfg.cache_size is None:
        return data

    def cached(split: ImageSet | None) -> ImageSet | None:
        return None if split is None else replace(split, cache=open_or_build(split, cfg.cache_size, cfg.cache_dir))

    return replace(data, train=cached(data.train), test=cached(data.test), val=cached(data.val))


def _load_list_dataset(cfg: DataConfig) -> LongTailData:
    if cfg.train_list is None or cfg.test_list is None or cfg.root is None:
        raise ValueError("data.name='list' needs data.root (image folder), data.train_list and data.test_list")
    train_paths, train_y = read_list_file(cfg.train_list)
    test_paths, test_y = read_list_file(cfg.test_list)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    root = Path(cfg.root)
    return LongTailData(
        name="list",
        class_names=[str(c) for c in range(num_classes)],
        train=ImageSet(labels=torch.from_numpy(train_y), paths=train_paths, root=root),
        test=ImageSet(labels=torch.from_numpy(test_y), paths=test_paths, root=root),
        val=None,
        class_counts=np.bincount(train_y, minlength=num_classes),
        fingerprint=fingerprint(None, train_y, train_paths),
        mean=(0.485, 0.456, 0.406),  # ImageNet statistics, as torchvision's ResNets expect
        std=(0.229, 0.224, 0.225),
        source_indices=np.arange(len(train_y)),
    )


def _load_folder_dataset(cfg: DataConfig) -> LongTailData:
    """`data.name=folder` (trainer/folder.py): the LongTailData the list-file reader gives, plus the skipped files.

    image_id = position among the usable training files in torchvision's ImageFolder order; source_indices maps it to
    the file's index in the full listing. A skipped file takes no id: ids, paths and fingerprint equal those of the
    same folder without it.
    """
    if cfg.root is None:
        raise ValueError("data.name=folder needs data.root: the folder holding train/ and val/ (or test/)")
    if cfg.val_per_class:
        raise ValueError("data.val_per_class carves a validation split out of in-memory data; for a folder dataset "
                         "put the validation images in data.root/val/ next to data.root/test/")
    scan = scan_folder_dataset(Path(cfg.root))
    train = scan.train
    keep = np.flatnonzero(train.usable)  # image_id -> index in the full listing
    if cfg.imbalance_factor != 1.0 or cfg.max_per_class is not None:  # asked for: LDAM's LT rule on usable files
        keep = keep[np.sort(lt_indices(train.labels[keep], cfg.imbalance_factor, cfg.lt_seed, cfg.max_per_class))]

    def image_set(split, index: np.ndarray) -> ImageSet:
        return ImageSet(labels=torch.from_numpy(split.labels[index].copy()),
                        paths=tuple(split.files[i] for i in index.tolist()), root=split.folder)

    train_set = image_set(train, keep)
    test_usable = np.flatnonzero(scan.test.usable)
    test_set = image_set(scan.test, test_usable[_cap_per_class(scan.test.labels[test_usable], cfg.test_per_class)])
    val_set = image_set(scan.val, np.flatnonzero(scan.val.usable)) if scan.val is not None else None
    train_y = train_set.labels.numpy()
    return LongTailData(
        name="folder",
        class_names=list(train.class_names),
        train=train_set,
        test=test_set,
        val=val_set,
        class_counts=np.bincount(train_y, minlength=len(train.class_names)),
        fingerprint=fingerprint(None, train_y, train_set.paths),
        mean=(0.485, 0.456, 0.406),  # ImageNet statistics, as torchvision's ResNets expect (as for list files)
        std=(0.229, 0.224, 0.225),
        source_indices=keep,
        skipped=tuple(scan.skipped()),
    )
