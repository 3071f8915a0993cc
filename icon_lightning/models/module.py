"""`IConModule`: frozen backbone → H cluster heads (a ``HeadBank``) → the I-Con objective, with label-free head
pruning and selection."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters  # the CLI's config, when given
from torch import Tensor

from icon_lightning.data.backbones import FrozenBackbone
from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.data.prepared import check_checkpoint
from icon_lightning.loss import Objective
from icon_lightning.models.bank import HeadBank
from icon_lightning.models.evaluation import ClusterEvaluation
from icon_lightning.models.heads import ClusterHeads, set_linear_head
from icon_lightning.models.heads_dino import module_heads
from icon_lightning.models.parts import TargetCache, global_head_losses
from icon_lightning.settings import OpenUnitInterval, PositiveFloat, PositiveInt, check_arguments
from icon_lightning.supervisory.graph import table_width

DEFAULT_LR = 1e-2
# the heads started from clusterings: a start of each kind (k-means suits balanced data, spectral clustering of the
# k-NN graph long tails: issue 32), never pruned, the judge choosing between them and the random heads' survivor
DEFAULT_HEAD_INIT = ("kmeans", "spectral")
DEFAULT_KEEP_HEADS = 1  # heads left by pruning: the run reports one head, and each survivor costs a head's price
DEFAULT_PRUNE_EVERY = 10  # optimizer steps between prunings: the 8 random heads are 1 by step 30 (8→4→2→1)
JUDGE_EVERY = 50  # optimizer steps between the judge's scorings before the last step (``HeadJudge.due``)
OLD_LAYOUT = "head_ids"  # a key of the checkpoints written before the head bank (heads shrunk at each pruning)


class EndOfStep(Callback):
    """A ``HeadBankModule``'s bookkeeping after each training step, before any checkpoint of the step: Lightning
    runs callbacks' ``on_train_batch_end`` before the module's, and checkpoint callbacks after every other callback,
    so bookkeeping in the module's own hook came after ``last.ckpt`` was written."""

    def on_train_batch_end(self, trainer, pl_module, outputs=None, batch=None, batch_idx: int = 0) -> None:
        pl_module.end_of_step(trainer)

    def on_train_end(self, trainer, pl_module) -> None:  # before the checkpoint callbacks' (the final model)
        pl_module.final_selection(trainer)


def attached_trainer(module):
    """``module``'s Trainer, or None (``load_from_checkpoint``: Lightning's ``trainer`` property raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def last_step(trainer) -> bool:
    """Whether the step just taken is training's last (stopped by a callback, or the step budget reached)."""
    return bool(trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step)


def optimizers(params, optimizer: OptimizerCallable | None, scheduler: LRSchedulerCallable | None, interval: str):
    """``configure_optimizers``' answer: ``optimizer`` (None: Adam at ``DEFAULT_LR``) and ``scheduler`` stepped
    every ``interval``."""
    optimizer = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=DEFAULT_LR)
    if scheduler is None:
        return {"optimizer": optimizer}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler(optimizer), "interval": interval}}


def started_heads(heads, head_init: list[str] | None, projection_dim: int | None) -> list[str]:
    """``head_init``, or its default (None): ``DEFAULT_HEAD_INIT`` for linear cluster heads on the features (one head:
    its first entry), no started head otherwise."""
    linear = heads.is_linear and projection_dim is None
    return (list(DEFAULT_HEAD_INIT[: heads.num_heads]) if linear else []) if head_init is None else head_init


