"""Decoding once (issue 21): the decoded-image cache against torchvision's ImageFolder + PIL + DataLoader, one run.

Writes folders of real JPEG files (PIL-encoded, classes that share structure: a per-class grating orientation,
frequency and two colours, per-image phase, shift, noise and size; long-tailed class sizes) into a temporary
directory, then for each (folder, crop) case measures in the same process, alternating ours and the baseline:

- input pipeline images/s: every training image once as normalised float batches, no model. Ours: the cache's rows
  (data.cache_size = eval_resize(crop)) through trainer/batches.py CachedBatches, random-resized-crop + flip on the
  device (here the CPU, torch threads = --threads). Baseline: ImageFolder + RandomResizedCrop + flip + ToTensor +
  Normalize (PIL in DataLoader(num_workers=2) workers, shuffled). A `:jitter` case adds ColorJitter(0.4, 0.4, 0.4)
  on both sides (the list-file training recipe; CachedBatches trains with it).
- one training epoch's wall time of a small CNN (two strided convs, cheap next to the input at 224 px) from each.
- the cache's first pass (seconds, images/s) and its bytes per image.

    python bench/image_cache.py                       # bench/results/image_cache-<device>.json
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from trainer.batches import CachedBatches, eval_resize
from trainer.config import DataConfig
from trainer.datasets import ImageSet, load_dataset
from trainer.image_cache import open_or_build
from trainer.report import write_results

log = logging.getLogger("bench.image_cache")


def class_sizes(images: int, classes: int) -> np.ndarray:
    """Long-tailed class sizes (exponential, head/tail = 20, each class >= 2) summing to about `images`."""
    shape = 20.0 ** (-np.arange(classes) / max(classes - 1, 1))
    return np.maximum(2, np.round(shape * images / shape.sum())).astype(int)


def write_folder(root: Path, images: int, classes: int, side: tuple[int, int], seed: int) -> int:
    """root/train/<class>/<i>.jpg with structured, learnable classes; images' shorter side uniform in `side`."""
    rng = np.random.RandomState(seed)
    theta, freq = rng.uniform(0, np.pi, classes), rng.uniform(0.05, 0.3, classes)
    colours = rng.uniform(0, 255, (classes, 2, 3))
    written = 0
    for c, n in enumerate(class_sizes(images, classes)):
        for i in range(n + 1):  # the last one goes to val/: load_dataset wants an evaluation split
            folder = root / ("train" if i < n else "val") / f"class_{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            short = rng.randint(side[0], side[1] + 1)
            h, w = (short, int(short * rng.uniform(1.0, 1.5)))[:: rng.choice([1, -1])]
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            t = theta[c] + rng.normal(0, 0.1)
            wave = 0.5 + 0.5 * np.sin(freq[c] * (np.cos(t) * xx + np.sin(t) * yy) + rng.uniform(0, 2 * np.pi))
            pixels = colours[c, 0] + (colours[c, 1] - colours[c, 0]) * wave[..., None]
            pixels += rng.normal(0, 12, pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=85)
            written += i < n
    return written


