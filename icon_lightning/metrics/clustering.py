"""Clustering metrics as torchmetrics ``Metric``s, reduced correctly across processes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from icon_lightning.functional.matching import confusion_matrix, hungarian_accuracy


class HungarianAccuracy(Metric):
    """Accuracy under the best one-to-one map of K clusters to C classes (scipy's Hungarian algorithm).

    State: the (K, C) confusion matrix, summed across processes; the assignment is solved once, in
    ``compute()``. K ≠ C is allowed (rectangular matching: unmatched clusters count as errors).
    ``over_clustering_accuracy()`` maps every cluster to its majority class instead (many-to-one), the
    number usually reported when K > C.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_clusters: int, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_clusters < 1 or num_classes < 1:
            raise ValueError(f"num_clusters, num_classes: expected ≥ 1, got {num_clusters}, {num_classes}")
        self.num_clusters, self.num_classes = num_clusters, num_classes
        self.add_state("confusion", torch.zeros(num_clusters, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: (N,) cluster ids in [0, K); target: (N,) class ids in [0, C) (rows with target < 0 are skipped)."""
        keep = target >= 0
        preds, target = preds[keep], target[keep]
        if preds.numel() and (preds.max() >= self.num_clusters or preds.min() < 0):
            raise ValueError(f"preds: expected cluster ids in [0, {self.num_clusters})")
        if target.numel() and target.max() >= self.num_classes:
            raise ValueError(f"target: expected class ids in [0, {self.num_classes})")
        self.confusion += confusion_matrix(preds, target, self.num_clusters, self.num_classes).to(self.confusion)

    def compute(self) -> Tensor:
        return torch.tensor(hungarian_accuracy(self.confusion)[0])

    def mapping(self) -> Tensor:
        """(K,) class matched to each cluster, -1 for unmatched clusters."""
        return hungarian_accuracy(self.confusion)[1]

    def over_clustering_accuracy(self) -> Tensor:
        total = self.confusion.sum()
        return self.confusion.max(1).values.sum() / total.clamp_min(1)

    def cluster_sizes(self) -> Tensor:
        """(K,) how many items each cluster received (the histogram that shows collapse)."""
        return self.confusion.sum(1)


class ClusteringMetrics(HungarianAccuracy):
    """Hungarian accuracy, NMI, ARI and AMI of one head from one summed (K, C) confusion-matrix state.

    NMI / ARI / AMI are scikit-learn's, evaluated on the label pairs the confusion matrix encodes (exact,
    O(N)), so every process's counts are reduced before any score is computed.
    """

    def compute(self) -> dict[str, Tensor]:
        from sklearn import metrics as skm

        counts = self.confusion.detach().cpu().numpy()
        k_idx, c_idx = np.nonzero(counts)
        reps = counts[k_idx, c_idx]
        pred, target = np.repeat(k_idx, reps), np.repeat(c_idx, reps)
        scores = {"hungarian_acc": super().compute(), "over_clustering_acc": self.over_clustering_accuracy()}
        if len(pred):
            scores["nmi"] = torch.tensor(skm.normalized_mutual_info_score(target, pred))
            scores["ari"] = torch.tensor(skm.adjusted_rand_score(target, pred))
            scores["ami"] = torch.tensor(skm.adjusted_mutual_info_score(target, pred))
        return {k: v.float() for k, v in scores.items()}


METRICS = ("hungarian_acc", "nmi", "ari")


def score_assignments(clusters, labels, num_clusters: int, num_classes: int | None = None) -> dict[str, float]:
    """Hungarian accuracy, NMI and ARI of (N,) cluster ids against (N,) labels, in this process alone (no
    synchronisation: the demo, the benchmarks and the ImageNet reproduction score finished assignments with it).
    With more clusters than classes, ``over_clustering_acc`` (each cluster → its majority class) is added beside
    ``hungarian_acc``, which stays the one-to-one matching's accuracy: one meaning per key."""
    num_classes = num_clusters if num_classes is None else num_classes
    metric = ClusteringMetrics(num_clusters, num_classes, sync_on_compute=False)
    metric.update(torch.as_tensor(np.asarray(clusters)).long().cpu(), torch.as_tensor(np.asarray(labels)).long().cpu())
    values = metric.compute()
    out = {name: float(values[name]) for name in METRICS if name in values}
    if num_clusters > num_classes:
        out["over_clustering_acc"] = float(values["over_clustering_acc"])
    return out
