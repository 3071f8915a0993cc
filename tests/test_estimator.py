"""``HeadClusterer`` as scikit-learn expects an estimator to behave: its own ``check_estimator`` suite (less the
checks that force ``n_clusters=1``: I-Con needs K ≥ 2), and the cases a hostile tester found, each an exception of
one line, never ``SystemExit``, and nothing written to the cache before X and the settings are checked."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from icon_lightning.cli import AssembledRun
from icon_lightning.estimator import EXPECTED_FAILED_CHECKS, HeadClusterer

CHEAP = ["--model.num_heads=1", "--convergence.max_steps=20"]  # scikit-learn's checks fit dozens of times


@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(n_samples=60, centers=3, n_features=4, random_state=0)
    return x.astype(np.float32)


def cheap(tmp_path, **params) -> HeadClusterer:
    return HeadClusterer(**{"overrides": CHEAP, "n_clusters": 3, "cache_dir": str(tmp_path / "cache"), **params})


def cached_files(tmp_path) -> list:
    return sorted((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []


@pytest.mark.slow  # 45 checks, about 60 fits: ~40 s together on one CPU core (each check under 5 s)
@parametrize_with_checks(
    [HeadClusterer(overrides=CHEAP, n_clusters=3)], expected_failed_checks=lambda _: EXPECTED_FAILED_CHECKS
)
def test_scikit_learn_check_estimator(estimator, check, tmp_path):
    check(clone(estimator).set_params(cache_dir=str(tmp_path)))


def test_random_state_takes_what_scikit_learn_takes(blobs, tmp_path):
    """None: a fresh seed each fit; a RandomState: one int drawn from it; either fit is the int-seeded fit."""
    first, second = cheap(tmp_path, random_state=None).fit(blobs), cheap(tmp_path, random_state=None).fit(blobs)
    assert first.seed_ != second.seed_
    again = cheap(tmp_path, random_state=first.seed_).fit(blobs)
    np.testing.assert_array_equal(again.labels_, first.labels_)
    assert again.head_losses_.tolist() == first.head_losses_.tolist()

    drawn = cheap(tmp_path, random_state=np.random.RandomState(5)).fit(blobs)
    assert drawn.seed_ == np.random.RandomState(5).randint(np.iinfo(np.int32).max)
    assert cheap(tmp_path, random_state=7).fit(blobs).seed_ == 7  # an int is the seed itself (`icon fit`'s)


@pytest.mark.parametrize(
    "params, match",
    [
        (
            {"n_clusters": 10.0},
            r"n_clusters: expected an integer with 2 ≤ n_clusters ≤ N = 60 \(X's samples\) or 'auto', got 10.0",
        ),
        ({"n_clusters": 1}, "n_clusters: expected an integer with 2 ≤ n_clusters ≤ N = 60"),
        ({"n_clusters": 61}, "n_clusters: expected an integer with 2 ≤ n_clusters ≤ N = 60"),
        ({"random_state": -1}, r"random_state: expected None, an int in \[0, 2\*\*32 - 1\] or a numpy"),
        ({"random_state": "seed"}, "random_state: expected None, an int"),
        ({"overrides": "--model.num_heads=1"}, "overrides: expected a list of `icon fit` words"),
    ],
)
def test_bad_settings_are_one_line_before_the_cache(blobs, tmp_path, params, match):
    with pytest.raises(ValueError, match=match) as raised:
        cheap(tmp_path, **params).fit(blobs)
    assert "\n" not in str(raised.value)
    assert cached_files(tmp_path) == []


def test_an_override_icon_does_not_parse_is_a_value_error_with_its_line(blobs, tmp_path, capsys):
    est = HeadClusterer(overrides=[*CHEAP, "--model.num_head=2"], n_clusters=3, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^icon: error: .*model\.num_head") as raised:
        est.fit(blobs)
    assert "\n" not in str(raised.value)
    assert capsys.readouterr().err == ""  # quiet: the line is in the exception, not on stderr


def test_an_interrupted_fit_is_a_keyboard_interrupt_not_system_exit(blobs, tmp_path, monkeypatch):
    def ctrl_c(self):  # what `icon fit` does on Ctrl-C once it has written its record: exit 130
        raise SystemExit(130)

    monkeypatch.setattr(AssembledRun, "execute", ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        cheap(tmp_path).fit(blobs)


def test_predict_before_fit_is_not_fitted_error(blobs, tmp_path):
    for method in ("predict", "predict_proba"):
        with pytest.raises(NotFittedError):
            getattr(cheap(tmp_path), method)(blobs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (sparse.csr_matrix, TypeError, "X: sparse input is not supported: expected a dense"),
        (sparse.csr_array, TypeError, "X: sparse input is not supported: expected a dense"),
        (lambda x: x + 1j, ValueError, "X: Complex data not supported: expected real"),
        (lambda x: x[:0], ValueError, r"X: Found array with 0 sample\(s\)"),
        (lambda x: x[:, :0], ValueError, r"X: Found array with 0 feature\(s\)"),
        (lambda x: x[:1], ValueError, r"X: Found array with 1 sample\(s\) \(shape=\(1, 4\)\) while a minimum of 2"),
        (lambda x: x[:, 0], ValueError, "X: Expected 2D array, got 1D array instead: Reshape your data"),
        (lambda x: np.where(np.arange(4) == 2, np.nan, x), ValueError, "X: Input X contains NaN"),
    ],
)
def test_bad_x_is_refused_on_one_line_before_the_cache(blobs, tmp_path, make, error, match):
    with pytest.raises(error, match=match) as raised:
        cheap(tmp_path).fit(make(blobs))
    assert "\n" not in str(raised.value)
    assert cached_files(tmp_path) == []


def test_n_features_in_is_set_by_fit_and_checked_by_predict(blobs, tmp_path):
    est = cheap(tmp_path).fit(blobs)
    assert est.n_features_in_ == 4
    np.testing.assert_array_equal(est.predict(blobs.astype(np.float64).tolist()), est.labels_)
    for method in ("predict", "predict_proba"):
        with pytest.raises(ValueError, match="X: X has 3 features, but HeadClusterer is expecting 4 features"):
            getattr(est, method)(blobs[:, :3])
    with pytest.raises(TypeError, match="X: sparse input is not supported"):
        est.predict(sparse.csr_matrix(blobs))
