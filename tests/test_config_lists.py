"""Lists live in configs (issue 33, deliverable 5): the clustering benchmark finds its data sets, peers and
ablations in files (``benchmark/datasets/``, ``peers/``, ``ablations/`` under ``--configs``), so adding one is a
file and no Python edit; the ablations moved out of ``methods()`` build the runs they built before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import benchmarks.clustering as bc
from icon_lightning.recipes import CONFIG_DIR, recipe_config


# ---------------------------------------------------------------------------------------------- the old code
def old_icon_loss(alpha_p: float, alpha_q: float, steps: int) -> dict:
    """benchmarks/clustering.py's ``icon_loss`` before the ablations moved to configs/ablations (verbatim)."""
    config = recipe_config("icon_clustering")
    propagated = config["init_args"]["p"]["init_args"]["base"]
    if steps > 1:
        propagated["init_args"]["steps"] = steps
    else:
        config["init_args"]["p"]["init_args"]["base"] = propagated["init_args"]["base"]
    for side, alpha in (("p", alpha_p), ("q", alpha_q)):
        if alpha:
            config["init_args"][side]["init_args"]["alpha"] = alpha
        else:
            config["init_args"][side] = config["init_args"][side]["init_args"]["base"]
    return config


def old_ablations(k: int) -> dict[str, tuple[list[str], int | str]]:
    """The old ``methods()`` rows of the I-Con default's ablations and options: name → (overrides, clusters)."""

    def loss(a_p, a_q, steps):
        return f"--model.loss={json.dumps(old_icon_loss(a_p, a_q, steps))}"

    def self_label(consensus: bool) -> str:
        callback = {"class_path": "icon_lightning.callbacks.SelfLabel", "init_args": {"consensus": consensus}}
        return f"--trainer.callbacks+={json.dumps(callback)}"

    return {
        "icon_auto_k": ([], "auto"),
        "icon_random_heads": (["--model.head_init=[]"], k),
        "icon_3_heads": (["--model.num_heads=3"], k),
        "icon_one_head": (["--model.num_heads=1"], k),
        "icon_spectral_head": (["--model.head_init=[kmeans,spectral]"], k),
        "icon_self_label": ([self_label(False)], k),
        "icon_consensus_self_label": ([self_label(True)], k),
        "icon_mlp_heads": (["--model.head_hidden_dim=512"], k),
        "icon_overcluster_3x": ([], 3 * k),
        "icon_no_debias": ([loss(0.0, 0.0, 2)], k),
        "icon_debias_p_only": ([loss(0.6, 0.0, 2)], k),
        "icon_no_walks": ([loss(0.6, 0.6, 1)], k),
        "icon_walk_steps_3": ([loss(0.6, 0.6, 3), "--data.walk_steps=3"], k),
    }


OLD_TABLE = (
    *("kmeans_sklearn", "kmeans_faiss", "spectral", "scan", "temi", "turtle", "icon", "icon_no_debias"),
    *("icon_no_walks", "icon_random_heads", "icon_one_head", "icon_overcluster_3x", "icon_self_label"),
)


def resolved(config, overrides: list[str], clusters, path, tmp_path) -> dict:
    """The run `icon fit` assembles for a benchmark row (``HeadClusterer``'s words), as its resolved config."""
    from icon_lightning.cli import assemble
    from icon_lightning.estimator import HeadClusterer

    estimator = HeadClusterer(config, overrides, clusters, 0, cache_dir=str(tmp_path))
    config = assemble(estimator.command(path, str(tmp_path / "runs"), clusters, 0)).config.fit.clone().as_dict()
    run_dir = Path(config.pop("run_dir"))  # <root>/<config>-<key of the settings>/fit-<time>-<id>: the key only
    config["trainer"]["default_root_dir"] = run_dir.parent.name
    return config


