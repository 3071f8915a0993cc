"""K without labels (``--data.num_clusters auto``, ``models.choose_k``): the search's scores are the judge's
(scikit-learn's cosine silhouette of the starts' assignments on the judge's rows), its K the argmax, well-separated
blobs give their number, labels change nothing, and `icon fit` on a file without labels records the search, builds
the model at the chosen K and predicts with its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import adjusted_rand_score, silhouette_score

from icon_lightning.classical import KNNSpectralClustering
from icon_lightning.cli import cli_main, features_command
from icon_lightning.data.neighbours import centred_unit_rows
from icon_lightning.data.num_clusters import checked_range, default_range
from icon_lightning.metrics.judge import judge_rows
from icon_lightning.models.choose_k import Starts, chosen_k, coarse_grid, fine_grid, search_num_clusters
from icon_lightning.models.parts import HEAD_INITS
from tests.test_predict_new_data import quiet


def blobs(n: int = 360, centers: int = 6, seed: int = 0, std: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n, 32, centers=centers, cluster_std=std, random_state=seed)
    return x.astype(np.float32), y


def prepared(x: np.ndarray) -> np.ndarray:
    return centred_unit_rows(x, None)  # the fit's preparation: its own mean, unit rows


def test_the_grid_is_coarse_then_fine_and_the_rule_takes_the_smaller_k_on_ties():
    assert coarse_grid(2, 50) == [2, 3, 4, 5, 6, 8, 10, 12, 15, 19, 24, 30, 38, 48, 50]
    assert coarse_grid(4, 4) == [4] and coarse_grid(2, 3) == [2, 3]
    assert fine_grid(coarse_grid(2, 50), 24) == [20, 21, 22, 23, 25, 26, 27, 28, 29]
    assert fine_grid(coarse_grid(2, 50), 2) == [] and fine_grid(coarse_grid(2, 50), 50) == [49]
    scores = {3: {"best": 0.2}, 5: {"best": 0.4}, 4: {"best": 0.4}, 9: {"best": -1.0}}
    assert chosen_k(scores) == 4


def test_default_range_is_the_stated_rule():
    assert default_range(10_000) == (2, 50) and default_range(1_797) == (2, 50)
    assert default_range(300) == (2, 15) and default_range(30) == (2, 2)
    assert checked_range([3, 7], 300) == (3, 7)
    for bad in ([5, 3], [1, 4], [2, 300], [2, 4096], [2], "2-5"):
        with pytest.raises(ValueError, match=r"^data\.num_clusters_range: expected \[lo, hi\]"):
            checked_range(bad, 300 if bad != [2, 4096] else 10_000)


def test_scores_are_scikit_learns_silhouette_of_the_starts_and_k_is_their_argmax():
    x = prepared(blobs(n=500, centers=5, std=3.0)[0])
    search = search_num_clusters(x, (2, 9))
    rows = judge_rows(len(x))
    starts = Starts(x[rows], 9)
    for k in (3, 5, 8):
        assignments = starts(k)
        # the k-means start is the heads' own (HEAD_INITS) on the judged rows
        np.testing.assert_array_equal(assignments["kmeans"], HEAD_INITS["kmeans"](x[rows], k, 0))
        for name, assignment in assignments.items():
            reference = silhouette_score(x[rows].astype(np.float64), assignment, metric="cosine")
            assert search.scores[k][name] == pytest.approx(reference, abs=1e-5), (k, name)
        assert search.scores[k]["best"] == max(search.scores[k]["kmeans"], search.scores[k]["spectral"])
    assert set(coarse_grid(2, 9)) <= set(search.scores) <= set(range(2, 10))
    assert search.chosen == max(search.scores, key=lambda k: (search.scores[k]["best"], -k))


def test_the_spectral_start_is_spectral_clustering_at_k_up_to_the_eigensolver():
    """The first K of K_max embedding columns, clustered: the partition scikit-learn's spectral clustering at K finds
    (on digits, whose 10-NN graph is connected: no eigenvalue of the first K_max repeats, so the span is unique)."""
    x = prepared(load_digits().data[:600].astype(np.float32))
    starts = Starts(x, 20)
    for k in (3, 10, 15):
        reference = KNNSpectralClustering(k, 10, random_state=0).fit(x).labels_
        assert adjusted_rand_score(reference, starts(k)["spectral"]) > 0.98, k


def test_separated_blobs_give_their_number_and_labels_change_nothing(tmp_path):
    x, y = blobs(n=600, centers=6, seed=1)
    search = search_num_clusters(prepared(x), default_range(len(x)))
    assert search.range == (2, 30) and search.chosen == 6
    assert search.record()["chosen"] == 6 and search.record()["scores"]["6"]["best"] == pytest.approx(
        search.scores[6]["best"], abs=1e-6
    )
    # through the DataModule (what the CLI reads): no labels, labels, permuted labels → the same features, K, scores
    from icon_lightning.data import ClusteringDataModule, FeaturesFile

    records = []
    for name, labels in (("none", None), ("true", y), ("permuted", np.random.default_rng(0).permutation(y))):
        path = tmp_path / f"{name}.npz"
        np.savez(path, features=x, **({} if labels is None else {"labels": labels}))
        data = ClusteringDataModule(
            FeaturesFile(str(path)), views="clean", num_clusters="auto", cache_dir=str(tmp_path / "cache")
        )
        clusters = data.data.clusters  # the DataModule's K part, which the CLI reads
        assert clusters.needs_search and clusters.range == (2, 30)
        found = search_num_clusters(clusters.features(), clusters.range)
        records.append({k: v for k, v in found.record().items() if k != "wall_time_s"})
    assert records[0] == records[1] == records[2] and records[0]["chosen"] == 6


def test_icon_fit_without_labels_searches_k_fits_it_and_predicts_with_it(tmp_path, capsys):
    x, _ = blobs(n=300, centers=5, seed=2)
    train = tmp_path / "train.npz"
    np.savez(train, features=x)
    argv = [*features_command(train), *quiet(tmp_path), "--data.num_clusters_range=[2,8]", "--trainer.max_steps=20"]
    fit = cli_main(argv)
    record = json.loads((Path(fit.run_dir) / "metrics.json").read_text())
    search = record["num_clusters_search"]
    assert search["range"] == [2, 8] and set(coarse_grid(2, 8)) <= set(map(int, search["scores"])) <= set(range(2, 9))
    assert search["chosen"] == 5 == fit.model.hparams.num_clusters == fit.datamodule.num_clusters
    assert set(search["scores"]["5"]) == {"kmeans", "spectral", "best"} and "subsample" in search["approximation"]
    assert (Path(fit.run_dir) / "num_clusters_search.png").stat().st_size > 0
    assert "K = 5 chosen by the judge from 2..8" in capsys.readouterr().out
    assert "auto" in (Path(fit.run_dir) / "config.yaml").read_text()  # what the user asked stays the run's config
    ckpt = Path(fit.run_dir) / "checkpoints" / "last.ckpt"
    for k in ([], ["--data.num_clusters=auto"]):  # unset or auto: the checkpoint's K
        predict = cli_main(["predict", *features_command(train)[1:], *quiet(tmp_path), f"--ckpt_path={ckpt}", *k])
        assert predict.model.hparams.num_clusters == 5
        labels = np.load(Path(predict.run_dir) / "predictions.npy")
        own = fit.model.cpu().eval().assign(fit.datamodule.train_features.float()).numpy()
        np.testing.assert_array_equal(labels, own)


def test_a_resumed_auto_fit_takes_its_checkpoints_k_without_searching(tmp_path, monkeypatch):
    import icon_lightning.models.choose_k as choose_k

    x, _ = blobs(n=300, centers=5, seed=2)
    train = tmp_path / "train.npz"
    np.savez(train, features=x)
    argv = [*features_command(train), *quiet(tmp_path), "--data.num_clusters_range=[2,8]"]
    fit = cli_main([*argv, "--trainer.max_steps=10"])
    assert fit.model.hparams.num_clusters == 5

    def refused(*_args, **_kwargs):
        raise AssertionError("a resumed fit searched K again")

    monkeypatch.setattr(choose_k, "search_num_clusters", refused)
    ckpt = Path(fit.run_dir) / "checkpoints" / "last.ckpt"
    resumed = cli_main([*argv, "--trainer.max_steps=14", f"--ckpt_path={ckpt}"])
    assert resumed.model.hparams.num_clusters == 5 and resumed.trainer.global_step == 14
    assert resumed.record["num_clusters_search"] is None  # the search is in the first fit's record


def test_auto_where_no_fit_chooses_k_is_one_line(tmp_path):
    train = tmp_path / "train.npz"
    np.savez(train, features=blobs(n=60)[0])
    argv = ["validate", *features_command(train)[1:], *quiet(tmp_path), "--allow_untrained=true"]
    for k in ([], ["--data.num_clusters=auto"]):
        with pytest.raises(ValueError, match=r"^data\.num_clusters: auto chooses K in a fit; validate takes K from"):
            cli_main([*argv, *k])
    with pytest.raises(ValueError, match=r"^data\.num_clusters_range: only read with data\.num_clusters auto"):
        cli_main(
            [*features_command(train), *quiet(tmp_path), "--data.num_clusters=3", "--data.num_clusters_range=[2,4]"]
        )


def test_the_estimator_with_auto_fits_and_predicts_at_the_chosen_k(tmp_path):
    from icon_lightning.estimator import HeadClusterer

    x, _ = blobs(n=240, centers=4, seed=3)
    overrides = ["--trainer.max_steps=10", "--model.num_heads=2", "--data.num_clusters_range=[2,6]"]
    est = HeadClusterer(n_clusters="auto", cache_dir=str(tmp_path), overrides=overrides).fit(x)
    search = est.record_["num_clusters_search"]
    assert est.n_clusters_ == search["chosen"] == 4 == est.module_.hparams.num_clusters
    assert est.predict_proba(x[:7]).shape == (7, 4) and np.array_equal(est.predict(x), est.labels_)
