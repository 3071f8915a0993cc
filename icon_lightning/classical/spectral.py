"""Spectral clustering on the cosine k-NN graph (scikit-learn), with an out-of-sample ``predict``."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import SpectralClustering

from icon_lightning.classical.kmeans import _as_features
from icon_lightning.data.neighbours import knn


def nearest_train(x: np.ndarray, train: np.ndarray, k: int, chunk_size: int = 4096) -> np.ndarray:
    """(N, k) indices of the k most cosine-similar rows of ``train`` for each row of ``x`` (exact)."""
    t = torch.nn.functional.normalize(torch.from_numpy(train), dim=1)
    out = []
    for start in range(0, len(x), chunk_size):
        q = torch.nn.functional.normalize(torch.from_numpy(x[start : start + chunk_size]), dim=1)
        out.append((q @ t.T).topk(k, dim=1).indices)
    return torch.cat(out).numpy()


def knn_affinity(x: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """The symmetrised cosine k-NN connectivity graph of ``x`` (N, D) with self loops, (A + Aᵀ)/2 (N × N sparse):
    what scikit-learn's ``affinity='nearest_neighbors'`` builds, found with this project's exact k-NN."""
    indices, _ = knn(x, n_neighbors)
    n = len(x)
    rows = np.repeat(np.arange(n), n_neighbors + 1)
    cols = np.concatenate([np.arange(n)[:, None], indices], axis=1).ravel()
    a = sp.csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(n, n))
    return 0.5 * (a + a.T)


class KNNSpectralClustering(ClusterMixin, BaseEstimator):
    """scikit-learn ``SpectralClustering`` on the symmetrised cosine k-NN connectivity graph.

    The graph is what ``affinity='nearest_neighbors'`` builds, (A + Aᵀ)/2 with self loops, but found with
    this project's exact k-NN (FAISS or torch), so 50 000 points take seconds rather than a brute-force
    scikit-learn search. ``predict`` labels new points by a majority vote of their ``n_neighbors`` nearest
    training points (spectral clustering itself has no out-of-sample rule). eigen_solver: scikit-learn's
    (None = ARPACK in shift-invert mode, whose sparse LU does not finish on a 50 000-point k-NN graph here;
    "lobpcg" does).
    Attributes: labels_ (N,), affinity_matrix_ (sparse N × N), train_features_.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        n_neighbors: int = 10,
        assign_labels: str = "kmeans",
        eigen_solver: str | None = None,
        random_state: int = 0,
    ) -> None:
        self.n_clusters = n_clusters
        self.n_neighbors = n_neighbors
        self.assign_labels = assign_labels
        self.eigen_solver = eigen_solver
        self.random_state = random_state

    def fit(self, X, y=None) -> KNNSpectralClustering:
        x = _as_features(X)
        if not 0 < self.n_neighbors < len(x):
            raise ValueError(f"n_neighbors: expected 1..{len(x) - 1}, got {self.n_neighbors}")
        self.affinity_matrix_ = knn_affinity(x, self.n_neighbors)
        spectral = SpectralClustering(
            self.n_clusters,
            affinity="precomputed",
            assign_labels=self.assign_labels,
            eigen_solver=self.eigen_solver,
            random_state=self.random_state,
        )
        self.labels_ = spectral.fit_predict(self.affinity_matrix_).astype(np.int64)
        self.train_features_ = x
        return self

    def predict(self, X) -> np.ndarray:
        x = _as_features(X)
        votes = self.labels_[nearest_train(x, self.train_features_, self.n_neighbors)]
        counts = np.zeros((len(x), self.n_clusters), dtype=np.int64)
        np.add.at(counts, (np.arange(len(x))[:, None], votes), 1)
        return counts.argmax(1)
