"""One result per seed: the first run on a new dataset (empty cache: features read and cached, k-NN built) and every
later run (cache filled) give the same predictions and head losses (issue 21's report: the k-means-started head
differed between the two)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from icon_lightning.cli import cli_main, features_command


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cold_and_warm_cache_give_the_same_run(tmp_path, dtype):
    digits = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, features=(digits.data[:600] / 16).astype(dtype), labels=digits.target[:600])
    cache = tmp_path / "cache"
    runs = []
    for name in ("cold", "warm"):
        cli = cli_main(
            [
                *features_command(path),
                "--trainer.max_steps=20",
                "--model.num_heads=2",
                f"--data.cache_dir={cache}",
                f"--trainer.default_root_dir={tmp_path / name}",
                "--trainer.logger=false",
            ]
        )
        record = json.loads((cli.run_dir / "metrics.json").read_text())
        runs.append((cli.model.assign(cli.datamodule.train_features).numpy(), record["head_losses"]))
        assert any(cache.iterdir())  # the first run filled the cache; the second read it
    (cold, cold_losses), (warm, warm_losses) = runs
    np.testing.assert_array_equal(cold, warm)
    assert cold_losses == warm_losses


def test_the_thread_count_does_not_change_a_seeded_run(tmp_path):
    """One and two threads (torch's intra-op pool and faiss's OpenMP pool: k-NN, the k-means start) give the same
    predictions and head losses."""
    import faiss
    import torch

    digits = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, features=(digits.data / 16).astype(np.float32), labels=digits.target)
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            cli = cli_main(
                [
                    *features_command(path),
                    "--trainer.max_steps=30",
                    "--model.num_heads=2",
                    f"--data.cache_dir={tmp_path / f'cache{threads}'}",  # each builds its own k-NN table
                    f"--trainer.default_root_dir={tmp_path / str(threads)}",
                    "--trainer.logger=false",
                ]
            )
            record = json.loads((cli.run_dir / "metrics.json").read_text())
            runs.append((cli.model.assign(cli.datamodule.train_features).numpy(), record["head_losses"]))
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    (one, one_losses), (two, two_losses) = runs
    np.testing.assert_array_equal(one, two)
    assert one_losses == two_losses
