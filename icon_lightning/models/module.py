"""`IConModule`: frozen backbone → H cluster heads → the I-Con objective, with label-free head selection."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters  # the CLI's config, when given
from torch import Tensor

from icon_lightning.data.backbones import FrozenBackbone
from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.data.prepared import check_checkpoint
from icon_lightning.loss import Objective
from icon_lightning.models.evaluation import ClusterEvaluation
from icon_lightning.models.heads import ClusterHeads, set_linear_head
from icon_lightning.models.parts import (
    EndOfStep,
    HeadPruning,
    HeadSelection,
    TargetCache,
    check_head_init,
    ema_teacher,
    global_head_losses,
    heads_of_state,
    register_head_state,
    start_heads,
)
from icon_lightning.settings import OpenUnitInterval, PositiveFloat, PositiveInt, check_arguments
from icon_lightning.supervisory.graph import table_width

DEFAULT_LR = 1e-2
DEFAULT_KEEP_HEADS = 1  # heads left by pruning: the run reports one head, and each survivor costs a head's price
DEFAULT_PRUNE_EVERY = 10  # optimizer steps between prunings: 10 heads pay their price for 40 steps (10→5→3→2→1)


class IConModule(ClusterEvaluation):
    """Trains H linear cluster heads (or a projection) on frozen features with an injected I-Con objective.

    loss: the objective of a recipe (``configs/recipes``), e.g. ``IConLoss(p, q)``.
    backbone: frozen extractor for batches of images (``views: online``); None on cached features.
    feature_dim, num_clusters, num_classes, num_samples: linked from the DataModule by the CLI.
    num_heads, head_temperature, projection_dim, head_hidden_dim: see ``ClusterHeads`` (hidden: MLP heads).
    head_init: None → ``["kmeans"]`` for linear cluster heads, none otherwise. How the first heads start, one
        entry a head: ``kmeans`` (k-means of the clean train features, a different seed each) or ``spectral``
        (spectral clustering of their 10-NN graph), as the nearest-centroid rule of that partition; the other
        heads start at random. The training loss picks the head (label-free), so a started head is kept only
        when the objective prefers it. Linear heads only.
    optimizer: None → Adam at lr 1e-2. scheduler: None → no fixed schedule (the ``Convergence`` callback halves
        the LR on plateaus); any ``LRSchedulerCallable``, stepped every optimizer step or, with
        ``scheduler_interval: epoch``, every epoch (the ImageNet preset: the paper's StepLR, halved every 10 of
        30 epochs).
    ema_momentum: keep an EMA teacher of the heads; teacher_candidates: the teacher's outputs form the
        candidate side of q. A p that reads the model's output (``Supervisory.reads_output``) reads the
        teacher's when there is one, else the student's (detached), head by head, rebuilt every step.
    with_labels: hand labels to p (SupCon, cross-entropy). Unsupervised recipes never see them.
    keep_heads / prune_every: label-free successive halving (``HeadPruning``): every ``prune_every`` optimizer
        steps the worse half of the heads by mean training loss since the last pruning leaves the computation (its
        parameters, optimizer state and scores), until ``keep_heads`` remain; None keeps every head to the end.
        Heads keep their numbers (``head_ids``) in logs and records.
    Head selection is label-free: the head with the lowest mean training loss over the last epoch.
    """

    def __init__(
        self,
        loss: Objective,
        feature_dim: int = 0,
        num_clusters: int = 10,
        num_classes: int = 0,
        num_samples: int = 0,
        num_heads: PositiveInt = 10,
        head_temperature: PositiveFloat = 1.0,
        projection_dim: PositiveInt | None = None,
        head_hidden_dim: PositiveInt | None = None,
        head_init: list[Literal["kmeans", "spectral"]] | None = None,
        backbone: FrozenBackbone | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        ema_momentum: OpenUnitInterval | None = None,
        teacher_candidates: bool = False,
        with_labels: bool = False,
        keep_heads: PositiveInt | None = DEFAULT_KEEP_HEADS,
        prune_every: PositiveInt = DEFAULT_PRUNE_EVERY,
    ) -> None:
        check_arguments(IConModule.__init__, locals())  # the annotations' limits, as `icon` checks them at parse time
        num_heads = num_heads if num_clusters >= 1 else 1  # a projection for representations is one output
        super().__init__(num_heads, num_clusters, num_classes)  # owns ``evaluation``
        # Under `icon` (LightningCLI) the hyper-parameters are the resolved config (the loss and backbone as
        # class_path dicts), so a checkpoint rebuilds the module; built in Python, the loss and backbone are module
        # objects, which the checkpoint's weights already hold: not hyper-parameters (Lightning's advice).
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else ["loss", "backbone"])
        self.loss, self.backbone, self.optimizer, self.scheduler = loss, backbone, optimizer, scheduler
        # the started heads' clustering seed, drawn first (after seed_everything): what data preparation draws from
        # torch's generator (a fresh extraction, a cached one) and the other heads' random weights (their number)
        # cannot change where head h starts
        self.init_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.heads = ClusterHeads(
            feature_dim, num_clusters, num_heads, head_temperature, projection_dim, head_hidden_dim
        )
        linear = self.heads.is_linear and projection_dim is None
        self.head_init = check_head_init((["kmeans"] if linear else []) if head_init is None else head_init, self.heads)
        self.teacher = ema_teacher(self.heads, ema_momentum, teacher_candidates)
        register_head_state(self, num_heads)
        self.selection, self.targets = HeadSelection(num_heads), TargetCache()
        self.pruning = HeadPruning(keep_heads, prune_every)
        self.register_load_state_dict_pre_hook(heads_of_state)  # weights of pruned heads shrink the heads first

    def setup(self, stage: str) -> None:
        """Start the ``head_init`` heads from clusterings of the DataModule's clean train features, once (a
        resumed run restores the trained weights afterwards; a second fit keeps them)."""
        if stage != "fit" or not self.head_init or bool(self.heads_started):
            return
        features = getattr(getattr(self.trainer, "datamodule", None), "train_features", None)
        if features is None:
            raise ValueError("head_init: needs a DataModule with train_features (ClusteringDataModule); set []")
        self.start_heads(features)

    def start_heads(self, features: Tensor) -> None:
        start_heads(self.heads, features, self.head_init, self.init_seed, self.teacher)
        self.heads_started.fill_(True)

    def data_needs(self) -> dict:
        """What the objective needs from the data, for the DataModule to ask: ``knn_width``, the widest k-NN table
        row its p reads (0: none)."""
        return {"knn_width": table_width(self.loss)}

    def features(self, batch: ClusteringBatch) -> Tensor:
        if batch.inputs.ndim > 2 and self.backbone is None:
            raise ValueError("batch.inputs: images need a backbone; pass model.backbone or use cached features")
        return (self.backbone(batch.inputs) if batch.inputs.ndim > 2 else batch.inputs).float()

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) features → (B, H, K) logits (or (B, 1, D') embeddings)."""
        return self.heads(features)

    def selected_position(self) -> int:
        return int(self.selected_head)

    def live_head_ids(self) -> list[int]:
        return self.head_ids.tolist()

    def replace_head(self, head: int, weight: Tensor, bias: Tensor) -> None:
        """Replace the weights of linear head ``head`` (a position among the live heads) by logits ``x @ weight.T +
        bias`` (a second stage such as ``SelfLabel``); the last validation no longer scores it."""
        set_linear_head(self.heads, head, weight, bias)
        self.evaluation.validated_at_step = None

    @torch.no_grad()
    def neighbourhoods(self, batch: ClusteringBatch, n: int) -> tuple[Tensor, Tensor] | None:
        """p and q of the first ``n`` anchors of ``batch`` under the selected head; None for objectives that are
        not one KL (``IConLoss.neighbourhoods``)."""
        if not hasattr(self.loss, "neighbourhoods"):
            return None
        z = self.selected(self.features(batch))
        return self.loss.neighbourhoods(batch.rows(z, self.hparams.with_labels), n)

    # ------------------------------------------------------------------ the objective over the global batch
    def objective(self, batch: ClusteringBatch, z: Tensor, teacher_z: Tensor | None = None) -> Tensor:
        """(H,) loss of each head over the global batch (``parts.global_head_losses``); ``teacher_z``: the EMA
        teacher's output of these rows."""
        hp = self.hparams
        return global_head_losses(
            self.loss, self.targets, batch, z, teacher_z, self.all_gather, hp.teacher_candidates, hp.num_samples,
            hp.with_labels,
        )  # fmt: skip

    def training_step(self, batch: ClusteringBatch, batch_idx: int) -> Tensor:
        feats = self.features(batch)
        z = self(feats)
        wants_teacher = self.hparams.teacher_candidates or self.loss.target_reads_output
        losses = self.objective(batch, z, self.teacher(feats) if self.teacher is not None and wants_teacher else None)
        self.selection.add(losses)
        self.pruning.add(losses)
        self.log("train/loss/live_heads_mean", losses.mean(), on_step=False, on_epoch=True, batch_size=len(batch))
        for h, value in zip(self.head_ids.tolist(), losses):
            self.log(f"train/loss/head_{h}", value, on_step=False, on_epoch=True, batch_size=len(batch))
        return {"loss": losses.sum(), "head_losses": losses.detach()}

    def configure_callbacks(self) -> list[EndOfStep]:
        """The step's bookkeeping (EMA teacher, pruning, the epoch's head losses) runs before its checkpoint."""
        return [EndOfStep()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["head_pruning"] = self.pruning.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The pruning schedule's state (its heads shrink in ``load_state_dict``: ``parts.heads_of_state``); heads of
        another D or K than the data's are one line (``check_checkpoint``)."""
        check_checkpoint(checkpoint, self.hparams.feature_dim, self.hparams.num_clusters, self._trainer)
        self.pruning.load_state_dict(checkpoint.get("head_pruning", {}))

    def on_train_epoch_end(self) -> None:
        """The epoch's head losses and selected head (nothing when ``EndOfStep`` took them at its last step)."""
        mean = self.selection.epoch_mean(self.all_gather if self.trainer.world_size > 1 else None)
        if mean is not None:
            self.head_losses.copy_(mean)
            self.selected_head.fill_(int(mean.argmin()))
            self.log("train/loss", mean.min(), prog_bar=True, on_step=False, on_epoch=True)  # the selected head's

    def configure_optimizers(self):
        params = self.heads.parameters()
        optimizer = self.optimizer(params) if self.optimizer is not None else torch.optim.Adam(params, lr=DEFAULT_LR)
        if self.scheduler is None:
            return {"optimizer": optimizer}
        interval = self.hparams.scheduler_interval
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": interval}}
