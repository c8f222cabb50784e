"""Trained classifiers under the runs root: ids -> files, cached loads, checked image decoding, one batched forward."""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from service.batching import DynamicBatcher
from service.errors import (ImageDecodeError, InvalidIdError, ModelExistsError, ModelFileError, ModelNotFoundError,
                            PayloadTooLargeError)

log = logging.getLogger(__name__)

SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no "..", no "/", no leading dot: never a path escape
MAX_DEPTH = 3  # run folders are found up to runs_root/a/b/c/model.pt
# a model id: up to MAX_DEPTH run folders, optionally ending in "/teacher" (that run's teacher.pt); the OpenAPI
# schema documents this same pattern, so a schema-valid id is never refused as malformed
MODEL_ID_PATTERN = re.compile(rf"^{SEGMENT.pattern}(?:/{SEGMENT.pattern}){{0,{MAX_DEPTH - 1}}}(?:/teacher)?$")
FORMATS = ("PNG", "JPEG")
PREVIOUS_SUFFIX = ".previous.pt"  # model.previous.pt: what a replace=true upload replaced (not listed, not served)
FORWARD_BATCH = 256  # images per forward pass: bounds activation memory on large uploads


@dataclass(frozen=True)
class ModelEntry:
    """A model file found under the runs root, with the self-description saved in it (trainer.export.ModelSpec)."""

    model_id: str
    path: Path
    spec: object  # trainer.export.ModelSpec (torch is imported lazily, so not named here)
    size_bytes: int
    modified: float


