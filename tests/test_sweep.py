"""`icon sweep` survives preemption: SIGTERM or Ctrl-C stops it after the running trial writes its interrupted
record (exit 143 / 130, no further trial, the summary marks the trial ``interrupted``); only a complete record counts
as done; a re-run resumes interrupted trials from their checkpoints and re-runs failed ones; the exit is non-zero while
any trial in the summary failed or was interrupted. Before, a signal was recorded as a failed trial and the next one
started, an interrupted fit's record counted as done on a re-run, and a re-run with earlier failures exited 0."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from icon_lightning.sweep import finished_run
from icon_lightning.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits" / "config.yaml")
RECIPE = str(ROOT / "configs" / "recipes" / "icon_clustering.yaml")
P_ALPHA = "model.loss.init_args.p.init_args.alpha"


def _alpha_sweep(path: Path, p_alphas: list[float]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "program": "icon",
                "method": "grid",
                "command": ["icon", "fit", "--config", DIGITS, "${args}"],
                "parameters": {
                    P_ALPHA: {"values": p_alphas},
                    "model.loss.init_args.q.init_args.alpha": {"values": [0.0, 0.4]},
                },
            }
        )
    )
    return path


class FakeRuns(list):
    """The argv of each call; ``plan`` says how the next calls end (default ``done``): ``sigterm`` / ``sigint``
    write an interrupted record with a checkpoint to resume from and exit 143 / 130 as the CLI does, ``error``
    writes the record of an error inside training and raises, ``crash`` raises before any record, ``kill`` sends
    this process SIGTERM outside any fit, ``ctrl-c`` raises KeyboardInterrupt outside any fit. A p-α of 0.7 fails
    like a crashing run while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[str] = []
        self.failing = True


@pytest.fixture
def fake_runs(monkeypatch):
    """Stands in for real runs: each writes a metrics.json into a run dir of its own, as IConCLI does, with the
    config hash of its arguments and the fields the CLI writes (a convergence verdict, ``resume_from``)."""
    from icon_lightning import cli
    from icon_lightning.runs import config_sha256

    calls = FakeRuns()

    def fake_cli(argv):
        calls.append(argv)
        how = calls.plan.pop(0) if calls.plan else "done"
        alpha = float(next(a.split("=")[1] for a in argv if ".p.init_args.alpha=" in a))
        if how == "crash" or (alpha == 0.7 and calls.failing):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGTERM)
        if how == "ctrl-c":
            raise KeyboardInterrupt
        root = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--trainer.default_root_dir=")))
        run_dir = root / "digits-x" / f"fit-{len(calls)}"
        (run_dir / "checkpoints").mkdir(parents=True)
        record = {"subcommand": "fit", "config_sha256": config_sha256(cli.parse_config(argv).as_dict())}
        record |= {"run_dir": str(run_dir), "metrics": {"train/loss": 1.0, "val/hungarian_acc/best": 0.5 + alpha}}
        record["convergence"] = {"converged": False, "reason": "stopped at step 60"}
        if how in ("sigterm", "sigint", "error"):
            signal_name = {"sigterm": "SIGTERM", "sigint": "SIGINT", "error": "RuntimeError: boom"}[how]
            torch.save({"global_step": 7}, run_dir / "checkpoints" / "last.ckpt")
            record["convergence"] = {"converged": False, "reason": f"interrupted by {signal_name}"}
            record |= {"steps": 7, "resume_from": str(run_dir / "checkpoints" / "last.ckpt"), "resume_step": 7}
            record["convergence"]["interrupted"] = signal_name
            record |= {"error": "RuntimeError: boom"} if how == "error" else {}
        (run_dir / "metrics.json").write_text(json.dumps(record))
        if how in ("sigterm", "sigint"):
            raise SystemExit(cli.INTERRUPT_EXIT[record["convergence"]["interrupted"]])
        if how == "error":
            raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cli_main", fake_cli)
    return calls


def _summary(out: Path) -> list[dict]:
    return json.loads((out / "sweep_summary.json").read_text())


def test_sweep_runner_runs_the_grid_and_skips_finished_trials(tmp_path, fake_runs, capsys):
    sweep = _alpha_sweep(tmp_path / "sweep.yaml", [0.0, 0.4])
    rows = sweep_main([str(sweep), "--out", str(tmp_path / "out")])
    assert len(fake_runs) == 4 and [r["val/hungarian_acc/best"] for r in rows] == [0.5, 0.5, 0.9, 0.9]
    assert len({r["dir"] for r in rows}) == 4 and all(r["status"] == "done" for r in rows)
    assert (tmp_path / "out" / "alpha_sweep.png").is_file() and (tmp_path / "out" / "sweep_summary.json").is_file()
    sweep_main([str(sweep), "--out", str(tmp_path / "out")])  # everything finished: nothing runs again
    assert len(fake_runs) == 4
    assert "val/hungarian_acc/best" in capsys.readouterr().out


