"""The parts `IConModule` delegates to, each small and tested on its own: the clusterings heads start from, the
shared target p of the global batch, each head's loss over it, and per-split scores (the heads themselves and
their bookkeeping: ``bank.HeadBank``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.distributed import world
from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.loss import Objective
from icon_lightning.metrics import ClusteringMetrics


# ---------------------------------------------------------------------- heads started from clusterings
def _kmeans(x, k: int, seed: int):
    from icon_lightning.classical import FaissKMeans

    return FaissKMeans(k, n_init=10, random_state=seed).fit(x).labels_


# rows above which the spectral start solves its eigenproblem with LOBPCG: on CIFAR-10 test's 10,000 Lite0 rows
# ARPACK's shift-invert took 34.9 s, LOBPCG 2.5 s, the partitions agreeing to ARI 0.984; on digits' 1,797 rows
# both take 0.1 s and agree exactly (one thread, 2026-12-07)
SPECTRAL_LOBPCG_ROWS = 2_000


def _spectral(x, k: int, seed: int):
    from icon_lightning.classical import KNNSpectralClustering

    solver = "lobpcg" if len(x) > SPECTRAL_LOBPCG_ROWS else None
    return KNNSpectralClustering(k, 10, eigen_solver=solver, random_state=seed).fit(x).labels_


HEAD_INITS: dict[str, Callable] = {"kmeans": _kmeans, "spectral": _spectral}


# ---------------------------------------------------------------------- the shared target p
class TargetCache:
    """p of the global batch for an objective whose p is shared by its heads.

    A p that reads only the rows' dataset facts is built once a step from head 0's rows, and in full-batch
    training on cached features (``reuse``: every step sees the same rows) kept while the rows stay the same.
    A p that reads the model's output (``Objective.target_reads_output``) is built every step for every head,
    from that head's output (``source`` z, (R, H, K): the EMA teacher's, or the detached student's)."""

    def __init__(self) -> None:
        self.key: tuple[Tensor, ...] | None = None
        self.p: Tensor | SparseTarget | None = None

    def shared(self, loss: Objective, rows, reuse: bool, key: tuple[Tensor, ...]) -> Tensor | SparseTarget:
        if reuse and self.key is not None and all(_same(a, b) for a, b in zip(key, self.key)):
            return self.p
        p = loss.target(rows)
        self.key, self.p = (key, p) if reuse else (None, None)
        return p

    @staticmethod
    def per_head(loss: Objective, meta: ClusteringBatch, source: Tensor, with_labels: bool) -> list:
        return [loss.target(meta.rows(zh.detach(), with_labels)) for zh in source.unbind(1)]


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)


def global_batch(batch: ClusteringBatch, gather: Callable[[Tensor], Tensor]) -> ClusteringBatch:
    """The rows of every process, each field gathered in rank order (image inputs stay local: p never reads
    pixels, so they travel as (R, 0))."""
    inputs = batch.inputs if batch.inputs.ndim == 2 else batch.inputs[:0].new_zeros((len(batch), 0))
    parts = {f.name: getattr(batch, f.name) for f in fields(batch)} | {"inputs": inputs}
    return ClusteringBatch(**{name: gather(value) for name, value in parts.items()})


def local_rows(p: Tensor | SparseTarget, start: int, stop: int) -> Tensor | SparseTarget:
    """Anchor rows [start, stop) of a global-batch p."""
    return p.row_slice(start, stop) if isinstance(p, SparseTarget) else p[start:stop]


@dataclass(frozen=True)
class GlobalRows:
    """This process's rows (the anchors) inside the global batch ``meta`` (the candidates), from row ``offset``."""

    batch: ClusteringBatch
    meta: ClusteringBatch
    offset: int
    with_labels: bool

    def head_losses(
        self, loss: Objective, targets: TargetCache, z: Tensor, candidates_z: Tensor, p_source: Tensor, reuse: bool
    ) -> Tensor:
        """(H,) loss of each head: anchors ``z`` (B, H, K) of this process against ``candidates_z`` (M, H, K). p is
        shared by the heads (cached by ``targets`` when ``reuse``), or, when it reads the model's output, built for
        head h from ``p_source[:, h]`` (the teacher's output, or the student's)."""
        anchors = self.batch.rows(z[:, 0], self.with_labels)
        square = candidates_z is z  # one process, no teacher: the anchors are the candidates
        candidates = anchors if square else self.meta.rows(candidates_z[:, 0], self.with_labels)
        heads = z.unbind(1)  # unbind, not z[:, h]: its backward is one stack, not H zero (B, H, K) grads
        anchor_rows = [anchors.with_z(zh) for zh in heads]
        candidate_rows = [candidates.with_z(c) for c in (heads if square else candidates_z.unbind(1))]
        local = (self.offset, self.offset + len(self.batch))
        if loss.target_reads_output:
            ps = TargetCache.per_head(loss, self.meta, p_source, self.with_labels)
            outs = [
                loss.forward_heads([a], [c], local_rows(p, *local), self.offset, h)[0]
                for h, (a, c, p) in enumerate(zip(anchor_rows, candidate_rows, ps))
            ]
        else:  # one p for every head (built on the rows, never their z), or none for objectives without one
            key, p = (self.meta.index, self.meta.view, self.meta.inputs), None
            if loss.shares_target:
                p = targets.shared(loss, self.meta.rows(candidates_z[:, 0], self.with_labels), reuse, key)
            outs = loss.forward_heads(
                anchor_rows, candidate_rows, None if p is None else local_rows(p, *local), self.offset
            )
        return torch.stack([out.loss for out in outs])


