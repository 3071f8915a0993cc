"""Classical clusterings of a feature array: k-means (FAISS) and spectral clustering on the k-NN graph. They use
no Lightning, so the model (head initialisation) and the baselines can both build on them."""

from icon_lightning.classical.kmeans import FaissKMeans
from icon_lightning.classical.spectral import KNNSpectralClustering

__all__ = ["FaissKMeans", "KNNSpectralClustering"]
