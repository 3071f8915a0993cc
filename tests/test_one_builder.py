"""One way to build a run: on the same features file and seed, ``icon fit``, ``HeadClusterer`` and the
benchmark harness's I-Con row are one computation (the same predictions, bit for bit)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

import benchmarks.clustering as bc
import benchmarks.common as common
from icon_lightning.cli import assemble, cli_main, features_command
from icon_lightning.estimator import HeadClusterer

STEPS = ["--convergence.max_steps=60"]  # the same short cap everywhere: the comparison, not convergence, is tested


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    digits = load_digits()
    path = tmp_path_factory.mktemp("features") / "digits_600.npz"
    np.savez(path, features=digits.data[:600].astype(np.float32), labels=digits.target[:600])
    return path


def test_icon_fit_the_estimator_and_the_benchmark_give_the_same_predictions(digits_file, tmp_path, monkeypatch):
    user = [
        *features_command(digits_file),
        "--seed_everything=1",
        "--data.seed=1",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'runs'}",
        *STEPS,
    ]
    cli = cli_main(user)  # what `icon fit …` does, validation and checkpoints included
    fitted = cli.model.assign(cli.datamodule.train_features).numpy()
    record = json.loads((cli.run_dir / "metrics.json").read_text())
    # the defaults: the k-means and spectral starts and the random heads' survivor
    assert record["steps"] == 60 and record["heads"][:2] == [0, 1] and len(record["heads"]) == 3

    x = np.load(digits_file)["features"]
    est = HeadClusterer(overrides=STEPS, random_state=1, cache_dir=str(tmp_path / "cache")).fit(x)
    np.testing.assert_array_equal(est.labels_, fitted)
    np.testing.assert_array_equal(est.predict(x), fitted)  # predict prepares X as the fit did (its mean)
    assert est.head_ids_.tolist() == record["heads"] and est.steps_ == 60
    assert est.head_losses_.tolist() == pytest.approx(record["head_losses"], rel=1e-6)

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "BUDGET", STEPS)
    args = ["--features", str(digits_file), "--methods", "icon", "--seeds", "1", "--cache-dir", str(tmp_path / "c2")]
    bc.main(args)
    row = json.loads((tmp_path / "clustering_digits_600.json").read_text())["methods"]["icon"]["runs"][0]
    assert row["assignments_sha256"] == hashlib.sha256(fitted.astype(np.int64).tobytes()).hexdigest()
    assert row["steps"] == 60


def test_the_builder_assembles_what_icon_fit_runs_without_running_it(digits_file, tmp_path):
    run = assemble([*features_command(digits_file), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert run.trainer.global_step == 0 and not (run.run_dir / "metrics.json").exists()
    assert run.model.hparams.num_heads == 10 and run.datamodule.views == "clean"  # the one set of defaults
    assert run.pending == "fit"


def test_each_experiment_runs_the_i_con_recipe_it_names():
    """jsonargparse has no include for a config file, and a recipe file (``model: loss:``) is not a sub-config of
    ``model.loss``, so the experiments spell the recipe out; this pins each to the recipe it names, so that the
    recipe stays the one place its settings live: digits runs ``icon_clustering`` itself, the two image experiments
    the paper's p (their augmented views ∪ the recipe's k-NN and walks) with the recipe's q and α."""
    import yaml

    from icon_lightning.recipes import recipe_config

    recipe = recipe_config("icon_clustering")
    root = Path(__file__).resolve().parents[1] / "experiments"
    loss = {name: yaml.safe_load((root / name / "config.yaml").read_text())["model"]["loss"] for name in EXPERIMENTS}
    assert loss["digits"] == recipe
    for name in ("cifar10_effnet", "imagenet_dinov2"):
        views = copy.deepcopy(recipe)
        knn = views["init_args"]["p"]["init_args"]["base"]
        mixture = [{"class_path": "icon_lightning.supervisory.Augmentation"}, knn]
        views["init_args"]["p"]["init_args"]["base"] = {
            "class_path": "icon_lightning.supervisory.Mixture",
            "init_args": {"components": mixture},
        }
        assert loss[name] == views, name


EXPERIMENTS = ("digits", "cifar10_effnet", "imagenet_dinov2")
