"""Every loader on tiny temporary data, clear errors on bad paths, and the shared real data when present."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from icon_lightning.data.datasets import (
    DigitsDataset,
    FeaturesFile,
    IdxDataset,
    ImageFolderDataset,
    TarImageFolder,
    TorchvisionDataset,
    read_idx,
)
from tests.conftest import SHARED_DATA

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder(tmp_path):
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.png").write_bytes(png_bytes(10 * c + i))
    data = ImageFolderDataset(str(tmp_path))
    assert len(data) == 6 and data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    image, label, index = data[4]
    assert label == 1 and index == 4 and np.asarray(image)[0, 0, 0] == 11
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ImageFolderDataset(str(tmp_path / "no_such_dir"))


def make_tar(path, names):
    with tarfile.open(path, "w") as tar:
        for n, name in enumerate(names):
            data = png_bytes(n)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_image_folder(tmp_path):
    path = tmp_path / "images.tar"
    make_tar(path, ["test/b/0.png", "test/a/0.png", "test/a/1.png", "train/a/0.png"])
    data = TarImageFolder(str(path), split="test")
    assert len(data) == 3 and data.classes == ["a", "b"] and data.labels.tolist() == [0, 0, 1]
    image, label, index = data[2]
    assert (label, index) == (1, 2) and np.asarray(image)[0, 0, 0] == 0  # test/b/0.png was member 0
    import pickle

    assert len(pickle.loads(pickle.dumps(data))) == 3  # workers receive it without the open handle
    bad = tmp_path / "flat.tar"
    make_tar(bad, ["test/x.png"])
    with pytest.raises(ValueError, match="does not follow"):
        TarImageFolder(str(bad), split="test")
    with pytest.raises(ValueError, match="no images under"):
        TarImageFolder(str(path), split="val")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        TarImageFolder(str(tmp_path / "missing.tar"))


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_cache_key_follows_content_not_place_or_time(tmp_path, monkeypatch):
    import icon_lightning.data.datasets as datasets

    path = tmp_path / "images.tar"
    make_tar(path, ["test/b/0.png", "test/a/0.png"])
    key = TarImageFolder(str(path), split="test").cache_key
    os.utime(path, (1, 1))  # touched, as a re-provisioned data folder is
    (tmp_path / "copy").mkdir()
    shutil.copy(path, tmp_path / "copy" / "images.tar")
    assert TarImageFolder(str(path), split="test").cache_key == key
    assert TarImageFolder(str(tmp_path / "copy" / "images.tar"), split="test").cache_key == key
    make_tar(path, ["test/b/0.png", "test/a/1.png"])  # other content
    assert TarImageFolder(str(path), split="test").cache_key != key

    # Large files are hashed on three blocks: a change inside one of them is seen.
    monkeypatch.setattr(datasets, "STAMP_WHOLE", 1024)
    monkeypatch.setattr(datasets, "STAMP_BLOCK", 64)
    big = tmp_path / "big.bin"
    body = bytearray(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    big.write_bytes(body)
    before = datasets._stamp(big)
    body[2048] ^= 1  # the middle block
    big.write_bytes(body)
    assert datasets._stamp(big) != before


def test_idx_dataset(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, size=(5, 28, 28))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    data = IdxDataset(str(tmp_path))
    image, label, index = data[2]
    assert len(data) == 5 and label == 4 and index == 2 and np.array_equal(np.asarray(image), images[2])
    with pytest.raises(FileNotFoundError, match="train-images"):
        IdxDataset(str(tmp_path), prefix="train")
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_features_file(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, features=np.ones((4, 3), dtype=np.float16), labels=np.array([0, 1, 0, 1]), classes=["a", "b"])
    data = FeaturesFile(str(path))
    x, label, index = data[3]
    assert x.shape == (3,) and label == 1 and index == 3 and data.classes == ["a", "b"]
    np.savez(path, feats=np.ones((4, 3)))
    with pytest.raises(ValueError, match="missing array 'features'"):
        FeaturesFile(str(path))
    np.savez(path, features=np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        FeaturesFile(str(path))
    np.savez(path, features=np.ones((4, 3)), labels=np.zeros(5))
    with pytest.raises(ValueError, match="'labels' must be"):
        FeaturesFile(str(path))


def test_digits_and_torchvision_errors(tmp_path):
    digits = DigitsDataset()
    assert len(digits) == 1797 and digits[0][0].shape == (64,) and digits.num_classes == 10
    with pytest.raises(FileNotFoundError, match="torchvision's format"):
        TorchvisionDataset("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="name"):
        TorchvisionDataset("imagenet", str(tmp_path))


@needs_shared
def test_shared_mnist_and_cifar10_tar():
    mnist = IdxDataset(str(SHARED_DATA / "mnist"))
    assert len(mnist) == 10000 and np.bincount(mnist.labels).min() > 800
    cifar = TarImageFolder(str(SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"), split="test")
    assert len(cifar) == 10000 and cifar.num_classes == 10 and np.bincount(cifar.labels).tolist() == [1000] * 10
    assert cifar[0][0].size == (32, 32)


def test_unreadable_features_files_are_one_line_naming_the_file(tmp_path):
    """An empty, truncated or non-zip .npz used to end in a bare or misleading error (one spoke of pickles)."""
    path = tmp_path / "f.npz"
    np.savez(path, features=np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"f\.npz: 'features' must be a non-empty \(N, D\) array, got shape \(0, 8\)"):
        FeaturesFile(str(path))
    np.savez(path, features=np.ones((1000, 8), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-2000])  # truncated mid-array
    with pytest.raises(ValueError, match=r"f\.npz: not a readable \.npz \(truncated"):
        FeaturesFile(str(path))
    path.write_text("features,labels\n1,2\n")  # not a zip at all
    with pytest.raises(ValueError, match=r"f\.npz: not a readable \.npz .*not a zip archive"):
        FeaturesFile(str(path))
    np.save(tmp_path / "single.npy", np.ones((3, 2)))
    (tmp_path / "single.npy").rename(path)  # one bare array under an .npz name
    with pytest.raises(ValueError, match=r"f\.npz: not a readable \.npz"):
        FeaturesFile(str(path))


def test_a_truncated_image_names_its_member_or_is_skipped_and_counted(tmp_path):
    """One truncated JPEG in a tar used to abort the whole extraction without saying which member it was."""
    from PIL import Image

    path = tmp_path / "images.tar"
    good = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(good, format="JPEG")
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("a/0.jpg", good.getvalue()),
            ("a/1.jpg", good.getvalue()[:-40]),
            ("b/0.jpg", good.getvalue()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = TarImageFolder(str(path))
    assert len(data) == 3 and np.asarray(data.load(0)).shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"images\.tar: member 'a/1\.jpg': not a readable image .*corrupt='skip'"):
        data.load(1)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images \(a/1\.jpg\)"):
        skipping = TarImageFolder(str(path), corrupt="skip")
    assert len(skipping) == 2 and skipping.skipped == ["a/1.jpg"] and skipping.labels.tolist() == [0, 1]
    assert skipping.cache_key != data.cache_key
    folder = tmp_path / "folder"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        (folder / cls / "0.jpg").write_bytes(good.getvalue())
    (folder / "a" / "1.jpg").write_bytes(good.getvalue()[:-40])
    with pytest.raises(ValueError, match=r"1\.jpg: not a readable image"):
        ImageFolderDataset(str(folder)).load(1)
    with pytest.warns(UserWarning, match="skipped 1 unreadable images"):
        assert len(ImageFolderDataset(str(folder), corrupt="skip")) == 2