class HeadBankModule(ClusterEvaluation):
    """The Lightning hooks of a module whose heads are a ``HeadBank`` (``self.bank``): they feed it each step's
    losses (``record_losses``), run its end-of-step bookkeeping before the step's checkpoint (the EMA teacher,
    pruning, the epoch's losses and selection: ``end_of_step``) and answer the evaluation's questions through it.
    Callbacks and the CLI reach the heads through these methods only."""

    bank: HeadBank

    def forward(self, features: Tensor, heads: list[int] | None = None) -> Tensor:
        """(B, D) features → (B, h, K) logits of the live heads (or those numbered ``heads``; (B, 1, D')
        embeddings for a projection)."""
        return self.bank(features, heads)

    @property
    def heads(self) -> ClusterHeads:
        """The heads' stacks (every head, pruned or not)."""
        return self.bank.heads

    @property
    def selected_head(self) -> int:
        return int(self.bank.selected)

    def live_head_ids(self) -> list[int]:
        return self.bank.live_ids()

    def head_report(self) -> dict:
        """The heads' part of a run's record (``HeadBank.report``): selected head, live heads, losses, pruning."""
        return self.bank.report()

    def replace_head(self, head: int, weight: Tensor, bias: Tensor) -> None:
        """Replace the weights of linear head number ``head`` by logits ``x @ weight.T + bias`` (a second stage
        such as ``SelfLabel``); the last validation no longer scores it."""
        set_linear_head(self.bank.heads, head, weight, bias)
        self.evaluation.validated_at_step = None

    def record_losses(self, losses: Tensor, batch_size: int) -> None:
        """One step's (h,) live head losses: into the bank's running means, and logged per head number."""
        self.bank.add(losses)
        self.log("train/loss/live_heads_mean", losses.mean(), on_step=False, on_epoch=True, batch_size=batch_size)
        for h, value in zip(self.bank.live_ids(), losses):
            self.log(f"train/loss/head_{h}", value, on_step=False, on_epoch=True, batch_size=batch_size)

    def end_of_step(self, trainer) -> None:
        """The EMA teacher's update, the pruning due at this step and, at an epoch's last step or training's, the
        epoch's head losses and selection (``trainer`` None: outside a fit, the first two only)."""
        self.bank.update_teacher()
        gather = self.all_gather if trainer is not None and trainer.world_size > 1 else None
        self.bank.prune(self.global_step, gather)
        if trainer is not None and (trainer.is_last_batch or last_step(trainer)):
            self.close_epoch(last_step(trainer))

    def close_epoch(self, last: bool = False) -> None:
        """The epoch's head losses and selected head (nothing when ``end_of_step`` took them at its last step),
        judged when due (``HeadJudge.due``: at the ``last`` step, else at most every ``JUDGE_EVERY`` steps)."""
        judge_at = self.global_step if self.bank.judged.due(self.global_step, JUDGE_EVERY, last) else None
        mean = self.bank.close_epoch(self.all_gather if self.trainer.world_size > 1 else None, judge_at)
        if mean is not None:  # the selected head's
            self.log("train/loss", mean[self.selected_head], prog_bar=True, on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        self.close_epoch()

    def final_selection(self, trainer) -> None:
        """When training ended at a step the judge has not scored (a time limit, an epoch limit): judge the live
        heads there and select, before the final checkpoint is saved."""
        if self.bank.judged.due(trainer.global_step, JUDGE_EVERY, last=True):
            self.bank.judge_heads(trainer.global_step)
            self.bank.selected.fill_(self.bank.select(self.bank.selection_scores()))

    def configure_callbacks(self) -> list[EndOfStep]:
        return [EndOfStep()]

    def setup(self, stage: str) -> None:
        """Start the bank's ``head_init`` heads from clusterings of the DataModule's clean train features, once (a
        resumed run restores the trained weights afterwards; a second fit keeps them), with seed ``init_seed``."""
        if stage != "fit":
            return
        features = getattr(getattr(self.trainer, "datamodule", None), "train_features", None)
        hp = self.hparams
        if hp.selection == "judge" and hp.num_clusters >= 2 and hp.projection_dim is None:
            self.bank.judged.use(None if features is None else torch.as_tensor(features))
        if not self.bank.head_init or bool(self.bank.started):
            return
        if features is None:
            raise ValueError("head_init: needs a DataModule with train_features (ClusteringDataModule); set []")
        self.bank.start(features, self.init_seed)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of the layout before the head bank (its heads shrunk by pruning), or with heads of another D
        or K than the data's (``check_checkpoint``), is one line."""
        trainer = attached_trainer(self)
        if any(key.endswith(OLD_LAYOUT) for key in checkpoint.get("state_dict", {})):
            ckpt = getattr(trainer, "ckpt_path", None) or "the checkpoint"
            raise ValueError(f"ckpt_path: {ckpt} holds heads of the layout before HeadBank (issue 32); re-fit it")
        check_checkpoint(checkpoint, self.hparams.feature_dim, self.hparams.num_clusters, trainer)


class IConModule(HeadBankModule):
    """Trains H linear cluster heads (or a projection) on frozen features with an injected I-Con objective.

    loss: the objective of a recipe (``configs/recipes``), e.g. ``IConLoss(p, q)``.
    backbone: frozen extractor for batches of images (``views: online``); None on cached features.
    feature_dim, num_clusters, num_classes, num_samples: linked from the DataModule by the CLI.
    num_heads, head_temperature, projection_dim, head_hidden_dim: see ``ClusterHeads`` (hidden: MLP heads).
    head_bottleneck_dim: DINO heads instead (TEMI's: ``heads_dino.DINOHeads``, D → hidden → bottleneck → K).
    head_init: None → ``["kmeans", "spectral"]`` for linear cluster heads (one head: ``["kmeans"]``), none
        otherwise. How the first heads start, one entry a head: ``kmeans`` (k-means of the clean train features,
        a different seed each) or ``spectral`` (spectral clustering of their 10-NN graph), as the
        nearest-centroid rule of that partition; the other heads start at random. Started heads are never
        pruned (``keep_heads``); the selection chooses among them and the random heads' survivors. Linear heads
        only.
    optimizer: None → Adam at lr 1e-2. scheduler: None → no fixed schedule (the ``Convergence`` callback halves
        the LR on plateaus); any ``LRSchedulerCallable``, stepped every optimizer step or, with
        ``scheduler_interval: epoch``, every epoch (the ImageNet preset: the paper's StepLR, halved every 10 of
        30 epochs).
    ema_momentum: keep an EMA teacher of the heads; teacher_candidates: the teacher's outputs form the
        candidate side of q. A p that reads the model's output (``Supervisory.reads_output``) reads the
        teacher's when there is one, else the student's (detached), head by head, rebuilt every step.
    with_labels: hand labels to p (SupCon, cross-entropy). Unsupervised recipes never see them.
    keep_heads / prune_every: label-free successive halving (``HeadBank.prune``) of the randomly started heads:
        every ``prune_every`` optimizer steps the worse half of them by mean training loss since the last pruning
        leaves the computation (the bank's live mask: its weights stay in the stacks, untouched by the forward),
        until ``keep_heads`` remain; None keeps every head to the end. Heads keep their numbers in logs and records.
    selection: how the run's head is chosen among the live heads, without labels (``HeadBank.select``; its number
        is ``selected_head``). ``judge``: the highest cosine silhouette of the head's partition in the prepared
        train features (``metrics.judge``: its rule and reasons), scored every ``JUDGE_EVERY`` steps and at the last
        step; ``loss``: the lowest mean training loss over the last epoch (the loss carries a balance prior, so it
        prefers balanced partitions: issue 32). Cluster heads only; a projection is selected by ``loss``.
    head_norm: ``weight``: weight-normalised linear heads (``heads.HeadWeightNorm``, TURTLE's task encoder); None:
        plain linear heads.
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
        selection: Literal["judge", "loss"] = "judge",
        head_norm: Literal["weight"] | None = None,
        head_bottleneck_dim: PositiveInt | None = None,
    ) -> None:
        check_arguments(IConModule.__init__, locals())  # the annotations' limits, as `icon` checks them at parse time
        super().__init__(num_heads if num_clusters >= 1 else 1, num_clusters, num_classes)  # owns ``evaluation``
        # Under `icon` (LightningCLI) the hyper-parameters are the resolved config (the loss and backbone as
        # class_path dicts), so a checkpoint rebuilds the module; built in Python, the loss and backbone are module
        # objects, which the checkpoint's weights already hold: not hyper-parameters (Lightning's advice).
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else ["loss", "backbone"])
        self.loss, self.backbone, self.optimizer, self.scheduler = loss, backbone, optimizer, scheduler
        # the started heads' clustering seed, drawn first (after seed_everything): what data preparation draws from
        # torch's generator (a fresh extraction, a cached one) and the other heads' random weights (their number)
        # cannot change where head h starts
        self.init_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        heads = module_heads(locals())  # DINO heads (head_bottleneck_dim), else ClusterHeads
        head_init = started_heads(heads, head_init, projection_dim)
        self.bank = HeadBank(heads, head_init, ema_momentum, teacher_candidates, keep_heads, prune_every)
        self.targets = TargetCache()

    def data_needs(self) -> dict:
        """What the objective needs from the data, for the DataModule to ask: ``knn_width``, the widest k-NN table
        row its p reads (0: none), and what its p declares (``data_needs()``, e.g. ``SampledNeighbours``')."""
        return {"knn_width": table_width(self.loss), **getattr(getattr(self.loss, "p", None), "data_needs", dict)()}

    def features(self, batch: ClusteringBatch) -> Tensor:
        if batch.inputs.ndim > 2 and self.backbone is None:
            raise ValueError("batch.inputs: images need a backbone; pass model.backbone or use cached features")
        return (self.backbone(batch.inputs) if batch.inputs.ndim > 2 else batch.inputs).float()

    @torch.no_grad()
    def neighbourhoods(self, batch: ClusteringBatch, n: int) -> tuple[Tensor, Tensor] | None:
        """p and q of the first ``n`` anchors of ``batch`` under the selected head; None for objectives that are
        not one KL (``IConLoss.neighbourhoods``)."""
        if not hasattr(self.loss, "neighbourhoods"):
            return None
        z = self.selected(self.features(batch))
        return self.loss.neighbourhoods(batch.rows(z, self.hparams.with_labels), n)

    def objective(self, batch: ClusteringBatch, z: Tensor, teacher_z: Tensor | None = None) -> Tensor:
        """(h,) loss of each live head over the global batch (``parts.global_head_losses``): anchors ``z`` of this
        process against the candidates of all; ``teacher_z``: the EMA teacher's output of these rows."""
        hp = self.hparams
        return global_head_losses(
            self.loss, self.targets, batch, z, teacher_z, self.all_gather, hp.teacher_candidates, hp.num_samples,
            hp.with_labels,
        )  # fmt: skip

    def training_step(self, batch: ClusteringBatch, batch_idx: int) -> dict:
        feats = self.features(batch)
        wants_teacher = self.hparams.teacher_candidates or self.loss.target_reads_output
        losses = self.objective(batch, self(feats), self.bank.teacher_output(feats) if wants_teacher else None)
        self.record_losses(losses, len(batch))
        return {"loss": losses.sum(), "head_losses": losses.detach()}

    def configure_optimizers(self):
        hp = self.hparams
        return optimizers(self.bank.heads.parameters(), self.optimizer, self.scheduler, hp.scheduler_interval)
