"""k-means with FAISS, in scikit-learn's conventions (fit/predict, learned attributes end in ``_``)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from icon_lightning.data.neighbours import faiss_gpus


def _as_features(X, name: str = "X") -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return x


class FaissKMeans(ClusterMixin, BaseEstimator):
    """Lloyd's k-means (``faiss.Kmeans``) on all N points, best of ``n_init`` restarts by inertia.

    FAISS subsamples to 256 points per centroid by default; here every point is used, as in scikit-learn, unless
    ``max_points_per_centroid`` asks for FAISS's subsample (K × that many points, drawn with ``random_state``).
    Runs on the GPUs when faiss reports any (``use_gpu=None``).
    Attributes: cluster_centers_ (K, D), labels_ (N,), inertia_ (sum of squared distances), n_iter_ (= ``max_iter``:
    FAISS has no early stop, so every restart runs them all).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        n_init: int = 10,
        max_iter: int = 100,
        random_state: int = 0,
        use_gpu=None,
        max_points_per_centroid: int | None = None,
    ) -> None:
        self.n_clusters, self.n_init, self.max_iter = n_clusters, n_init, max_iter
        self.random_state, self.use_gpu, self.max_points_per_centroid = random_state, use_gpu, max_points_per_centroid

    def fit(self, X, y=None) -> FaissKMeans:
        import faiss

        x = _as_features(X)
        if not 1 <= self.n_clusters <= len(x):
            raise ValueError(f"n_clusters: expected 1..{len(x)}, got {self.n_clusters}")
        if self.n_init < 1:
            raise ValueError(f"n_init: expected at least 1, got {self.n_init}")
        gpu = faiss_gpus() > 0 if self.use_gpu is None else bool(self.use_gpu)
        kmeans = faiss.Kmeans(
            x.shape[1],
            self.n_clusters,
            niter=self.max_iter,
            nredo=self.n_init,
            seed=self.random_state,
            max_points_per_centroid=self.max_points_per_centroid or len(x),
            min_points_per_centroid=1,
            gpu=gpu,
            verbose=False,
        )
        kmeans.train(x)
        self.cluster_centers_ = kmeans.centroids.copy()
        distances, labels = kmeans.index.search(x, 1)
        self.labels_ = labels[:, 0].astype(np.int64)
        self.inertia_ = float(distances.sum())
        self.n_iter_ = self.max_iter  # FAISS has no convergence test: every restart runs all max_iter iterations
        return self

    def predict(self, X) -> np.ndarray:
        x = _as_features(X)
        d2 = (x**2).sum(1, keepdims=True) - 2 * x @ self.cluster_centers_.T + (self.cluster_centers_**2).sum(1)
        return d2.argmin(1).astype(np.int64)
