"""Neighbourhoods defined by identity: same image (augmentations), other modality, same class."""

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


class SameLabel(Supervisory):
    """Uniform over candidates of the anchor's class → SupCon.

    With class prototypes as candidates (candidates.label = arange(C)) this is the one-hot target of
    cross-entropy.
    """

    def forward(self, anchors: Rows, candidates: Rows, valid: Tensor | None) -> Tensor:
        label_a, label_c = _require("label", anchors, "anchors"), _require("label", candidates, "candidates")
        same = label_a.unsqueeze(1) == label_c.unsqueeze(0)
        return normalize_rows(same.to(target_dtype(anchors)), valid)

    def sparse(self, anchors: Rows, candidates: Rows, self_col: Tensor) -> SparseTarget:
        label_a, label_c = _require("label", anchors, "anchors"), _require("label", candidates, "candidates")
        return same_key_target(label_a, label_c, self_col, target_dtype(anchors))
