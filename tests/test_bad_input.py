"""Bad input gives a ValueError that names the argument."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentError

from icon_lightning import learned, supervisory
from icon_lightning.loss import IConLoss, SCInfoNCE
from icon_lightning.recipes import load_recipe
from icon_lightning.rows import Rows


def rows(n=8, d=4, **kw):
    return Rows(z=torch.randn(n, d), index=torch.arange(n), **kw)


def test_shape_mismatch_names_the_field():
    with pytest.raises(ValueError, match="index"):
        Rows(z=torch.randn(4, 3), index=torch.arange(5))
    with pytest.raises(ValueError, match="z"):
        Rows(z=torch.randn(4), index=torch.arange(4))
    with pytest.raises(ValueError, match="features"):
        Rows(z=torch.randn(4, 3), index=torch.arange(4), features=torch.randn(5, 2))
    loss = IConLoss(supervisory.Augmentation(), learned.Gaussian())
    with pytest.raises(ValueError, match="candidates.z"):
        loss(rows(d=4), rows(d=5))
    with pytest.raises(ValueError, match="^p:"):
        loss(rows(), p=torch.ones(3, 3))


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"^p\.alpha \(supervisory\.Debiased"):  # which side's α is wrong
        supervisory.Debiased(supervisory.Augmentation(), alpha)
    with pytest.raises(ValueError, match=r"^q\.alpha \(learned\.Debiased"):
        learned.Debiased(learned.UniformCluster(), alpha)


def test_non_finite_input():
    z = torch.randn(4, 3)
    z[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z: expected finite"):
        Rows(z=z, index=torch.arange(4))
    features = torch.randn(4, 3)
    features[0, 0] = float("inf")
    with pytest.raises(ValueError, match="features: expected finite"):
        Rows(z=torch.randn(4, 3), index=torch.arange(4), features=features)


def test_k_not_below_number_of_candidates():
    r = rows(n=8, features=torch.randn(8, 5))
    loss = IConLoss(supervisory.KNNGraph(k=7), learned.UniformCluster())  # 7 valid candidates per anchor
    with pytest.raises(ValueError, match="^k:"):
        loss(r)
    table = rows(n=8, neighbours=torch.zeros(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="^k:"):
        IConLoss(supervisory.KNNGraph(k=3), learned.UniformCluster())(table)
    with pytest.raises(ValueError, match="^k:"):
        supervisory.KNNGraph(k=0)


def test_other_hyper_parameters_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        learned.Gaussian("cosine", 0.0)
    with pytest.raises(ValueError, match="metric"):
        learned.Gaussian("manhattan")
    with pytest.raises(ValueError, match="gamma"):
        learned.ExponentialKernel(gamma=3.0)
    with pytest.raises(ValueError, match="perplexity"):
        IConLoss(supervisory.Gaussian(perplexity=30.0), learned.StudentT())(rows(n=10, features=torch.randn(10, 3)))
    with pytest.raises(ValueError, match="steps"):
        supervisory.Propagated(supervisory.KNNGraph(), steps=0)
    with pytest.raises(ValueError, match="features"):
        IConLoss(supervisory.Gaussian(), learned.Gaussian())(rows())
    with pytest.raises(ValueError, match="degree"):
        IConLoss(supervisory.Augmentation(), learned.UniformCluster(degree_weighted=True))(rows())
    with pytest.raises(ValueError, match="candidates"):
        SCInfoNCE()(rows(), Rows(z=torch.randn(8, 4), index=torch.arange(8) // 2))  # two positives a row


def test_no_positive_anywhere_is_an_error_not_a_nan():
    loss = IConLoss(supervisory.Augmentation(), learned.Gaussian())
    with pytest.raises(ValueError, match="no anchor has a positive"):
        loss(rows())  # every index distinct: no other view of any item


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe: no file"):
        load_recipe("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  loss:\n    class_path: icon_lightning.loss.IConLoss\n    init_args:\n"
        "      p: {class_path: icon_lightning.supervisory.Augmentation}\n"
        "      q: {class_path: icon_lightning.learned.Gaussian, init_args: {temprature: 0.1}}\n"
    )
    with pytest.raises(ArgumentError, match="temprature"):
        load_recipe(bad)


# ---------------------------------------------------------------------------------------------------------------
# What a user typing `icon …` sees: one line on stderr naming the argument or path, no traceback. README's
# bad-input table is printed from this list: `python -m tests.test_bad_input`.

DIGITS_CONFIG = "experiments/digits/config.yaml"


def _npz(folder, name: str, make) -> str:
    import numpy as np

    path = folder / name
    make(path, np)
    return str(path)


def _unlabelled(folder) -> str:
    return _npz(
        folder, "unlabelled.npz", lambda p, np: np.savez(p, features=np.random.default_rng(0).normal(size=(60, 8)))
    )


def _tar_with_a_truncated_jpeg(folder, np) -> str:
    import io
    import tarfile

    from PIL import Image

    good = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(good, format="JPEG")
    path = folder / "images.tar"
    with tarfile.open(path, "w") as tar:
        members = [(f"a/{i}.jpg", good.getvalue()) for i in range(2, 8)]  # enough rows for a fit's k-NN table
        for name, data in (("a/0.jpg", good.getvalue()), ("b/1.jpg", good.getvalue()[:-40]), *members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _truncated_checkpoint(folder) -> Path:
    path = folder / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-300])  # the end (the zip's central directory) is lost, as in a killed write
    return path


def _file(path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return True


def _features_command(path: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/recipes/icon_clustering.yaml",
        "--data.dataset",
        "icon_lightning.data.FeaturesFile",
        "--data.dataset.path",
        path,
        "--data.views",
        "clean",
        *extra,
    ]


CLI_CASES = {
    # case: (argv builder taking the temporary folder, a fragment of the expected line)
    "option given as a prefix of another (`--model.num_head`)": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--model.num_head=5"],
        "num_head",
    ),
    "config file missing": (lambda d: ["fit", "--config", str(d / "nope.yaml")], "nope.yaml"),
    "features file missing": (lambda d: _features_command(str(d / "missing.npz")), "missing.npz: not found"),
    "features file with zero rows": (
        lambda d: _features_command(_npz(d, "empty.npz", lambda p, np: np.savez(p, features=np.zeros((0, 4))))),
        "must be a non-empty (N, D) array",
    ),
    "truncated .npz": (
        lambda d: _features_command(
            _npz(
                d,
                "cut.npz",
                lambda p, np: (np.savez(p, features=np.ones((500, 8))), p.write_bytes(p.read_bytes()[:-900])),
            )
        ),
        "not a readable .npz",
    ),
    "a CSV named .npz": (
        lambda d: _features_command(_npz(d, "csv.npz", lambda p, np: p.write_text("a,b\n1,2\n"))),
        "not a zip archive",
    ),
    "NaN in the features": (
        lambda d: _features_command(
            _npz(d, "nan.npz", lambda p, np: np.savez(p, features=np.array([[np.nan, 1.0]] * 4)))
        ),
        "contains NaN or inf",
    ),
    "labels of the wrong length": (
        lambda d: _features_command(
            _npz(d, "lab.npz", lambda p, np: np.savez(p, features=np.ones((4, 2)), labels=np.zeros(5)))
        ),
        "'labels' must be (4,)",
    ),
    "string features": (
        lambda d: _features_command(_npz(d, "str.npz", lambda p, np: np.savez(p, features=np.array([["a", "b"]] * 4)))),
        "str.npz: 'features' must be numeric, got dtype <U1",
    ),
    "string labels": (
        lambda d: _features_command(
            _npz(d, "sl.npz", lambda p, np: np.savez(p, features=np.eye(4), labels=np.array(list("abcd"))))
        ),
        "sl.npz: 'labels' must be integer class ids (-1: unlabelled), got dtype <U1",
    ),
    "float labels (0.5 … 9.5)": (
        lambda d: _features_command(
            _npz(d, "fl.npz", lambda p, np: np.savez(p, features=np.eye(10), labels=np.arange(10) + 0.5))
        ),
        "fl.npz: 'labels' must be whole-number class ids (-1: unlabelled), got values such as [0.5, 1.5, 2.5]",
    ),
    "300 identical rows": (
        lambda d: _features_command(
            _npz(d, "same.npz", lambda p, np: np.savez(p, features=np.ones((300, 8)), labels=np.arange(300) % 3)),
            "--data.num_clusters=3",
            f"--data.cache_dir={d / 'cache'}",
        ),
        "same.npz: 'features' are constant (every row the same, up to 0.0001 of their size): nothing to cluster",
    ),
    "float64 features beyond float32's range": (
        lambda d: _features_command(_npz(d, "huge.npz", lambda p, np: np.savez(p, features=np.eye(8) * 1e39))),
        "huge.npz: 'features' holds values beyond float32's range (largest |x| = 1e+39 > 3.4e+38)",
    ),
    "a 'classes' array shorter than the labels": (
        lambda d: _features_command(
            _npz(d, "cls.npz", lambda p, np: np.savez(p, features=np.eye(6), labels=np.arange(6) % 3, classes=["a"]))
        ),
        "cls.npz: 'classes' names 1 classes but 'labels' go up to 2",
    ),
    "ragged rows saved as an object array": (
        lambda d: _features_command(
            _npz(d, "obj.npz", lambda p, np: np.savez(p, features=np.array([np.ones(3), np.ones(4)], dtype=object)))
        ),
        "obj.npz: 'features' is an object array (ragged rows or Python objects)",
    ),
    "a `num_clusters_range` with lo > hi (no labels: K is `auto`)": (
        lambda d: _features_command(_unlabelled(d), "--data.num_clusters_range=[5,3]"),
        "data.num_clusters_range: expected [lo, hi] with 2 ≤ lo ≤ hi < 60 (the rows the search clusters",
    ),
    "a `num_clusters_range` from 1": (
        lambda d: _features_command(_unlabelled(d), "--data.num_clusters=auto", "--data.num_clusters_range=[1,4]"),
        "data.num_clusters_range: expected [lo, hi] with 2 ≤ lo ≤ hi < 60",
    ),
    "a `num_clusters_range` up to N": (
        lambda d: _features_command(_unlabelled(d), "--data.num_clusters_range=[2,60]"),
        "data.num_clusters_range: expected [lo, hi] with 2 ≤ lo ≤ hi < 60",
    ),
    "a `num_clusters_range` with a fixed K": (
        lambda d: _features_command(_unlabelled(d), "--data.num_clusters=3", "--data.num_clusters_range=[2,4]"),
        "data.num_clusters_range: only read with data.num_clusters auto, but data.num_clusters is 3",
    ),
    "`num_clusters auto` for validate without a checkpoint": (
        lambda d: ["validate", *_features_command(_unlabelled(d), "--allow_untrained=true")[1:]],
        "data.num_clusters: auto chooses K in a fit; validate takes K from its --ckpt_path, or pass --data.num",
    ),
    "N ≤ k + 1 rows (every loss 0)": (
        lambda d: _features_command(
            _npz(d, "four.npz", lambda p, np: np.savez(p, features=np.eye(4), labels=[0, 0, 1, 1])),
            f"--data.cache_dir={d / 'cache'}",
        ),
        "four.npz has 4 rows; a fit with a 3-NN table needs at least 5",
    ),
    "a validation set of another feature dim": (
        lambda d: _features_command(
            _npz(
                d,
                "train.npz",
                lambda p, np: np.savez(
                    p, features=np.random.default_rng(0).normal(size=(60, 8)), labels=np.arange(60) % 3
                ),
            ),
            "--data.val_dataset=icon_lightning.data.FeaturesFile",
            "--data.val_dataset.path=" + _npz(d, "val5.npz", lambda p, np: np.savez(p, features=np.eye(5))),
            f"--data.cache_dir={d / 'cache'}",
        ),
        "val5.npz: rows of 5 features, but the fit's data",
    ),  # fmt: skip
    "an out-of-range seed": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--seed_everything=-5"],
        "seed_everything: expected an integer in [0, 4294967295] or true (a random seed), got -5",
    ),
    "`num_clusters 0`": (lambda d: ["fit", "--config", DIGITS_CONFIG, "--data.num_clusters=0"], "num_clusters"),
    "`num_clusters 1`": (lambda d: ["fit", "--config", DIGITS_CONFIG, "--data.num_clusters=1"], "num_clusters"),
    "`num_clusters` above N": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--data.num_clusters=5000"],
        "2 ≤ K ≤ N = 1797",
    ),
    "`val_batch_size 0`": (lambda d: ["fit", "--config", DIGITS_CONFIG, "--data.val_batch_size=0"], "val_batch_size"),
    "α of p outside [0, 1)": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--model.loss.init_args.p.init_args.alpha=1.5"],
        "p.alpha",
    ),
    "α of q outside [0, 1)": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--model.loss.init_args.q.init_args.alpha=-0.1"],
        "q.alpha",
    ),
    "`icon validate` without a checkpoint": (
        lambda d: ["validate", "--config", DIGITS_CONFIG, f"--trainer.default_root_dir={d}"],
        "needs trained heads",
    ),
    "`--ckpt_path last` before any fit": (
        lambda d: ["predict", "--config", DIGITS_CONFIG, f"--trainer.default_root_dir={d}", "--ckpt_path=last"],
        "found no checkpoint",
    ),
    "`--ckpt_path` that does not exist": (
        lambda d: ["validate", "--config", DIGITS_CONFIG, f"--ckpt_path={d / 'x.ckpt'}"],
        "no checkpoint file at",
    ),
    "`--trainer.default_root_dir` not creatable": (
        lambda d: _file(d / "f") and ["fit", "--config", DIGITS_CONFIG, f"--trainer.default_root_dir={d / 'f'}"],
        "cannot create",
    ),
    "`--run_dir` holding another run": (
        lambda d: (
            ((d / "r").mkdir(), (d / "r" / "metrics.json").write_text("{}"))
            and ["fit", "--config", DIGITS_CONFIG, f"--run_dir={d / 'r'}"]
        ),
        "already holds another run",
    ),
    "an image tar with a truncated JPEG": (
        lambda d: [
            "fit",
            "--config",
            "configs/recipes/icon_clustering.yaml",
            "--data.dataset=icon_lightning.data.TarImageFolder",
            f"--data.dataset.path={_tar_with_a_truncated_jpeg(d, __import__('numpy'))}",
            "--data.backbone=icon_lightning.data.backbones.FrozenBackbone",
            "--data.backbone.model=torch.nn.Flatten",
            "--data.backbone.feature_dim=192",
            "--data.image_size=8",
            "--data.views=clean",
            f"--data.cache_dir={d / 'cache'}",
        ],
        "member 'b/1.jpg': not a readable image",
    ),
    "`--trainer.max_steps 0` (no step: no head to select)": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--trainer.max_steps=0", f"--trainer.default_root_dir={d}"],
        "trainer.max_steps: 0 takes no optimizer step, so no head can be selected",
    ),
    "a truncated checkpoint": (
        lambda d: ["validate", "--config", DIGITS_CONFIG, f"--ckpt_path={_truncated_checkpoint(d)}"],
        "cut.ckpt is not a readable checkpoint (truncated, or not written by torch.save",
    ),
    "an unknown subcommand (the usage names sweep too)": (
        lambda d: ["fitt", "--config", DIGITS_CONFIG],
        "unknown subcommand 'fitt': expected one of fit, validate, test, predict, sweep",
    ),
    "an optimizer's lr with no optimizer class (the recipe sets none)": (
        lambda d: ["fit", "--config", "configs/recipes/icon_clustering.yaml", "--model.optimizer.init_args.lr=-0.01"],
        "model.optimizer: 'lr' was given before a class: set model.optimizer first (for example "
        "--model.optimizer=torch.optim.Adam)",
    ),
    "sweep file missing": (lambda d: ["sweep", str(d / "sweep.yaml")], "no file at"),
    "a count below its annotation's limit (jsonargparse, at parse time)": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--model.num_heads=0"],
        "model.num_heads: expected a value > 0, got 0",
    ),
    "a momentum outside (0, 1) in an optional setting": (
        lambda d: ["fit", "--config", DIGITS_CONFIG, "--model.ema_momentum=1.5"],
        "model.ema_momentum: expected a value > 0 and < 1 (or another listed form), got 1.5",
    ),
}


def run_case(argv: list[str]) -> str:
    """What `icon <argv>` prints on stderr as it exits (all of it), or "" when it does not fail."""
    import contextlib
    import io

    from icon_lightning.entry import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main(argv)
    except SystemExit as end:
        return str(end.code) if isinstance(end.code, str) else err.getvalue().strip()
    return ""


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_every_bad_cli_input_ends_in_one_line(case, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the configs' relative paths
    monkeypatch.setenv("WANDB_MODE", "disabled")
    build, fragment = CLI_CASES[case]
    out = run_case(build(tmp_path))
    line = out.splitlines()[-1]  # pytest's argv makes LightningCLI warn first; `icon` itself prints one line
    assert fragment in line and line.startswith("icon: error: ") and "Traceback" not in out, out


BAD_INPUT_MARKERS = ("<!-- bad-input-table -->", "<!-- bad-input-table-end -->")  # docs/bad-input.md


def cli_table() -> str:
    """docs/bad-input.md's table: each case's last line, with what changes from run to run or with any default
    (temporary folders, a run's config key and time, the `--debug` hint) written as `…`, `<key>`, `<time>-<id>`."""
    import re
    import tempfile

    lines = ["| bad input | what `icon` prints (one line, exit 1 or 2) |", "|---|---|"]
    for case, (build, _) in CLI_CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            try:
                line = run_case(build(Path(folder))).splitlines()[-1].replace(folder, "…")
            except BaseException as error:  # noqa: BLE001 - a case that escapes is reported, not hidden
                line = f"UNCAUGHT {type(error).__name__}: {error}"
        line = re.sub(r"-[0-9a-f]{8}/", "-<key>/", line.replace("  (--debug or ICON_DEBUG=1 shows the traceback)", ""))
        line = re.sub(r"-\d{8}-\d{6}-[0-9a-f]{4}", "-<time>-<id>", line)
        lines.append(f"| {case} | `{line.replace('|', '/')}` |")
    return "\n".join(lines)


if __name__ == "__main__":  # docs/bad-input.md's table; --readme writes it there
    import sys

    from benchmarks.common import write_readme_block

    table = cli_table()
    print(table)
    if "--readme" in sys.argv[1:]:
        write_readme_block(table, markers=BAD_INPUT_MARKERS)


def test_features_along_fewer_directions_than_clusters_warn_by_name(tmp_path):
    """Rank below K still clusters (blobs on a line), so it is a named warning, not an error; the rank is that of
    the centred features (np.linalg.matrix_rank agrees)."""
    import numpy as np

    from icon_lightning.data.prepared import check_spread

    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=500), rng.normal(size=16)) + 3.0  # rank 1 after centring
    assert np.linalg.matrix_rank(line - line.mean(0)) == 1
    with pytest.warns(UserWarning, match=r"^line.npz: 'features' vary along only 1 direction\(s\), fewer than num_c"):
        check_spread(line, line.mean(0, keepdims=True), 4, "line.npz")
    full = rng.normal(size=(500, 16))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_spread(full, full.mean(0, keepdims=True), 10, "full.npz")  # 16 directions ≥ 10: silent
    nearly = np.ones((300, 8)) + 1e-7 * rng.normal(size=(300, 8))
    with pytest.raises(ValueError, match="'features' are constant"):
        check_spread(nearly, nearly.mean(0, keepdims=True), 3, "nearly.npz")


