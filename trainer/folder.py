"""The user's own images in torchvision's ImageFolder layout: list, scan, skip the unreadable files.

trainer/datasets.py builds the LongTailData from the scan (data.name=folder); trainer/data_inspect.py reports it.

    root/train/<class>/<image>      training split, used as it is (no LT sub-sampling unless asked)
    root/val/<class>/<image>        evaluation split (root/test/ when there is no val/; with both, val/ is the
    root/test/<class>/<image>       held-out validation split and test/ the test split)

Class index = position of the class folder in sorted order, from torchvision's own `find_classes`, and files are
listed by torchvision's `make_dataset`, so class indices and file order are exactly a torchvision user's
(`ImageFolder(root/train).class_to_idx` and `.samples`).

Image ids: image_id = position among the *usable* training files in that order, and `source_indices[image_id]` is the
file's index in the full listing (= its index in `ImageFolder(root/train).samples`). A skipped file therefore takes
no id, so the ids, paths and fingerprint are exactly those of the same folder without the unreadable files: a
labelset made on the cleaned folder lines up with the uncleaned one, and a file that becomes unreadable (or readable)
changes the fingerprint, so a labelset that no longer lines up is refused instead of read shifted.

Unreadable files (zero bytes, not an image, truncated) are found by the scan, which reads headers only: PIL opens
each file (format, size) and checks that the file ends where its format says it ends (JPEG's EOI marker, PNG's IEND
chunk, WebP's RIFF length); only a file failing that check is decoded in full to decide, and BMP (uncompressed) is
always decoded. A file damaged inside its entropy-coded data with an intact end passes the scan; the DataLoader
path (trainer/batches.py ListFileImages) then substitutes another image of the same class for it instead of
stopping the epoch, and logs it.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # matched in any case, as torchvision does
SKIPPED_FILE = "skipped_images.json"
_PNG_END = b"IEND\xaeB`\x82"


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a readable image from its header; raises (OSError, ValueError, ...) for an unreadable one."""
    from PIL import Image

    with open(path, "rb") as f:
        with Image.open(f) as image:
            size, fmt = image.size, image.format
            if fmt == "BMP" or not _ends_where_it_should(f, fmt):
                image.load()  # the second opinion: a full decode raises on truncated data
    return size


def _ends_where_it_should(f, fmt: str | None) -> bool:
    """Whether a file's last bytes are its format's end: cheap, and false for every truncated file of that format."""
    end = f.seek(0, os.SEEK_END)
    if fmt == "JPEG":  # EOI marker; allow a little padding after it, as some writers leave
        f.seek(max(0, end - 64))
        return b"\xff\xd9" in f.read()
    if fmt == "PNG":
        f.seek(max(0, end - 8))
        return f.read() == _PNG_END
    if fmt == "WEBP":
        f.seek(4)
        return end >= int.from_bytes(f.read(4), "little") + 8
    return False  # any other format PIL recognised: decode to decide


def _check(path: str) -> tuple[int, int, str | None]:
    from PIL import UnidentifiedImageError

    try:
        width, height = check_image(path)
        return width, height, None
    except UnidentifiedImageError:
        empty = os.path.getsize(path) == 0
        return 0, 0, "empty file (0 bytes)" if empty else "not an image (no format recognises its header)"
    except Exception as err:  # noqa: BLE001 - any reason a file cannot be read is a reason to skip it
        return 0, 0, f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class SplitScan:
    """Every file with an image extension in one split folder, in torchvision's order, and which ones are usable."""

    folder: Path
    class_names: list[str]
    files: tuple[str, ...]  # relative to `folder`, '/'-separated
    labels: np.ndarray  # int64 class index per file
    sizes: np.ndarray  # int64 (N, 2) width, height from the header; 0 where unreadable
    problems: dict[int, str]  # file index -> why it is skipped

    @property
    def usable(self) -> np.ndarray:
        keep = np.ones(len(self.files), dtype=bool)
        keep[list(self.problems)] = False
        return keep

    def skipped(self, split: str) -> list[dict]:
        return [{"split": split, "path": self.files[i], "class": self.class_names[int(self.labels[i])],
                 "reason": reason} for i, reason in sorted(self.problems.items())]

    def usable_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.usable], minlength=len(self.class_names))

    def check_every_class_usable(self, split: str) -> None:
        """A class of the training split left without one usable image cannot be learned: a clear error naming it."""
        counts, listed = self.usable_counts(), np.bincount(self.labels, minlength=len(self.class_names))
        empty = [i for i in range(len(self.class_names)) if counts[i] == 0]
        if empty:
            said = ", ".join(f"{self.class_names[i]!r} ({listed[i]} files, none readable)" for i in empty[:10])
            more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
            raise ValueError(f"{self.folder}: class {said}{more} has no usable image in the {split} split; add "
                             f"readable {'/'.join(IMAGE_EXTENSIONS)} files or remove the folder")


