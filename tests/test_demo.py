"""`make demo` end to end on scikit-learn's digits, shortened."""

from __future__ import annotations

from icon_lightning import demo


def test_demo_clusters_digits_close_to_kmeans(capsys):
    results = demo.main(["--steps", "80", "--heads", "2"])
    acc, nmi = results["icon"]
    kmeans_acc, _ = results["kmeans"]
    assert acc > 0.6 and nmi > 0.6  # chance is 0.1 / 0.0
    assert acc > kmeans_acc - 0.1
    out = capsys.readouterr().out
    assert "I-Con (icon_clustering)" in out and "k-means" in out and "selected head" in out