class ModelRegistry:
    """Finds `model.pt` / `teacher.pt` under the runs root; loads them once per (file, mtime) into an LRU.

    A model id is the run folder's path under the root ("3f2a9c01d4e5", "demo/ssd"); "<run>/teacher" names the
    SSD teacher saved beside the student. Ids are checked segment by segment, so no id reaches outside the root.
    """

    def __init__(self, runs_root: Path, device: str = "auto", cache_size: int = 4, threads: int = 1,
                 batching: bool = True, max_batch: int = 64, max_wait_s: float = 0.0):
        self.root = Path(runs_root)
        self.device = device
        self.threads = threads
        self.batching, self.max_batch, self.max_wait_s = batching, max_batch, max_wait_s
        self._batchers: dict[str, tuple[int, DynamicBatcher]] = {}  # model file -> (its mtime, batcher)
        self._batch_lock = threading.Lock()
        self._spec = functools.lru_cache(maxsize=1024)(self._read_spec)
        self._model = functools.lru_cache(maxsize=cache_size)(self._load_model)
        self._add_lock = threading.Lock()

    @staticmethod
    def _parts(model_id: str) -> list[str]:
        if not MODEL_ID_PATTERN.fullmatch(model_id):
            raise InvalidIdError(f"invalid model id {model_id!r}: use run folder names (letters, digits, . _ -) "
                                 f"joined by '/', at most {MAX_DEPTH} deep, optionally ending in '/teacher'")
        return model_id.split("/")

    @staticmethod
    def _file(parts: list[str]) -> tuple[list[str], str]:
        """(run folder parts, file name) an id is uploaded to: '<run>/teacher' is the run's teacher.pt."""
        if len(parts) > 1 and parts[-1] == "teacher":
            return parts[:-1], "teacher.pt"
        return parts, "model.pt"

    def resolve(self, model_id: str) -> Path:
        """The model file of an id, or InvalidIdError (not a safe id) / ModelNotFoundError (no such file)."""
        parts = self._parts(model_id)
        root = self.root.resolve()
        candidates = [root.joinpath(*parts, "model.pt")]
        if parts[-1] == "teacher" and len(parts) > 1:
            candidates.insert(0, root.joinpath(*parts[:-1], "teacher.pt"))
        for path in candidates:
            # resolve() follows symlinks: a link pointing outside the root is not ours to load
            if path.is_file() and path.resolve().is_relative_to(root):
                return path
        raise ModelNotFoundError(f"no model {model_id!r} under the runs root")

    def add(self, model_id: str, data: bytes, replace: bool = False) -> ModelEntry:
        """Publish an uploaded model file as runs_root/<id>/model.pt, only after it loads (weights_only) and runs.

        '<run>/teacher' uploads that run's teacher.pt (a teacher for label jobs). An id that already names a model
        is a ModelExistsError unless `replace`; then the model it replaces is kept beside it as `model.previous.pt`
        (`teacher.previous.pt`; one previous version). The file is checked in a temporary name beside its target
        and renamed into place, so a reader never sees a half-written model.
        """
        folder_parts, name = self._file(self._parts(model_id))
        root = self.root.resolve()
        folder = root.joinpath(*folder_parts)
        target = folder / name
        with self._add_lock:
            if target.exists() and not replace:
                raise ModelExistsError(f"model {model_id!r} already exists; upload under a new id, or send "
                                       "replace=true to replace it (the old file is kept as model.previous.pt)")
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".upload-{os.getpid()}-{threading.get_ident()}.pt"
            try:
                tmp.write_bytes(data)
                _check_model_file(tmp)
                if target.exists():
                    os.replace(target, folder / name.replace(".pt", PREVIOUS_SUFFIX))
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return self.entry(model_id)

    def list(self) -> list[ModelEntry]:
        """Every readable model file under the root, sorted by id (unreadable files are logged and skipped)."""
        root = self.root.resolve()
        if not root.is_dir():
            return []
        out = []
        for depth in range(1, MAX_DEPTH + 1):
            for name in ("model.pt", "teacher.pt"):
                for path in root.glob("/".join(["*"] * depth + [name])):
                    folder = path.parent.relative_to(root).as_posix()
                    model_id = folder if name == "model.pt" else f"{folder}/teacher"
                    try:
                        out.append(self.entry(model_id, path))
                    except (InvalidIdError, OSError, RuntimeError, KeyError, TypeError) as err:
                        log.warning("skipping %s: %s", path, err)
        return sorted(out, key=lambda e: e.model_id)

    def entry(self, model_id: str, path: Path | None = None) -> ModelEntry:
        """The listing entry of one model (spec read from the file header, weights not loaded)."""
        if path is None:
            path = self.resolve(model_id)
        elif not all(SEGMENT.fullmatch(p) for p in model_id.split("/")):  # a folder found by list()
            raise InvalidIdError(f"model folder {model_id!r} is not a valid id")
        stat = path.stat()
        return ModelEntry(model_id, path, self._spec(str(path), stat.st_mtime_ns), stat.st_size, stat.st_mtime)

    def load(self, model_id: str):
        """(model in eval mode on the serving device, ModelSpec); reloaded when the file changes."""
        path = self.resolve(model_id)
        return self._model(str(path), path.stat().st_mtime_ns)

    def classify(self, model_id: str, images: list, k: int):
        """Top-k (probabilities, class ids) of uint8 images; with batching, concurrent requests for the same model
        file share forward passes (one worker per model), each getting back exactly its own rows."""
        import torch

        path = self.resolve(model_id)
        key = (str(path), path.stat().st_mtime_ns)
        model, spec = self._model(*key)
        if not self.batching:
            return classify(model, spec, images, k)
        rows = self._batcher(key, model, spec)(images)
        top = torch.stack(rows).topk(min(k, spec.num_classes), dim=1)
        return top.values, top.indices

    def _batcher(self, key: tuple[str, int], model, spec) -> DynamicBatcher:
        with self._batch_lock:
            mtime, batcher = self._batchers.get(key[0], (None, None))
            if mtime != key[1]:  # new file, or replaced: the old worker finishes its queue and stops
                if batcher is not None:
                    threading.Thread(target=batcher.close, daemon=True).start()
                batcher = DynamicBatcher(functools.partial(probabilities, model, spec), self.max_batch,
                                         self.max_wait_s, name=f"predict {key[0]}")
                self._batchers[key[0]] = (key[1], batcher)
            return batcher

    def close(self) -> None:
        """Stop the batching workers (after the requests they hold)."""
        with self._batch_lock:
            batchers, self._batchers = self._batchers, {}
        for _, batcher in batchers.values():
            batcher.close()

    def _read_spec(self, path: str, mtime_ns: int):
        import torch

        from trainer.export import ModelSpec

        # mmap: only the small spec dict is read, not the weights
        return ModelSpec(**torch.load(path, map_location="cpu", weights_only=True, mmap=True)["spec"])

    def _load_model(self, path: str, mtime_ns: int):
        import torch

        from trainer.export import load_model
        from trainer.context import resolve_device

        torch.set_num_threads(self.threads)  # process-wide; set here so a service that never predicts skips torch
        device = resolve_device(self.device)
        model, spec = load_model(Path(path), map_location=device)
        return model.to(device), spec