# ---------------------------------------------------------------------- each head's loss over the global batch
def global_head_losses(
    loss: Objective,
    targets: TargetCache,
    batch: ClusteringBatch,
    z: Tensor,
    teacher_z: Tensor | None,
    all_gather: Callable,
    teacher_candidates: bool,
    num_samples: int,
    with_labels: bool,
) -> Tensor:
    """(H,) loss of each head. Under DDP the candidates are the global batch (``all_gather``, with gradients for
    z) and p is built on the global rows, so cluster sizes, softmax denominators and debiasing use it.
    teacher_z: the EMA teacher's output of these rows: the candidates' z with ``teacher_candidates``, and what a
    p that reads the model's output reads. A full batch of feature rows (``num_samples`` of them) reuses p."""
    rank, size = world()

    def gather(x: Tensor, sync_grads: bool = False) -> Tensor:
        return x if size == 1 else all_gather(x, sync_grads=sync_grads).flatten(0, 1)

    meta = batch if size == 1 else global_batch(batch, gather)
    gathered = gather(z, sync_grads=True)
    teacher = None if teacher_z is None else gather(teacher_z.detach())
    candidates_z = teacher if teacher_candidates and teacher is not None else gathered
    reuse = 0 < num_samples <= len(meta) and meta.inputs.ndim == 2
    rows = GlobalRows(batch, meta, rank * len(batch), with_labels)
    return rows.head_losses(loss, targets, z, candidates_z, gathered if teacher is None else teacher, reuse)


# ---------------------------------------------------------------------- scores per split and head
class SplitScores(nn.ModuleDict):
    """One ``ClusteringMetrics`` per head for each split (none without labels); ``summary`` turns a split's
    counts into the values to log, reporting the selected head's also without the head suffix."""

    def __init__(self, splits: Sequence[str], num_heads: int, num_clusters: int, num_classes: int) -> None:
        super().__init__()
        if num_classes > 0 and num_clusters > 0:
            for split in splits:  # keys may not shadow nn.Module attributes such as `train`
                self[f"{split}_split"] = nn.ModuleList(
                    ClusteringMetrics(num_clusters, num_classes) for _ in range(num_heads)
                )
        self.last_cluster_sizes: dict[str, Tensor] = {}
        self.last_confusion: dict[str, Tensor] = {}

    def split(self, split: str) -> nn.ModuleList | None:
        return self[f"{split}_split"] if f"{split}_split" in self else None

    def update(self, split: str, z: Tensor, label: Tensor, heads: Sequence[int]) -> None:
        """Counts the (B, h, K) logits ``z`` of the heads numbered ``heads`` against ``label``."""
        metrics = self.split(split) or []
        for position, h in enumerate(heads if metrics else []):
            metrics[h].update(z[:, position].argmax(-1), label)

    def summary(self, split: str, best: int, over_clustering: bool, heads: Sequence[int]) -> dict:
        """The values to log of the heads numbered ``heads`` (``head_{h}``); ``best``: the selected head's number."""
        metrics = self.split(split)
        if metrics is None or not any(metrics[h].update_called for h in heads):
            return {}
        out = {f"{split}/selected_head": torch.tensor(float(best))}
        for h in heads:
            metric = metrics[h]
            values = metric.compute()  # counts are already summed over processes
            names = ("hungarian_acc", "nmi", "ari", "ami")
            out.update({f"{split}/{name}/head_{h}": values[name] for name in names})
            if h == best:
                out.update({f"{split}/{name}": values[name] for name in ("nmi", "ari", "ami")})
                out[f"{split}/hungarian_acc/best"] = values["hungarian_acc"]
                if over_clustering:
                    out[f"{split}/over_clustering_acc"] = values["over_clustering_acc"]
                self.last_cluster_sizes[split] = metric.cluster_sizes().detach().cpu()
                self.last_confusion[split] = metric.confusion.detach().cpu().clone()
            metric.reset()
        return out
