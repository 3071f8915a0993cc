"""Evaluation of a cluster-head LightningModule: ``Evaluation``, the part it owns (per-head scores of the
validation, train and test splits, the last confusion, whether the last validation scores the model as it is),
and ``ClusterEvaluation``, the Lightning hooks that feed it through a declared interface."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.models.parts import SplitScores

SPLITS = ("val", "train")  # validation dataloader 0 scores the val split, 1 (when present) the train split


class Evaluation(nn.Module):
    """Per-head scores of each split (``SplitScores``: none without labels) and the step of the last validation.
    ``over_clustering``: K > C, so the selected head's accuracy is also logged as ``over_clustering_acc``."""

    def __init__(self, num_heads: int, num_clusters: int, num_classes: int) -> None:
        super().__init__()
        self.scores = SplitScores((*SPLITS, "test"), num_heads, num_clusters, num_classes)
        self.over_clustering = num_clusters > num_classes
        self.validated_at_step: int | None = None  # the global step of the last validation (None: none since a change)

    def update(self, split: str, logits: Tensor, labels: Tensor, heads: list[int]) -> None:
        """Counts (B, h, K) ``logits`` of the heads numbered ``heads`` against ``labels``."""
        if self.scores.split(split) is not None:
            self.scores.update(split, logits, labels, heads)

    def results(self, split: str, selected: int, heads: list[int]) -> tuple[dict, Tensor | None]:
        """(values to log, the selected head's accuracy or None) of ``split`` for the heads numbered ``heads``
        (``selected``: a head's number); the counts start again."""
        values = self.scores.summary(split, selected, self.over_clustering, heads)
        return values, values.pop(f"{split}/hungarian_acc/best", None)

    def last_scores(self, split: str) -> tuple[Tensor, Tensor] | None:
        """(confusion (K, C), cluster sizes (K,)) of the selected head at the last scoring of ``split``, or None."""
        if split not in self.scores.last_confusion:
            return None
        return self.scores.last_confusion[split], self.scores.last_cluster_sizes[split]


class ClusterEvaluation(L.LightningModule):
    """The evaluation hooks of a cluster-head module. It owns ``evaluation`` (an ``Evaluation``) and reaches the
    module only through what it declares below: ``features(batch)``, ``forward(features, heads=None) -> (B, h,
    K)`` (the live heads, in the order of their numbers, or the heads numbered ``heads``), ``selected_head`` (a
    head's number) and ``live_head_ids()``. Callbacks and the CLI use the public methods (``assign``,
    ``last_scores``, ``needs_final_validation``)."""

    def __init__(self, num_heads: int, num_clusters: int, num_classes: int) -> None:
        super().__init__()
        self.evaluation = Evaluation(num_heads, num_clusters, num_classes)

    def features(self, batch: ClusteringBatch) -> Tensor:
        raise NotImplementedError

    @property
    def selected_head(self) -> int:
        """The selected head's number (heads keep their numbers through pruning)."""
        raise NotImplementedError

    def live_head_ids(self) -> list[int]:
        """The numbers of the heads still trained, ascending (their names in logs)."""
        raise NotImplementedError

    def validation_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.update(SPLITS[dataloader_idx], self(self.features(batch)), batch.label, self.live_head_ids())

    def test_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.update("test", self(self.features(batch)), batch.label, self.live_head_ids())

    def _log_split(self, split: str) -> None:
        values, best = self.evaluation.results(split, self.selected_head, self.live_head_ids())
        self.log_dict(values)
        if best is not None:
            self.log(f"{split}/hungarian_acc/best", best, prog_bar=split == "val")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.evaluation.validated_at_step = self.global_step  # the CLI validates again when the last step was not
        for split in SPLITS:
            self._log_split(split)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def needs_final_validation(self) -> bool:
        """Whether the metrics on record do not score the model as it is now (no validation since the last step or
        since a head was replaced): the CLI validates once more after fitting."""
        return self.evaluation.validated_at_step != self.global_step

    def last_scores(self, split: str) -> tuple[Tensor, Tensor] | None:
        """(confusion (K, C), cluster sizes (K,)) of the selected head at the last scoring of ``split``, or None."""
        return self.evaluation.last_scores(split)

    def selected(self, features: Tensor) -> Tensor:
        """(N, K) logits of the selected head."""
        return self(features, [self.selected_head])[:, 0]

    @torch.no_grad()
    def assign(self, features: Tensor) -> Tensor:
        """(N,) cluster of each feature row under the selected head."""
        return self.selected(features).argmax(-1)

    def predict_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        z = self.selected(self.features(batch))
        return {"index": batch.index, "cluster": z.argmax(-1), "probs": z.softmax(-1)}
