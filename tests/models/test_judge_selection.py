"""The run's head is chosen without labels by the judge (issue 32): the started heads are never pruned by the
training loss, whose balance prior would drop a start of other balance before it converged; the judge (the cosine
silhouette of each live head's partition in the prepared features) selects among the survivors, never reading
labels, and the record, the checkpoint and the prediction agree on its choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from icon_lightning.metrics.judge import judge_rows
from icon_lightning.models.bank import HeadBank
from icon_lightning.models.heads import ClusterHeads


def test_started_heads_are_never_pruned_and_the_random_heads_halve_among_themselves():
    bank = HeadBank(ClusterHeads(3, 2, num_heads=6), head_init=["kmeans", "spectral"], keep=1, every=1)
    bank.add(torch.tensor([9.0, 8.0, 1.0, 2.0, 3.0, 4.0]))  # the started heads have the worst losses
    assert bank.prune(1) and bank.live_ids() == [0, 1, 2, 3]  # of the 4 random heads the better half goes on
    assert bank.report()["pruning"][-1]["kept"] == [2, 3] and bank.report()["pruning"][-1]["dropped"] == [4, 5]
    bank.add(torch.tensor([9.0, 8.0, 2.0, 1.0]))
    assert bank.prune(2) and bank.live_ids() == [0, 1, 3]
    bank.add(torch.tensor([9.0, 8.0, 1.0]))
    assert not bank.prune(3) and bank.live_ids() == [0, 1, 3]  # keep: one random head besides the starts


def _unbalanced(n_big: int = 900, n_small: int = 100) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    x = np.concatenate([g.normal(size=(n_big, 2)) * 0.3 + [1.0, 0.0], g.normal(size=(n_small, 2)) * 0.3 + [-1.0, 0]])
    return x.astype(np.float32), np.repeat([0, 1], [n_big, n_small])


def _two_heads() -> HeadBank:
    """Head 0 splits by the first coordinate (the true, unbalanced partition); head 1 by the second (halves)."""
    bank = HeadBank(ClusterHeads(2, 2, num_heads=2))
    with torch.no_grad():
        bank.heads.weight.copy_(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, -1.0]]]))
        bank.heads.bias.zero_()
    return bank


def test_the_judge_selects_by_silhouette_where_the_loss_prefers_the_balanced_split():
    x, y = _unbalanced()
    bank = _two_heads()
    bank.add(torch.tensor([2.0, 1.0]))  # the loss prefers head 1 (a balance prior would)
    bank.close_epoch()
    assert int(bank.selected) == 1 and bank.report()["selection"] == "training loss"
    bank.judged.use(torch.as_tensor(x))
    bank.add(torch.tensor([2.0, 1.0]))
    bank.close_epoch(judge_at=7)
    rows = judge_rows(len(x))
    expected = [
        silhouette_score(x[rows], labels[rows], metric="cosine")
        for labels in ((x[:, 0] < 0).astype(int), (x[:, 1] < 0).astype(int))
    ]
    report = bank.report()
    assert report["judge"]["scores"] == {
        "0": pytest.approx(expected[0], abs=1e-5),
        "1": pytest.approx(expected[1], abs=1e-5),
    }
    assert expected[0] > expected[1] and int(bank.selected) == 0 and report["selected_head"] == 0
    assert report["selection"] == "judge" and report["judge"]["step"] == 7


def test_the_judges_scores_survive_a_checkpoint():
    x, _ = _unbalanced()
    bank = _two_heads()
    bank.judged.use(torch.as_tensor(x))
    bank.add(torch.tensor([2.0, 1.0]))
    bank.close_epoch(judge_at=3)
    restored = _two_heads()
    restored.load_state_dict(bank.state_dict())
    assert restored.report() == bank.report() and int(restored.selected) == 0
    restored.judged.use(torch.as_tensor(x))
    assert restored.judged.due(53, every=50, last=False) and not restored.judged.due(40, every=50, last=False)
    state = bank.state_dict()  # a checkpoint written before the judge existed: nothing judged
    state["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "judged"}
    older = _two_heads()
    older.load_state_dict(state)
    assert older.report()["judge"] is None


# ---------------------------------------------------------------------- a user's fit
def _long_tailed_digits(root, labels_seed: int = 0):
    from sklearn.datasets import load_digits

    from icon_lightning.data.long_tailed import long_tailed_indices

    x, y = load_digits(return_X_y=True)
    keep = long_tailed_indices(y, 10, seed=0)
    labels = y[keep] if not labels_seed else np.random.default_rng(labels_seed).permutation(y[keep])
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"digits_lt10_{labels_seed}.npz"
    np.savez(path, features=x[keep].astype(np.float32), labels=labels.astype(np.int64))
    return path


def _fit(root, labels_seed: int = 0):
    from icon_lightning.cli import cli_main, features_command

    quiet = [f"--data.cache_dir={root / 'cache'}", f"--trainer.default_root_dir={root / 'runs'}"]
    quiet += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    path = _long_tailed_digits(root, labels_seed)
    return path, quiet, cli_main([*features_command(path), *quiet, "--seed_everything=0"])


def test_a_users_fit_keeps_both_starts_and_reports_the_judges_head_everywhere(tmp_path):
    from pathlib import Path

    from icon_lightning.cli import cli_main, features_command

    path, quiet, fit = _fit(tmp_path / "a")
    record = fit.record
    assert record["selection"] == "judge" and {0, 1} <= set(record["heads"])  # k-means and spectral starts survive
    scores = {int(h): v for h, v in record["judge"]["scores"].items()}
    assert sorted(scores) == record["heads"] and record["selected_head"] == max(scores, key=scores.get)
    assert record["judge"]["step"] == record["steps"]  # judged at the last step
    # each score is scikit-learn's cosine silhouette of that head's argmax partition on the judged rows
    x = fit.datamodule.train_features.float()
    rows = judge_rows(len(x))
    with torch.no_grad():
        labels = fit.model.cpu()(x[rows], record["heads"]).argmax(-1).numpy()
    for i, h in enumerate(record["heads"]):
        assert scores[h] == pytest.approx(silhouette_score(x[rows].numpy(), labels[:, i], metric="cosine"), abs=1e-5)
    # the checkpoint holds the judge's head: predicting the training file gives its labels
    ckpt = Path(fit.run_dir) / "checkpoints" / "last.ckpt"
    assert int(torch.load(ckpt, weights_only=False)["state_dict"]["bank.selected"]) == record["selected_head"]
    predicted = cli_main(["predict", *features_command(path)[1:], *quiet, f"--ckpt_path={ckpt}"])
    with torch.no_grad():
        own = fit.model(x, [record["selected_head"]])[:, 0].argmax(-1).numpy()
    assert np.array_equal(np.load(Path(predicted.run_dir) / "predictions.npy"), own)
    # labels are never read: the same rows with permuted labels give the same scores and the same head
    _, _, shuffled = _fit(tmp_path / "b", labels_seed=5)
    assert shuffled.record["judge"] == record["judge"] and shuffled.record["selected_head"] == record["selected_head"]
