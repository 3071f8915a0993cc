"""The competitors, run on the same cached features and scored by the same metrics as the I-Con recipes.

k-means (FAISS; scikit-learn's ``KMeans`` is used as is), spectral clustering on the k-NN graph, and the
deep clusterers SCAN, TEMI and TURTLE as objectives of the same Lightning run (their configs: ``configs/peers/``;
``icon_lightning.estimator.HeadClusterer`` runs any of them as an estimator).
"""

from icon_lightning.baselines.objectives import SCANLoss, TEMILoss
from icon_lightning.baselines.pairs import SampledNeighbours
from icon_lightning.baselines.turtle import TURTLELoss
from icon_lightning.classical.kmeans import FaissKMeans
from icon_lightning.classical.spectral import KNNSpectralClustering

__all__ = ["FaissKMeans", "KNNSpectralClustering", "SampledNeighbours", "SCANLoss", "TEMILoss", "TURTLELoss"]