def find_class_folders(folder: Path) -> tuple[list[str], dict[str, int]]:
    """torchvision's own rule (sorted sub-folder names), so class indices equal an ImageFolder's class_to_idx."""
    from torchvision.datasets.folder import find_classes

    return find_classes(str(folder))


def scan_split(folder: Path, class_to_idx: dict[str, int] | None = None, threads: int | None = None) -> SplitScan:
    """List a split folder as torchvision's ImageFolder does and check every file's header (see the module doc).

    `class_to_idx` (the training split's) maps an evaluation split's folders; a folder it does not name is an error.
    About 90 µs per file from the page cache (PIL's JPEG header parse, in Python): 100k 64-px JPEGs in 8.8 s on a
    2-core machine, 38 s from a cold page cache. `threads` > 1 checks files from a thread pool; the parse holds the
    GIL, and on that machine 8 threads took 15.8 s warm and 37.4 s cold, so the default is serial; a pool may pay
    where each read waits on a network disk.
    """
    from torchvision.datasets.folder import make_dataset

    folder = Path(folder)
    names, found = find_class_folders(folder)
    if class_to_idx is None:
        class_to_idx = found
    else:
        unknown = sorted(set(names) - set(class_to_idx))
        if unknown:
            raise ValueError(f"{folder}: class folders {unknown[:10]} are not classes of the training split")
    samples = make_dataset(str(folder), {n: class_to_idx[n] for n in names}, extensions=IMAGE_EXTENSIONS,
                           allow_empty=True)
    prefix = len(str(folder)) + 1
    files = tuple(path[prefix:].replace(os.sep, "/") for path, _ in samples)
    labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
    paths = [path for path, _ in samples]
    if threads and threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            checked = list(pool.map(_check, paths, chunksize=256))
    else:
        checked = [_check(path) for path in paths]
    sizes = np.array([(w, h) for w, h, _ in checked], dtype=np.int64).reshape(-1, 2)
    problems = {i: reason for i, (_, _, reason) in enumerate(checked) if reason is not None}
    by_index = sorted(class_to_idx, key=class_to_idx.get)
    return SplitScan(folder, by_index, files, labels, sizes, problems)


def split_folders(root: Path) -> tuple[Path, Path, Path | None]:
    """(train, test, val or None) of an ImageFolder-layout root; see the module doc for val/ and test/."""
    root = Path(root)
    train, val, test = root / "train", root / "val", root / "test"
    if not train.is_dir():
        raise ValueError(f"data.name=folder expects {train}/<class>/<image> (torchvision's ImageFolder layout)")
    if test.is_dir() and val.is_dir():
        return train, test, val
    if test.is_dir() or val.is_dir():
        return train, test if test.is_dir() else val, None
    raise ValueError(f"data.name=folder expects an evaluation split next to {train}: {val}/<class>/<image> or {test}/")


@dataclass(frozen=True)
class FolderScan:
    """The scanned splits of one ImageFolder-layout root (trainer/datasets.py builds the LongTailData from it)."""

    train: SplitScan
    test: SplitScan
    val: SplitScan | None

    def skipped(self) -> list[dict]:
        """Every skipped file, its split named by its folder (train, val or test), so root/split/path is the file."""
        return [row for scan in self.splits() for row in scan.skipped(scan.folder.name)]

    def splits(self) -> list[SplitScan]:
        return [self.train, self.test] + ([self.val] if self.val is not None else [])


def scan_folder_dataset(root: Path) -> FolderScan:
    """Scan train/ and val/ (or test/, or both) of `root`; every training class must keep a usable image."""
    train_dir, test_dir, val_dir = split_folders(Path(root))
    train = scan_split(train_dir)
    train.check_every_class_usable("train")
    class_to_idx = {name: i for i, name in enumerate(train.class_names)}
    scan = FolderScan(train, scan_split(test_dir, class_to_idx),
                      scan_split(val_dir, class_to_idx) if val_dir is not None else None)
    skipped = scan.skipped()
    if skipped:
        counts = ", ".join(f"{s.folder.name} {len(s.problems)}" for s in scan.splits() if s.problems)
        log.warning("%s: %d unreadable image files skipped (%s); the run folder lists them in %s", root,
                    len(skipped), counts, SKIPPED_FILE)
    return scan


def write_skipped(data, out_dir: Path) -> Path | None:
    """`skipped_images.json` in a run folder when the data skipped unreadable files (nothing otherwise)."""
    rows = list(getattr(data, "skipped", ()) or ())
    path = Path(out_dir) / SKIPPED_FILE
    if not rows:
        path.unlink(missing_ok=True)  # a reused run folder must not keep the list of an earlier, broken scan
        return None
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # whole or absent, even with several ranks writing it at once
    tmp.write_text(json.dumps({"count": len(rows), "files": rows}, indent=1))
    os.replace(tmp, path)
    return path
