"""data.name=folder on real files on disk: torchvision's ImageFolder layout, mixed formats, unreadable files, ids."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from trainer.batches import ListFileImages, read_rgb
from trainer.config import DataConfig, dump_config, load_config
from trainer.datasets import load_dataset

RNG = np.random.RandomState(0)


def _image(path: Path, mode: str = "RGB", size=(24, 20), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


def _truncated(path: Path, like: Path) -> Path:
    data = like.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def _folder(root: Path, sizes: dict[str, int], val: dict[str, int] | None = None, ext: str = ".jpg") -> Path:
    for split, counts in (("train", sizes), ("val", val or {c: 1 for c in sizes})):
        for cls, n in counts.items():
            for i in range(n):
                _image(root / split / cls / f"{i:03d}{ext}")
    return root


def _folder_cfg(root: Path, *extra: str):
    return load_config(None, ["data.name=folder", f"data.root={root}", *extra])


def test_mixed_formats_and_modes_all_read_as_rgb(tmp_path):
    """JPEG, PNG, WebP, BMP; grayscale, CMYK, RGBA, palette; upper-case extensions: all usable, all decoded to the
    RGB pixels PIL's .convert("RGB") gives."""
    files = {
        "cat/rgb.jpg": ("RGB", "JPEG"), "cat/GRAY.JPG": ("L", "JPEG"), "cat/cmyk.jpeg": ("CMYK", "JPEG"),
        "cat/upper.JPEG": ("RGB", "JPEG"), "dog/rgba.PNG": ("RGBA", "PNG"), "dog/gray.png": ("L", "PNG"),
        "dog/palette.png": ("P", "PNG"), "dog/photo.WebP": ("RGB", "WEBP"), "dog/old.BMP": ("RGB", "BMP"),
    }
    for rel, (mode, fmt) in files.items():
        _image(tmp_path / "train" / rel, mode, fmt=fmt)
    (tmp_path / "train" / "dog" / "readme.txt").write_text("not an image extension: not listed")
    _image(tmp_path / "test" / "cat" / "a.jpg")
    _image(tmp_path / "test" / "dog" / "b.png")
    data = load_dataset(_folder_cfg(tmp_path).data)
    assert data.skipped == () and sorted(data.train.paths) == sorted(files)
    assert data.class_counts.tolist() == [4, 5] and not data.in_memory and data.val is None
    for rel in data.train.paths:
        image = read_rgb(data.train.root / rel)
        expected = np.asarray(Image.open(data.train.root / rel).convert("RGB")).transpose(2, 0, 1)
        assert image.dtype == torch.uint8 and image.shape == (3, 20, 24), rel
        np.testing.assert_array_equal(image.numpy(), expected, err_msg=rel)


def test_class_order_and_file_order_equal_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    names = ["b", "A", "a", "10", "9", "_x", "Z", "café"]
    _folder(tmp_path, {n: 1 + i % 3 for i, n in enumerate(names)})
    _image(tmp_path / "train" / "a" / "nested" / "deep.PNG")  # ImageFolder walks sub-folders too
    data = load_dataset(_folder_cfg(tmp_path).data)
    reference = ImageFolder(str(tmp_path / "train"))
    assert {n: i for i, n in enumerate(data.class_names)} == reference.class_to_idx
    prefix = len(str(tmp_path / "train")) + 1
    assert list(zip(data.train.paths, data.train.labels.tolist())) == [(p[prefix:], y) for p, y in reference.samples]
    assert data.class_counts.tolist() == np.bincount(reference.targets).tolist()