def tiny_cnn(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 5, stride=4, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def baseline_loader(train_dir: Path, crop: int, batch: int, workers: int, mean, std, jitter: bool):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                                    *([transforms.ColorJitter(0.4, 0.4, 0.4)] if jitter else []),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset = datasets.ImageFolder(str(train_dir), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)


def pass_ours(batches: CachedBatches, generator: torch.Generator, model=None, optimizer=None) -> tuple[float, int]:
    tic, seen = time.perf_counter(), 0
    for batch in batches.epoch(0.0, generator):
        seen += len(batch.ids)
        if model is not None:
            step(model, optimizer, batch.images, batch.labels)
    return time.perf_counter() - tic, seen


def pass_baseline(loader, model=None, optimizer=None) -> tuple[float, int]:
    tic, seen = time.perf_counter(), 0
    for images, labels in loader:
        seen += len(labels)
        if model is not None:
            step(model, optimizer, images, labels)
    return time.perf_counter() - tic, seen


def step(model: nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run_case(name: str, root: Path, crop: int, jitter: bool, args, cache_dir: Path) -> list[dict]:
    data = load_dataset(DataConfig(name="folder", root=root, image_size=crop))
    size = eval_resize(crop)
    tic = time.perf_counter()
    path = open_or_build(data.train, size, cache_dir, threads=args.threads)
    first_pass = time.perf_counter() - tic
    split = ImageSet(labels=data.train.labels, paths=data.train.paths, root=data.train.root, cache=path)
    ours = CachedBatches(split, data.mean, data.std, torch.device("cpu"), args.batch, crop, train=True, jitter=jitter)
    loader = baseline_loader(root / "train", crop, args.batch, args.workers, data.mean, data.std, jitter)
    n = len(split)
    generator = torch.Generator().manual_seed(0)
    pipeline = {"ours": [], "baseline": []}
    for _ in range(args.repeats):  # alternate, keep the best (as timeit does): others' load only slows a pass down
        pipeline["ours"].append(pass_ours(ours, generator)[0])
        pipeline["baseline"].append(pass_baseline(loader)[0])
    epoch = {}
    for who in ("ours", "baseline"):
        torch.manual_seed(0)
        model = tiny_cnn(data.num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        epoch[who] = (pass_ours(ours, generator, model, optimizer) if who == "ours"
                      else pass_baseline(loader, model, optimizer))[0]
    best = {who: min(times) for who, times in pipeline.items()}
    common = {"folder": name, "images": n, "classes": data.num_classes, "crop": crop, "cache_size": size,
              "source_short_side": args_side(args, name),
              "augment": "rrc+jitter+flip" if jitter else "rrc+flip"}
    rows = [
        {**common, "name": "input_pipeline", "ours": round(n / best["ours"], 1),
         "baseline": round(n / best["baseline"], 1), "ratio": round(best["baseline"] / best["ours"], 2),
         "unit": "img/s", "ours_s": [round(t, 2) for t in pipeline["ours"]],
         "baseline_s": [round(t, 2) for t in pipeline["baseline"]]},
        {**common, "name": "train_epoch", "ours": round(epoch["ours"], 2), "baseline": round(epoch["baseline"], 2),
         "ratio": round(epoch["baseline"] / epoch["ours"], 2), "unit": "s (one epoch, tiny CNN)"},
        {**common, "name": "first_pass", "ours": round(first_pass, 2), "img_s": round(n / first_pass, 1),
         "unit": "s (decode + resize + write, once)", "threads": args.threads,
         "vs_baseline_epochs": round(first_pass / epoch["baseline"], 2)},
        {**common, "name": "bytes_per_image", "ours": size * size * 3, "cache_bytes": path.stat().st_size,
         "source_jpeg_bytes_per_image": round(sum((root / "train" / p).stat().st_size for p in split.paths) / n),
         "unit": "B"},
    ]
    for row in rows:
        log.info("%s", row)
    return rows


def args_side(args, name: str) -> list[int]:
    return list(args.small_side if name == "small" else args.photo_side)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo-images", type=int, default=3000)
    parser.add_argument("--small-images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=300)
    parser.add_argument("--photo-side", type=int, nargs=2, default=(300, 400), help="photos' shorter side range")
    parser.add_argument("--small-side", type=int, nargs=2, default=(64, 80), help="small images' shorter side range")
    parser.add_argument("--cases", default="small:64,photo:64,photo:224,photo:224:jitter",
                        help="folder:crop[:jitter], comma-separated; jitter adds ColorJitter(0.4, 0.4, 0.4) both sides")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for ours, and the first pass's decoders")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--note", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ltd_image_cache_") as tmp:
        tmp = Path(tmp)
        written = {}
        for name in {case.split(":")[0] for case in args.cases.split(",")}:
            tic = time.perf_counter()
            images = args.small_images if name == "small" else args.photo_images
            written[name] = write_folder(tmp / name, images, args.classes, args_side(args, name), seed=1)
            log.info("%s folder: %d JPEGs written in %.1f s", name, written[name], time.perf_counter() - tic)
        for case in args.cases.split(","):
            name, crop, *jitter = case.split(":")
            rows += run_case(name, tmp / name, int(crop), jitter == ["jitter"], args, tmp / "cache")
    command = "python bench/image_cache.py " + " ".join(shlex.quote(a) for a in argv)
    path = write_results("image_cache", rows, command, args.out, extra={"note": args.note} if args.note else None)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main(sys.argv[1:])
