"""Datasets whose items carry their dataset index: ``(x, label, index)``; label is -1 when unknown.

Each dataset also has ``cache_key`` (what identifies its content for the feature store), ``labels``
(an (N,) int64 array, -1 when unlabelled) and ``classes``. A missing or malformed path raises an error
that names the path and the expected layout.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from icon_lightning.io import IMAGE_SUFFIXES


def _require(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; expected {what}")
    return path


def decode_image(source, where: str) -> Image.Image:
    """Fully decode an image (a truncated JPEG fails here, not half-way into a batch) or raise one line naming
    ``where`` (a path, or a tar and its member)."""
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{where}: not a readable image ({err}); corrupt='skip' leaves unreadable images out and counts them"
        ) from None


def _readable(items: list, read: Callable, name: Callable[[object], str], where: str, corrupt: str) -> list:
    """``items`` whose image decodes. ``corrupt='fail'`` keeps all (the first unreadable one fails when read);
    ``'skip'`` decodes each once now, drops the unreadable ones and warns with their count and names."""
    if corrupt not in ("fail", "skip"):
        raise ValueError(f"corrupt: expected 'fail' or 'skip', got {corrupt!r}")
    if corrupt == "fail":
        return items
    kept, skipped = [], []
    for item in items:
        try:
            read(item)
            kept.append(item)
        except ValueError:
            skipped.append(item)
    if skipped:
        names = ", ".join(name(s) for s in skipped[:3])
        more = ", …" if len(skipped) > 3 else ""
        warnings.warn(f"{where}: skipped {len(skipped)} unreadable images ({names}{more})", stacklevel=3)
    return kept


STAMP_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones at their start, middle and end
STAMP_BLOCK = 1 << 20


def _stamp(path: Path) -> str:
    """Name, size and a content hash: changes when the file's content does, not when it is copied or touched
    (a re-provisioned data folder keeps its caches). Files over 64 MiB are hashed on three 1 MiB blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= STAMP_WHOLE:
            digest.update(f.read())
        else:
            for offset in (0, size // 2, size - STAMP_BLOCK):
                f.seek(offset)
                digest.update(f.read(STAMP_BLOCK))
    return f"{path.name}:{size}:{digest.hexdigest()[:16]}"


class IndexedDataset(Dataset):
    """Base class: subclasses fill ``labels`` and implement ``load(i)`` returning the raw sample."""

    transform: Callable | None = None
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):  # pragma: no cover
        raise NotImplementedError

    def __getitem__(self, i: int):
        x = self.load(int(i))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i]), int(i)

    @property
    def cache_key(self) -> str:  # pragma: no cover
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ImageFolderDataset(IndexedDataset):
    """torchvision's ``ImageFolder`` layout (the ImageNet train/val layout): ``root/<class>/<image>``.

    corrupt: ``fail`` (an unreadable image stops the run, naming its file) or ``skip`` (every image is decoded once
    here; unreadable ones are left out and counted in ``skipped``)."""

    def __init__(self, root: str, transform: Callable | None = None, corrupt: Literal["fail", "skip"] = "fail") -> None:
        from torchvision.datasets import ImageFolder

        root_path = _require(root, "an image folder root/<class>/<image>.jpg")
        try:
            self._folder = ImageFolder(str(root_path))
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(f"{root_path}: expected an image folder root/<class>/<image>.jpg ({err})") from err
        self.root = root_path
        self.transform = transform
        self.classes = list(self._folder.classes)
        samples = self._folder.samples
        kept = _readable(samples, lambda s: decode_image(s[0], s[0]), lambda s: s[0], str(root_path), corrupt)
        kept_paths = {path for path, _ in kept}
        self.skipped = [path for path, _ in samples if path not in kept_paths]
        self._folder.samples = kept
        self.labels = np.asarray([label for _, label in kept], dtype=np.int64)

    def load(self, i: int):
        return decode_image(self._folder.samples[i][0], self._folder.samples[i][0])

    @property
    def cache_key(self) -> str:
        return f"imagefolder:{self.root.resolve()}:{len(self)}"