def test_unreadable_files_are_skipped_listed_and_leave_the_other_ids_alone(tmp_path):
    """A truncated, a zero-byte and a not-an-image file sit between good ones; the dataset is the clean folder's
    (same paths in the same id order, same fingerprint, so a labelset of one lines up with the other), the run folder
    lists the three, and each id's source index points at its file in the full listing."""
    from torchvision.datasets import ImageFolder

    from trainer.context import prepare

    clean = _folder(tmp_path / "clean", {"ant": 4, "bee": 3, "cow": 2}, ext=".png")
    broken = tmp_path / "broken"
    shutil.copytree(clean, broken)
    _truncated(broken / "train" / "ant" / "001a.jpg", _image(tmp_path / "whole.jpg", size=(64, 48)))
    (broken / "train" / "bee" / "000a.jpg").write_bytes(b"")
    (broken / "train" / "bee" / "001a.png").write_text("hello, not a PNG")
    (broken / "val" / "cow" / "zzz.jpg").write_bytes(b"")  # an evaluation split's file is skipped as well

    a, b = load_dataset(_folder_cfg(clean).data), load_dataset(_folder_cfg(broken).data)
    assert b.train.paths == a.train.paths and b.fingerprint == a.fingerprint
    assert torch.equal(b.train.labels, a.train.labels) and b.test.paths == a.test.paths
    assert {(r["split"], r["path"], r["class"]) for r in b.skipped} == {
        ("train", "ant/001a.jpg", "ant"), ("train", "bee/000a.jpg", "bee"), ("train", "bee/001a.png", "bee"),
        ("val", "cow/zzz.jpg", "cow")}
    reasons = {r["path"]: r["reason"] for r in b.skipped}
    assert "truncated" in reasons["ant/001a.jpg"] and "0 bytes" in reasons["bee/000a.jpg"]
    assert "not an image" in reasons["bee/001a.png"]
    listing = ImageFolder(str(broken / "train"), allow_empty=True).samples
    prefix = len(str(broken / "train")) + 1
    assert [listing[i][0][prefix:] for i in b.source_indices.tolist()] == list(b.train.paths)
    assert b.source_indices.tolist() != list(range(len(b.train)))  # the skipped files do sit between usable ones

    run = tmp_path / "run"
    prepare(_folder_cfg(broken, f"out_dir={run}"))
    listed = json.loads((run / "skipped_images.json").read_text())
    assert listed["count"] == 4 and {r["path"] for r in listed["files"]} == set(reasons)
    prepare(_folder_cfg(clean, f"out_dir={run}"))  # the same run folder on clean data keeps no stale list
    assert not (run / "skipped_images.json").exists()


def test_a_class_whose_only_image_is_corrupt_is_a_clear_error(tmp_path):
    root = _folder(tmp_path, {"ant": 2, "bee": 2})
    _truncated(root / "train" / "zebra" / "only.jpg", _image(tmp_path / "whole.jpg", size=(64, 48)))
    with pytest.raises(ValueError, match=r"'zebra' \(1 files, none readable\)"):
        load_dataset(_folder_cfg(root).data)


def test_folder_split_is_used_as_it_is_unless_asked(tmp_path):
    root = _folder(tmp_path, {"a": 12, "b": 6, "c": 3})
    cfg = _folder_cfg(root, f"out_dir={tmp_path / 'run'}")
    assert cfg.data.imbalance_factor == 1.0
    assert load_dataset(cfg.data).class_counts.tolist() == [12, 6, 3]
    dump_config(cfg, tmp_path / "config.yaml")  # what a run folder and a worker receive reloads to the same split
    assert load_config(tmp_path / "config.yaml").data == cfg.data
    sub = load_dataset(_folder_cfg(root, "data.imbalance_factor=4", "data.max_per_class=8").data)
    assert sub.class_counts.tolist() == [8, 4, 2]
    assert sub.train.paths == tuple(sorted(sub.train.paths))  # ids stay in listing order
    assert DataConfig(name="cifar10").imbalance_factor == 100.0  # the other readers keep their default


def test_an_image_that_fails_to_decode_mid_epoch_is_stood_in_for(tmp_path):
    """What the scan cannot catch (a list-file split is not scanned; a file broken after the scan) never stops an
    epoch: the DataLoader path gives the next decodable image of the same class, and remembers the broken one."""
    from trainer.datasets import ImageSet

    for name in ("a0.jpg", "a2.png", "b0.jpg"):
        _image(tmp_path / name)
    (tmp_path / "a1.jpg").write_bytes(b"")
    split = ImageSet(labels=torch.tensor([0, 0, 0, 1]), paths=("a0.jpg", "a1.jpg", "a2.png", "b0.jpg"), root=tmp_path)
    images = ListFileImages(split, transform=lambda x: x)
    i, label, image, _ = images[1]
    assert (i, label) == (1, 0) and images.broken == {1}
    np.testing.assert_array_equal(image.numpy(), read_rgb(tmp_path / "a2.png").numpy())  # the next one of class 0
    (tmp_path / "a2.png").write_bytes(b"")
    images = ListFileImages(split, transform=lambda x: x)
    np.testing.assert_array_equal(images[1][2].numpy(), read_rgb(tmp_path / "a0.jpg").numpy())  # wraps around
    (tmp_path / "b0.jpg").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no image of class 1"):
        images[3]


