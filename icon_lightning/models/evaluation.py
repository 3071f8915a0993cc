"""`ClusterEvaluation`: the evaluation half of a cluster-head LightningModule: per-head scores of the validation,
train and test splits, the selected head's assignments (predict) and its p-vs-q neighbourhoods (plots)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.models.heads import set_linear_head

SPLITS = ("val", "train")  # validation dataloader 0 scores the val split, 1 (when present) the train split


class ClusterEvaluation(L.LightningModule):
    """Scores the H heads of ``self(features) -> (B, H, K)`` on labelled splits into ``self.scores`` (a
    ``SplitScores``) and logs them, the head ``self.selected_head`` also without its suffix. The subclass provides
    ``features(batch)``, ``heads`` (``ClusterHeads``), ``scores``, ``selected_head``, ``head_ids``, ``loss`` and
    ``hparams.num_clusters/num_classes``.

    Callbacks and the CLI reach it through the methods below (``assign``, ``replace_head``, ``last_scores``,
    ``needs_final_validation``), never through its attributes."""

    validated_at_step: int | None = None  # the global step of the last validation (None: none since a change)

    def validation_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.scores.split(SPLITS[dataloader_idx]) is not None:
            self.scores.update(SPLITS[dataloader_idx], self(self.features(batch)), batch.label)

    def test_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.scores.split("test") is not None:
            self.scores.update("test", self(self.features(batch)), batch.label)

    def _log_split(self, split: str) -> None:
        hp = self.hparams
        over = hp.num_clusters > hp.num_classes
        values = self.scores.summary(split, int(self.selected_head), over, self.head_ids.tolist())
        best = values.pop(f"{split}/hungarian_acc/best", None)
        self.log_dict(values)
        if best is not None:
            self.log(f"{split}/hungarian_acc/best", best, prog_bar=split == "val")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step  # the CLI validates once more when the last step was not
        for split in SPLITS:
            self._log_split(split)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def needs_final_validation(self) -> bool:
        """Whether the metrics on record do not score the model as it is now (no validation since the last step or
        since a head was replaced): the CLI validates once more after fitting."""
        return self.validated_at_step != self.global_step

    def replace_head(self, head: int, weight: Tensor, bias: Tensor) -> None:
        """Replace the weights of linear head ``head`` (a position among the live heads) by logits ``x @ weight.T +
        bias`` (a second stage such as ``SelfLabel``); the last validation no longer scores it."""
        set_linear_head(self.heads, head, weight, bias)
        self.validated_at_step = None

    def last_scores(self, split: str) -> tuple[Tensor, Tensor] | None:
        """(confusion (K, C), cluster sizes (K,)) of the selected head at the last scoring of ``split``, or None."""
        if split not in self.scores.last_confusion:
            return None
        return self.scores.last_confusion[split], self.scores.last_cluster_sizes[split]

    def selected(self, features: Tensor) -> Tensor:
        """(N, K) logits of the selected head."""
        return self(features)[:, int(self.selected_head)]

    @torch.no_grad()
    def assign(self, features: Tensor) -> Tensor:
        """(N,) cluster of each feature row under the selected head."""
        return self.selected(features).argmax(-1)

    @torch.no_grad()
    def neighbourhoods(self, batch: ClusteringBatch, n: int) -> tuple[Tensor, Tensor] | None:
        """p and q of the first ``n`` anchors of ``batch`` under the selected head; None for objectives that are
        not one KL (``IConLoss.neighbourhoods``)."""
        if not hasattr(self.loss, "neighbourhoods"):
            return None
        z = self.selected(self.features(batch))
        return self.loss.neighbourhoods(batch.rows(z, self.hparams.with_labels), n)

    def predict_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        z = self.selected(self.features(batch))
        return {"index": batch.index, "cluster": z.argmax(-1), "probs": z.softmax(-1)}