def _check_model_file(path: Path) -> None:
    """ModelFileError unless `path` is a model file trainer.export can rebuild and run on one dummy input."""
    import torch

    from trainer.export import load_model

    try:
        model, spec = load_model(path)
        with torch.no_grad():
            out = model(torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size))
        if tuple(out.shape) != (1, spec.num_classes) or len(spec.class_names) != spec.num_classes:
            raise ValueError(f"it outputs {tuple(out.shape)} for {spec.num_classes} classes "
                             f"and names {len(spec.class_names)}")
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the upload is refused
        raise ModelFileError(f"not a loadable model file ({type(err).__name__}: {str(err)[:300]}); upload a "
                             "model.pt written by `ltd train` (trainer.export.save_model)") from err


def decode_image(data: bytes, filename: str, max_pixels: int):
    """A PIL image from PNG/JPEG bytes: verified first, size-checked before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    bad = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, (width, height) = probe.format, probe.size
            probe.verify()  # checks structure and checksums without decoding the pixels
    except Image.DecompressionBombError as err:  # PIL's own ceiling, far above ours: the header alone says so
        raise PayloadTooLargeError(f"{filename!r} declares more pixels than PIL will open; the limit is "
                                   f"{max_pixels} pixels") from err
    except bad as err:
        raise ImageDecodeError(f"{filename!r} is not a readable PNG or JPEG image: {_clean(err)}",
                               filename=filename) from err
    if fmt not in FORMATS:
        raise ImageDecodeError(f"{filename!r} is {fmt}; send PNG or JPEG", filename=filename)
    if width * height > max_pixels:
        raise PayloadTooLargeError(f"{filename!r} is {width}x{height} pixels; the limit is {max_pixels} pixels")
    try:
        image = Image.open(io.BytesIO(data))  # verify() leaves the image unusable: open it again
        image.load()
    except bad as err:  # e.g. a truncated file that passed the structural check
        raise ImageDecodeError(f"{filename!r} could not be decoded: {_clean(err)}", filename=filename) from err
    return image


def _clean(err: Exception) -> str:
    """An error's message without object reprs (`<_io.BytesIO object at 0x…>`): clients see no server internals."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err)).strip() or type(err).__name__


def to_model_input(image, spec):
    """uint8 (C, S, S): the model's channels, shorter side resized to spec.resize (as its eval split was), then
    centre-cropped to S. An image already S x S is taken as it is (CIFAR-style models see whole images)."""
    from torchvision.transforms.v2 import functional as TF

    tensor = TF.pil_to_tensor(image.convert("L" if spec.in_channels == 1 else "RGB"))
    size = spec.image_size
    if tensor.shape[-2:] != (size, size):
        tensor = TF.center_crop(TF.resize(tensor, [spec.resize or size], antialias=True), [size, size])
    return tensor


def probabilities(model, spec, images: list):
    """Class probabilities (N, C) of N uint8 (C, S, S) images, in forward passes of at most FORWARD_BATCH.

    Normalised exactly as in training (trainer.augment: to_float then per-channel mean/std).
    """
    import torch

    from trainer.augment import normalize, to_float

    device = next(model.parameters()).device
    batch = torch.stack(images)
    out = []
    with torch.inference_mode():
        for start in range(0, len(batch), FORWARD_BATCH):
            x = normalize(to_float(batch[start:start + FORWARD_BATCH].to(device)), spec.mean, spec.std)
            out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out)


def classify(model, spec, images: list, k: int):
    """Top-k (probabilities, class ids), each (N, k), of N uint8 (C, S, S) images."""
    top = probabilities(model, spec, images).topk(min(k, spec.num_classes), dim=1)
    return top.values, top.indices