def test_ltd_train_on_a_folder_dataset(tmp_path):
    """`ltd train` end to end on a tiny folder (SSD: teacher, soft labels through the DataLoader path, student)."""
    from service.cli import app

    root = tmp_path / "data"
    for split, sizes in (("train", {"zebra": 12, "ant": 6, "moth": 3}), ("val", {"zebra": 2, "ant": 2, "moth": 2})):
        for cls, n in sizes.items():
            for i in range(n):
                _image(root / split / cls / f"{i}.jpg", size=(40, 36))
    (root / "train" / "moth" / "broken.jpg").write_bytes(b"")
    run = tmp_path / "run"
    tiny = ["model.arch=resnet10", "data.image_size=32", "data.num_workers=0", "stage1.optim.epochs=1",
            "stage1.optim.warmup_epochs=0", "stage1.moco.queue_size=8", "stage2.optim.epochs=1", "stage3.optim.epochs=1",
            "stage3.optim.warmup_epochs=0", "stage4.optim.epochs=1", "stage1.optim.batch_size=8",
            "stage3.optim.batch_size=8"]
    result = CliRunner().invoke(app, ["train", "--no-ray", "data.name=folder", f"data.root={root}", f"out_dir={run}",
                                      *tiny])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "folder" and metrics["class_counts"] == [6, 3, 12]  # ant, moth, zebra
    assert metrics["class_names"] == ["ant", "moth", "zebra"] and metrics["imbalance_factor"] == 1.0
    assert set(metrics["stages"]) == {"I", "II", "III", "III_hard_head", "IV"}
    assert [r["path"] for r in json.loads((run / "skipped_images.json").read_text())["files"]] == ["moth/broken.jpg"]


def test_ltd_data_inspect_prints_the_counts_and_writes_the_curve(tmp_path):
    from service.cli import app

    root = tmp_path / "data"
    for cls, n, size in (("head", 105, (8, 6)), ("mid", 30, (10, 12)), ("tail", 4, (16, 16))):
        for i in range(n):
            _image(root / "train" / cls / f"{i}.png", size=size)
        _image(root / "val" / cls / "0.png")
    (root / "train" / "tail" / "empty.jpg").write_bytes(b"")
    png = tmp_path / "out" / "curve.png"
    result = CliRunner().invoke(app, ["data", "inspect", str(root), "--out", str(png)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "classes: 3\n" in out and "images: 139 usable of 140 files, 1 skipped" in out
    assert "many/medium/few classes: 1/1/1" in out
    assert "image width:  min 8 / p5 8 / median 8 / p95 10 / max 16" in out
    assert "most common sizes: 8x6 (105), 10x12 (30), 16x16 (4)" in out
    assert "train/tail/empty.jpg: empty file (0 bytes)" in out and "val split: 3 images in 3 classes" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 300

    config = tmp_path / "own.yaml"  # a run config naming the folder reads the same
    config.write_text(f"data:\n  name: folder\n  root: {root}\n")
    result = CliRunner().invoke(app, ["data", "inspect", str(config), "--out", str(png), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["shot_groups"] == {"many": 1, "medium": 1, "few": 1} and summary["images"] == 139
    assert CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "nowhere")]).exit_code == 2


def test_evaluation_folders(tmp_path):
    """val/ alone is the test split; val/ and test/ together are the validation and the test split; an evaluation
    class the training split lacks, or a root without train/, is an error that says what layout is expected."""
    root = _folder(tmp_path / "a", {"x": 2, "y": 2}, val={"x": 1, "y": 2})
    data = load_dataset(_folder_cfg(root).data)
    assert data.val is None and data.test.paths == ("x/000.jpg", "y/000.jpg", "y/001.jpg")
    for cls in ("x", "y"):
        _image(root / "test" / cls / "t.png")
    data = load_dataset(_folder_cfg(root).data)
    assert data.test.paths == ("x/t.png", "y/t.png") and data.test.root == root / "test"
    assert data.val.paths == ("x/000.jpg", "y/000.jpg", "y/001.jpg") and data.val.root == root / "val"
    _image(root / "test" / "stranger" / "s.jpg")
    with pytest.raises(ValueError, match="stranger"):
        load_dataset(_folder_cfg(root).data)
    with pytest.raises(ValueError, match="ImageFolder layout"):
        load_dataset(_folder_cfg(tmp_path / "nothing").data)
