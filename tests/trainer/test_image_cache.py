"""The decoded-image cache (data.cache_size) on real files on disk: pixels, keys, reuse, stand-ins, a training run."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torchvision.transforms.v2 import functional as TF
from typer.testing import CliRunner

from trainer import image_cache
from trainer.batches import CachedBatches, ListFileImages, make_batches
from trainer.config import DataConfig, load_config
from trainer.datasets import ImageSet, load_dataset
from trainer.image_cache import decode_resized, open_cached, open_or_build

from test_folder_dataset import _image  # real image files on disk, one writer for both folder-reading suites


def _folder(root: Path, sizes: dict[str, int]) -> Path:
    for split, counts in (("train", sizes), ("val", {c: 1 for c in sizes})):
        for cls, n in counts.items():
            for i in range(n):
                _image(root / split / cls / f"{i:03d}.jpg", size=(30 + 7 * i, 44 - 3 * i))
    return root


def _cached(root: Path, cache: Path, *extra: str):
    cfg = load_config(None, ["data.name=folder", f"data.root={root}", f"data.cache_dir={cache}", *extra])
    return load_dataset(cfg.data)


def test_the_cache_holds_the_pixels_of_a_direct_decode(tmp_path):
    """Every split's rows equal torchvision's Resize + CenterCrop of the file as PIL RGB (grayscale, CMYK and RGBA too),
    and eval batches are that square's centre crop at the crop size."""
    root = _folder(tmp_path / "data", {"ant": 3, "bee": 2})
    _image(root / "train" / "bee" / "gray.png", "L", size=(50, 20), fmt="PNG")
    _image(root / "train" / "bee" / "cmyk.jpg", "CMYK", size=(21, 33), fmt="JPEG")
    _image(root / "train" / "ant" / "alpha.png", "RGBA", size=(24, 24), fmt="PNG")
    data = _cached(root, tmp_path / "cache", "data.cache_size=18", "data.image_size=16")
    for split in (data.train, data.test):
        pixels = open_cached(split.cache)
        assert pixels.shape == (len(split), 18, 18, 3) and pixels.dtype == np.uint8
        for i, rel in enumerate(split.paths):
            with Image.open(split.root / rel) as image:
                expected = np.asarray(TF.center_crop(TF.resize(image.convert("RGB"), 18), 18))
            np.testing.assert_array_equal(pixels[i], expected, err_msg=rel)
            np.testing.assert_array_equal(pixels[i], decode_resized(split.root / rel, 18), err_msg=rel)
    batches = make_batches(data, data.test, torch.device("cpu"), 4, train=False, image_size=16)
    assert isinstance(batches, CachedBatches)
    images = torch.cat([b.images for b in batches.epoch()])
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    crops = torch.from_numpy(np.array(open_cached(data.test.cache))).permute(0, 3, 1, 2)[:, :, 1:17, 1:17]
    torch.testing.assert_close(images, (crops.float() / 255 - mean) / std)


