"""The head bank against the run before it: short pruned fits on digits give the head losses, the pruning record
and the labels recorded from the heads as they were (one ``nn.Linear``, or MLP layers, shrunk at each pruning,
their optimizer state carried row by row, the EMA teacher a torch ``AveragedModel`` shrunk with them), to float
tolerance. The references were recorded by running this file as a script on the code before the bank (commit
dbc5f21: ``PYTHONPATH=<that tree> python -m tests.models.test_head_bank`` in that tree, this file copied in)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REFERENCE = Path(__file__).with_name("head_bank_reference.json")


CASES = {  # README's first command on digits' 64 pixels, 30 steps, seed 0: 10 heads halved every 10 steps
    "linear": ["--model.head_init=[]"],  # linear heads, all started at random (a started head is never pruned now)
    "mlp_teacher": ["--model.head_hidden_dim=16", "--model.ema_momentum=0.9", "--model.teacher_candidates=true"],
}
SINCE = ["--model.selection=loss"]  # what the code before the bank did, named since the judge became the default


def pruned_digits_fit(tmp_path, overrides=()):
    from sklearn.datasets import load_digits

    from icon_lightning.estimator import HeadClusterer

    x = load_digits().data.astype(np.float32)
    est = HeadClusterer(overrides=["--convergence.max_steps=30", *overrides], cache_dir=str(tmp_path), random_state=0)
    return est.fit(x)


def summary(est) -> dict:
    record = est.record_
    return {
        "head_losses": [float(v) for v in record["head_losses"]],
        "heads": record["heads"],
        "selected_head": record["selected_head"],
        "pruning": record["pruning"],
        "labels": est.labels_.tolist(),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_pruned_fit_gives_the_losses_and_labels_of_the_heads_before_the_bank(tmp_path, case):
    got, want = summary(pruned_digits_fit(tmp_path, CASES[case] + SINCE)), json.loads(REFERENCE.read_text())[case]
    # the live heads by number (the bank lists them ascending; the shrunk heads listed them best first)
    assert sorted(got["heads"]) == sorted(want["heads"]) and got["selected_head"] == want["selected_head"]
    assert [(h["step"], h["kept"], h["dropped"]) for h in got["pruning"]] == [
        (h["step"], h["kept"], h["dropped"]) for h in want["pruning"]
    ]
    for g, w in zip(got["pruning"], want["pruning"]):
        assert g["losses"] == pytest.approx(w["losses"], rel=1e-5)
    losses = dict(zip(want["heads"], want["head_losses"]))
    assert got["head_losses"] == pytest.approx([losses[h] for h in got["heads"]], rel=1e-5)
    assert np.mean(np.array(got["labels"]) == np.array(want["labels"])) >= 0.999  # argmax ties of float rounding


if __name__ == "__main__":  # records the references (run once on the code before the head bank)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        found = {case: summary(pruned_digits_fit(Path(tmp) / case, CASES[case])) for case in sorted(CASES)}
    REFERENCE.write_text(json.dumps(found) + "\n")