def test_an_edited_sweep_runs_its_new_trials_instead_of_reusing_old_results(tmp_path, fake_runs):
    """The runner used to match finished trials by position: after an edit it skipped every trial and reported
    the old results under the new parameters."""
    sweep_main([str(_alpha_sweep(tmp_path / "sweep.yaml", [0.0, 0.4])), "--out", str(tmp_path / "out")])
    rows = sweep_main([str(_alpha_sweep(tmp_path / "sweep.yaml", [0.2, 0.4])), "--out", str(tmp_path / "out")])
    assert len(fake_runs) == 6  # the two p-α = 0.2 trials ran; the p-α = 0.4 ones were reused
    assert [r["val/hungarian_acc/best"] for r in rows] == pytest.approx([0.7, 0.7, 0.9, 0.9])
    summary = _summary(tmp_path / "out")
    # merged: the earlier run's p-α = 0 trials stay in the summary (it used to be replaced by this run's 4 rows)
    assert [r[P_ALPHA] for r in summary] == [0.0, 0.0, 0.2, 0.2, 0.4, 0.4]
    assert len({r["config_sha256"] for r in summary}) == 6


def test_a_failed_trial_makes_every_rerun_exit_non_zero_until_it_succeeds(tmp_path, fake_runs, capsys):
    """Failures merged from an earlier summary did not count: a re-run of the trials that were done printed
    "2 of 4 trials failed" and exited 0."""
    from icon_lightning.entry import main as icon

    sweep, out = _alpha_sweep(tmp_path / "sweep.yaml", [0.4, 0.7]), tmp_path / "out"
    with pytest.raises(RuntimeError, match="^2 of 4 trials failed"):  # the sweep goes on, then exits non-zero
        sweep_main([str(sweep), "--out", str(out)])
    assert len(fake_runs) == 4
    failures = list(out.glob("trial-*/failed-*.json"))
    assert len(failures) == 2 and "RuntimeError" in json.loads(failures[0].read_text())["traceback"]
    assert [r["status"] for r in _summary(out)] == ["done", "done", "failed", "failed"]
    assert "illegal memory access" in _summary(out)[2]["error"]
    assert "2 of 4 trials failed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as end:  # retried, through `icon`: a non-zero exit with the count
        icon(["sweep", str(sweep), "--out", str(out)])
    assert len(fake_runs) == 6 and str(end.value.code).startswith("icon: error: RuntimeError: 2 of 4 trials failed")
    with pytest.raises(SystemExit) as end:  # only the done trials this time: the failed ones are still in the summary
        icon(["sweep", str(sweep), "--out", str(out), "--count", "2"])
    assert len(fake_runs) == 6 and str(end.value.code).startswith("icon: error: RuntimeError: 2 of 4 trials failed")
    fake_runs.failing = False  # fixed: the failed trials run again, from scratch, and the sweep succeeds
    rows = sweep_main([str(sweep), "--out", str(out)])
    assert len(fake_runs) == 8 and not any("--ckpt_path" in a for argv in fake_runs[-2:] for a in argv)
    assert [r["status"] for r in rows] == [r["status"] for r in _summary(out)] == ["done"] * 4


@pytest.mark.parametrize(("how", "code", "name"), [("sigterm", 143, "SIGTERM"), ("sigint", 130, "SIGINT")])
def test_a_signal_in_a_trial_stops_the_sweep_and_a_rerun_resumes_it(tmp_path, fake_runs, capsys, how, code, name):
    """A fit ended by a signal used to be recorded as a failed trial, the next trial started and the exit was 1;
    its record (subcommand fit, same hash) then counted as done on a re-run."""
    from icon_lightning.entry import main as icon

    sweep, out = _alpha_sweep(tmp_path / "sweep.yaml", [0.0, 0.4]), tmp_path / "out"
    fake_runs.plan = ["done", how]
    with pytest.raises(SystemExit) as end:
        icon(["sweep", str(sweep), "--out", str(out)])
    assert end.value.code == code and len(fake_runs) == 2  # trials 3 and 4 never started
    summary = _summary(out)
    assert [r["status"] for r in summary] == ["done", "interrupted"] and summary[1]["interrupted"] == name
    assert Path(summary[1]["resume_from"]).is_file() and summary[1]["steps"] == 7
    assert not list(out.glob("trial-*/failed-*.json"))
    assert f"stopped by {name} with 2 of 4 trials taken up" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="^1 of 2 trials interrupted"):  # trial 2 not repeated: still in the summary
        sweep_main([str(sweep), "--out", str(out), "--count", "1"])
    assert len(fake_runs) == 2
    rows = sweep_main([str(sweep), "--out", str(out)])  # resumes trial 2 from its checkpoint, runs 3 and 4
    assert len(fake_runs) == 5 and "--ckpt_path=last" in fake_runs[2]
    assert not any(a.startswith("--ckpt_path") for argv in fake_runs[3:] for a in argv)
    assert rows[1]["config_sha256"] == summary[1]["config_sha256"]  # the resumed trial keeps its key
    assert [r["status"] for r in rows] == [r["status"] for r in _summary(out)] == ["done"] * 4