class TarImageFolder(IndexedDataset):
    """An image folder packed in a ``.tar``: members ``[split/]<class>/<image>`` (e.g. the CIFAR-10 JPEG tars).

    The member list is read once; each worker process opens its own handle on first use. ``corrupt``: ``fail``
    (an unreadable image stops the run, naming its member) or ``skip`` (every image is decoded once here;
    unreadable members are left out and counted in ``skipped``).
    """

    def __init__(
        self,
        path: str,
        split: str | None = None,
        transform: Callable | None = None,
        corrupt: Literal["fail", "skip"] = "fail",
    ) -> None:
        self.path = _require(path, "a .tar of [split/]<class>/<image> files")
        layout = f"members [{split + '/' if split else ''}]<class>/<image>"
        if not tarfile.is_tarfile(self.path):
            raise ValueError(f"{self.path}: not a tar archive; expected {layout}")
        with tarfile.open(self.path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)]
        prefix = "" if split is None else split.strip("/") + "/"
        entries = []
        for m in members:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            if len(parts) != 2:
                raise ValueError(f"{self.path}: member {m.name!r} does not follow {layout}")
            entries.append((parts[0], name, m))
        if not entries:
            raise ValueError(f"{self.path}: no images under {prefix or 'the top level'}; expected {layout}")
        entries.sort(key=lambda e: e[1])
        self.classes = sorted({c for c, _, _ in entries})
        self._tar: tarfile.TarFile | None = None
        self._pid: int | None = None
        kept = _readable(entries, lambda e: self._decode(e[2]), lambda e: e[1], str(self.path), corrupt)
        self.skipped = sorted({name for _, name, _ in entries} - {name for _, name, _ in kept})
        to_label = {c: i for i, c in enumerate(self.classes)}
        self.labels = np.asarray([to_label[c] for c, _, _ in kept], dtype=np.int64)
        self._members = [m for _, _, m in kept]
        self.split = split
        self.transform = transform

    def _decode(self, member: tarfile.TarInfo):
        if self._tar is None or self._pid != os.getpid():
            self._tar = tarfile.open(self.path)
            self._pid = os.getpid()
        data = self._tar.extractfile(member).read()
        return decode_image(io.BytesIO(data), f"{self.path}: member {member.name!r}")

    def load(self, i: int):
        return self._decode(self._members[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tar"] = None
        return state

    @property
    def cache_key(self) -> str:
        return f"tar:{_stamp(self.path)}:{self.split}:{len(self)}"


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST format), gzipped or not, as a numpy array."""
    path = _require(path, "an idx file (e.g. t10k-images-idx3-ubyte[.gz])")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} bytes")
    return body.reshape(shape)


class IdxDataset(IndexedDataset):
    """MNIST / Fashion-MNIST from local idx files: ``root/<prefix>-images-idx3-ubyte[.gz]`` and labels.

    prefix: ``t10k`` (test) or ``train``. Images come out as grayscale PIL images (transform to tensors).
    Fashion-MNIST from Debian's dataset-fashion-mnist lives in /usr/share/datasets/fashion-mnist/.
    """

    def __init__(
        self, root: str, prefix: str = "t10k", transform: Callable | None = None, classes: list[str] | None = None
    ) -> None:
        self.root = _require(root, f"a folder with {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]")

        def find(kind: str, dims: int) -> Path:
            for name in (f"{prefix}-{kind}-idx{dims}-ubyte.gz", f"{prefix}-{kind}-idx{dims}-ubyte"):
                if (self.root / name).is_file():
                    return self.root / name
            raise FileNotFoundError(f"{self.root}: no {prefix}-{kind}-idx{dims}-ubyte[.gz]")

        self._image_path, self._label_path = find("images", 3), find("labels", 1)
        self.images = read_idx(self._image_path)
        self.labels = read_idx(self._label_path).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.root}: {len(self.images)} images but {len(self.labels)} labels")
        self.classes = classes or [str(c) for c in range(int(self.labels.max()) + 1)]
        self.prefix = prefix
        self.transform = transform

    def load(self, i: int):
        return Image.fromarray(self.images[i], mode="L")

    @property
    def cache_key(self) -> str:
        return f"idx:{_stamp(self._image_path)}:{_stamp(self._label_path)}"


class TorchvisionDataset(IndexedDataset):
    """CIFAR-10, CIFAR-100 and STL-10 in torchvision's own on-disk format (``download`` is off by default)."""

    NAMES = ("cifar10", "cifar100", "stl10")

    def __init__(
        self, name: str, root: str, split: str = "train", transform: Callable | None = None, download: bool = False
    ) -> None:
        from torchvision import datasets

        if name not in self.NAMES:
            raise ValueError(f"name: expected one of {self.NAMES}, got {name!r}")
        root_path = Path(root).expanduser()
        try:
            if name == "stl10":
                self._data = datasets.STL10(str(root_path), split=split, download=download)
                labels = self._data.labels
            else:
                cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
                if split not in ("train", "test"):
                    raise ValueError(f"split: expected 'train' or 'test' for {name}, got {split!r}")
                self._data = cls(str(root_path), train=split == "train", download=download)
                labels = self._data.targets
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{root_path}: no {name} in torchvision's format ({err}); pass download=True online"
            ) from err
        self.name, self.root, self.split = name, root_path, split
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(getattr(self._data, "classes", [str(c) for c in range(int(self.labels.max()) + 1)]))
        self.transform = transform

    def load(self, i: int):
        return self._data[i][0]

    @property
    def cache_key(self) -> str:
        return f"torchvision:{self.name}:{self.root.resolve()}:{self.split}:{len(self)}"


