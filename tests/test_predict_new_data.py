"""New data labelled as the fit labels it (issue 31): the fit's preparation (its centring mean, ``normalize``, D, K)
travels with its checkpoint, so `icon predict` (and validate/test) on any subset of the training rows, alone in a
file of its own (one class, three rows with K = 10, a single row), gives exactly the fit's labels for those rows;
a checkpoint that does not match the data is one line naming both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits

from icon_lightning.cli import cli_main, features_command
from icon_lightning.data import ClusteringDataModule, FeaturesFile
from icon_lightning.data.prepared import FitPreparation, saved_preparation

N = 600  # digits rows fitted: a few seconds on one CPU core


def quiet(root: Path) -> list[str]:
    return [
        f"--data.cache_dir={root / 'cache'}",
        f"--trainer.default_root_dir={root / 'runs'}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
    ]


def save(path: Path, features: np.ndarray, labels: np.ndarray | None = None) -> Path:
    arrays = {"features": features} if labels is None else {"features": features, "labels": labels}
    np.savez(path, **arrays)
    return path


def evaluate(subcommand: str, path: Path, ckpt: Path, root: Path, *extra: str, recipe: str = "icon_clustering"):
    argv = [subcommand, *features_command(path, recipe)[1:], *quiet(root), f"--ckpt_path={ckpt}", *extra]
    return cli_main(argv)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A fit of README's first command on N digits (shifted off the origin, so that a subset's own mean is far from
    the fit's), its checkpoint, and its labels of every row (``predictions.npy`` of predicting the whole file)."""
    root = tmp_path_factory.mktemp("fit")
    x, y = load_digits(return_X_y=True)
    x = (x[:N] + 3.0).astype(np.float32)
    y = y[:N].astype(np.int64)
    train = save(root / "train.npz", x, y)
    fit = cli_main([*features_command(train), *quiet(root), "--seed_everything=0", "--trainer.max_steps=40"])
    ckpt = Path(fit.run_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    whole = evaluate("predict", train, ckpt, root)
    labels = np.load(Path(whole.run_dir) / "predictions.npy")
    own = fit.model.cpu().eval().assign(fit.datamodule.train_features.float()).numpy()
    np.testing.assert_array_equal(labels, own)  # predicting the training file is the fit's own assignment
    return {"root": root, "x": x, "y": y, "ckpt": ckpt, "labels": labels, "mean": x.mean(0, keepdims=True)}


def test_the_checkpoint_keeps_the_fits_preparation(fitted):
    """The DataModule's state in the checkpoint is the fit's mean (float64 reference), normalize, D and K."""
    saved = saved_preparation(fitted["ckpt"])
    assert isinstance(saved, FitPreparation)
    np.testing.assert_allclose(saved.mean, fitted["x"].astype(np.float64).mean(0, keepdims=True), rtol=1e-5)
    assert (saved.normalize, saved.feature_dim, saved.num_clusters) == (True, 64, 10)
    assert saved.data.endswith("train.npz")


def one_per_cluster(labels: np.ndarray, count: int) -> np.ndarray:
    """The first row of each of the first ``count`` clusters of the fit: rows the fit labels differently (a row
    centred by its own mean is zero, so rows of different clusters cannot all keep their labels that way)."""
    return np.array([np.flatnonzero(labels == c)[0] for c in np.unique(labels)[:count]])


@pytest.mark.parametrize(
    "name, labelled",
    [
        ("one class", True),  # the tester's case: 9.5 % agreement when centred by its own mean
        ("three rows, K = 10", True),  # fewer rows than K: refused before
        ("a single row", False),  # one unlabelled row, alone: no k-NN table, no mean of its own
        ("mixed new rows", False),
    ],
)
def test_predicting_a_subset_alone_gives_the_fits_labels(fitted, tmp_path, name, labelled):
    x, y, reference = fitted["x"], fitted["y"], fitted["labels"]
    subsets = {
        "one class": [np.flatnonzero(y == 3)],
        "three rows, K = 10": [one_per_cluster(reference, 3)],
        "a single row": [[row] for row in one_per_cluster(reference, 2)],  # each predicted alone
        "mixed new rows": [np.random.default_rng(0).choice(N, 400, replace=False)],
    }[name]
    for i, rows in enumerate(subsets):
        rows = np.asarray(rows)
        subset = save(tmp_path / f"subset{i}.npz", x[rows], y[rows] if labelled else None)
        run = evaluate("predict", subset, fitted["ckpt"], tmp_path)
        predicted = np.load(Path(run.run_dir) / "predictions.npy")
        assert predicted.shape == (len(rows),)
        np.testing.assert_array_equal(predicted, reference[rows], err_msg=f"{name}: rows {rows[:5]}")


@pytest.mark.parametrize("which", ["three rows", "one class"])
def test_validate_on_a_subset_scores_the_fits_labels(fitted, tmp_path, which):
    """Validation of a subset alone (3 rows under a K = 10 checkpoint; one class's rows): its Hungarian accuracy is
    that of the fit's labels of those rows against their classes (scipy's assignment on the 10 × 10 counts)."""
    rows = one_per_cluster(fitted["labels"], 3) if which == "three rows" else np.flatnonzero(fitted["y"] == 3)
    subset = save(tmp_path / "subset.npz", fitted["x"][rows], fitted["y"][rows])
    run = evaluate("validate", subset, fitted["ckpt"], tmp_path)
    counts = np.zeros((10, 10))
    np.add.at(counts, (fitted["labels"][rows], fitted["y"][rows]), 1)
    r, c = linear_sum_assignment(counts, maximize=True)
    assert run.record["metrics"]["val/hungarian_acc/best"] == pytest.approx(counts[r, c].sum() / len(rows))


def test_validate_on_new_data_draws_its_plots_without_a_train_batch(fitted, tmp_path):
    """Evaluation items have no k-NN table and no anchors: strict plots draw the embedding and confusion of the
    new rows and leave out the p/q neighbourhoods of a training batch (none exists) instead of failing."""
    rows = one_per_cluster(fitted["labels"], 3)
    subset = save(tmp_path / "subset.npz", fitted["x"][rows], fitted["y"][rows])
    plots = ["--trainer.callbacks+=icon_lightning.callbacks.ClusteringPlots", "--trainer.callbacks.strict=true"]
    run = evaluate("validate", subset, fitted["ckpt"], tmp_path, *plots)
    drawn = sorted(p.name.split("_epoch")[0] for p in (Path(run.run_dir) / "plots").glob("*.png"))
    assert drawn == ["cluster_sizes", "confusion", "embedding"]


def test_a_checkpoint_of_other_features_is_one_line_naming_both(fitted, tmp_path):
    other = save(tmp_path / "narrow.npz", np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32))
    with pytest.raises(ValueError) as err:
        evaluate("predict", other, fitted["ckpt"], tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(fitted["ckpt"]) in message and str(other) in message
    assert "64 features" in message and "32 features" in message


def test_a_checkpoint_of_another_k_is_one_line_naming_both(fitted, tmp_path):
    subset = save(tmp_path / "subset.npz", fitted["x"][:50], fitted["y"][:50])
    with pytest.raises(ValueError) as err:
        evaluate("predict", subset, fitted["ckpt"], tmp_path, "--data.num_clusters=5")
    message = str(err.value)
    assert "\n" not in message and str(fitted["ckpt"]) in message and str(subset) in message
    assert "K = 10" in message and "num_clusters is 5" in message


def test_a_checkpoint_of_another_recipe_is_one_line_naming_both(fitted, tmp_path):
    """It used to run the checkpoint's objective in a run folder named for the --config's recipe."""
    subset = save(tmp_path / "subset.npz", fitted["x"][:50])
    with pytest.raises(ValueError) as err:
        evaluate("predict", subset, fitted["ckpt"], tmp_path, recipe="kmeans")
    message = str(err.value)
    assert "\n" not in message and str(fitted["ckpt"]) in message and "kmeans.yaml" in message
    assert "loss.p: icon_lightning.supervisory.Debiased in the checkpoint" in message


def test_a_checkpoint_without_the_preparation_says_so(fitted, tmp_path):
    """A checkpoint saved before the preparation travelled with it: the data are centred by their own mean, and
    predict says so instead of silently labelling them otherwise than the fit."""
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=False)
    del checkpoint["ClusteringDataModule"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.warns(UserWarning, match=r"old\.ckpt holds no fit preparation .*train\.npz is centred by its own mean"):
        evaluate("predict", fitted["root"] / "train.npz", old, tmp_path)


def test_the_datamodule_prepares_other_rows_with_a_loaded_preparation(tmp_path):
    """Without a Trainer: a DataModule given a checkpoint's state prepares a single row by the fit's mean (the
    float64 formula), where its own mean would make the row zero."""
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(1, 6)).astype(np.float32)
    row = rng.normal(size=(1, 6)).astype(np.float32)
    fit = FitPreparation(mean, True, 6, 4, "train.npz")
    loaded = torch.load(_saved(tmp_path, fit.state_dict()), weights_only=True)  # as Lightning reads a checkpoint
    data = ClusteringDataModule(FeaturesFile(save(tmp_path / "one.npz", row)), views="clean", num_clusters=4,
                                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data.setup("predict")
    data.load_state_dict(loaded)
    expected = (row - mean).astype(np.float64)
    expected /= np.linalg.norm(expected)
    batch = next(iter(data.predict_dataloader()))
    np.testing.assert_allclose(batch.inputs.numpy(), expected, rtol=1e-5)


def _saved(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_the_estimator_labels_any_subset_as_its_fit_did(tmp_path):
    """`HeadClusterer.predict` and `icon predict` apply one preparation (the fit's ``FitPreparation``): a single row,
    and one class's rows alone, get the fit's labels."""
    from sklearn.datasets import load_digits

    from icon_lightning.estimator import HeadClusterer

    x, y = load_digits(return_X_y=True)
    x, y = x[:600], y[:600]
    est = HeadClusterer(cache_dir=str(tmp_path), overrides=["--trainer.max_steps=20", "--model.num_heads=2"])
    est.fit(x)
    assert est.preparation_.feature_dim == 64 and est.preparation_.num_clusters == 10
    assert np.array_equal(est.predict(x), est.labels_)
    for i in (0, 17, 599):
        assert est.predict(x[i : i + 1]).tolist() == [est.labels_[i]]
    seven = y == 7
    assert np.array_equal(est.predict(x[seven]), est.labels_[seven])