@pytest.mark.parametrize("how", ["error", "crash"])
def test_a_trial_that_raised_in_training_is_not_done_and_runs_again_from_scratch(tmp_path, fake_runs, how):
    """The record of a fit that raised inside training (an ``error``, or an exception's name as its interruption)
    has ``subcommand: fit`` and the trial's hash: it used to count as done on a re-run, with partial metrics."""
    sweep, out = _alpha_sweep(tmp_path / "sweep.yaml", [0.0]), tmp_path / "out"
    fake_runs.plan = [how]
    with pytest.raises(RuntimeError, match="^1 of 2 trials failed"):
        sweep_main([str(sweep), "--out", str(out)])
    rows = sweep_main([str(sweep), "--out", str(out)])
    assert len(fake_runs) == 3 and not any(a.startswith("--ckpt_path") for a in fake_runs[2])
    assert [r["status"] for r in rows] == ["done", "done"]


def test_a_failure_after_an_interruption_runs_the_trial_again_from_scratch(tmp_path, fake_runs):
    sweep, out = _alpha_sweep(tmp_path / "sweep.yaml", [0.0]), tmp_path / "out"
    fake_runs.plan = ["sigterm"]
    with pytest.raises(SystemExit):
        sweep_main([str(sweep), "--out", str(out)])
    fake_runs.plan = ["crash"]  # the resumed attempt fails (a bad checkpoint, say): not resumed from it again
    with pytest.raises(RuntimeError, match="^1 of 2 trials failed"):
        sweep_main([str(sweep), "--out", str(out)])
    assert any(a.startswith("--ckpt_path=") for a in fake_runs[1])
    sweep_main([str(sweep), "--out", str(out)])
    assert not any(a.startswith("--ckpt_path") for a in fake_runs[3])


