"""Readers on real files in each format: CIFAR pickles, IDX, the JPEG npz, list files; ids and fingerprints."""

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.longtail import lt_class_sizes
from trainer.datasets import CIFAR10_NPZ_CANDIDATES, fingerprint, load_dataset, read_cifar, read_list_file


def write_cifar100(root: Path, per_class_train=6, per_class_test=2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, n in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), n).tolist()
        data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return data


def write_cifar10(root: Path):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.tile(np.arange(10), 4).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.randint(0, 256, (40, 3072), dtype=np.uint8), b"labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"n{i}".encode() for i in range(10)]}, f)


def test_cifar100_layout_reads_and_splits(tmp_path):
    last_test_rows = write_cifar100(tmp_path)
    x_train, y_train, x_test, y_test, names = read_cifar(tmp_path, 100)
    assert x_train.shape == (600, 3, 32, 32) and len(names) == 100 and names[7] == "c7"
    np.testing.assert_array_equal(x_test.reshape(len(x_test), -1), last_test_rows)
    data = load_dataset(DataConfig(name="cifar100", root=tmp_path, imbalance_factor=6))
    assert data.class_counts[0] == 6 and data.class_counts[-1] == 1 and data.num_classes == 100
    assert len(data.test) == 200


def test_cifar10_layout(tmp_path):
    write_cifar10(tmp_path)
    data = load_dataset(DataConfig(name="cifar10", root=tmp_path, imbalance_factor=1))
    assert len(data.train) == 200 and data.train.images.dtype == torch.uint8 and data.in_channels == 3


