"""``HeadBank``: the one owner of a module's cluster heads and of everything done to them during a fit: their
starts from clusterings, the EMA teacher, the running training losses, label-free pruning (successive halving)
and selection. Every head stays in the stacks for the whole run (layout (H, …) from the first step to the
checkpoint); a live mask says which heads go on, so pruning changes no optimizer state, DDP wrapper or checkpoint
layout, and a pruned head costs nothing (the forward indexes the stacks by the live heads)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from icon_lightning.metrics.judge import Judge
from icon_lightning.models.heads import ClusterHeads
from icon_lightning.models.parts import HEAD_INITS

Gather = Callable[[Tensor], Tensor] | None
JUDGE_RULE = "cosine silhouette of the head's argmax partition of the prepared train features (metrics.judge)"


def scores_of(scores: dict[int, float] | None, heads: Sequence[int] | None = None) -> dict[str, float] | None:
    """Judge scores by head number as a record holds them (keys: strings), for ``heads`` (default all)."""
    if scores is None:
        return None
    return {str(h): float(v) for h, v in scores.items() if heads is None or h in heads}


class RunningMean:
    """Sum and count of (H,) losses since the last ``take``; ``take`` averages over processes through ``gather``."""

    def __init__(self, num_heads: int) -> None:
        self.total, self.count = torch.zeros(num_heads), 0

    def add(self, live: Tensor, losses: Tensor) -> None:
        total = self.total.to(losses.device, torch.promote_types(self.total.dtype, losses.dtype))
        live = live.to(losses.device)
        self.total = total.index_put((live,), total[live] + losses.detach())
        self.count += 1

    def take(self, gather: Gather = None) -> Tensor | None:
        mean = self.total / self.count if self.count else None
        if mean is not None and gather is not None:
            mean = gather(mean).reshape(-1, len(mean)).mean(0)
        self.total, self.count = torch.zeros_like(self.total), 0
        return mean

    def state(self) -> dict:
        return {"total": self.total.detach().cpu().tolist(), "count": self.count}

    def load(self, state: dict) -> None:
        self.total = torch.tensor(state["total"], dtype=torch.float32)
        self.count = int(state["count"])


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


class EmaTeacher(nn.Module):
    """An exponential moving average of the stacks of ``heads`` (a copy that no optimizer moves):
    teacher ← m · teacher + (1 − m) · heads, its first update a copy (as ``torch.optim.swa_utils.AveragedModel``
    with ``get_ema_multi_avg_fn``, which it replaces: the same numbers)."""

    def __init__(self, heads: ClusterHeads, momentum: float) -> None:
        super().__init__()
        self.momentum, self.heads = momentum, copy.deepcopy(heads).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, features: Tensor, heads: Sequence[int]) -> Tensor:
        return self.heads(features, heads)

    @torch.no_grad()
    def update(self, student: ClusterHeads) -> None:
        for ema, current in zip(self.heads.parameters(), student.parameters()):
            ema.copy_(current) if int(self.updates) == 0 else ema.lerp_(current, 1 - self.momentum)
        self.updates += 1


class SuccessiveHalving:
    """Label-free pruning: every ``every`` optimizer steps the worse half of the live heads that may be pruned by
    their mean training loss since the last pruning (averaged over processes) leaves, until ``keep`` of them remain
    (None: no pruning). Heads numbered in ``protected`` (those started from a clustering) are never compared: the
    loss carries a balance prior (log N − H(π)), so it must not drop a start of other balance before it converged;
    they go on to the end, and the judge chooses among the survivors. ``history`` records each pruning by head
    number (kept best first, dropped, the window's mean losses)."""

    def __init__(self, num_heads: int, keep: int | None, every: int, protected: Sequence[int] = ()) -> None:
        self.keep, self.every, self.window, self.history = keep, every, RunningMean(num_heads), []
        self.protected = set(protected)

    def add(self, live: Tensor, losses: Tensor) -> None:
        if self.keep is not None:
            self.window.add(live, losses)

    def survivors(self, step: int, live: list[int], gather: Gather = None) -> list[int] | None:
        """The heads that go on after optimizer step ``step`` (best first), or None when no pruning is due."""
        compared = [h for h in live if h not in self.protected]
        if self.keep is None or len(compared) <= self.keep or step % self.every or not self.window.count:
            return None
        mean = self.window.take(gather).detach().cpu().double()
        order = sorted(compared, key=lambda h: (float(mean[h]), h))  # ties: the lower number
        kept = order[: max(self.keep, math.ceil(len(compared) / 2))]
        losses = {str(h): float(mean[h]) for h in order}
        self.history.append({"step": int(step), "kept": kept, "dropped": order[len(kept) :], "losses": losses})
        protected = [h for h in live if h in self.protected]
        return sorted(protected + kept, key=lambda h: (float(mean[h]), h))

    def state(self) -> dict:
        return {"history": [dict(entry) for entry in self.history], "window": self.window.state()}

    def load(self, state: dict) -> None:
        self.history = [dict(entry) for entry in state["history"]]
        self.window.load(state["window"])


class LiveHeads(nn.Module):
    """The heads' stacks (``ClusterHeads``, every head for the whole run), the live mask (``live``: which heads go
    on) and the EMA teacher of the stacks (``ema_momentum`` None: none); ``head_init``: how the first heads start
    (``start``, once: ``started``)."""

    def __init__(self, heads: ClusterHeads, head_init: Sequence[str] = (), ema_momentum: float | None = None) -> None:
        super().__init__()
        self.heads, self.head_init = heads, check_head_init(head_init, heads)
        self.teacher = None if ema_momentum is None else EmaTeacher(heads, ema_momentum)
        self.register_buffer("live", torch.ones(heads.num_heads, dtype=torch.bool))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ the heads' outputs
    def live_ids(self) -> list[int]:
        return self.live.nonzero().flatten().tolist()

    def forward(self, features: Tensor, heads: Sequence[int] | None = None) -> Tensor:
        """(B, h, K) logits of the live heads (or of the heads numbered ``heads``), in the order of their numbers."""
        return self.heads(features, self.live_ids() if heads is None else heads)

    def teacher_output(self, features: Tensor) -> Tensor | None:
        """The EMA teacher's (B, h, K) output of the live heads, or None without a teacher."""
        return None if self.teacher is None else self.teacher(features, self.live_ids())

    # ------------------------------------------------------------------ starts and the teacher
    @torch.no_grad()
    def start(self, features: Tensor, seed: int) -> None:
        """Head h starts at the nearest-centroid rule of the ``head_init[h]`` clustering of ``features`` (N, D),
        with seed ``seed + h``; the teacher starts where the heads start. Once: later calls do nothing."""
        if bool(self.started):
            return
        x = features.detach().float().cpu()
        for head, method in enumerate(self.head_init):
            assignment = HEAD_INITS[method](x.numpy(), self.heads.num_clusters, seed + head)
            self.heads.init_from_partition(head, x, torch.as_tensor(assignment))
        if self.teacher is not None:
            self.teacher.heads.load_state_dict(self.heads.state_dict())
        self.started.fill_(True)

    def update_teacher(self) -> None:
        """One EMA step of the teacher towards the heads (``EmaTeacher``); nothing without a teacher."""
        if self.teacher is not None:
            self.teacher.update(self.heads)


class HeadJudge:
    """The judge of a bank's live heads (``use``: on the prepared features, ``metrics.judge.Judge``; None: none):
    each live head's score (``score``: the cosine silhouette of its argmax partition of the judged rows, higher is
    better), the step they were taken at, when the next scoring is due (``due``) and what a record holds of them."""

    def __init__(self) -> None:
        self.judge: Judge | None = None  # not state: it is the data's, rebuilt by ``use`` when a fit starts
        self.step: int | None = None
        self.scores: dict[int, float] | None = None  # by head number

    def use(self, features: Tensor | None) -> None:
        """Judge partitions of ``features`` (N, D): the prepared train features the heads see (None: no judge)."""
        self.judge = None if features is None else Judge(features.detach().cpu())

    @torch.no_grad()
    def score(self, bank: LiveHeads, step: int) -> dict[int, float]:
        """The score of each of ``bank``'s live heads, taken at ``step``."""
        weight = next(bank.heads.parameters())
        assignments = bank(self.judge.features.to(weight.device, weight.dtype)).argmax(-1).cpu()  # (S, h)
        self.step, self.scores = int(step), {h: self.judge.score(a) for h, a in zip(bank.live_ids(), assignments.T)}
        return self.scores

    def due(self, step: int, every: int, last: bool) -> bool:
        """Whether to score at an epoch closed at ``step``: at the run's ``last`` step, and at most once every
        ``every`` steps before (a scoring costs an (S, S) @ (S, K) product a live head)."""
        before = self.step
        return self.judge is not None and (last or before is None or step - before >= every) and before != step

    def covers(self, live: Sequence[int]) -> bool:
        return self.scores is not None and set(live) <= set(self.scores)

    def negated(self, num_heads: int) -> Tensor:
        """(H,) minus the scores (lower is better, as selection reads them); heads never scored: inf."""
        return torch.tensor([-self.scores.get(h, -math.inf) for h in range(num_heads)], dtype=torch.float64)

    def record(self, live: Sequence[int]) -> dict | None:
        return (
            None
            if self.scores is None
            else {"rule": JUDGE_RULE, "step": self.step, "scores": scores_of(self.scores, live)}
        )

    def state(self) -> dict:
        return {"step": self.step, "scores": scores_of(self.scores)}

    def load(self, state: dict | None) -> None:
        state = state or {"step": None, "scores": None}  # checkpoints before the judge: nothing judged
        self.step, scores = state["step"], state["scores"]
        self.scores = None if scores is None else {int(h): v for h, v in scores.items()}


class HeadBank(LiveHeads):
    """H heads with a live mask and all their bookkeeping, through declared methods only: the stacks, starts and
    EMA teacher (``LiveHeads``), each step's training losses (``add``), successive halving (``prune``: keep / every,
    ``SuccessiveHalving``; the started heads are never pruned) and selection: the live head with the lowest
    ``selection_scores()``, ``selected`` being its number. The scores are the judge's (``judged``, a ``HeadJudge``,
    given the features by its ``use``: the cosine silhouette of each live head's partition in the prepared features;
    higher is better, so its negative), taken by ``judge_heads``, else the last epoch's mean training loss (which
    carries the loss's balance prior and so cannot judge between partitions of other balance).
    ``state_dict`` holds the stacks, the teacher, the mask, the last losses, the selected head, the running windows,
    the pruning history and the judge's last scores: a resumed run continues as the uninterrupted one.
    """

    def __init__(
        self,
        heads: ClusterHeads,
        head_init: Sequence[str] = (),
        ema_momentum: float | None = None,
        teacher_candidates: bool = False,
        keep: int | None = None,
        every: int = 10,
    ) -> None:
        if teacher_candidates and ema_momentum is None:
            raise ValueError("teacher_candidates: needs an EMA teacher (set ema_momentum, e.g. 0.996)")
        super().__init__(heads, head_init, ema_momentum)
        self.register_buffer("losses", torch.zeros(heads.num_heads))  # the last closed epoch's mean training losses
        self.register_buffer("selected", torch.zeros((), dtype=torch.long))  # a head's number
        self.epoch, self.judged = RunningMean(heads.num_heads), HeadJudge()
        self.halving = SuccessiveHalving(heads.num_heads, keep, every, protected=range(len(self.head_init)))

    # ------------------------------------------------------------------ the judge
    def judge_heads(self, step: int) -> dict[int, float]:
        """The judge's score of each live head's partition (its argmax on the judged rows), recorded with ``step``."""
        return self.judged.score(self, step)

    # ------------------------------------------------------------------ losses, pruning, selection
    def add(self, losses: Tensor) -> None:
        """The live heads' (h,) training losses of one step (in the order of their numbers)."""
        live = self.live.nonzero().flatten()
        self.epoch.add(live, losses)
        self.halving.add(live, losses)

    def prune(self, step: int, gather: Gather = None) -> bool:
        """After optimizer step ``step``: the worse half of the live heads leaves when a pruning is due
        (``SuccessiveHalving``); the best survivor is selected until the epoch's losses select one."""
        kept = self.halving.survivors(step, self.live_ids(), gather)
        if kept is None:
            return False
        self.live.fill_(False)
        self.live[kept] = True
        self.selected.fill_(kept[0])
        return True

    def selection_scores(self) -> Tensor:
        """(H,) the score each head is selected by, lower is better (pruned heads: inf): minus the judge's last
        scores when it judged every live head, else the last closed epoch's mean training loss."""
        if self.judged.covers(self.live_ids()):
            return self.judged.negated(len(self.live)).masked_fill(~self.live.cpu(), math.inf)
        return self.losses.masked_fill(~self.live, math.inf)

    def select(self, scores: Tensor) -> int:
        """The number of the live head with the lowest ``scores`` (ties: the lower number)."""
        return int(scores.masked_fill(~self.live.to(scores.device), math.inf).argmin())

    def close_epoch(self, gather: Gather = None, judge_at: int | None = None) -> Tensor | None:
        """The epoch's (H,) mean losses (None when no step was added since the last close); the selection, after
        the judge scored the live heads when ``judge_at`` (the step) is given and there is a judge."""
        mean = self.epoch.take(gather)
        if mean is not None:
            self.losses.copy_(mean)
            if judge_at is not None and self.judged.judge is not None:
                self.judge_heads(judge_at)
            self.selected.fill_(self.select(self.selection_scores()))
        return mean

    def report(self) -> dict:
        """The record of a run: the selected head's number, the live heads, their losses, how the head was selected
        (``judge`` or ``training loss``) and the judge's scores, the pruning history."""
        measured, live = bool(self.losses[self.live].ne(0).any()), self.live_ids()  # zeros: no epoch closed yet
        return {
            "selected_head": int(self.selected) if measured else None,
            "heads": live,
            "head_losses": [float(self.losses[h]) for h in live] if measured else None,
            "selection": "judge" if measured and self.judged.covers(live) else "training loss",
            "judge": self.judged.record(live),
            "pruning": [dict(entry) for entry in self.halving.history],
        }

    def get_extra_state(self) -> dict:
        return {"epoch": self.epoch.state(), "halving": self.halving.state(), "judged": self.judged.state()}

    def set_extra_state(self, state: dict) -> None:
        self.epoch.load(state["epoch"])
        self.halving.load(state["halving"])
        self.judged.load(state.get("judged"))