@pytest.mark.slow
def test_every_moved_ablation_builds_the_run_it_built_before(tmp_path):
    """Each ablation file, read by ``methods()``, gives `icon fit` the same resolved model, loss, data, trainer and
    convergence settings, and the same cluster count, as the old Python row did."""
    from icon_lightning.data.datasets import DigitsDataset
    from icon_lightning.estimator import features_file

    path = features_file(DigitsDataset().data.numpy().astype(np.float32), tmp_path)
    new, old = bc.methods(10, cache_dir=str(tmp_path)), old_ablations(10)
    added = {"icon_loss_selection"}  # issue 33: the selection rule as a row of its own (no Python row before)
    assert set(old) <= set(new) and set(bc.config_files(CONFIG_DIR, "ablations")) == set(old) | added
    for name, (words, clusters) in old.items():
        estimator = new[name][1](0)
        assert new[name][2] == clusters, name
        assert estimator.config == "icon_clustering" and estimator.n_clusters == clusters, name
        expected = resolved("icon_clustering", words, clusters, path, tmp_path)
        assert resolved(estimator.config, list(estimator.overrides), clusters, path, tmp_path) == expected, name
    # the ablations do change the default: the comparison can tell rows apart
    default = resolved("icon_clustering", [], 10, path, tmp_path)
    assert default != resolved("icon_clustering", old["icon_no_walks"][0], 10, path, tmp_path)


def test_the_table_keeps_its_rows_and_adds_every_peer():
    table = bc.table_methods()
    peers = tuple(bc.config_files(CONFIG_DIR, "peers"))
    assert set(OLD_TABLE) <= set(table) and set(peers) <= set(table) and "icon_published" in table
    # nothing else joined but issue 33's rows of their own: the K-free mode and the selection rule
    assert set(table) - set(OLD_TABLE) == set(peers) - {"scan", "temi", "turtle"} | {
        "icon_auto_k",
        "icon_loss_selection",
    }
    assert table[:3] == bc.CLASSICAL and table.index("icon") > max(table.index(p) for p in peers)


def test_the_data_sets_are_the_files_and_digits_loads_as_before():
    old = ("digits", "cifar10_test", "cifar10_train_test", "fashion_mnist_test", "mnist_test")
    lt = {f"{s}_lt{r}" for s in ("digits", "cifar10_test", "mnist_test", "fashion_mnist_test") for r in (10, 100)}
    assert set(bc.DATASETS) == set(old) | lt and set(bc.LONG_TAILED) == lt
    from sklearn.datasets import load_digits

    split = bc.load_split("digits", bc.arguments().parse_args([]))
    digits = load_digits()
    np.testing.assert_array_equal(split.fit_x, digits.data.astype(np.float32))
    np.testing.assert_array_equal(split.score_y, digits.target)
    assert split.transductive and split.source == "scikit-learn digits, 64 raw pixels"  # the results files' source


def test_the_image_sets_keep_their_sources_and_extraction(monkeypatch):
    """Without the images: the files build the loaders, the backbone and the transform the old code built (ImageNet
    mean and std, the set's size, grayscale to RGB for the IDX sets)."""
    from icon_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

    calls = []

    def features(store, backbone, data, transform):
        calls.append((backbone, data, transform))
        return np.zeros((4, 3), np.float32)

    monkeypatch.setattr(bc, "cached_features", features)
    monkeypatch.setattr(bc, "_instance", lambda spec, values, where: _Fake(spec, values))
    args = bc.arguments().parse_args(["--fashion-size", "32"])
    fashion = bc.load_split("fashion_mnist_test", args)
    assert fashion.source == "Fashion-MNIST test, EfficientNet-Lite0 features at 32 px"
    backbone, data, transform = calls[-1]
    assert backbone.spec["class_path"] == "icon_lightning.data.backbones.EfficientNetLite0"
    assert data.init_args == {"root": str(bc.FASHION), "prefix": "t10k"}
    assert repr(transform) == repr(eval_transform(32, IMAGENET_MEAN, IMAGENET_STD, grayscale_to_rgb=True))
    train_test = bc.load_split("cifar10_train_test", args)
    assert train_test.source.endswith("features at 128 px: fit on train (50 000), scored on test (10 000)")
    tars = [c[1].init_args for c in calls[-2:]]
    assert tars == [
        {"path": f"{args.cifar10_tar_dir}/cifar10_jpeg_{split}.tar", "split": split} for split in ("train", "test")
    ]
    assert not train_test.transductive
    assert repr(calls[-1][2]) == repr(eval_transform(128, IMAGENET_MEAN, IMAGENET_STD, grayscale_to_rgb=False))


