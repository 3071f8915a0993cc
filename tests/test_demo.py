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


def test_knn_table_never_contains_self():
    import numpy as np

    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    x[5] = x[6]  # a duplicate can be returned before the row itself
    table = demo.knn_table(x, 3)
    assert table.shape == (30, 3) and not (table == np.arange(30)[:, None]).any()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    brute = np.argsort(-sim, axis=1)[:, :3]
    assert [set(r) for r in table] == [set(r) for r in brute]