class DigitsDataset(IndexedDataset):
    """scikit-learn's bundled digits (1797 × 64 raw pixels, 10 classes) as float vectors; no download."""

    def __init__(self, transform: Callable | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.data = torch.from_numpy(digits.data.astype(np.float32))
        self.labels = digits.target.astype(np.int64)
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def load(self, i: int):
        return self.data[i]

    @property
    def cache_key(self) -> str:
        return "sklearn:digits"


class DigitsImages(DigitsDataset):
    """The same digits as 8 × 8 grayscale images (pixel values 0–16 scaled to 0–255), for a frozen backbone:
    ``--data.backbone … --data.grayscale_to_rgb true``. ``make demo`` runs EfficientNet-Lite0 on them."""

    def load(self, i: int):
        pixels = (self.data[i].reshape(8, 8).numpy() * (255 / 16)).round().astype(np.uint8)
        return Image.fromarray(pixels, mode="L")

    @property
    def cache_key(self) -> str:
        return "sklearn:digits:images"


def integer_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Class ids as int64 (-1: unlabelled, left out of scoring); floats only when every value is a whole number."""
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)))][:3].tolist()
        raise ValueError(f"{where} must be whole-number class ids (-1: unlabelled), got values such as {bad}")
    raise ValueError(f"{where} must be integer class ids (-1: unlabelled), got dtype {labels.dtype}")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_feature_values(features: np.ndarray, where: str) -> None:
    """Finite values within float32's range (features are trained in float32: 1e39 in a float64 file would become
    inf), each problem one line naming ``where``."""
    if not np.isfinite(features).all():
        raise ValueError(f"{where} contains NaN or inf; expected finite numbers")
    largest = float(np.abs(features).max(initial=0.0))
    if largest > FLOAT32_MAX:
        raise ValueError(
            f"{where} holds values beyond float32's range (largest |x| = {largest:.3g} > {FLOAT32_MAX:.3g}); "
            "rescale them (clustering here is scale-free: features are centred and L2-normalised)"
        )


def check_class_names(classes: list[str], labels: np.ndarray, where: str) -> None:
    """A ``classes`` array names every class id the labels use."""
    if classes and labels.max(initial=-1) >= len(classes):
        raise ValueError(
            f"{where}: 'classes' names {len(classes)} classes but 'labels' go up to {int(labels.max())}; expected "
            "a name for every class id (or no 'classes' array)"
        )


class FeaturesFile(IndexedDataset):
    """Precomputed features: an ``.npz`` with ``features`` (N, D) and optional ``labels`` (N,) and ``classes``."""

    def __init__(self, path: str) -> None:
        self.path = _require(path, "an .npz with 'features' (N, D) and optional 'labels' (N,), 'classes'")
        reading = "the file"
        try:
            npz = np.load(self.path, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single array, not named arrays")
            with npz:
                if "features" not in npz:
                    raise KeyError(f"missing array 'features'; found {list(npz.keys())}")
                reading = "'features'"  # named before each read: an object array fails on it
                features = npz["features"]
                reading = "'labels'"
                labels = npz["labels"] if "labels" in npz else np.full(len(features), -1)
                reading = "'classes'"
                classes = [str(c) for c in npz["classes"]] if "classes" in npz else []
        except KeyError as err:
            raise ValueError(f"{self.path}: {err.args[0]}") from None
        except ValueError as err:
            if "Object arrays cannot be loaded" not in str(err):
                raise self._unreadable(err) from None
            raise ValueError(
                f"{self.path}: {reading} is an object array (ragged rows or Python objects), which is not loaded "
                "(it would need pickle); expected a numeric array"
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise self._unreadable(err) from None
        if features.dtype.kind not in "biuf":
            raise ValueError(f"{self.path}: 'features' must be numeric, got dtype {features.dtype}")
        if features.ndim != 2 or 0 in features.shape:
            raise ValueError(f"{self.path}: 'features' must be a non-empty (N, D) array, got shape {features.shape}")
        if labels.shape != (len(features),):
            raise ValueError(f"{self.path}: 'labels' must be ({len(features)},), got shape {labels.shape}")
        labels = integer_labels(labels, f"{self.path}: 'labels'")
        check_feature_values(features, f"{self.path}: 'features'")
        check_class_names(classes, labels, str(self.path))
        self.features = torch.from_numpy(features.astype(np.float32))
        self.labels = labels.astype(np.int64)
        self.classes = classes or ([str(c) for c in range(int(labels.max()) + 1)] if labels.max() >= 0 else [])
        self.transform = None

    def _unreadable(self, err: Exception) -> ValueError:
        """One line for a file np.load cannot read as an .npz."""
        reason = "not a zip archive" if "pickle" in str(err) else f"{type(err).__name__}: {err}"
        return ValueError(
            f"{self.path}: not a readable .npz (truncated or not an np.savez file: {reason}); expected "
            "'features' (N, D) and optional 'labels' (N,), 'classes'"
        )

    def load(self, i: int):
        return self.features[i]

    @property
    def cache_key(self) -> str:
        return f"npz:{_stamp(self.path)}"


class FeaturesArray(IndexedDataset):
    """In-memory features (N, D) with optional labels (N,): the scikit-learn-style baselines' input."""

    def __init__(self, features, labels=None) -> None:
        features = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"features: expected a non-empty (N, D) array, got shape {features.shape}")
        check_feature_values(features, "features")
        labels = (
            np.full(len(features), -1, dtype=np.int64)
            if labels is None
            else integer_labels(np.asarray(labels), "labels")
        )
        if labels.shape != (len(features),):
            raise ValueError(f"labels: expected shape ({len(features)},), got {labels.shape}")
        self.features = torch.from_numpy(features)
        self.labels = labels
        self.classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.max() >= 0 else []
        self.transform = None
        self._digest = hashlib.sha1(features.tobytes()).hexdigest()[:20]

    def load(self, i: int):
        return self.features[i]

    @property
    def cache_key(self) -> str:
        return f"array:{self._digest}:{self.features.shape[0]}x{self.features.shape[1]}"
