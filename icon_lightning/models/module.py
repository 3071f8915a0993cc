"""`IConModule`: frozen backbone → H cluster heads → the I-Con objective, with label-free head selection."""

from __future__ import annotations

from dataclasses import fields

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.loss import Objective
from icon_lightning.metrics import ClusteringMetrics
from icon_lightning.models.backbones import FrozenBackbone
from icon_lightning.models.distributed import gather, world
from icon_lightning.models.heads import ClusterHeads

SPLITS = ("val", "train")  # validation dataloader 0 scores the val split, 1 (when present) the train split


class IConModule(L.LightningModule):
    """Trains H linear cluster heads (or a projection) on frozen features with an injected I-Con objective.

    loss: the objective of a recipe (``configs/recipes``), e.g. ``IConLoss(p, q)``.
    backbone: frozen extractor for batches of images (``views: online``); None on cached features.
    feature_dim, num_clusters, num_classes, num_samples: linked from the DataModule by the CLI.
    num_heads, head_temperature, projection_dim: see ``ClusterHeads``.
    optimizer: Adam at lr 1e-3 by default; the LR is multiplied by ``lr_gamma`` every ``lr_step_size``
        epochs (the paper: halved every 10 of 30 epochs).
    ema_momentum: keep an EMA teacher of the heads (a registered module: it moves devices and is
        checkpointed); teacher_candidates: the teacher's outputs form the candidate side of q.
    with_labels: hand labels to p (SupCon, cross-entropy). Unsupervised recipes never see them.
    Head selection is label-free: the head with the lowest mean training loss over the last epoch.
    """

    def __init__(
        self,
        loss: Objective,
        feature_dim: int = 0,
        num_clusters: int = 10,
        num_classes: int = 0,
        num_samples: int = 0,
        num_heads: int = 1,
        head_temperature: float = 1.0,
        projection_dim: int | None = None,
        backbone: FrozenBackbone | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_step_size: int = 10,
        lr_gamma: float = 0.5,
        ema_momentum: float | None = None,
        teacher_candidates: bool = False,
        with_labels: bool = False,
    ) -> None:
        super().__init__()
        # Under `icon` the CLI stores the resolved config here, so load_from_checkpoint rebuilds every part.
        self.save_hyperparameters()
        if teacher_candidates and ema_momentum is None:
            raise ValueError("teacher_candidates: needs an EMA teacher (set ema_momentum, e.g. 0.996)")
        if ema_momentum is not None and not 0.0 < ema_momentum < 1.0:
            raise ValueError(f"ema_momentum: expected a value in (0, 1), got {ema_momentum}")
        self.loss = loss
        self.backbone = backbone
        self.optimizer = optimizer
        self.heads = ClusterHeads(feature_dim, num_clusters, num_heads, head_temperature, projection_dim)
        self.teacher = None
        if ema_momentum is not None:
            self.teacher = AveragedModel(self.heads, multi_avg_fn=get_ema_multi_avg_fn(ema_momentum), use_buffers=True)
        self.register_buffer("head_losses", torch.zeros(num_heads))
        self.register_buffer("selected_head", torch.zeros((), dtype=torch.long))
        self._loss_sum = torch.zeros(num_heads)
        self._cached_target: tuple[tuple[Tensor, ...], Tensor] | None = None
        self._loss_count = 0
        self.metrics = nn.ModuleDict()
        if num_classes > 0 and num_clusters > 0:
            for split in (*SPLITS, "test"):
                self.metrics[f"{split}_split"] = nn.ModuleList(
                    ClusteringMetrics(num_clusters, num_classes) for _ in range(num_heads)
                )
        self.last_cluster_sizes: dict[str, Tensor] = {}
        self.last_confusion: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ forward
    def features(self, batch: ClusteringBatch) -> Tensor:
        x = batch.inputs
        if x.ndim > 2:
            if self.backbone is None:
                raise ValueError("batch.inputs: images need a backbone; pass model.backbone or use cached features")
            x = self.backbone(x)
        return x.float()

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) features → (B, H, K) logits (or (B, 1, D') embeddings)."""
        return self.heads(features)

    # ------------------------------------------------------------------ the objective over the global batch
    def objective(self, batch: ClusteringBatch, z: Tensor, teacher_z: Tensor | None = None) -> Tensor:
        """(H,) loss of each head. Under DDP the candidates are the global batch (gathered with gradients)
        and p is built on the global rows, so cluster sizes, softmax denominators and debiasing use it."""
        rank, size = world()
        local = len(batch)
        offset = rank * local
        if size > 1:
            meta = ClusteringBatch(
                **{
                    f.name: (
                        gather(getattr(batch, f.name))
                        if f.name != "inputs" or batch.inputs.ndim == 2
                        else batch.inputs[:0].new_zeros((local * size, 0))
                    )
                    for f in fields(batch)
                }
            )
            candidates_z = gather(z, with_grad=True)
        else:
            meta, candidates_z = batch, z
        if teacher_z is not None:
            candidates_z = gather(teacher_z.detach())
        with_labels = self.hparams.with_labels
        p = None
        if getattr(self.loss, "shares_target", False):  # one p for all heads (I-Con, SCAN, TEMI): rows only, not z
            p = self._target(meta, candidates_z[:, 0], with_labels)
            p = p.row_slice(offset, offset + local) if isinstance(p, SparseTarget) else p[offset : offset + local]
        anchors = batch.rows(z[:, 0], with_labels)
        candidates = anchors if meta is batch and candidates_z is z else meta.rows(candidates_z[:, 0], with_labels)
        # unbind, not z[:, h]: its backward is one stack, where H selects would each build a zero (B, H, K) grad
        heads = z.unbind(1)
        outs = self.loss.forward_heads(
            [anchors.with_z(zh) for zh in heads],
            [candidates.with_z(zh) for zh in (heads if candidates_z is z else candidates_z.unbind(1))],
            p=p,
            self_offset=offset,
        )
        return torch.stack([out.loss for out in outs])

    def _target(self, meta: ClusteringBatch, z: Tensor, with_labels: bool) -> Tensor:
        """p of the global batch. p depends on the rows (indices, views, input features), never on z, so in
        full-batch training on cached features (every step sees the whole dataset) a batch identical to the
        previous one reuses its p. Mini-batches keep nothing."""
        full = 0 < self.hparams.num_samples <= len(meta) and meta.inputs.ndim == 2
        key = (meta.index, meta.view, meta.inputs) if full else None
        cached = self._cached_target
        if key is not None and cached is not None and all(_same(a, b) for a, b in zip(key, cached[0])):
            return cached[1]
        p = self.loss.target(meta.rows(z, with_labels))
        self._cached_target = None if key is None else (key, p)
        return p

    def training_step(self, batch: ClusteringBatch, batch_idx: int) -> Tensor:
        feats = self.features(batch)
        z = self(feats)
        teacher_z = self.teacher(feats) if self.hparams.teacher_candidates else None
        losses = self.objective(batch, z, teacher_z)
        self._loss_sum = self._loss_sum.to(losses.device) + losses.detach()
        self._loss_count += 1
        self.log("train/loss", losses.mean(), prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch))
        for h, value in enumerate(losses):
            self.log(f"train/loss/head_{h}", value, on_step=False, on_epoch=True, batch_size=len(batch))
        return losses.sum()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.teacher is not None:
            self.teacher.update_parameters(self.heads)

    def on_train_epoch_end(self) -> None:
        if self._loss_count:
            mean = self._loss_sum / self._loss_count
            mean = self.all_gather(mean).reshape(-1, len(mean)).mean(0) if self.trainer.world_size > 1 else mean
            self.head_losses.copy_(mean)
            self.selected_head.fill_(int(mean.argmin()))
        self._loss_sum = torch.zeros_like(self._loss_sum)
        self._loss_count = 0

    # ------------------------------------------------------------------ evaluation
    def split_metrics(self, split: str) -> nn.ModuleList | None:
        """One ClusteringMetrics per head for ``split`` (None when the data have no labels)."""
        key = f"{split}_split"  # ModuleDict keys may not shadow nn.Module attributes such as `train`
        return self.metrics[key] if key in self.metrics else None

    def _evaluate(self, split: str, batch: ClusteringBatch) -> None:
        metrics = self.split_metrics(split)
        if metrics is None:
            return
        z = self(self.features(batch))
        for h, metric in enumerate(metrics):
            metric.update(z[:, h].argmax(-1), batch.label)

    def validation_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(SPLITS[dataloader_idx], batch)

    def test_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch)

    def _log_split(self, split: str) -> None:
        metrics = self.split_metrics(split)
        if metrics is None or not metrics[0].update_called:
            return
        best = int(self.selected_head)
        for h, metric in enumerate(metrics):
            values = metric.compute()  # counts are already summed over processes
            for name in ("hungarian_acc", "nmi", "ari", "ami"):
                self.log(f"{split}/{name}/head_{h}", values[name])
            if h == best:
                self.log(f"{split}/hungarian_acc/best", values["hungarian_acc"], prog_bar=split == "val")
                for name in ("nmi", "ari", "ami"):
                    self.log(f"{split}/{name}", values[name])
                if self.hparams.num_clusters > self.hparams.num_classes:
                    self.log(f"{split}/over_clustering_acc", values["over_clustering_acc"])
                self.last_cluster_sizes[split] = metric.cluster_sizes().detach().cpu()
                self.last_confusion[split] = metric.confusion.detach().cpu().clone()
            metric.reset()
        self.log(f"{split}/selected_head", float(best))

    def on_validation_epoch_end(self) -> None:
        for split in SPLITS:
            self._log_split(split)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def predict_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        z = self(self.features(batch))[:, int(self.selected_head)]
        return {"index": batch.index, "cluster": z.argmax(-1), "probs": z.softmax(-1)}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = self.optimizer(self.heads.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.hparams.lr_step_size, self.hparams.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)
