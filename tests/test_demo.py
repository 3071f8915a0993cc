"""`make demo` end to end on scikit-learn's digits, shortened; the CIFAR-10 layouts of `make demo-cifar10`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from jsonargparse import ArgumentParser
from PIL import Image

from icon_lightning import demo
from icon_lightning.data import ImageFolderDataset, TarImageFolder
from icon_lightning.data.datasets import IndexedDataset


def test_demo_fits_validates_and_tabulates_beside_kmeans_and_spectral(capsys, tmp_path):
    results = demo.main(
        ["--max-steps", "60", "--heads", "2", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path)]
    )
    icon, kmeans, spectral = results["icon"], results["kmeans"], results["spectral"]
    assert icon["hungarian_acc"] > 0.6 and icon["nmi"] > 0.6  # chance is 0.1 / 0.0
    assert icon["hungarian_acc"] > kmeans["hungarian_acc"] - 0.1
    assert kmeans["hungarian_acc"] > 0.7 and spectral["hungarian_acc"] > 0.7  # scikit-learn's usual figures
    names = {Path(p).name for p in results["plots"]}
    assert {"confusion_epoch59.png", "cluster_sizes_epoch59.png", "embedding_epoch59.png"} <= names
    record = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())  # the `icon fit` record
    assert record["steps"] == 60 and record["metrics"]["val/nmi"] == pytest.approx(icon["nmi"])
    assert all(Path(p).stat().st_size > 0 for p in results["plots"])
    assert all(Path(p).resolve().is_relative_to(tmp_path.resolve()) for p in results["plots"])  # not the cwd
    out = capsys.readouterr().out
    assert results["steps"] == 60 and not results["converged"]  # the cap ended it, and the demo says so
    for text in ("I-Con (icon_clustering)", "k-means", "spectral", "selected head", "plots: ", "NOT CONVERGED"):
        assert text in out


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
