"""Runs never lose or misattribute records: a folder per run, `--ckpt_path last`, checkpoints between
validations, no silent evaluation of untrained heads, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from icon_lightning.cli import check_config, cli_main
from icon_lightning.entry import main
from icon_lightning.runs import config_sha256

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits" / "config.yaml")


def digits(subcommand: str, root: Path, *extra: str) -> list[str]:
    return [
        subcommand,
        "--config",
        DIGITS,
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        f"--data.cache_dir={root.parent / 'cache'}",
        *extra,
    ]


def record(cli) -> dict:
    return json.loads((cli.run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_fits(tmp_path_factory):
    """Two fits of one config into one root (20 steps each; the second ends later), then a predict."""
    root = tmp_path_factory.mktemp("runs") / "runs"
    first = cli_main(digits("fit", root, "--convergence.max_steps=20"))
    second = cli_main(digits("fit", root, "--convergence.max_steps=20", "--seed_everything=1"))
    return root, first, second


def test_runs_of_one_config_keep_separate_records(two_fits):
    """Every run of a config used to write metrics.json and config.yaml into the logger's shared save_dir, and
    `icon predict` replaced the fit's metrics.json with an empty one."""
    root, first, second = two_fits
    assert first.run_dir != second.run_dir and first.run_dir.parent == second.run_dir.parent
    assert first.run_dir.parent.parent == root
    predict = cli_main(digits("predict", root, "--ckpt_path=last"))
    for run, subcommand, seed in ((first, "fit", 0), (second, "fit", 1), (predict, "predict", 0)):
        assert record(run)["subcommand"] == subcommand and record(run)["seed"] == seed
        assert (run.run_dir / "config.yaml").is_file() and record(run)["run_dir"] == str(run.run_dir)
    assert (predict.run_dir / "predictions.npy").is_file() and not (first.run_dir / "predictions.npy").exists()
    assert (first.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert record(first)["config_sha256"] != record(second)["config_sha256"]  # the seeds differ


def test_ckpt_path_last_is_the_newest_checkpoint_of_that_config(two_fits, tmp_path):
    """`--ckpt_path last` used to find nothing (each W&B run had its own folder): fit restarted from step 0 and
    validate scored untrained heads."""
    root, _, second = two_fits
    validate = cli_main(digits("validate", root, "--ckpt_path=last"))
    assert record(validate)["ckpt_path"] == str(second.run_dir / "checkpoints" / "last.ckpt")
    assert record(validate)["metrics"]["val/hungarian_acc/best"] == pytest.approx(
        record(second)["metrics"]["val/hungarian_acc/best"], abs=1e-6
    )
    # The checkpoint holds the head losses the fit recorded (it held the previous epoch's: the checkpoint is written
    # at the epoch's validation, before the epoch's losses were taken).
    assert record(validate)["head_losses"] == record(second)["head_losses"]
    assert record(validate)["selected_head"] == record(second)["selected_head"]
    resumed = cli_main(digits("fit", root, "--ckpt_path=last", "--convergence.max_steps=30", "--seed_everything=1"))
    assert record(resumed)["steps"] == 30 and resumed.run_dir not in (second.run_dir,)
    assert json.loads((second.run_dir / "metrics.json").read_text())["steps"] == 20  # the first fit's record stays
    with pytest.raises(FileNotFoundError, match=r"ckpt_path: 'last' found no checkpoint .*runs"):
        cli_main(digits("validate", root, "--ckpt_path=last", "--data.k=7"))  # other data settings: no match


def test_evaluating_untrained_heads_needs_an_explicit_flag(tmp_path):
    root = tmp_path / "runs"
    for subcommand in ("validate", "predict"):
        with pytest.raises(ValueError, match=rf"ckpt_path: `icon {subcommand}` needs trained heads"):
            cli_main(digits(subcommand, root))
    cli = cli_main(digits("validate", root, "--allow_untrained=true"))
    assert record(cli)["ckpt_path"] is None and "val/hungarian_acc/best" in record(cli)["metrics"]
    with pytest.raises(FileNotFoundError, match="ckpt_path: no checkpoint file at"):
        cli_main(digits("validate", root, f"--ckpt_path={tmp_path / 'missing.ckpt'}"))


def test_a_checkpoint_is_written_between_validations(tmp_path):
    """Checkpoints used to follow validation only: the digits config validates every 25 epochs, so a crash at
    epoch 15 left nothing to resume from."""
    from lightning.pytorch import Callback

    class Crash(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 15:
                raise RuntimeError("killed")

    cli = cli_main(digits("fit", tmp_path / "runs", "--trainer.check_val_every_n_epoch=25")[1:], run=False)
    cli.trainer.callbacks.append(Crash())
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    last = torch.load(cli.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10
    assert not list((cli.run_dir / "checkpoints").glob("*.tmp"))


def test_option_prefixes_are_refused():
    """`--model.num_head` used to pass as `--model.num_heads` (argparse abbreviations)."""
    with pytest.raises(SystemExit):
        check_config(["--config", DIGITS, "--model.num_head=5"])
    assert check_config(["--config", DIGITS, "--model.num_heads=5"]).fit.model.num_heads == 5


def test_the_config_hash_ignores_where_a_run_writes_and_nothing_else():
    def sha(*args: str) -> str:  # hashed at once: a later parse may reuse the objects of an earlier one
        return config_sha256(check_config(["--config", DIGITS, *args]).fit.as_dict())

    base = sha()
    assert sha("--trainer.default_root_dir=/elsewhere", "--run_dir=x", "--ckpt_path=a.ckpt") == base
    assert sha("--model.num_heads=5") != base != sha("--seed_everything=1")


def test_an_unwritable_run_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=rf"trainer.default_root_dir: cannot create {blocker}"):
        cli_main(digits("fit", blocker, "--convergence.max_steps=2"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match=rf"run_dir: {taken} already holds another run"):
        cli_main(digits("fit", tmp_path / "runs", f"--run_dir={taken}"))


def test_icon_errors_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(digits("validate", tmp_path / "runs"))
    message = str(exit_info.value.code)
    assert message.startswith("icon: error: ckpt_path:") and "\n" not in message and "--debug" in message
    with pytest.raises(ValueError, match="ckpt_path"):
        main([*digits("validate", tmp_path / "runs"), "--debug"])
    monkeypatch.setenv("ICON_DEBUG", "1")
    with pytest.raises(ValueError, match="ckpt_path"):
        main(digits("validate", tmp_path / "runs"))


def test_records_get_the_permissions_of_ordinary_files(tmp_path):
    """tempfile's 0600 made shared caches and records unreadable to the other users of a group."""
    from icon_lightning.io import atomic_write_json

    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and json.loads(path.read_text()) == {"a": 1}


def test_ddp_processes_share_rank_zeros_folder_and_other_ranks_create_none(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    first = cli_main(digits("fit", root)[1:], run=False)  # rank 0: creates its folder and exports it
    assert first.run_dir.is_dir() and os.environ["ICON_RUN_DIR"] == str(first.run_dir)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started: rank 0's folder
    child = cli_main(digits("fit", root)[1:], run=False)
    assert child.run_dir == first.run_dir
    monkeypatch.delenv("ICON_RUN_DIR")
    monkeypatch.setenv("RANK", "3")  # started by torchrun/SLURM beside rank 0: writes nothing, creates nothing
    other = cli_main(digits("fit", root)[1:], run=False)
    assert not other.run_dir.exists() and len(list(first.run_dir.parent.iterdir())) == 1
