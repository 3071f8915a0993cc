"""`make demo` end to end on scikit-learn's digits (frozen Lite0 features, then raw pixels), shortened;
the CIFAR-10 layouts of `make demo-cifar10`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from jsonargparse import ArgumentParser
from PIL import Image

from icon_lightning import demo
from icon_lightning.data import DigitsDataset, DigitsImages, ImageFolderDataset, TarImageFolder
from icon_lightning.data.datasets import IndexedDataset


def test_demo_runs_the_frozen_backbone_pipeline_then_raw_pixels(capsys, tmp_path):
    args = ["--max-steps", "60", "--heads", "2", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    results = demo.main([*args, "--image-size", "64"])
    out = capsys.readouterr().out
    first, second = out.index("== block 1 of 2: digits, frozen EfficientNet-Lite0"), out.index("== block 2 of 2")
    assert first < second and "the 64 raw pixels, no backbone" in out[second:]
    features, pixels = results["features"], results["pixels"]
    config = yaml.safe_load((Path(features["run_dir"]) / "config.yaml").read_text())["data"]
    assert config["backbone"]["class_path"].endswith("EfficientNetLite0") and config["image_size"] == 64
    assert config["dataset"]["class_path"].endswith("DigitsImages")
    for block in (features, pixels):
        icon, kmeans = block["icon"], block["kmeans"]
        assert icon["hungarian_acc"] > 0.5 and kmeans["hungarian_acc"] > 0.5 < block["spectral"]["hungarian_acc"]
        assert block["steps"] == 60 and not block["converged"]  # the cap ended it, and the demo says so
        record = json.loads((Path(block["run_dir"]) / "metrics.json").read_text())  # the `icon fit` record
        assert record["steps"] == 60 and record["metrics"]["val/nmi"] == pytest.approx(icon["nmi"])
    names = {Path(p).name for p in features["plots"]}  # the first block's plots; the second has none
    assert {"confusion_epoch59.png", "cluster_sizes_epoch59.png", "embedding_epoch59.png"} <= names
    assert all(Path(p).resolve().is_relative_to(tmp_path.resolve()) for p in features["plots"])  # not the cwd
    assert pixels["plots"] == []
    assert pixels["kmeans"]["hungarian_acc"] > 0.7 and pixels["spectral"]["hungarian_acc"] > 0.7  # sklearn's usual
    for text in ("I-Con (icon_clustering)", "k-means", "spectral", "selected head", "plots: ", "NOT CONVERGED"):
        assert text in out

    cached = sorted((tmp_path / "c").rglob("*"))
    again = demo.main([*args, "--image-size", "64", "--pipeline", "features"])  # the second run reads the cache
    assert sorted((tmp_path / "c").rglob("*")) == cached  # nothing extracted or written again
    assert {m: again["features"][m] for m in ("icon", "kmeans", "spectral")} == {
        m: features[m] for m in ("icon", "kmeans", "spectral")
    }


def test_digits_images_are_the_digits_pixels_as_grayscale_images():
    from sklearn.datasets import load_digits

    images, digits = DigitsImages(), load_digits()
    image = images.load(5)
    assert image.mode == "L" and image.size == (8, 8) and len(images) == 1797
    expected = np.round(digits.images[5] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert images.labels.tolist() == digits.target.tolist() and images.cache_key != DigitsDataset().cache_key


def dataset(config: dict):
    """The ``data.dataset`` config as the CLI's parser instantiates it."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--dataset", type=IndexedDataset)
    return parser.instantiate(parser.parse_object({"dataset": config})).dataset


def _image_folder(root: Path) -> None:
    for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


def test_demo_cifar10_finds_each_layout(tmp_path):
    _image_folder(tmp_path / "flat")
    assert isinstance(dataset(demo.cifar10_test_split(str(tmp_path / "flat"))), ImageFolderDataset)
    _image_folder(tmp_path / "split" / "test")
    found = dataset(demo.cifar10_test_split(str(tmp_path / "split")))
    assert isinstance(found, ImageFolderDataset) and len(found) == 4
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        tar.add(tmp_path / "split" / "test", arcname="test")
    assert isinstance(dataset(demo.cifar10_test_split(str(tmp_path / "c.tar"))), TarImageFolder)
    with pytest.raises(FileNotFoundError, match="--cifar10"):
        demo.cifar10_test_split(str(tmp_path / "missing"))
