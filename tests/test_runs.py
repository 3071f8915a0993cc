"""Runs never lose or misattribute records: a folder per run, `--ckpt_path last`, checkpoints between
validations, no silent evaluation of untrained heads, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from icon_lightning.cli import DATA_FACTS, check_config, cli_main
from icon_lightning.entry import main
from icon_lightning.runs import LENGTH_KEYS, LINKED_KEYS, RESULT_FREE_KEYS, config_sha256, experiment_key, use_run_dir

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
    assert first.run_dir != second.run_dir and first.run_dir.parent != second.run_dir.parent  # seeds: runs apart
    assert first.run_dir.parent.parent == root == second.run_dir.parent.parent
    predict = cli_main(digits("predict", root, "--ckpt_path=last"))
    for run, subcommand, seed in ((first, "fit", 0), (second, "fit", 1), (predict, "predict", 0)):
        assert record(run)["subcommand"] == subcommand and record(run)["seed"] == seed
        assert (run.run_dir / "config.yaml").is_file() and record(run)["run_dir"] == str(run.run_dir)
    assert (predict.run_dir / "predictions.npy").is_file() and not (first.run_dir / "predictions.npy").exists()
    assert (first.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert record(first)["config_sha256"] != record(second)["config_sha256"]  # the seeds differ


def test_ckpt_path_last_is_the_newest_checkpoint_of_that_config(two_fits, tmp_path):
    """`--ckpt_path last` used to find nothing (each W&B run had its own folder): fit restarted from step 0 and
    validate scored untrained heads. It also ignored the seed (a requeued seed-1 job resumed seed 2's checkpoint and
    recorded seed 1) and found nothing when a setting that cannot change the result (cache folder, validation batch
    size) differed."""
    root, first, second = two_fits
    own = cli_main(digits("validate", root, "--ckpt_path=last"))  # seed 0: the first fit's, though the second is newer
    assert record(own)["ckpt_path"] == str(first.run_dir / "checkpoints" / "last.ckpt")
    assert record(own)["steps"] == 20  # the checkpoint's step (a validate record said 0)
    elsewhere = [f"--data.cache_dir={tmp_path / 'other-cache'}", "--data.val_batch_size=7"]
    validate = cli_main(digits("validate", root, "--ckpt_path=last", "--seed_everything=1", *elsewhere))
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


def test_the_run_key_holds_every_setting_that_can_change_the_result_and_nothing_else():
    """The experiment key (where `--ckpt_path last` looks) hashed the model and data sections only: the seed was
    not in it, and the cache folder and validation batch size were."""

    def keys(*args: str) -> tuple[str, str]:  # hashed at once: a later parse may reuse the objects of an earlier one
        plain = check_config(["--config", DIGITS, *args]).fit.as_dict()
        return config_sha256(plain), experiment_key(plain)

    base = keys()
    harmless = [
        ["--trainer.default_root_dir=/elsewhere", "--run_dir=x", "--ckpt_path=a.ckpt"],
        ["--data.cache_dir=/other/cache", "--data.val_batch_size=7", "--data.num_workers=2"],
        ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"],
    ]
    for args in harmless:
        assert keys(*args) == base, args
    for args in (["--seed_everything=1"], ["--data.seed=1"], ["--model.num_heads=5"], ["--data.k=7"]):
        changed = keys(*args)
        assert changed[0] != base[0] and changed[1] != base[1], args
    longer = keys("--convergence.max_steps=30", "--trainer.max_steps=40")
    assert longer[0] != base[0] and longer[1] == base[1]  # a longer run of the same key: what a resume trains on


def test_every_declared_result_free_or_length_key_exists_in_a_parsed_config():
    """A misspelt entry would leave its setting in the key silently; the subcommands' own options (validate's
    ``verbose``, predict's ``return_predictions``) are the only other differences between their configs."""
    from icon_lightning.cli import parse_config

    plain = {sub: parse_config([sub, "--config", DIGITS]).as_dict() for sub in ("fit", "validate", "test", "predict")}

    def has(config: dict, key: str) -> bool:
        for part in key.split("."):
            if not (isinstance(config, dict) and part in config):
                return False
            config = config[part]
        return True

    for key in RESULT_FREE_KEYS + LENGTH_KEYS:
        assert any(has(config, key) for config in plain.values()), key
    assert len({experiment_key(config) for config in plain.values()}) == 1  # `last` finds the fit's checkpoint
    assert LINKED_KEYS == tuple(f"model.{target}" for _, target in DATA_FACTS)  # the facts the CLI links