@pytest.fixture
def sigterm_guard():
    """A SIGTERM handler that fails the test instead of killing pytest (before the fix the sweep set none); the
    sweep must put it back when it ends."""

    def guard(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler")

    before = signal.signal(signal.SIGTERM, guard)
    yield guard
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize(("how", "code"), [("kill", 143), ("ctrl-c", 130)])
def test_a_signal_outside_a_fit_stops_the_sweep(tmp_path, fake_runs, sigterm_guard, how, code):
    """SIGTERM while a trial loads its data (no Lightning handler yet) or Ctrl-C there: the sweep stops at once."""
    sweep, out = _alpha_sweep(tmp_path / "sweep.yaml", [0.0, 0.4]), tmp_path / "out"
    fake_runs.plan = ["done", how]
    with pytest.raises(SystemExit) as end:
        sweep_main([str(sweep), "--out", str(out)])
    assert end.value.code == code and len(fake_runs) == 2
    assert [r["status"] for r in _summary(out)] == ["done", "interrupted"]
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard
    sweep_main([str(sweep), "--out", str(out)])  # nothing to resume from: trial 2 runs from scratch
    assert len(fake_runs) == 5 and not any(a.startswith("--ckpt_path") for argv in fake_runs for a in argv)


def test_a_sweep_file_with_a_yaml_error_names_the_file_in_one_line(tmp_path):
    from icon_lightning.entry import main as icon

    bad = tmp_path / "sweep.yaml"
    bad.write_text("method: grid\nparameters:\n  a: {values: [1, 2]\n  b: 3\n")
    with pytest.raises(SystemExit) as end:
        icon(["sweep", str(bad)])
    message = str(end.value.code)
    assert message.startswith(f"icon: error: {bad}: not valid YAML: ") and "\n" not in message
    assert "<unicode string>" not in message and "line 4" in message, message


class SendAt(Callback):
    """Sends this process ``sig`` after optimizer step ``step``; records the step each fit starts from."""

    def __init__(self, step: int | None, starts: list[int], sig: int = signal.SIGTERM) -> None:
        self.step, self.starts, self.sig = step, starts, sig

    def on_train_start(self, trainer, *args) -> None:
        self.starts.append(trainer.global_step)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def _seed_sweep(path: Path, cache: Path) -> Path:
    fixed = ["--data.dataset=icon_lightning.data.DigitsDataset", "--data.views=clean", "--model.num_heads=2"]
    fixed += ["--data.batch_size=2048", "--trainer.max_steps=30", "--trainer.logger=false", f"--data.cache_dir={cache}"]
    command = ["icon", "fit", "--config", RECIPE, *fixed, "--trainer.enable_progress_bar=false", "${args}"]
    spec = {"program": "icon", "method": "grid", "command": command}
    path.write_text(yaml.safe_dump(spec | {"parameters": {"seed_everything": {"values": [0, 1, 2]}}}))
    return path


def built_with(monkeypatch, callback_for) -> list[list[str]]:
    """Every run the sweep builds gets ``callback_for(runs built before it)`` among its callbacks; returns the list
    of the runs' arguments, in order."""
    from icon_lightning import cli

    assemble, built = cli.assemble, []

    def assemble_with(argv):
        run = assemble(argv)
        run.trainer.callbacks.append(callback_for(built))
        built.append(argv)
        return run

    monkeypatch.setattr(cli, "assemble", assemble_with)
    return built


def test_sigterm_in_a_real_fit_stops_the_sweep_and_the_rerun_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Real digits fits (30 full-batch steps): SIGTERM at step 12 of trial 1 of 3 → exit 143, trial 2 never ran, the
    record says interrupted with its last.ckpt; the re-run resumes trial 1 from step 12 to the metrics of an unbroken
    fit, runs trials 2 and 3, and exits 0."""
    from icon_lightning import cli

    starts: list[int] = []
    built = built_with(monkeypatch, lambda before: SendAt(12 if not before else None, starts))
    sweep, out = _seed_sweep(tmp_path / "sweep.yaml", tmp_path / "cache"), tmp_path / "out"
    with pytest.raises(SystemExit) as end:
        sweep_main([str(sweep), "--out", str(out)])
    assert end.value.code == 143 and len(built) == 1  # trial 2 never started
    (row,) = _summary(out)
    assert row["status"] == "interrupted" and row["interrupted"] == "SIGTERM" and row["steps"] == 12
    record = json.loads(next(out.glob("trial-*/**/metrics.json")).read_text())
    assert record["convergence"]["interrupted"] == "SIGTERM" and record["resume_step"] == 12
    assert row["resume_from"] == record["resume_from"] and Path(record["resume_from"]).is_file()
    rows = sweep_main([str(sweep), "--out", str(out)])
    assert len(built) == 4 and "--ckpt_path=last" in built[1]
    assert starts == [0, 12, 0, 0]  # the resumed fit started at the checkpoint's step; the others from scratch
    assert [r["status"] for r in rows] == ["done"] * 3 and [r["steps"] for r in rows] == [30] * 3
    assert rows[0]["config_sha256"] == row["config_sha256"]  # the resumed trial keeps its key
    resumed = finished_run(Path(rows[0]["dir"]), row["config_sha256"])
    assert resumed["ckpt_path"] == record["resume_from"] and resumed["steps"] == 30  # from that checkpoint on
    unbroken = cli.cli_main([*built[0][:-1], f"--trainer.default_root_dir={tmp_path / 'unbroken'}"])
    for key in ("train/loss", "val/nmi"):
        assert rows[0][key] == pytest.approx(unbroken.record["metrics"][key], abs=1e-5), key


class SendAtSetup(Callback):
    """Sends this process SIGTERM while the fit sets up (before Lightning installs its own SIGTERM handler)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_while_a_real_fit_sets_up_stops_the_sweep_at_once(tmp_path, monkeypatch, sigterm_guard):
    """Before Lightning's handler is in place (data, setup) SIGTERM used to take Python's default: the process died
    with no summary, or, under a handler of its own, the trial ran to its end."""
    built = built_with(monkeypatch, lambda before: SendAtSetup())
    sweep, out = _seed_sweep(tmp_path / "sweep.yaml", tmp_path / "cache"), tmp_path / "out"
    with pytest.raises(SystemExit) as end:
        sweep_main([str(sweep), "--out", str(out)])
    assert end.value.code == 143 and len(built) == 1
    (row,) = _summary(out)
    assert row["status"] == "interrupted" and row["interrupted"] == "SIGTERM" and row["steps"] == 0
    record = json.loads(next(out.glob("trial-*/**/metrics.json")).read_text())
    assert record["convergence"]["interrupted"] == "SIGTERM" and record["resume_from"] is None
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the sweep's handler is gone again