def test_whole_number_float_labels_are_accepted_and_others_named():
    import numpy as np

    from icon_lightning.data.datasets import FeaturesArray, integer_labels

    assert integer_labels(np.array([0.0, 2.0, -1.0]), "labels").tolist() == [0, 2, -1]
    with pytest.raises(ValueError, match=r"^labels must be whole-number class ids.*\[0\.5\]"):
        FeaturesArray(np.eye(3), np.array([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("scale", [2.0**100, 2.0**-100])
def test_huge_and_tiny_float32_features_are_prepared_like_ordinary_ones(scale, tmp_path):
    """float32 features near 1e30 overflowed the L2 norm: every row became zero and the fit trained on zeros, exit 0
    (and near 1e-30 the squares underflowed). A power-of-two scale is exact, so the prepared rows must be equal."""
    import numpy as np

    from icon_lightning.data.neighbours import centred_unit_rows
    from icon_lightning.estimator import HeadClusterer

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, size=(60, 8)) for c in (-2, 0, 2)]).astype(np.float32)
    scaled = x * np.float32(scale)
    reference = x.astype(np.float64) - x.astype(np.float64).mean(0)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert np.abs(centred_unit_rows(x) - reference).max() < 1e-6
    assert np.array_equal(centred_unit_rows(scaled), centred_unit_rows(x))
    mean = x.mean(0, keepdims=True)  # a fit's mean, applied to other rows (predict)
    assert np.array_equal(centred_unit_rows(scaled[:5], mean * np.float32(scale)), centred_unit_rows(x[:5], mean))
    settings = dict(n_clusters=3, cache_dir=str(tmp_path), overrides=["--trainer.max_steps=10", "--model.num_heads=1"])
    assert np.array_equal(HeadClusterer(**settings).fit(scaled).labels_, HeadClusterer(**settings).fit(x).labels_)