class _Fake:
    def __init__(self, spec, values):
        self.spec, self.values = spec, values
        self.init_args = bc._filled(spec.get("init_args") or {}, values, "x")
        self.labels = np.arange(4)
        self.normalization = ((0.5,) * 3, (0.5,) * 3)


# ---------------------------------------------------------------------------------------------- adding one
PEER = """# A new peer: the I-Con recipe with two random heads
model:
  loss: {loss}
  num_heads: 2
  head_init: []
"""
ABLATION = """# A new ablation: the default with 2 heads
table: true
overrides:
  model.num_heads: 2
"""
DATASET = """# two blobs, 8 features
fit:
  class_path: icon_lightning.data.FeaturesFile
  init_args: {{path: "{{configs}}/blobs.npz"}}
"""


def test_a_new_peer_ablation_and_data_set_are_one_file_each(tmp_path, monkeypatch):
    """A copy of configs/ with one more file in each folder: the benchmark lists them, runs them and writes their
    rows, with no Python edited."""
    import benchmarks.common as common

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "peers" / "new_peer.yaml").write_text(PEER.format(loss=json.dumps(recipe_config("icon_clustering"))))
    (configs / "ablations" / "new_ablation.yaml").write_text(ABLATION)
    (configs / "benchmark" / "datasets" / "blobs.yaml").write_text(DATASET.format())
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (60, 8)), rng.normal(4, 1, (60, 8))]).astype(np.float32)
    np.savez(configs / "blobs.npz", features=x, labels=np.repeat([0, 1], 60))

    assert {"new_peer", "new_ablation"} <= set(bc.table_methods(configs))
    assert "blobs" in bc.dataset_names(configs) and "blobs" not in bc.DATASETS
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "BUDGET", ["--convergence.max_steps=5"])
    words = ["--dataset", "blobs", "--seeds", "0", "--configs", str(configs), "--results", str(tmp_path)]
    bc.main([*words, "--cache-dir", str(tmp_path / "cache"), "--methods", "new_peer", "new_ablation", "kmeans_sklearn"])

    data = json.loads((tmp_path / "clustering_blobs.json").read_text())
    assert data["source"] == "two blobs, 8 features" and data["fit_shape"] == [120, 8]
    rows = data["methods"]
    assert rows["new_peer"]["description"] == "A new peer: the I-Con recipe with two random heads"
    assert rows["new_ablation"]["description"] == "A new ablation: the default with 2 heads"
    assert rows["new_peer"]["runs"][0]["heads"] == [0, 1] and rows["new_peer"]["runs"][0]["steps"] == 5
    assert rows["kmeans_sklearn"]["hungarian_acc"]["mean"] == 1.0  # two far blobs: the data really were read
    assert bc.ISSUE_32 not in rows["new_peer"]["protocol"] and bc.ISSUE_32 in rows["new_ablation"]["protocol"]


def test_a_broken_config_is_named_in_one_line(tmp_path):
    (tmp_path / "ablations").mkdir()
    (tmp_path / "ablations" / "x.yaml").write_text("# x\noverride: {model.num_heads: 2}\n")
    with pytest.raises(ValueError, match=r"x.yaml: unknown keys \['override'\]"):
        bc.methods(10, configs=tmp_path)
    (tmp_path / "ablations" / "x.yaml").write_text("table: true\n")
    with pytest.raises(ValueError, match=r"x.yaml: expected a first line '# <one-line description>'"):
        bc.methods(10, configs=tmp_path)
    (tmp_path / "ablations" / "x.yaml").write_text("# x\nclusters: three\n")
    with pytest.raises(ValueError, match=r"x.yaml: clusters: expected auto or <n>x"):
        bc.methods(10, configs=tmp_path)
