"""Teacher -> logits for a block of training images: clean (un-augmented) or K recorded augmented views."""

from __future__ import annotations

import torch
from torch import nn

from trainer import augment
from trainer.context import resolve_device


def sample_views(num_images: int, views: int, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """(N, K, 5) view records [x0, y0, x1, y1, flip]: the student's own crop+flip augmentation, drawn K times."""
    # One independent draw per (image, view), in image-major order so a shard's records do not depend on the others.
    params = augment.sample_crop_flip(num_images * views, padding, flip, generator)
    return params.reshape(num_images, views, 3)


@torch.no_grad()
def teacher_logits_block(
    teacher: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    batch_size: int = 512,
    crop_params: torch.Tensor | None = None,
    padding: int = 0,
) -> torch.Tensor:
    """Logits (n, C) of the eval-mode teacher on uint8 images (n, C, H, W), or (n, K, C) on replayed views.

    `crop_params` (n, K, 3) are `sample_crop_flip` parameters; the views are rebuilt on the teacher's device exactly
    as the student's batches will rebuild them, so stored target and student view match pixel for pixel.
    """
    teacher.eval()
    device = next(teacher.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        block = images[start : start + batch_size].to(device)
        if crop_params is None:
            out.append(teacher(augment.normalize(augment.to_float(block), mean, std)).float().cpu())
            continue
        k = crop_params.shape[1]
        params = crop_params[start : start + batch_size].reshape(-1, 3)
        replayed = augment.apply_crop_flip(block.repeat_interleave(k, dim=0), params, padding)
        logits = teacher(augment.normalize(augment.to_float(replayed), mean, std)).float().cpu()
        out.append(logits.reshape(len(block), k, -1))
    return torch.cat(out)


class LabelShardWriter:
    """Runs a saved teacher over chunks of the training set and writes them into a staged labelset.

    A plain class (tests call it in-process); `trainer/workers.py` wraps it as a Ray actor, one per GPU or CPU slot.
    Views are drawn per chunk from (seed, chunk index), so a chunk's content never depends on which worker or which
    run wrote it: a resumed generation is identical to an unbroken one.
    """

    def __init__(self, teacher_path: str, data_cfg: dict, store_root: str, labelset_id: str, augment_cfg: dict,
                 seed: int = 0, device: str = "auto", batch_size: int = 512, exit_after_chunks: int | None = None):
        from store import LabelsetWriter
        from trainer.config import AugmentConfig, DataConfig
        from trainer.datasets import load_dataset
        from trainer.export import load_model

        self.device = resolve_device(device)
        self.teacher, self.spec = load_model(teacher_path, map_location=self.device)
        self.teacher.to(self.device)
        self.data = load_dataset(DataConfig.model_validate(data_cfg))
        if self.data.fingerprint != self.spec.fingerprint:
            raise ValueError(f"teacher {teacher_path} was trained on dataset {self.spec.fingerprint} but this data "
                             f"config gives {self.data.fingerprint}; use the teacher's run config")
        self.writer = LabelsetWriter.open(store_root, labelset_id)
        self.augment = AugmentConfig.model_validate(augment_cfg)
        self.seed, self.batch_size = seed, batch_size
        self.data_workers = DataConfig.model_validate(data_cfg).num_workers
        self.exit_after_chunks = exit_after_chunks  # fault injection for tests: die like a killed process
        self.written = 0

    def write(self, chunk_index: int) -> int:
        """Teacher logits for one chunk (clean or K views), written and checksummed; returns the rows written."""
        start, stop = self.writer.chunk_bounds(chunk_index)
        prov = self.writer.provenance
        labels = self.data.train.labels[start:stop].numpy()
        records = None
        if not self.data.in_memory:
            if prov.mode == "views":
                raise ValueError("views mode replays crops of in-memory images; list-file datasets use clean mode")
            logits = self._list_file_logits(start, stop)
        elif prov.mode == "views":
            images = self.data.train.images[start:stop]
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk_index)
            crops = sample_views(stop - start, prov.views_per_image, self.augment.crop_padding, self.augment.flip,
                                 generator)
            logits = teacher_logits_block(self.teacher, images, self.spec.mean, self.spec.std, self.batch_size,
                                          crop_params=crops, padding=self.augment.crop_padding)
            h, w = images.shape[-2:]
            records = augment.crop_flip_to_boxes(crops.reshape(-1, 3), self.augment.crop_padding, h, w)
            records = records.reshape(stop - start, prov.views_per_image, 5).numpy()
        else:
            images = self.data.train.images[start:stop]
            logits = teacher_logits_block(self.teacher, images, self.spec.mean, self.spec.std, self.batch_size)
        self.writer.write_chunk(chunk_index, logits.numpy(), labels, view_params=records)
        self.written += 1
        if self.exit_after_chunks is not None and self.written >= self.exit_after_chunks:
            import os

            os._exit(1)
        return stop - start

    @torch.no_grad()
    def _list_file_logits(self, start: int, stop: int) -> torch.Tensor:
        """Clean logits of list-file images (decoded by DataLoader workers, resized and centre-cropped)."""
        from torch.utils.data import DataLoader, Subset

        from trainer.batches import ListFileImages, list_file_transforms

        transform, _ = list_file_transforms(self.spec.image_size, self.spec.mean, self.spec.std, train=False)
        dataset = Subset(ListFileImages(self.data.train, transform), range(start, stop))
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=min(4, self.data_workers))
        return torch.cat([self.teacher(images.to(self.device)).float().cpu() for _, _, images, _ in loader])