def test_resuming_from_a_checkpoint_file_keeps_the_runs_identity(two_fits):
    """Lightning merges a given checkpoint's hyper-parameters (the model's linked data facts) into the parsed config:
    `--ckpt_path FILE` gave a resumed run another config hash and experiment folder than its fit."""
    root, first, _ = two_fits
    ckpt = first.run_dir / "checkpoints" / "last.ckpt"
    resumed = cli_main(digits("fit", root, f"--ckpt_path={ckpt}", "--convergence.max_steps=24"))
    assert resumed.run_dir.parent == first.run_dir.parent and record(resumed)["steps"] == 24
    plain = check_config(digits("fit", root, "--convergence.max_steps=24")[1:]).fit.as_dict()
    assert record(resumed)["config_sha256"] == config_sha256(plain)


def test_two_claims_of_one_run_folder_at_the_same_instant_give_it_to_one(tmp_path):
    """The "folder already holds a run" check was not atomic: two fits started together with one --run_dir both ran,
    and the folder kept one run's metrics.json beside the other's config.yaml."""
    import threading

    folder, start, won, lost = tmp_path / "shared-run", threading.Barrier(8), [], []

    def claim() -> None:
        start.wait()
        try:
            won.append(use_run_dir(folder))
        except FileExistsError as error:
            lost.append(str(error))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == 7
    assert all(m.startswith(f"run_dir: {folder} already holds another run") for m in lost)


def test_a_resumed_converged_run_says_so_and_stops_unless_asked_for_more_steps(tmp_path, capsys):
    """`fit --ckpt_path last` on a converged run trained 25 more steps and wrote a second, different record."""
    quick = ["--convergence.min_steps=0", "--convergence.window=5", "--convergence.tol=1.0", "--model.num_heads=2",
             "--convergence.stop_on_plateau=true", "--convergence.lr_drops=0"]  # fmt: skip
    root = tmp_path / "runs"
    done = cli_main(digits("fit", root, *quick))
    steps = record(done)["steps"]
    assert record(done)["convergence"]["converged"]
    again = cli_main(digits("fit", root, *quick, "--ckpt_path=last"))
    assert record(again)["steps"] == steps and record(again)["convergence"]["converged"]
    assert record(again)["convergence"]["reason"].startswith(f"resumed a converged run at step {steps}: nothing")
    assert record(again)["head_losses"] == record(done)["head_losses"]
    more = cli_main(digits("fit", root, *quick, "--ckpt_path=last", f"--trainer.max_steps={steps + 7}"))
    assert record(more)["steps"] == steps + 7


def test_train_loss_is_the_selected_heads_loss(tmp_path):
    """`train/loss` was the mean over the live heads (0.8205 against the selected head's 0.6474)."""
    args = ["--convergence.max_steps=12", "--model.keep_heads=null", "--model.num_heads=4"]
    rec = record(cli_main(digits("fit", tmp_path / "runs", *args)))
    losses = rec["head_losses"]
    assert len(losses) == 4 and rec["selected_head"] == rec["heads"][losses.index(min(losses))]
    assert rec["metrics"]["train/loss"] == pytest.approx(min(losses), rel=1e-6)
    assert rec["metrics"]["train/loss/live_heads_mean"] == pytest.approx(sum(losses) / 4, rel=1e-6)


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
