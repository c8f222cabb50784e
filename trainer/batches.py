"""Training and evaluation batches: uint8 images kept on the device with batched augmentation, or a DataLoader."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer import augment
from trainer.config import AugmentConfig
from trainer.datasets import ImageSet
from trainer.distributed import shard_epoch
from trainer.image_cache import open_cached
from trainer.samplers import epoch_indices

log = logging.getLogger(__name__)


@dataclass
class Batch:
    ids: torch.Tensor  # (B,) image ids on the device
    labels: torch.Tensor  # (B,)
    images: torch.Tensor  # (B, C, H, W) normalised float: the standard view
    key_images: torch.Tensor | None = None  # MoCo key view, when asked for
    views: torch.Tensor | None = None  # (B,) index of the stored view each image replays (views mode)


@dataclass
class Draw:
    """A training batch before augmentation: which images, and every random view parameter, on the device.

    DeviceBatches draws it on the host from the seeded generator and `realize`s it with device ops only, inside the
    training step: so a CUDA graph of the step (trainer/graphs.py) holds the augmentation too, and each step copies a
    few small tensors into the graph instead of two float image batches.
    """

    ids: torch.Tensor  # (B,) image ids on the device
    labels: torch.Tensor  # (B,)
    crop: torch.Tensor | None = None  # (B, 3) crop + flip of the standard view (augment.sample_crop_flip)
    key: torch.Tensor | None = None  # (B, 10) MoCo key-view parameters (augment.sample_moco_view)
    views: torch.Tensor | None = None  # (B,) index of the stored view each image replays (views mode)
    raw: torch.Tensor | None = None  # (B, S, S, 3) uint8 rows gathered on the host (CachedBatches)
    resized_crop: torch.Tensor | None = None  # (B, 9) box, flip, jitter factors of a random-resized-crop view


class DeviceBatches:
    """The whole split as one uint8 tensor on the training device; each batch is gathered and augmented at once.

    No per-image Python or PIL work: one index gather plus a few batched tensor ops per step, which is what makes
    small-image training fast on a GPU (see bench/train_throughput.py).
    """

    def __init__(
        self,
        split: ImageSet,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        batch_size: int,
        augment_cfg: AugmentConfig | None = None,
        sampler: str = "instance",
        key_view: bool = False,
        drop_last: bool = False,
        view_records: torch.Tensor | None = None,
        shard: tuple[int, int] | None = None,
    ):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.labels_cpu = split.labels
        # On the device once: a Python list made a CUDA tensor per batch is a pageable copy, which waits for the GPU
        # queue to drain (a host sync every batch) and cannot be captured in a CUDA graph.
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=device) for v in (mean, std))
        self.batch_size = batch_size
        self.augment_cfg = augment_cfg
        self.sampler = sampler
        self.key_view = key_view
        self.drop_last = drop_last
        self.shard = shard  # (rank, world): data-parallel, this rank's strided part of each global epoch order
        # (N, K, 5) stored view records: when set, each image replays one of its K views instead of a random crop
        self.padding = augment_cfg.crop_padding if augment_cfg else 0
        self.view_params = None
        if view_records is not None:
            flat = augment.boxes_to_crop_flip(view_records.reshape(-1, 5).float(), self.padding)
            self.view_params = flat.reshape(view_records.shape[0], view_records.shape[1], 3).to(device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def epoch(self, progress: float = 0.0, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """One pass: sampler order (instance / class / sqrt / progressive at `progress`), augmented if configured."""
        return map(self.realize, self.draws(progress, generator))

    def draws(self, progress: float = 0.0, generator: torch.Generator | None = None) -> Iterator[Draw]:
        """`epoch`'s batches before augmentation (engine.fit realizes each inside its training step)."""
        if self.augment_cfg is None and self.sampler == "instance" and generator is None:
            order = torch.arange(len(self.labels))
        else:
            order = epoch_indices(self.labels_cpu, self.sampler, progress, generator)
        if self.shard is not None:
            order, generator = shard_epoch(order, generator, *self.shard)
        order = augment.to_device(order, self.images.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield self.draw(idx, generator)

    def draw(self, idx: torch.Tensor, generator: torch.Generator | None) -> Draw:
        """The random parameters of one batch, drawn on the host in a fixed order (so a seed replays the run)."""
        n, device, aug = len(idx), self.images.device, self.augment_cfg
        crop = views = key = None
        if self.view_params is not None:
            views = augment.to_device(torch.randint(0, self.view_params.shape[1], (n,), generator=generator), device)
            crop = self.view_params[idx, views]
        elif aug is not None and (self.padding or aug.flip):
            crop = augment.to_device(augment.sample_crop_flip(n, self.padding, aug.flip, generator), device)
        if self.key_view:
            key = augment.to_device(augment.sample_moco_view((n, *self.images.shape[1:]), generator), device)
        return Draw(ids=idx, labels=self.labels[idx], crop=crop, key=key, views=views)

    def realize(self, draw: Draw) -> Batch:
        """Gather and augment a drawn batch: device ops only, no host sync, so it runs inside a captured step."""
        raw = self.images[draw.ids]
        view = raw if draw.crop is None else augment.apply_crop_flip(raw, draw.crop, self.padding)
        images = augment.normalize(augment.to_float(view), self.mean, self.std)
        key = None
        if draw.key is not None:
            key = augment.normalize(augment.apply_moco_view(raw, draw.key, raw.shape[-1]), self.mean, self.std)
        return Batch(ids=draw.ids, labels=draw.labels, images=images, key_images=key, views=draw.views)


def read_rgb(path) -> torch.Tensor:
    """uint8 (3, H, W): torchvision.io's decoder (JPEG, PNG, WebP; grayscale, CMYK, palette and alpha to RGB, equal to
    PIL's .convert("RGB")), and PIL's .convert("RGB") for what it cannot read (BMP)."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image

        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


class ListFileImages(Dataset):
    """Images named in a list file (or found in a folder), decoded and transformed per image (DataLoader workers).

    A file that cannot be decoded never stops the epoch: the next decodable image of the same class stands in for
    it (logged once per file and worker). The folder reader's scan skips such files before ids are given
    (trainer/folder.py); this catches what only a full decode finds.
    """

    def __init__(self, split: ImageSet, transform: v2.Transform, key_transform: v2.Transform | None = None):
        self.split, self.transform, self.key_transform = split, transform, key_transform
        self.broken: set[int] = set()
        self._pixels = None  # the split's decoded-image cache, opened in the process that reads it

    def __getstate__(self) -> dict:  # DataLoader workers open the memory map themselves
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self._decode(i)
        key = self.key_transform(image) if self.key_transform is not None else torch.empty(0)
        return i, int(self.split.labels[i]), self.transform(image), key

    def _decode(self, i: int) -> torch.Tensor:
        if self.split.cache is not None:  # decoded once; its undecodable files already stood in for
            if self._pixels is None:
                self._pixels = open_cached(self.split.cache)
            return torch.from_numpy(np.array(self._pixels[i])).permute(2, 0, 1)
        if i not in self.broken:
            try:
                return read_rgb(self.split.root / self.split.paths[i])
            except Exception as err:  # noqa: BLE001 - any undecodable file is stood in for, below
                self.broken.add(i)
                log.warning("cannot decode %s (%s: %s): an image of the same class stands in for it",
                            self.split.root / self.split.paths[i], type(err).__name__, err)
        same = np.flatnonzero(self.split.labels.numpy() == int(self.split.labels[i]))
        start = int(np.searchsorted(same, i))
        for j in np.roll(same, -start - 1).tolist():
            if j in self.broken or j == i:
                continue
            try:
                return read_rgb(self.split.root / self.split.paths[j])
            except Exception:  # noqa: BLE001
                self.broken.add(j)
        raise RuntimeError(f"no image of class {int(self.split.labels[i])} in {self.split.root} can be decoded")


def eval_resize(size: int) -> int:
    """Shorter side an eval image is resized to before its centre crop of `size` (ImageNet's 256 -> 224)."""
    return int(size * 256 / 224)


def list_file_transforms(size: int, mean, std, train: bool) -> tuple[v2.Transform, v2.Transform]:
    """ImageNet-LT recipe of the official code: RRC + jitter + flip (query); MoCo-v2 key view adds blur, grayscale."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if not train:
        return v2.Compose([v2.Resize(eval_resize(size)), v2.CenterCrop(size), *tail]), None
    query = v2.Compose([v2.RandomResizedCrop(size), v2.ColorJitter(0.4, 0.4, 0.4, 0), v2.RandomHorizontalFlip(), *tail])
    key = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        *tail,
    ])
    return query, key


def epoch_order(labels: torch.Tensor, sampler: str, progress: float, generator: torch.Generator | None, train: bool,
                shard: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Generator | None]:
    """One epoch's image order for a file-backed source (sampled when training, file order otherwise), cut to this
    rank's shard; and the generator its augmentation draws from (the shard's own under data parallelism)."""
    order = epoch_indices(labels, sampler, progress, generator) if train else torch.arange(len(labels))
    if shard is not None:
        order, generator = shard_epoch(order, generator if train else None, *shard)
    return order, generator


class LoaderBatches:
    """List-file datasets (ImageNet-LT, iNaturalist): a DataLoader with workers, weighted sampling for re-balancing."""

    def __init__(self, split, mean, std, device, batch_size, size, num_workers, train, sampler="instance", key_view=False,
                 shard: tuple[int, int] | None = None):
        self.split, self.device, self.batch_size, self.sampler, self.shard = split, device, batch_size, sampler, shard
        self.labels_cpu = split.labels
        query, key = list_file_transforms(size, mean, std, train)
        self.dataset = ListFileImages(split, query, key if key_view else None)
        self.num_workers, self.train = num_workers, train

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.split)

    def epoch(self, progress: float = 0.0, generator: torch.Generator | None = None) -> Iterator[Batch]:
        order, _ = epoch_order(self.labels_cpu, self.sampler, progress, generator, self.train, self.shard)
        loader = DataLoader(self.dataset, self.batch_size, sampler=order.tolist(),
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for ids, labels, images, key in loader:  # pinned on CUDA: non-blocking copies keep the host ahead of the GPU
            ids, labels, images, key = (t.to(self.device, non_blocking=True) for t in (ids, labels, images, key))
            yield Batch(ids=ids, labels=labels, images=images, key_images=key if key.numel() else None)


def make_batches(data, split: ImageSet, device, batch_size, *, train: bool, augment_cfg=None, sampler="instance",
                 key_view=False, image_size=224, num_workers=4, view_records=None, shard=None):
    """The right batch source for a split: on-device tensors for in-memory data, rows of the decoded-image cache
    augmented on the device (data.cache_size), else a DataLoader that decodes the files."""
    if split.images is not None:
        return DeviceBatches(split, data.mean, data.std, device, batch_size,
                             augment_cfg if train else None, sampler if train else "instance", key_view and train,
                             view_records=view_records if train else None, shard=shard)
    if view_records is not None:
        raise ValueError("views-mode soft labels need an in-memory dataset (CIFAR, Fashion-MNIST); use clean or online")
    if split.cache is not None:
        return CachedBatches(split, data.mean, data.std, device, batch_size, image_size, train,
                             sampler if train else "instance", key_view and train, shard=shard)
    return LoaderBatches(split, data.mean, data.std, device, batch_size, image_size, num_workers, train, sampler, key_view,
                         shard=shard)


class CachedBatches:
    """Image files read from their decoded-image cache (trainer/image_cache.py) and augmented on the device.

    Each batch's uint8 rows are gathered from the memory map on the host (in file order, so reads stay sequential)
    and copied to the device; `realize` then runs device ops only, as DeviceBatches does for in-memory data, so the
    step (and its CUDA graph) holds the augmentation. Training: list_file_transforms' query view, RandomResizedCrop
    (scale 0.08-1) + ColorJitter(0.4, 0.4, 0.4) + flip, drawn on the cached square (trainer/augment.py; jitter in a
    fixed order), and the MoCo-v2 key view when asked. Evaluation: resize to eval_resize(size) (nothing to do when
    data.cache_size is that size) and the centre crop, as list_file_transforms does.
    """

    def __init__(self, split: ImageSet, mean, std, device, batch_size: int, size: int, train: bool,
                 sampler: str = "instance", key_view: bool = False, shard: tuple[int, int] | None = None,
                 jitter: bool = True):
        self.pixels = open_cached(split.cache)
        self.jitter = jitter  # False: RandomResizedCrop + flip only (bench/image_cache.py's like-for-like row)
        self.labels_cpu, self.labels = split.labels, split.labels.to(device)
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=device) for v in (mean, std))
        self.device, self.batch_size, self.size, self.train = torch.device(device), batch_size, size, train
        self.sampler, self.key_view, self.shard = sampler, key_view, shard
        self.cached_size = int(self.pixels.shape[1])
        # (x / 255 - mean) / std as one multiply-add from uint8: x * scale - shift
        self.scale, self.shift = (1 / (255 * self.std)).view(1, -1, 1, 1), (self.mean / self.std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return -(-len(self.labels_cpu) // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.labels_cpu)

    def epoch(self, progress: float = 0.0, generator: torch.Generator | None = None) -> Iterator[Batch]:
        return map(self.realize, self.draws(progress, generator))

    def draws(self, progress: float = 0.0, generator: torch.Generator | None = None) -> Iterator[Draw]:
        """The batches' rows and random view parameters, before augmentation (engine.fit realizes them in the step)."""
        order, generator = epoch_order(self.labels_cpu, self.sampler, progress, generator, self.train, self.shard)
        for start in range(0, len(order), self.batch_size):
            yield self.draw(order[start : start + self.batch_size], generator)

    def draw(self, idx: torch.Tensor, generator: torch.Generator | None) -> Draw:
        ids = np.sort(idx.numpy())  # a batch is a set: reading it in file order keeps the memory map's reads sequential
        raw = augment.to_device(torch.from_numpy(np.asarray(self.pixels[ids])), self.device)
        ids = augment.to_device(torch.from_numpy(ids), self.device)
        resized_crop = key = None
        if self.train:
            n, s = len(ids), self.cached_size
            boxes = augment.sample_resized_crop_boxes(n, s, s, (0.08, 1.0), generator=generator)
            flips = torch.rand(n, generator=generator) < 0.5
            jitter = augment.sample_jitter_factors(n, 0.4, 0.4, 0.4, 0.0, generator=generator)
            resized_crop = augment.to_device(torch.cat([boxes, flips[:, None].float(), jitter], 1), self.device)
            if self.key_view:
                key = augment.to_device(augment.sample_moco_view((n, 3, s, s), generator), self.device)
        return Draw(ids=ids, labels=self.labels[ids], key=key, raw=raw, resized_crop=resized_crop)

    def realize(self, draw: Draw) -> Batch:
        """Crop, flip and jitter (training) or centre-crop (evaluation) a drawn batch: device ops only on a GPU (no host
        sync, fixed shapes); on a CPU the crop takes augment.resized_crop_uint8's per-image loop, about 2x faster."""
        raw = draw.raw.permute(0, 3, 1, 2)  # NCHW in channels-last memory: the layout the uint8 resize is fast in
        if draw.resized_crop is not None:
            boxes, flips = draw.resized_crop[:, :4], draw.resized_crop[:, 4] > 0
            if raw.device.type == "cpu":
                view = augment.resized_crop_uint8(raw, boxes, flips, self.size)
                if not self.jitter:  # uint8 straight to normalised float: one pass less over the batch
                    images = view.float().mul_(self.scale).sub_(self.shift)
                    return Batch(ids=draw.ids, labels=draw.labels, images=images, key_images=self._key(raw, draw))
                view = augment.to_float(view)
            else:
                view = augment.apply_resized_crop(augment.to_float(raw), boxes, flips, self.size)
            if self.jitter:
                view = augment.apply_color_jitter(view, draw.resized_crop[:, 5:], hue=False)
        else:
            view = raw if self.cached_size == eval_resize(self.size) else TF.resize(raw, eval_resize(self.size))
            view = augment.to_float(TF.center_crop(view, self.size))
        images = augment.normalize(view, self.mean, self.std)
        return Batch(ids=draw.ids, labels=draw.labels, images=images, key_images=self._key(raw, draw))

    def _key(self, raw: torch.Tensor, draw: Draw) -> torch.Tensor | None:
        if draw.key is None:
            return None
        return augment.normalize(augment.apply_moco_view(raw, draw.key, self.size), self.mean, self.std)


def as_numpy_ids(ids: torch.Tensor) -> np.ndarray:
    return ids.detach().cpu().numpy().astype(np.int64)
