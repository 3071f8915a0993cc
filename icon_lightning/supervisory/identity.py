"""Neighbourhoods defined by identity: same image (augmentations), other modality, same class, same cluster."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from icon_lightning.functional import normalize_rows
from icon_lightning.functional.sparse import SparseTarget, match_pairs, normalized_target, unique_valid_pairs
from icon_lightning.rows import Rows
from icon_lightning.supervisory.base import Supervisory, target_dtype


def _require(name: str, rows: Rows, side: str):
    value = getattr(rows, name)
    if value is None:
        raise ValueError(f"{side}.{name}: required by this supervisory distribution but missing")
    return value


def same_key_target(
    anchor_key: Tensor,
    candidate_key: Tensor,
    self_col: Tensor,
    dtype: torch.dtype,
    keep: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> SparseTarget:
    """Uniform over the valid candidates whose key equals the anchor's, found by sorting (no (B, M) compare).

    keep: optional filter of the matched pairs: (rows, cols) → (pairs,) bool."""
    rows, cols = match_pairs(torch.arange(len(anchor_key), device=anchor_key.device), anchor_key, candidate_key)
    if keep is not None:
        mask = keep(rows, cols)
        rows, cols = rows[mask], cols[mask]
    rows, cols, weights = unique_valid_pairs(rows, cols, self_col, len(candidate_key))
    return normalized_target(rows, cols, weights, self_col, len(candidate_key), dtype)


class Augmentation(Supervisory):
    """Uniform over the other views of the same dataset item → InfoNCE / SimCLR (2B anchors × 2B−1)."""

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        same = anchors.index.unsqueeze(1) == candidates.index.unsqueeze(0)
        return normalize_rows(same.to(target_dtype(anchors)), valid)

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget:
        return same_key_target(anchors.index, candidates.index, self_col, target_dtype(anchors))


class CrossView(Supervisory):
    """Positives only where the item is the same and the view / modality differs → CMC, CLIP."""

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        view_a, view_c = _require("view", anchors, "anchors"), _require("view", candidates, "candidates")
        same = anchors.index.unsqueeze(1) == candidates.index.unsqueeze(0)
        other = view_a.unsqueeze(1) != view_c.unsqueeze(0)
        return normalize_rows((same & other).to(target_dtype(anchors)), valid)

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget:
        view_a, view_c = _require("view", anchors, "anchors"), _require("view", candidates, "candidates")
        return same_key_target(
            anchors.index, candidates.index, self_col, target_dtype(anchors), lambda r, c: view_a[r] != view_c[c]
        )


class SameKey(Supervisory):
    """Uniform over the valid candidates whose ``key`` equals the anchor's; subclasses say what the key is."""

    def key(self, rows: Rows, side: str) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        same = self.key(anchors, "anchors").unsqueeze(1) == self.key(candidates, "candidates").unsqueeze(0)
        return normalize_rows(same.to(target_dtype(anchors)), valid)

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget:
        return same_key_target(
            self.key(anchors, "anchors"), self.key(candidates, "candidates"), self_col, target_dtype(anchors)
        )


class SameLabel(SameKey):
    """Uniform over candidates of the anchor's class → SupCon.

    With class prototypes as candidates (candidates.label = arange(C)) this is the one-hot target of
    cross-entropy.
    """

    def key(self, rows: Rows, side: str) -> Tensor:
        return _require("label", rows, side)


class SameCluster(SameKey):
    """Uniform over the valid candidates the rows' z puts in the anchor's cluster (argmax): pseudo-labels.

    The rows' z is the model's output, or its EMA teacher's when the module has one
    (``IConModule(ema_momentum=…)``): p = "same cluster as the teacher says". It reads z (``reads_z``), so the
    module rebuilds it from the current output every step and for every head.
    """

    reads_z = True

    def key(self, rows: Rows, side: str) -> Tensor:
        return rows.z.argmax(-1)
