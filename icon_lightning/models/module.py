"""`IConModule`: frozen backbone → H cluster heads → the I-Con objective, with label-free head selection."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from icon_lightning.data.backbones import FrozenBackbone
from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.distributed import gather, world
from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.loss import Objective
from icon_lightning.metrics import ClusteringMetrics
from icon_lightning.models.heads import ClusterHeads

SPLITS = ("val", "train")  # validation dataloader 0 scores the val split, 1 (when present) the train split


class IConModule(L.LightningModule):
    """Trains H linear cluster heads (or a projection) on frozen features with an injected I-Con objective.

    loss: the objective of a recipe (``configs/recipes``), e.g. ``IConLoss(p, q)``.
    backbone: frozen extractor for batches of images (``views: online``); None on cached features.
    feature_dim, num_clusters, num_classes, num_samples: linked from the DataModule by the CLI.
    num_heads, head_temperature, projection_dim, head_hidden_dim: see ``ClusterHeads`` (hidden: MLP heads).
    head_init: None → ``["kmeans"]`` for linear cluster heads, none otherwise. How the first heads start, one
        entry a head: ``kmeans`` (k-means of the clean train features,
        a different seed each) or ``spectral`` (spectral clustering of their 10-NN graph), as the
        nearest-centroid rule of that partition; the other heads start at random. The training loss picks the
        head (label-free), so a started head is kept only when the objective prefers it. Linear heads only.
    optimizer: None → Adam at lr 1e-2. lr_step_size: None → no fixed schedule (the ``Convergence`` callback
        halves the LR on plateaus); an integer multiplies the LR by ``lr_gamma`` every ``lr_step_size``
        optimizer steps, or epochs with ``lr_interval='epoch'`` (the paper: halved every 10 of 30 epochs).
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
        num_heads: int = 10,
        head_temperature: float = 1.0,
        projection_dim: int | None = None,
        head_hidden_dim: int | None = None,
        head_init: list[Literal["kmeans", "spectral"]] | None = None,
        backbone: FrozenBackbone | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_step_size: int | None = None,
        lr_gamma: float = 0.5,
        lr_interval: Literal["step", "epoch"] = "step",
        ema_momentum: float | None = None,
        teacher_candidates: bool = False,
        with_labels: bool = False,
    ) -> None:
        super().__init__()
        if num_clusters < 1:  # a projection for representation learning is one output, whatever num_heads says
            num_heads = 1
        linear = head_hidden_dim is None and projection_dim is None and num_clusters >= 1
        head_init = (["kmeans"] if linear else []) if head_init is None else list(head_init)
        # Under `icon` the CLI stores the resolved config here, so load_from_checkpoint rebuilds every part.
        self.save_hyperparameters()
        if teacher_candidates and ema_momentum is None:
            raise ValueError("teacher_candidates: needs an EMA teacher (set ema_momentum, e.g. 0.996)")
        if ema_momentum is not None and not 0.0 < ema_momentum < 1.0:
            raise ValueError(f"ema_momentum: expected a value in (0, 1), got {ema_momentum}")
        self.loss = loss
        self.backbone = backbone
        self.optimizer = optimizer
        if len(head_init) > num_heads:
            raise ValueError(f"head_init: {len(head_init)} started heads but num_heads is {num_heads}")
        unknown = sorted(set(head_init) - set(HEAD_INITS))
        if unknown:
            raise ValueError(f"head_init: unknown {unknown}; expected entries of {list(HEAD_INITS)}")
        if lr_step_size is not None and lr_step_size < 1:
            raise ValueError(f"lr_step_size: expected None or ≥ 1, got {lr_step_size}")
        if lr_interval not in ("step", "epoch"):
            raise ValueError(f"lr_interval: expected 'step' or 'epoch', got {lr_interval!r}")
        self.head_init = head_init
        self.heads = ClusterHeads(
            feature_dim, num_clusters, num_heads, head_temperature, projection_dim, hidden_dim=head_hidden_dim
        )
        if head_init and not self.heads.is_linear or head_init and projection_dim is not None:
            raise ValueError("head_init: heads started from a clustering must be linear heads on the features")
        self.teacher = None
        if ema_momentum is not None:
            self.teacher = AveragedModel(self.heads, multi_avg_fn=get_ema_multi_avg_fn(ema_momentum), use_buffers=True)
        self.register_buffer("head_losses", torch.zeros(num_heads))
        self.register_buffer("selected_head", torch.zeros((), dtype=torch.long))
        self.register_buffer("heads_started", torch.zeros((), dtype=torch.bool))  # head_init ran (checkpointed)
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

    # ------------------------------------------------------------------ heads started from clusterings
    def setup(self, stage: str) -> None:
        """Start the ``head_init`` heads from clusterings of the DataModule's clean train features, once (a
        resumed run restores the trained weights afterwards; a second fit keeps them)."""
        if stage != "fit" or not self.head_init or bool(self.heads_started):
            return
        features = getattr(getattr(self.trainer, "datamodule", None), "train_features", None)
        if features is None:
            raise ValueError(
                "head_init: needs a DataModule with train_features (ClusteringDataModule); set head_init: []"
            )
        self.start_heads(features)

    @torch.no_grad()
    def start_heads(self, features: Tensor) -> None:
        x = features.detach().float().cpu()
        base = int(torch.randint(0, 2**31 - 1, ()).item())  # follows seed_everything
        for head, method in enumerate(self.head_init):
            assignment = HEAD_INITS[method](x.numpy(), self.hparams.num_clusters, base + head)
            self.heads.init_from_partition(head, x, torch.as_tensor(assignment))
        if self.teacher is not None:  # the EMA teacher starts where the heads start
            self.teacher.module.load_state_dict(self.heads.state_dict())
        self.heads_started.fill_(True)

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
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step  # the CLI validates once more when the last step was not
        for split in SPLITS:
            self._log_split(split)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def predict_step(self, batch: ClusteringBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        z = self(self.features(batch))[:, int(self.selected_head)]
        return {"index": batch.index, "cluster": z.argmax(-1), "probs": z.softmax(-1)}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = self.heads.parameters()
        optimizer = self.optimizer(params) if self.optimizer is not None else torch.optim.Adam(params, lr=DEFAULT_LR)
        if self.hparams.lr_step_size is None:
            return {"optimizer": optimizer}
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.hparams.lr_step_size, self.hparams.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.lr_interval}}


def _kmeans(x, k: int, seed: int):
    from icon_lightning.classical import FaissKMeans

    return FaissKMeans(k, n_init=10, random_state=seed).fit(x).labels_


def _spectral(x, k: int, seed: int):
    from icon_lightning.classical import KNNSpectralClustering

    return (
        KNNSpectralClustering(k, 10, eigen_solver="lobpcg" if len(x) > 20_000 else None, random_state=seed)
        .fit(x)
        .labels_
    )


HEAD_INITS = {"kmeans": _kmeans, "spectral": _spectral}
DEFAULT_LR = 1e-2


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)
