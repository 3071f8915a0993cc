"""torchmetrics metrics for clustering: Hungarian accuracy with a confusion-matrix state; NMI, ARI, AMI."""

from icon_lightning.metrics.clustering import METRICS, ClusteringMetrics, HungarianAccuracy, score_assignments

__all__ = ["METRICS", "ClusteringMetrics", "HungarianAccuracy", "score_assignments"]
