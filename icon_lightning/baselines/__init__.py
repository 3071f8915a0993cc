"""The competitors, run on the same cached features and scored by the same metrics as the I-Con recipes.

k-means (FAISS; scikit-learn's ``KMeans`` is used as is), spectral clustering on the k-NN graph, and the
deep clusterers SCAN and TEMI as objectives of the same Lightning run (their recipes: ``configs/recipes/scan.yaml``
and ``temi.yaml``; ``icon_lightning.estimator.HeadClusterer`` runs any recipe as an estimator).
"""

from icon_lightning.baselines.objectives import SCANLoss, TEMILoss
from icon_lightning.classical.kmeans import FaissKMeans
from icon_lightning.classical.spectral import KNNSpectralClustering

__all__ = ["FaissKMeans", "KNNSpectralClustering", "SCANLoss", "TEMILoss"]
