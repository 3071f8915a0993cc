"""The parts `IConModule` delegates to, each small and tested on its own: heads started from clusterings, the
EMA teacher, the shared target p of the global batch, label-free head selection and per-split scores."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.distributed import world
from icon_lightning.functional.sparse import SparseTarget
from icon_lightning.loss import Objective
from icon_lightning.metrics import ClusteringMetrics
from icon_lightning.models.heads import ClusterHeads, keep_heads


# ---------------------------------------------------------------------- heads started from clusterings
def _kmeans(x, k: int, seed: int):
    from icon_lightning.classical import FaissKMeans

    return FaissKMeans(k, n_init=10, random_state=seed).fit(x).labels_


def _spectral(x, k: int, seed: int):
    from icon_lightning.classical import KNNSpectralClustering

    solver = "lobpcg" if len(x) > 20_000 else None
    return KNNSpectralClustering(k, 10, eigen_solver=solver, random_state=seed).fit(x).labels_


HEAD_INITS: dict[str, Callable] = {"kmeans": _kmeans, "spectral": _spectral}


def register_head_state(module: nn.Module, num_heads: int) -> None:
    """The head bookkeeping a module checkpoints: ``head_ids`` (each head's number before any pruning),
    ``head_losses``, ``selected_head`` and ``heads_started`` (``head_init`` ran)."""
    module.register_buffer("head_ids", torch.arange(num_heads))
    module.register_buffer("head_losses", torch.zeros(num_heads))
    module.register_buffer("selected_head", torch.zeros((), dtype=torch.long))
    module.register_buffer("heads_started", torch.zeros((), dtype=torch.bool))


def check_head_init(head_init: Sequence[str], heads: ClusterHeads) -> list[str]:
    """The ``head_init`` list, checked against the heads it starts."""
    head_init = list(head_init)
    if len(head_init) > heads.num_heads:
        raise ValueError(f"head_init: {len(head_init)} started heads but num_heads is {heads.num_heads}")
    unknown = sorted(set(head_init) - set(HEAD_INITS))
    if unknown:
        raise ValueError(f"head_init: unknown {unknown}; expected entries of {list(HEAD_INITS)}")
    if head_init and (not heads.is_linear or not isinstance(heads.projection, nn.Identity)):
        raise ValueError("head_init: heads started from a clustering must be linear heads on the features")
    return head_init


@torch.no_grad()
def start_heads(
    heads: ClusterHeads, features: Tensor, head_init: Sequence[str], seed: int, teacher: AveragedModel | None = None
) -> None:
    """Head h starts at the nearest-centroid rule of the ``head_init[h]`` clustering of ``features`` (N, D), with
    seed ``seed + h``; an EMA ``teacher`` starts where the heads start."""
    x = features.detach().float().cpu()
    for head, method in enumerate(head_init):
        assignment = HEAD_INITS[method](x.numpy(), heads.num_clusters, seed + head)
        heads.init_from_partition(head, x, torch.as_tensor(assignment))
    if teacher is not None:
        teacher.module.load_state_dict(heads.state_dict())


# ---------------------------------------------------------------------- the EMA teacher
def ema_teacher(heads: nn.Module, momentum: float | None, teacher_candidates: bool = False) -> AveragedModel | None:
    """An exponential moving average of ``heads`` (a module: it moves devices and is checkpointed), or None;
    ``teacher_candidates`` (its outputs as the candidates of q) needs one."""
    if teacher_candidates and momentum is None:
        raise ValueError("teacher_candidates: needs an EMA teacher (set ema_momentum, e.g. 0.996)")
    if momentum is None:
        return None
    return AveragedModel(heads, multi_avg_fn=get_ema_multi_avg_fn(momentum), use_buffers=True)


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


# ---------------------------------------------------------------------- label-free head selection
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


class HeadSelection:
    """Running mean of each head's training loss over an epoch; the selected head has the lowest."""

    def __init__(self, num_heads: int) -> None:
        self.total, self.count = torch.zeros(num_heads), 0

    def add(self, losses: Tensor) -> None:
        self.total = self.total.to(losses.device) + losses.detach()
        self.count += 1

    def epoch_mean(self, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """(H,) mean since the last call (averaged over processes through ``gather``), or None; then resets."""
        mean = self.total / self.count if self.count else None
        if mean is not None and gather is not None:
            mean = gather(mean).reshape(-1, len(mean)).mean(0)
        self.total, self.count = torch.zeros_like(self.total), 0
        return mean

    def keep(self, index: Tensor) -> None:
        """Only the heads at positions ``index`` go on."""
        self.total = self.total[index.to(self.total.device)]


class EndOfStep(Callback):
    """An ``IConModule``'s bookkeeping after each training step, before any checkpoint of the step: Lightning runs
    callbacks' ``on_train_batch_end`` before the module's, and checkpoint callbacks after every other callback, so
    bookkeeping in the module's own hook came after ``last.ckpt`` was written (the checkpoint held the step's heads
    unpruned, the teacher one update behind and the previous epoch's head losses)."""

    def on_train_batch_end(self, trainer, pl_module, outputs=None, batch=None, batch_idx: int = 0) -> None:
        """The EMA teacher's update, the pruning due at this step and, at an epoch's last step or training's, the
        epoch's head losses and selection (``trainer`` None: outside a fit, the first two only)."""
        if pl_module.teacher is not None:
            pl_module.teacher.update_parameters(pl_module.heads)
        gather = pl_module.all_gather if trainer is not None and trainer.world_size > 1 else None
        kept = pl_module.pruning.survivors(pl_module.global_step, pl_module.head_ids, gather)
        if kept is not None:
            keep_module_heads(pl_module, kept)  # only the heads at ``kept`` (best first) go on
        if trainer is not None and (
            trainer.is_last_batch or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        ):
            pl_module.on_train_epoch_end()


# ---------------------------------------------------------------------- label-free head pruning
class HeadPruning:
    """Successive halving of the heads by their training loss, label-free: every ``every`` optimizer steps the
    worse half of the heads by their mean training loss since the last pruning (averaged over processes) is
    dropped, until ``keep`` heads remain (``keep`` None: no pruning). ``history`` records each pruning."""

    def __init__(self, keep: int | None, every: int) -> None:  # their limits: IConModule's keep_heads, prune_every
        self.keep, self.every = keep, every
        self.window = HeadSelection(0)
        self.history: list[dict] = []

    def add(self, losses: Tensor) -> None:
        if self.window.count == 0:
            self.window.total = torch.zeros_like(losses.detach())
        self.window.add(losses)

    def survivors(self, step: int, ids: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """Positions of the heads that go on after optimizer step ``step`` (best first), or None when no pruning is
        due; ``ids`` (H,) names the heads in the record."""
        num_heads = len(ids)
        if self.keep is None or num_heads <= self.keep or step % self.every or not self.window.count:
            return None
        mean = self.window.epoch_mean(gather).detach().cpu().double()
        order = sorted(range(num_heads), key=lambda h: (float(mean[h]), h))  # ties: the lower position
        kept = order[: max(self.keep, math.ceil(num_heads / 2))]
        names = [int(i) for i in ids.tolist()]
        self.history.append(
            {
                "step": int(step),
                "kept": [names[h] for h in kept],
                "dropped": [names[h] for h in order[len(kept) :]],
                "losses": {str(names[h]): float(mean[h]) for h in order},
            }
        )
        return torch.tensor(kept, dtype=torch.long)

    def state_dict(self) -> dict:
        """The record and the window so far: a resumed run prunes as the uninterrupted one."""
        window = self.window.total.detach().cpu().tolist() if self.window.count else []
        return {"history": [dict(entry) for entry in self.history], "window": window, "count": self.window.count}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(entry) for entry in state.get("history", [])]
        self.window.total = torch.tensor(state.get("window", []), dtype=torch.float32)
        self.window.count = int(state.get("count", 0)) if len(self.window.total) else 0


@torch.no_grad()
def carry_optimizer_state(optimizer: torch.optim.Optimizer, replaced: dict[nn.Parameter, tuple[nn.Parameter, Tensor]]):
    """Point ``optimizer`` at new parameters: each old parameter (a key of ``replaced``) becomes its new one, and
    every state tensor shaped like the old parameter (Adam's moments, SGD's momentum) keeps the rows the new one
    holds (the second entry: indices along dim 0); scalar state (steps) is kept as it is."""
    for group in optimizer.param_groups:
        group["params"] = [replaced[p][0] if p in replaced else p for p in group["params"]]
    for old, (new, rows) in replaced.items():
        state = optimizer.state.pop(old, None)
        if state is None:
            continue
        optimizer.state[new] = {
            key: value[rows.to(value.device)].clone()
            if isinstance(value, Tensor) and value.shape == old.shape and value.ndim > 0
            else value
            for key, value in state.items()
        }


def rewrap_ddp(strategy) -> None:
    """After parameters were replaced during a fit, wrap the module in a new ``DistributedDataParallel`` (its reducer
    holds the old parameters); every process calls this at the same step. Nothing to do outside DDP."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(getattr(strategy, "model", None), DistributedDataParallel):
        strategy.model = strategy._setup_model(strategy.lightning_module)  # Lightning's own wrapping, its DDP kwargs
        strategy._register_ddp_hooks()


@torch.no_grad()
def keep_module_heads(module, positions: Tensor) -> None:
    """Only the heads of ``module`` (an ``IConModule``) at ``positions`` (best first) go on: their parameters, the
    teacher's, the optimizers' state, the scores and the head bookkeeping shrink to them; the selected head becomes
    the first of them; under DDP the module is wrapped anew."""
    index = torch.as_tensor(positions, dtype=torch.long).cpu()
    before = dict(module.heads.named_parameters())
    rows = keep_heads(module.heads, index.tolist())
    after = dict(module.heads.named_parameters())
    if module.teacher is not None:
        keep_heads(module.teacher.module, index.tolist())
    trainer = module._trainer
    for optimizer in trainer.optimizers if trainer is not None else []:
        carry_optimizer_state(optimizer, {before[name]: (after[name], r) for name, r in rows.items()})
    module.head_ids = module.head_ids[index.to(module.head_ids.device)]
    module.head_losses = module.head_losses[index.to(module.head_losses.device)]
    module.selected_head.fill_(0)
    module.selection.keep(index)
    module.evaluation.keep(index)
    if trainer is not None and trainer.optimizers:
        rewrap_ddp(trainer.strategy)


def heads_of_state(module, state: dict, prefix: str = "", *_) -> None:
    """``module``'s (an ``IConModule``) ``load_state_dict`` pre-hook: before the weights ``state`` are loaded
    (from a checkpoint, or ``ddp_spawn``'s workers handing theirs back), only the heads they hold go on, by
    number (``head_ids``; weights from before pruning existed hold them all)."""
    ids = state.setdefault(prefix + "head_ids", torch.arange(len(module.head_ids)))
    if len(ids) != len(module.head_ids) or not torch.equal(ids.cpu(), module.head_ids.cpu()):
        position = {int(i): h for h, i in enumerate(module.head_ids.tolist())}
        missing = [int(i) for i in ids.tolist() if int(i) not in position]
        if missing:
            raise ValueError(f"checkpoint: heads {missing} are not among this model's heads {position}")
        keep_module_heads(module, torch.tensor([position[int(i)] for i in ids.tolist()]))


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

    def update(self, split: str, z: Tensor, label: Tensor) -> None:
        for h, metric in enumerate(self.split(split) or []):
            metric.update(z[:, h].argmax(-1), label)

    def keep(self, index: Tensor) -> None:
        """Only the heads at positions ``index`` go on being scored."""
        for key in list(self.keys()):
            self[key] = nn.ModuleList(self[key][int(h)] for h in index)

    def summary(self, split: str, best: int, over_clustering: bool, ids: Sequence[int] | None = None) -> dict:
        """The values to log; head h is named ``head_{ids[h]}`` (its number before any pruning)."""
        metrics = self.split(split)
        if metrics is None or not metrics[0].update_called:
            return {}
        ids = list(range(len(metrics))) if ids is None else [int(i) for i in ids]
        out = {f"{split}/selected_head": torch.tensor(float(ids[best]))}
        for h, metric in enumerate(metrics):
            values = metric.compute()  # counts are already summed over processes
            names = ("hungarian_acc", "nmi", "ari", "ami")
            out.update({f"{split}/{name}/head_{ids[h]}": values[name] for name in names})
            if h == best:
                out.update({f"{split}/{name}": values[name] for name in ("nmi", "ari", "ami")})
                out[f"{split}/hungarian_acc/best"] = values["hungarian_acc"]
                if over_clustering:
                    out[f"{split}/over_clustering_acc"] = values["over_clustering_acc"]
                self.last_cluster_sizes[split] = metric.cluster_sizes().detach().cpu()
                self.last_confusion[split] = metric.confusion.detach().cpu().clone()
            metric.reset()
        return out
