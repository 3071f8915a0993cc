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

    def update(self, split: str, logits: Tensor, labels: Tensor) -> None:
        """Counts (B, H, K) ``logits`` against ``labels`` for every head of ``split``."""
        if self.scores.split(split) is not None:
            self.scores.update(split, logits, labels)

    def results(self, split: str, selected: int, head_ids: list[int]) -> tuple[dict, Tensor | None]:
        """(values to log, the selected head's accuracy or None) of ``split``; the counts start again."""
        values = self.scores.summary(split, selected, self.over_clustering, head_ids)
        return values, values.pop(f"{split}/hungarian_acc/best", None)

    def keep(self, index: Tensor) -> None:
        """Only the heads at positions ``index`` go on being scored (pruning)."""
        self.scores.keep(index)

    def last_scores(self, split: str) -> tuple[Tensor, Tensor] | None:
        """(confusion (K, C), cluster sizes (K,)) of the selected head at the last scoring of ``split``, or None."""
        if split not in self.scores.last_confusion:
            return None
        return self.scores.last_confusion[split], self.scores.last_cluster_sizes[split]


class ClusterEvaluation(L.LightningModule):
    """The evaluation hooks of a cluster-head module. It owns ``evaluation`` (an ``Evaluation``) and reaches the
    module only through what it declares below: ``features(batch)``, ``forward(features) -> (B, H, K)``,
    ``selected_position()`` and ``live_head_ids()``. Callbacks and the CLI use the public methods (``assign``,
    ``last_scores``, ``needs_final_validation``)."""

    def __init__(self, num_heads: int, num_clusters: int, num_classes: int) -> None:
        super().__init__()
        self.evaluation = Evaluation(num_heads, num_clusters, num_classes)

    def features(self, batch: ClusteringBatch) -> Tensor:
        raise NotImplementedError

    def selected_position(self) -> int:
        """The selected head's position among the live heads."""
        raise NotImplementedError

    def live_head_ids(self) -> list[int]:
        """The live heads' numbers before any pruning (their names in logs)."""
        raise NotImplementedError

    def validation_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.update(SPLITS[dataloader_idx], self(self.features(batch)), batch.label)

    def test_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.update("test", self(self.features(batch)), batch.label)

    def _log_split(self, split: str) -> None:
        values, best = self.evaluation.results(split, self.selected_position(), self.live_head_ids())
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
        return self(features)[:, self.selected_position()]

    @torch.no_grad()
    def assign(self, features: Tensor) -> Tensor:
        """(N,) cluster of each feature row under the selected head."""
        return self.selected(features).argmax(-1)

    def predict_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        z = self.selected(self.features(batch))
        return {"index": batch.index, "cluster": z.argmax(-1), "probs": z.softmax(-1)}
