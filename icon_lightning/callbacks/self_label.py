"""`SelfLabel`: a second, label-free stage after the I-Con fit: pseudo-labels → a classifier → the selected head.

1. Pseudo-labels on the clean train features: the selected head's clusters, or (``consensus``, ICCE style) the
   mean of every head's probabilities after each head's clusters are matched to the selected head's (Hungarian
   matching of their co-occurrence counts, ``scipy.optimize.linear_sum_assignment``).
2. Confident and class-balanced: from each cluster, its ``fraction`` × N / K most confident members (all of them
   when it has fewer), so no cluster dominates the classifier.
3. A multinomial logistic regression (scikit-learn, L2 strength ``C``) on those items; its weights become the
   selected head (linear heads), which then predicts, validates and is checkpointed as usual.

No label is read: the stage uses only the features and the heads. The fraction and C are fixed defaults (SCAN keeps
confident samples by a threshold on augmented images; on frozen features the most confident half is used).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from scipy.optimize import linear_sum_assignment

from icon_lightning.settings import PositiveFloat, PositiveInt, UnitFraction, check_arguments


def align_to(reference: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
    """perm with perm[c] = the reference cluster that ``other``'s cluster c overlaps most (one-to-one)."""
    counts = np.zeros((k, k))
    np.add.at(counts, (other, reference), 1)
    rows, cols = linear_sum_assignment(-counts)
    perm = np.empty(k, dtype=np.int64)
    perm[rows] = cols
    return perm


def consensus_probabilities(probs: np.ndarray, reference: int) -> np.ndarray:
    """(H, N, K) head probabilities → (N, K) mean after matching every head's clusters to head ``reference``."""
    _, _, k = probs.shape
    ref = probs[reference].argmax(1)
    out = np.zeros_like(probs[reference])
    for head in probs:
        perm = align_to(ref, head.argmax(1), k)
        aligned = np.zeros_like(head)
        aligned[:, perm] = head  # other cluster c → reference cluster perm[c]
        out += aligned
    return out / len(probs)


def confident_balanced(probs: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and pseudo-labels: each cluster's ``fraction`` × N / K most confident members (ties by index)."""
    n, k = probs.shape
    label, confidence = probs.argmax(1), probs.max(1)
    per_cluster = max(1, int(fraction * n / k))
    keep = []
    for c in range(k):
        members = np.flatnonzero(label == c)
        order = np.argsort(-confidence[members], kind="stable")
        keep.append(members[order[:per_cluster]])
    index = np.sort(np.concatenate(keep))
    return index, label[index]


class SelfLabel(Callback):
    """After fit: confident, class-balanced pseudo-labels (optionally a consensus of heads) train a logistic
    regression that replaces the selected head (module doc)."""

    def __init__(
        self, fraction: UnitFraction = 0.5, consensus: bool = True, C: PositiveFloat = 1.0, max_iter: PositiveInt = 1000
    ) -> None:
        check_arguments(SelfLabel.__init__, locals())
        self.fraction, self.consensus, self.C, self.max_iter = float(fraction), consensus, float(C), max_iter
        self.summary: dict = {}

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.hparams.get("head_hidden_dim") is not None:
            raise ValueError("SelfLabel: the classifier replaces a linear head; MLP heads (head_hidden_dim) have none")
        features = getattr(trainer.datamodule, "train_features", None)
        if features is None:
            raise ValueError("SelfLabel: needs a DataModule with train_features (ClusteringDataModule)")
        x = features.float().to(pl_module.device)
        best = pl_module.selected_head  # a head's number
        position = pl_module.live_head_ids().index(best)
        probs = pl_module(x).softmax(-1).transpose(0, 1).double().cpu().numpy()  # (h, N, K): the live heads
        chosen = consensus_probabilities(probs, position) if self.consensus else probs[position]
        index, label = confident_balanced(chosen, self.fraction)
        pl_module.replace_head(best, *self.fit_head(pl_module.hparams.num_clusters, x.cpu().numpy()[index], label))
        moved = float((pl_module.assign(x).cpu().numpy() != probs[position].argmax(1)).mean())
        self.summary = {"pseudo_labelled": len(index), "consensus": self.consensus, "changed_assignments": moved}
        rank_zero_info(
            f"self-labelling: {len(index)} confident, class-balanced pseudo-labels"
            f"{' (consensus of heads)' if self.consensus else ''}; {moved:.1%} of the assignments changed"
        )

    def fit_head(self, k: int, x: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, D) weight and (K,) bias of a logistic regression on the pseudo-labels, as logits of K clusters."""
        from sklearn.linear_model import LogisticRegression

        classifier = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(x, label)
        weight = np.zeros((k, x.shape[1]))
        bias = np.full(k, -1e4)  # a cluster left without pseudo-labels is never predicted
        weight[classifier.classes_] = classifier.coef_ if len(classifier.classes_) > 2 else 0.0
        bias[classifier.classes_] = classifier.intercept_ if len(classifier.classes_) > 2 else 0.0
        if len(classifier.classes_) == 2:  # scikit-learn's binary form: one row for the second class
            weight[classifier.classes_[1]], bias[classifier.classes_[1]] = classifier.coef_[0], classifier.intercept_[0]
        return torch.from_numpy(weight), torch.from_numpy(bias)
