"""torchmetrics metrics for clustering: Hungarian accuracy with a confusion-matrix state; NMI, ARI, AMI."""

from icon_lightning.metrics.clustering import ClusteringMetrics, HungarianAccuracy

__all__ = ["ClusteringMetrics", "HungarianAccuracy"]
