"""k-NN (FAISS and chunked torch) against brute force, walks against dense matrix powers, the cache."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from icon_lightning.data.neighbours import NeighbourTable, knn, knn_faiss, knn_torch, label_agreement, walks


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sim, order, 1)


@pytest.fixture
def points():
    return np.random.default_rng(0).normal(size=(700, 12)).astype(np.float32)


@pytest.mark.parametrize("chunk_size", [64, 100, 700, 5000])
def test_torch_knn_matches_brute_force_across_chunks(points, chunk_size):
    indices, sims = knn_torch(points, 5, chunk_size=chunk_size, device="cpu")
    ref_i, ref_s = brute_force(points, 5)
    assert not (indices == np.arange(len(points))[:, None]).any()  # no row contains itself, in any chunk
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_faiss_knn_matches_brute_force(points):
    indices, sims = knn_faiss(points, 5, use_gpu=False)
    ref_i, ref_s = brute_force(points, 5)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_duplicates_never_return_self():
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    x[10] = x[11] = x[12]  # three identical rows: self may come back anywhere among ties
    for backend in ("faiss", "torch"):
        indices, _ = knn(x, 3, backend=backend)
        assert not (indices == np.arange(50)[:, None]).any()
        assert set(indices[10][:2]) == {11, 12}


def test_walks_match_dense_matrix_powers():
    rng = np.random.default_rng(2)
    n, k = 9, 3
    table = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    p = np.zeros((n, n))
    for i in range(n):
        p[i, table[i]] = 1 / k
    pool = walks(table, 3)
    assert pool.shape == (n, k + k**2 + k**3)
    start = 0
    for s in (1, 2, 3):
        block = pool[:, start : start + k**s]
        counts = np.stack([np.bincount(row, minlength=n) for row in block]) / k**s
        np.testing.assert_allclose(counts, np.linalg.matrix_power(p, s))
        start += k**s


def test_label_agreement_and_bad_input():
    table = np.array([[1, 2], [0, 2], [0, 1]])
    assert label_agreement(table, np.array([0, 0, 1])) == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match="features: expected finite"):
        knn(np.array([[0.0, np.nan], [1.0, 0.0], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="features: expected an"):
        knn(np.zeros(5), 1)
    with pytest.raises(ValueError, match="^k:"):
        knn(np.eye(3), 3)


def test_neighbour_table_cache(tmp_path, points):
    path = tmp_path / "t.knn5.npz"
    first = NeighbourTable.build_or_load(points, 5, path)
    stamp = path.stat().st_mtime_ns
    again = NeighbourTable.build_or_load(points, 5, path)  # hit: file untouched
    assert path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.indices, again.indices)
    changed = points.copy()
    changed[:, 0] += 1.0
    rebuilt = NeighbourTable.build_or_load(changed, 5, path)  # other features: rebuilt, not trusted
    np.testing.assert_array_equal(rebuilt.indices, brute_force(changed, 5)[0])
    many = np.random.default_rng(1).normal(size=(3000, 12)).astype(np.float32)
    NeighbourTable.build_or_load(many, 5, path)
    skipped = many.copy()
    skipped[1] = (
        0.9 * skipped[1] + 0.4 * skipped[2]
    )  # a row a strided sample skips: the old key (shape + every N//1024-th row) missed it
    np.testing.assert_array_equal(NeighbourTable.build_or_load(skipped, 5, path).indices, brute_force(skipped, 5)[0])
    path.write_bytes(b"garbage")  # a corrupt file is rebuilt
    np.testing.assert_array_equal(NeighbourTable.build_or_load(points, 5, path).indices, first.indices)


def flip_bytes(path, at: float = 0.5, count: int = 32) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + count] = bytes(b ^ 0x5A for b in data[start : start + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped", "a plain .npy", "another table"])
def test_a_damaged_table_is_named_removed_and_rebuilt(tmp_path, points, damage):
    """An empty or truncated k-NN cache raised EOFError or BadZipFile, naming no file, on every later run; bytes
    changed inside it went unchecked. Zip's CRC-32 of each array is now checked as it is read."""
    first = NeighbourTable.in_folder(points, 5, tmp_path, backend="torch")
    (path,) = tmp_path.glob("*.knn5.npz")
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flipped":
        flip_bytes(path)  # inside the indices array
    elif damage == "a plain .npy":
        np.save(path.with_suffix(".npy"), points)
        path.with_suffix(".npy").replace(path)
    else:
        np.savez(path, indices=first.indices[::-1], similarities=first.similarities, fingerprint=np.array("x" * 20))
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(path))}: .*; removed, rebuilt$"):
        rebuilt = NeighbourTable.in_folder(points, 5, tmp_path, backend="torch")
    ref_i, ref_s = brute_force(points, 5)
    np.testing.assert_array_equal(rebuilt.indices, ref_i)
    np.testing.assert_allclose(rebuilt.similarities, ref_s, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is intact: read without a warning
        np.testing.assert_array_equal(NeighbourTable.in_folder(points, 5, tmp_path).indices, ref_i)


def test_a_table_indexing_outside_its_features_is_rebuilt(tmp_path, points):
    path = tmp_path / "t.knn5.npz"
    table = NeighbourTable.build_or_load(points, 5, path, backend="torch")
    fingerprint = NeighbourTable.fingerprint(points)
    np.savez(path, indices=table.indices + 1, similarities=table.similarities, fingerprint=np.array(fingerprint))
    with pytest.warns(UserWarning, match="indices outside 0..699"):
        rebuilt = NeighbourTable.build_or_load(points, 5, path, backend="torch")
    np.testing.assert_array_equal(rebuilt.indices, brute_force(points, 5)[0])