def test_the_key_follows_the_folder_and_the_size_and_a_second_open_decodes_nothing(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data", {"ant": 3, "bee": 2})
    cache = tmp_path / "cache"
    decoded = []
    real = image_cache.decode_resized
    monkeypatch.setattr(image_cache, "decode_resized", lambda path, size: decoded.append(path) or real(path, size))
    first = _cached(root, cache, "data.cache_size=20", "data.image_size=16").train.cache
    assert len(decoded) == 5 + 2  # train and val, once each
    mtime = first.stat().st_mtime_ns
    decoded.clear()
    again = _cached(root, cache, "data.cache_size=20", "data.image_size=16").train.cache
    assert again == first and decoded == [] and first.stat().st_mtime_ns == mtime

    other_size = _cached(root, cache, "data.cache_size=24", "data.image_size=16").train.cache
    assert other_size != first and open_cached(other_size).shape[1:] == (24, 24, 3)
    _image(root / "train" / "bee" / "new.jpg", size=(40, 30))  # another file: another fingerprint
    added = _cached(root, cache, "data.cache_size=20", "data.image_size=16").train.cache
    edited_file = root / "train" / "ant" / "000.jpg"
    _image(edited_file, size=(31, 45))  # the same list, one file rewritten in place
    os.utime(edited_file, ns=(mtime + 10**9, mtime + 10**9))
    edited = _cached(root, cache, "data.cache_size=20", "data.image_size=16").train.cache
    assert len({first, added, edited}) == 3
    assert not list(cache.glob("*.tmp*"))  # every build renamed its temporary file into place


def test_a_file_that_fails_to_decode_is_stood_in_for_as_list_file_images_does(tmp_path, caplog):
    """A split that is not scanned (a list file) holds a zero-byte file: its row is the next decodable image of the
    same class, the same donor ListFileImages picks; the ids stay, the sidecar lists it, a reopen reports it."""
    for name in ("a0.jpg", "a2.png", "b0.jpg"):
        _image(tmp_path / name, size=(40, 30))
    (tmp_path / "a1.jpg").write_bytes(b"")
    split = ImageSet(labels=torch.tensor([0, 0, 0, 1]), paths=("a0.jpg", "a1.jpg", "a2.png", "b0.jpg"), root=tmp_path)
    path = open_or_build(split, 16, tmp_path / "cache")
    pixels = open_cached(path)
    assert len(pixels) == 4
    np.testing.assert_array_equal(pixels[1], decode_resized(tmp_path / "a2.png", 16))
    np.testing.assert_array_equal(pixels[0], decode_resized(tmp_path / "a0.jpg", 16))
    listed = json.loads(path.with_suffix(".json").read_text())["substituted"]
    assert list(listed) == ["1"] and listed["1"]["path"] == "a1.jpg" and listed["1"]["by"] == "a2.png"
    reference = ListFileImages(split, transform=lambda x: x)
    np.testing.assert_array_equal(reference[1][2].numpy(), np.asarray(Image.open(tmp_path / "a2.png")).transpose(2, 0, 1))
    from_cache = ListFileImages(ImageSet(split.labels, paths=split.paths, root=tmp_path, cache=path), lambda x: x)
    np.testing.assert_array_equal(from_cache[1][2].numpy(), pixels[1].transpose(2, 0, 1))  # label generation's path
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert open_or_build(split, 16, tmp_path / "cache") == path
    assert "1 undecodable files" in caplog.text

    (tmp_path / "b0.jpg").write_bytes(b"garbage")  # the only image of class 1
    with pytest.raises(RuntimeError, match="no image of class 1"):
        open_or_build(split, 16, tmp_path / "cache")


def test_cache_config_is_checked():
    with pytest.raises(ValidationError, match=r"set data.cache_size >= 224, e.g. 256"):
        DataConfig(name="folder", cache_size=200)
    with pytest.raises(ValidationError, match="already held in memory"):
        DataConfig(name="cifar10", cache_size=256)
    assert DataConfig(name="folder", cache_size=256).cache_size == 256


def test_ltd_train_with_the_image_cache(tmp_path, monkeypatch):
    """`ltd train` end to end from the cache (SSD: teacher, soft labels read through the cache, student): the training
    and evaluation batches come from the decoded rows, and the files are decoded once per split."""
    from service.cli import app
    from trainer import batches

    def no_decoding(*args, **kwargs):
        raise AssertionError("with data.cache_size no batch decodes a file")

    monkeypatch.setattr(batches, "LoaderBatches", no_decoding)
    monkeypatch.setattr(batches, "read_rgb", no_decoding)  # ListFileImages (label generation) reads the cache

    root = tmp_path / "data"
    for split, sizes in (("train", {"zebra": 12, "ant": 6, "moth": 3}), ("val", {"zebra": 2, "ant": 2, "moth": 2})):
        for cls, n in sizes.items():
            for i in range(n):
                _image(root / split / cls / f"{i}.jpg", size=(40, 36))
    (root / "train" / "moth" / "broken.jpg").write_bytes(b"")
    run, cache = tmp_path / "run", tmp_path / "cache"
    tiny = ["model.arch=resnet10", "data.image_size=32", "data.cache_size=36", f"data.cache_dir={cache}",
            "data.num_workers=0", "stage1.optim.epochs=1", "stage1.optim.warmup_epochs=0", "stage1.moco.queue_size=8",
            "stage2.optim.epochs=1", "stage3.optim.epochs=1", "stage3.optim.warmup_epochs=0", "stage4.optim.epochs=1",
            "stage1.optim.batch_size=8", "stage3.optim.batch_size=8"]
    result = CliRunner().invoke(app, ["train", "--no-ray", "data.name=folder", f"data.root={root}", f"out_dir={run}",
                                      *tiny])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_counts"] == [6, 3, 12] and set(metrics["stages"]) == {"I", "II", "III", "III_hard_head", "IV"}
    assert sorted(open_cached(p).shape[0] for p in cache.glob("*.npy")) == [6, 21]  # val, train: built once each
    assert [r["path"] for r in json.loads((run / "skipped_images.json").read_text())["files"]] == ["moth/broken.jpg"]


def test_the_cpu_resized_crop_is_torchvisions_crop_then_resize():
    """augment.resized_crop_uint8 (CachedBatches on a CPU) equals torchvision's resized_crop + hflip per image."""
    from trainer import augment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 40, 40, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    boxes = augment.sample_resized_crop_boxes(6, 40, 40, (0.08, 1.0), generator=g)
    flips = torch.tensor([True, False] * 3)
    out = augment.resized_crop_uint8(images, boxes, flips, 16)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.uint8
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        expected = TF.resized_crop(images[i], y0, x0, y1 - y0, x1 - x0, [16, 16], antialias=True)
        torch.testing.assert_close(out[i], TF.horizontal_flip(expected) if flips[i] else expected)