def test_missing_root_is_a_clear_error():
    with pytest.raises(ValueError, match="data.root"):
        load_dataset(DataConfig(name="cifar100"))


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.RandomState(0)
    written = {}
    for prefix, n in (("train", 100), ("t10k", 20)):
        images = written[prefix] = rng.randint(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.repeat(np.arange(10), n // 10).astype(np.uint8)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + labels.tobytes())
    data = load_dataset(DataConfig(name="fashion_mnist", root=tmp_path, imbalance_factor=10))
    assert data.class_counts.tolist() == lt_class_sizes(10, 10, 10)
    assert data.train.images.shape[1:] == (1, 28, 28)
    for image_id in (0, 5, len(data.train) - 1):  # image_id -> the original file row it came from
        original = written["train"][data.source_indices[image_id]]
        assert torch.equal(data.train.images[image_id, 0], torch.from_numpy(original))


def test_image_ids_and_fingerprint_are_stable_and_content_sensitive():
    cfg = DataConfig(name="synthetic", imbalance_factor=10, max_per_class=50)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train.labels, b.train.labels)
    assert load_dataset(cfg.model_copy(update={"lt_seed": 1})).fingerprint != a.fingerprint
    images = a.train.images.numpy().copy()
    images[0, 0, 0, 0] ^= 1
    assert fingerprint(images, a.train.labels.numpy()) != a.fingerprint


def test_val_split_is_balanced_and_outside_train():
    data = load_dataset(DataConfig(name="synthetic", imbalance_factor=10, max_per_class=50, val_per_class=5))
    assert np.bincount(data.val.labels.numpy()).tolist() == [5] * 10


def test_list_files(tmp_path):
    rng = np.random.RandomState(0)
    lines = []
    for i in range(6):
        path = tmp_path / "img" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        lines.append(f"img/{i}.jpg {i % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[:2]) + "\n")
    data = load_dataset(DataConfig(name="list", root=tmp_path, train_list=tmp_path / "train.txt",
                                   test_list=tmp_path / "test.txt"))
    assert data.class_counts.tolist() == [3, 3] and not data.in_memory
    (tmp_path / "bad.txt").write_text("../etc/passwd 1\n")
    with pytest.raises(ValueError, match="inside the image root"):
        read_list_file(tmp_path / "bad.txt")
    (tmp_path / "bad2.txt").write_text("img/0.jpg cat\n")
    with pytest.raises(ValueError, match="bad2.txt:1"):
        read_list_file(tmp_path / "bad2.txt")


def test_jpeg_npz_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("LTD_CACHE", str(tmp_path / "cache"))
    rng = np.random.RandomState(0)

    def pack(n):
        blobs, labels = [], np.repeat(np.arange(10), n // 10).astype(np.int16)
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
        return np.concatenate(blobs), offsets, labels

    train, train_off, y_train = pack(50)
    test, test_off, y_test = pack(20)
    path = tmp_path / "c10.npz"
    np.savez(path, train_jpeg=train, train_offsets=train_off, y_train=y_train, test_jpeg=test,
             test_offsets=test_off, y_test=y_test, class_names=np.array([f"k{i}" for i in range(10)]))
    data = load_dataset(DataConfig(name="cifar10_npz", root=path, imbalance_factor=1))
    first = np.asarray(Image.open(io.BytesIO(train[train_off[0]:train_off[1]].tobytes())).convert("RGB"))
    position = int(np.where(data.source_indices == 0)[0][0])
    np.testing.assert_array_equal(data.train.images[position].permute(1, 2, 0).numpy(), first)
    assert data.class_names[3] == "k3"
    cached = load_dataset(DataConfig(name="cifar10_npz", root=path, imbalance_factor=1))  # from the decoded cache
    assert cached.fingerprint == data.fingerprint and cached.class_names == data.class_names
    assert all(type(name) is str for name in cached.class_names)  # np.str_ would not load with weights_only


@pytest.mark.skipif(not CIFAR10_NPZ_CANDIDATES[-1].exists(), reason="../shared/data not beside this checkout")
def test_real_cifar10_lt_totals():
    for factor, total in {100: 12406, 10: 20431}.items():
        data = load_dataset(DataConfig(name="cifar10_npz", imbalance_factor=factor))
        assert len(data.train) == total and len(data.test) == 10000
        assert data.class_names[0] == "airplane"


@pytest.mark.skipif(not CIFAR10_NPZ_CANDIDATES[-1].exists(), reason="../shared/data not beside this checkout")
def test_real_cifar10_lt_validation_split(caplog):
    """configs/cifar10_lt/tau_norm.yaml's split: class 0 has no image outside CIFAR-10-LT, so it lends 20 of its own."""
    data = load_dataset(DataConfig(name="cifar10_npz", imbalance_factor=100, val_per_class=20))
    assert data.class_counts.tolist() == [5000 - 20, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert np.bincount(data.val.labels.numpy()).tolist() == [20] * 10
    assert "classes [0] had too few images outside the LT split" in caplog.text
    train_keys = {row.tobytes() for row in data.train.images.numpy()}
    assert not any(row.tobytes() in train_keys for row in data.val.images.numpy())


@pytest.mark.parametrize("name", ["synthetic", "embedded"])
def test_jpeg_round_trip_keeps_the_split_and_degrades_the_pixels_as_a_lossy_copy(name):
    """data.jpeg_quality: the same images and ids, each decoded from JPEG as PIL writes it, a new fingerprint."""
    from trainer.datasets import jpeg_round_trip

    cfg = DataConfig(name=name, imbalance_factor=10, max_per_class=50, test_per_class=20)
    plain, lossy = load_dataset(cfg), load_dataset(cfg.model_copy(update={"jpeg_quality": 75}))
    assert torch.equal(plain.train.labels, lossy.train.labels)
    np.testing.assert_array_equal(plain.source_indices, lossy.source_indices)
    assert lossy.fingerprint != plain.fingerprint
    for split in ("train", "test"):
        a, b = getattr(plain, split).images, getattr(lossy, split).images
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
        err = (a.float() - b.float()).abs().mean().item()
        assert 0.1 < err < 40  # changed (noisy synthetic images lose most), yet recognisably the same images
    image = plain.train.images[:1].numpy()
    mode = "L" if image.shape[1] == 1 else "RGB"
    blob = io.BytesIO()
    Image.fromarray(image[0, 0] if mode == "L" else image[0].transpose(1, 2, 0), mode).save(blob, "JPEG", quality=75)
    by_hand = np.asarray(Image.open(blob).convert(mode))
    np.testing.assert_array_equal(lossy.train.images[0].numpy(), by_hand[None] if mode == "L" else
                                  by_hand.transpose(2, 0, 1))
    np.testing.assert_array_equal(jpeg_round_trip(image, 100).shape, image.shape)
