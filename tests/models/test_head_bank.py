"""The head bank against the run before it: a short pruned fit on digits gives the head losses, the pruning
record and the labels recorded from the heads as they were (one ``nn.Linear`` shrunk at each pruning, its
optimizer state carried row by row), to float tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REFERENCE = Path(__file__).with_name("head_bank_reference.json")


def pruned_digits_fit(tmp_path):
    """README's first command on digits' 64 pixels, 30 steps, seed 0: 10 heads (head 0 started from k-means),
    halved by training loss every 10 steps down to 1."""
    from sklearn.datasets import load_digits

    from icon_lightning.estimator import HeadClusterer

    x = load_digits().data.astype(np.float32)
    est = HeadClusterer(overrides=["--convergence.max_steps=30"], cache_dir=str(tmp_path), random_state=0)
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


def test_a_pruned_fit_gives_the_losses_and_labels_of_the_heads_before_the_bank(tmp_path):
    got, want = summary(pruned_digits_fit(tmp_path)), json.loads(REFERENCE.read_text())
    assert got["heads"] == want["heads"] and got["selected_head"] == want["selected_head"]
    assert [(h["step"], h["kept"], h["dropped"]) for h in got["pruning"]] == [
        (h["step"], h["kept"], h["dropped"]) for h in want["pruning"]
    ]
    for g, w in zip(got["pruning"], want["pruning"]):
        assert g["losses"] == pytest.approx(w["losses"], rel=1e-5)
    assert got["head_losses"] == pytest.approx(want["head_losses"], rel=1e-5)
    assert np.mean(np.array(got["labels"]) == np.array(want["labels"])) >= 0.999  # argmax ties of float rounding


if __name__ == "__main__":  # records the reference (run once on the code before the head bank)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps(summary(pruned_digits_fit(Path(tmp)))) + "\n")
