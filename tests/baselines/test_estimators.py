"""The scikit-learn-style baselines against scikit-learn itself, and the Lightning-backed HeadClusterer."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from icon_lightning.baselines import FaissKMeans, KNNSpectralClustering
from icon_lightning.data.neighbours import centred_unit_rows
from icon_lightning.estimator import HeadClusterer
from icon_lightning.recipes import CONFIG_DIR


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n_samples=300, centers=4, n_features=8, cluster_std=1.0, random_state=0)
    return x.astype(np.float32), y


def test_faiss_kmeans_matches_sklearn(blobs):
    x, y = blobs
    # FAISS seeds uniformly at random (no k-means++): on these blobs 5 restarts can all miss, 10 do not.
    ours = FaissKMeans(4, n_init=10, random_state=0).fit(x)
    ref = KMeans(4, n_init=10, random_state=0).fit(x)
    assert adjusted_rand_score(ref.labels_, ours.labels_) == pytest.approx(1.0)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-4)
    np.testing.assert_array_equal(ours.predict(x), ours.labels_)
    assert ours.cluster_centers_.shape == (4, 8)


@pytest.mark.parametrize("solver", [None, "lobpcg"])
def test_spectral_matches_sklearn_nearest_neighbours_graph(blobs, solver):
    x, y = blobs
    x = centred_unit_rows(x)
    ours = KNNSpectralClustering(4, n_neighbors=10, eigen_solver=solver, random_state=0).fit(x)
    ref = SpectralClustering(4, affinity="nearest_neighbors", n_neighbors=11, random_state=0).fit(x)
    assert adjusted_rand_score(ref.labels_, ours.labels_) > 0.95
    a = ours.affinity_matrix_
    assert abs(a - a.T).max() == 0  # symmetrised graph
    assert (ours.predict(x) == ours.labels_).mean() > 0.95  # out-of-sample vote agrees on the train points


@pytest.mark.parametrize("estimator", [FaissKMeans(2), KNNSpectralClustering(2)])
def test_bad_features_are_named(estimator):
    x = np.ones((10, 3), dtype=np.float32)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="X: contains NaN"):
        estimator.fit(x)
    with pytest.raises(ValueError, match="X: expected a non-empty"):
        estimator.fit(np.ones(5))


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("icon_clustering", []),
        (CONFIG_DIR / "peers" / "scan_common.yaml", ["--model.loss.init_args.p.init_args.k=10"]),
        (  # linear heads on 300 points (the peer's 16 MLP heads of 512 are for real data)
            CONFIG_DIR / "peers" / "temi_common.yaml",
            ["--model.loss.init_args.p.init_args.k=10", "--model.ema_momentum=0.9", "--model.head_hidden_dim=null"],
        ),
    ],
)
def test_head_clusterer_recovers_separated_blobs(blobs, tmp_path, config, overrides):
    x, y = blobs
    name = str(config)
    small = ["--model.num_heads=2", "--data.batch_size=64", "--convergence.max_steps=150"]
    est = HeadClusterer(config, [*small, *overrides], n_clusters=4, cache_dir=str(tmp_path)).fit(x)
    assert adjusted_rand_score(y, est.labels_) > 0.9, name
    if name == "icon_clustering":  # both heads started (k-means, spectral): never pruned, the judge chooses
        scores = est.record_["judge"]["scores"]
        assert est.head_ids_.tolist() == [0, 1] and est.selected_head_ == int(max(scores, key=scores.get))
    else:  # the peers' random heads, pruned by training loss to one, chosen by it; the survivor keeps its number
        assert est.head_losses_.shape == (1,) and est.selected_head_ == int(est.head_ids_[np.argmin(est.head_losses_)])
        assert est.head_ids_.shape == (1,) and int(est.head_ids_[0]) in (0, 1)
    np.testing.assert_array_equal(est.predict(x), est.labels_)
    assert est.predict_proba(x[:5]).sum(1) == pytest.approx(np.ones(5), abs=1e-5)
    with pytest.raises(ValueError, match="X: X has 3 features, but HeadClusterer is expecting 8 features"):
        est.predict(x[:, :3])
