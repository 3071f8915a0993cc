"""Run a W&B sweep file offline: `icon sweep experiments/digits/sweep.yaml [--count N] [--out DIR]`.

`wandb sweep` + `wandb agent` need the W&B server. This runner executes the same file locally: the grid
(every combination of ``values``/``value``) or ``random`` draws (``values``, ``min``/``max`` uniform,
``distribution: int_uniform``), each trial a normal `icon` run with its own run directory and
``metrics.json``, then prints a summary table and writes ``sweep_summary.json`` (and, for debias-α sweeps,
``alpha_sweep.png``).

Each trial is keyed by the hash of its whole parsed config (the sweep's command, its config files' contents and the
trial's parameters): its runs live in ``<out>/trial-<key>/``. Only a complete record counts as done: a fit's
``metrics.json`` of that exact hash with a convergence verdict that is not an interruption and no ``error``; so an
edited sweep or config runs again, beside the old results. A trial that fails is recorded (``failed-<time>.json``,
and ``failed`` in the summary) and the sweep goes on. SIGTERM (a preemption) or Ctrl-C stops the sweep: the running
trial writes its interrupted record, no further trial starts, the summary marks it ``interrupted``, and the exit is
143 / 130. Re-running the same command skips the done trials, resumes each interrupted one from its checkpoint (the
record's ``resume_from``, the trial's newest ``last.ckpt``: ``--ckpt_path last``, which keeps the trial's key) and
runs failed ones again from scratch. The summary is written however the sweep ends, and the exit is non-zero while
any trial in it failed or was interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

PLACEHOLDERS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}"}


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep: no file at {path}")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {yaml_problem(error)}") from None
    if not isinstance(sweep, dict) or "parameters" not in sweep or "command" not in sweep:
        raise ValueError(f"{path}: expected a W&B sweep with 'command' and 'parameters'")
    if sweep.get("method") not in ("grid", "random"):
        raise ValueError(f"{path}: method must be 'grid' or 'random' offline, got {sweep.get('method')!r}")
    return sweep


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message in one line, with the line and column of the problem (its own names ``<unicode string>``)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _choices(spec: dict) -> list | None:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return None


def trials(sweep: dict, count: int | None = None, seed: int = 0) -> list[dict]:
    """The parameter assignments of each trial."""
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        names = list(params)
        grids = [_choices(params[n]) for n in names]
        if any(g is None for g in grids):
            raise ValueError("grid: every parameter needs 'values' or 'value'")
        out = [dict(zip(names, combo)) for combo in itertools.product(*grids)]
        return out[:count] if count else out
    rng = random.Random(seed)
    out = []
    for _ in range(count or 10):
        trial = {}
        for name, spec in params.items():
            choices = _choices(spec)
            if choices is not None:
                trial[name] = rng.choice(choices)
            elif spec.get("distribution") == "int_uniform":
                trial[name] = rng.randint(int(spec["min"]), int(spec["max"]))
            else:
                trial[name] = rng.uniform(float(spec["min"]), float(spec["max"]))
        out.append(trial)
    return out


def resolve_config(value: str, sweep_file: Path | None) -> str:
    """A relative ``--config`` path of a sweep's command, found from the sweep file's folder: the folder itself,
    then each folder above it (so `experiments/digits/config.yaml` in `experiments/digits/sweep.yaml` means the
    same file from any working directory). Absolute paths, and any path when the sweep file is unknown, stay."""
    if sweep_file is None or Path(value).is_absolute():
        return value
    folder = sweep_file.resolve().parent
    for base in (folder, *folder.parents):
        if (base / value).is_file():
            return str(base / value)
    raise FileNotFoundError(f"{sweep_file}: --config {value}: not found from {folder} or any folder above it")


def trial_args(sweep: dict, trial: dict, sweep_file: Path | None = None) -> list[str]:
    """The `icon` arguments of one trial: the sweep's command with ``${args}`` expanded and its ``--config`` paths
    found from the sweep file's folder (``resolve_config``)."""
    args = []
    command = list(sweep["command"])
    if command and command[0] in (sweep.get("program"), "icon"):
        command = command[1:]  # the program itself; the runner calls it in-process
    for token in command:
        if token == "${args}":
            args += [f"--{k}={v}" for k, v in trial.items()]
        elif token not in PLACEHOLDERS:
            args.append(str(token))
    for i, word in enumerate(args):
        if word.startswith("--config="):
            args[i] = "--config=" + resolve_config(word.split("=", 1)[1], sweep_file)
        elif i and args[i - 1] == "--config":
            args[i] = resolve_config(word, sweep_file)
    return args


def record_state(record: dict, sha: str) -> str | None:
    """What a ``metrics.json`` says of a fit of the config hashed ``sha``: ``done`` (complete: a convergence verdict
    that is not an interruption, and no ``error``), ``interrupted`` (by SIGTERM or Ctrl-C: resumable), ``failed``
    (an error inside training, or no verdict), or None (not a fit of this config)."""
    from icon_lightning.cli import INTERRUPT_EXIT

    if not isinstance(record, dict) or record.get("subcommand") != "fit" or record.get("config_sha256") != sha:
        return None
    verdict = record.get("convergence")
    if "error" in record or not isinstance(verdict, dict):
        return "failed"
    if not verdict.get("interrupted"):
        return "done"
    return "interrupted" if verdict["interrupted"] in INTERRUPT_EXIT else "failed"  # else an error's name


def _read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: no record
    return record if isinstance(record, dict) else None


def attempts(trial_dir: Path, sha: str) -> list[tuple[str, dict]]:
    """Every attempt at this trial under ``trial_dir``, newest first, as (state, record): its fits' records of this
    config (``record_state``) and its ``failed-*.json`` (state ``failed``)."""
    found = []
    for path in trial_dir.glob("**/metrics.json"):
        record = _read_json(path)
        state = record_state(record, sha) if record is not None else None
        if state is not None:
            found.append((path.stat().st_mtime_ns, 0, state, record))
    for path in trial_dir.glob("failed-*.json"):  # written after the record of the same attempt, if any
        found.append((path.stat().st_mtime_ns, 1, "failed", _read_json(path) or {}))
    return [(state, record) for *_, state, record in sorted(found, key=lambda a: a[:2], reverse=True)]


def finished_run(trial_dir: Path, sha: str) -> dict | None:
    """The complete ``metrics.json`` of a fit of exactly this config under ``trial_dir``, if any."""
    return next((record for state, record in attempts(trial_dir, sha) if state == "done"), None)


def resume_point(trial_dir: Path, sha: str) -> dict | None:
    """The record of the newest interrupted fit of this config whose checkpoint (``resume_from``) exists, unless a
    failure came after it (a failed trial runs again from scratch); None: run from scratch."""
    for state, record in attempts(trial_dir, sha):
        if state == "failed":
            return None
        if state == "interrupted" and record.get("resume_from") and Path(record["resume_from"]).is_file():
            return record
    return None


def signal_of(end: BaseException) -> str | None:
    """The signal that ended a trial: ``SIGINT`` (Ctrl-C outside a fit: KeyboardInterrupt), ``SIGTERM`` (outside a
    fit: this runner's handler raises Lightning's SIGTERMException), or either inside a fit (the CLI's exit 143 /
    130 after it wrote the interrupted record); None for anything else."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from icon_lightning.cli import INTERRUPT_EXIT

    if isinstance(end, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(end, SIGTERMException):
        return "SIGTERM"
    if isinstance(end, SystemExit):
        return next((name for name, code in INTERRUPT_EXIT.items() if end.code == code), None)
    return None


@contextlib.contextmanager
def stops_on_sigterm():
    """SIGTERM during the sweep: inside a fit, Lightning's handler (which calls this one too) ends the fit between
    steps and the CLI records it; anywhere else (loading data, between trials) the first one raises Lightning's
    ``SIGTERMException`` where the sweep is. Yields the list of signals received."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    received: list[str] = []

    def on_sigterm(signum, frame) -> None:
        received.append("SIGTERM")
        if len(received) == 1 and signal.getsignal(signal.SIGTERM) is on_sigterm:  # not inside Lightning's fit
            raise SIGTERMException

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return
    before = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def run_trial(argv: list[str], trial_dir: Path, sha: str) -> dict:
    """Run one trial in this process. Its failure is recorded in ``trial_dir`` and returned, never raised; a signal
    returns status ``interrupted`` with the record the fit wrote, if it got that far."""
    from icon_lightning.cli import cli_main
    from icon_lightning.io import atomic_write_json, one_line

    started = time.time_ns()
    try:
        cli_main([*argv, f"--trainer.default_root_dir={trial_dir}"])
    except (Exception, SystemExit, KeyboardInterrupt) as error:  # a parse error exits; a signal stops the sweep
        how = signal_of(error)
        if how is not None:
            newest = next(iter(attempts(trial_dir, sha)), ("none", {}))
            record = newest[1] if newest[0] == "interrupted" and _written_since(newest[1], started) else {}
            print(f"    interrupted by {how}", flush=True)
            return {**record, "status": "interrupted", "interrupted": how, "argv": argv}
        message = one_line(error) if isinstance(error, Exception) else f"the CLI exited with {error.code}"
        record = {"status": "failed", "error": message, "traceback": traceback.format_exc(), "argv": argv}
        atomic_write_json(trial_dir / f"failed-{time.strftime('%Y%m%d-%H%M%S')}.json", record)
        print(f"    failed: {message}", flush=True)
        return record
    record = finished_run(trial_dir, sha)
    if record is None:
        return {"status": "failed", "error": f"no complete metrics.json of this config under {trial_dir}", "argv": argv}
    return {"status": "done", **record}


def _written_since(record: dict, started_ns: int) -> bool:
    path = Path(record.get("run_dir") or "/nonexistent") / "metrics.json"
    return path.is_file() and path.stat().st_mtime_ns >= started_ns


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="icon sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("sweep")
    parser.add_argument("--count", type=int, default=None, help="at most this many trials")
    parser.add_argument("--out", default=None, help="folder of the trials' run directories")
    parser.add_argument("--dry-run", action="store_true", help="print the trials' commands only")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error(f"--count: expected a positive number of trials, got {args.count}")
    sweep = load_sweep(args.sweep)
    out = Path(args.out or Path("runs") / "sweeps" / Path(args.sweep).parent.name)
    rows, summary = [], []
    with stops_on_sigterm() as received:
        try:
            stop = run_trials(sweep, Path(args.sweep), args, out, rows, received)
        except BaseException as end:
            if (stop := signal_of(end)) is None:
                raise
        finally:
            if rows:
                summary = merged_with_earlier(rows, out)
                write_summary(summary, out, list(sweep["parameters"]))
    if stop is not None:
        from icon_lightning.cli import INTERRUPT_EXIT

        total = len(trials(sweep, args.count))
        print(
            f"icon sweep: stopped by {stop} with {len(rows)} of {total} trials taken up; the same command resumes it",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(INTERRUPT_EXIT[stop])
    check_every_trial_done(summary, out)
    return rows


def run_trials(sweep: dict, sweep_file: Path, args, out: Path, rows: list[dict], received: list[str]) -> str | None:
    """Run (or reuse) each trial in turn, appending its row to ``rows``; returns the signal that stopped the sweep
    after a trial (None: every trial had its turn)."""
    for i, trial in enumerate(trials(sweep, args.count)):
        argv_i = trial_args(sweep, trial, sweep_file)
        print(f"[{i + 1}] icon {' '.join(argv_i)}", flush=True)
        if args.dry_run:
            continue
        rows.append({"trial": i, **trial, **trial_result(argv_i, out)})
        if rows[-1]["status"] == "interrupted" or received:  # a SIGTERM in a fit's last steps lets it finish
            return rows[-1].get("interrupted") or received[0]
    return None


def check_every_trial_done(summary: list[dict], out: Path) -> None:
    """A sweep whose summary holds a failed or interrupted trial (of this run, or of an earlier one it did not
    repeat) ends in one line, non-zero."""
    failed = sum(r["status"] == "failed" for r in summary)
    interrupted = sum(r["status"] == "interrupted" for r in summary)
    if failed or interrupted:
        counts = f"{failed} of {len(summary)} trials failed" + (f", {interrupted} interrupted" if interrupted else "")
        if not failed:
            counts = f"{interrupted} of {len(summary)} trials interrupted"
        raise RuntimeError(
            f"{counts} (`error` and `reason` in {out / 'sweep_summary.json'}; "
            f"tracebacks in {out}/trial-*/failed-*.json); the same command resumes interrupted trials and re-runs "
            "failed ones"
        )


def merged_with_earlier(rows: list[dict], out: Path) -> list[dict]:
    """This run's rows after the trials of earlier runs into the same ``out`` that it did not run again (matched by
    config hash): a smaller re-run adds to the summary instead of replacing it. An unreadable summary is not
    trusted: this run's rows replace it."""
    path = out / "sweep_summary.json"
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        earlier = []
    ran = {r.get("config_sha256") for r in rows}
    kept = [r for r in earlier if isinstance(r, dict) and r.get("config_sha256") not in ran | {None}]
    return kept + rows


def trial_result(argv: list[str], out: Path) -> dict:
    """Key the trial by its config hash, then reuse its finished fit, resume its interrupted one, or run it."""
    from icon_lightning.cli import parse_config
    from icon_lightning.io import one_line
    from icon_lightning.runs import config_sha256

    try:
        sha = config_sha256(parse_config(argv).as_dict())
    except (Exception, SystemExit) as error:
        if signal_of(error) is not None:
            raise
        message = one_line(error) if isinstance(error, Exception) else "the trial's arguments do not parse"
        print(f"    failed: {message}", flush=True)
        return {"status": "failed", "error": message}
    trial_dir = out / f"trial-{sha[:12]}"
    if (record := finished_run(trial_dir, sha)) is not None:
        print(f"    finished earlier: {trial_dir}", flush=True)
        result = {"status": "done", **record}
    elif (resume := resume_point(trial_dir, sha)) is not None:
        # `last` is that checkpoint: the newest last.ckpt of this trial's runs (the trial's folder is their root). A
        # file path would do the same, but Lightning merges the file's hyper-parameters into the parsed config (the
        # data facts linked into the model), which changes the config hash the trial is keyed by.
        print(f"    resuming from {resume['resume_from']} (step {resume.get('resume_step')})", flush=True)
        result = run_trial([*argv, "--ckpt_path=last"], trial_dir, sha)
    else:
        result = run_trial(argv, trial_dir, sha)
    return summary_row(result, sha, trial_dir)


def summary_row(result: dict, sha: str, trial_dir: Path) -> dict:
    """A trial's row: status, key, folder, steps and metrics (less per-head ones); why it failed, or how it was
    interrupted and where it resumes."""
    metrics = {k: v for k, v in result.get("metrics", {}).items() if "/head_" not in k}
    row = {"status": result["status"], "config_sha256": sha, "dir": str(trial_dir), **metrics}
    if result.get("steps") is not None:
        row["steps"] = result["steps"]
    if result["status"] == "failed":
        row["error"] = result["error"]
    if result["status"] == "interrupted":
        reason = (result.get("convergence") or {}).get("reason") or f"interrupted by {result['interrupted']}"
        row |= {"interrupted": result["interrupted"], "reason": reason, "resume_from": result.get("resume_from")}
    return row


def write_summary(rows: list[dict], out: Path, params: list[str]) -> None:
    from icon_lightning.io import atomic_write

    atomic_write(out / "sweep_summary.json", lambda f: json.dump(rows, f, indent=2))
    print_table(rows, params)
    failed = [r.get("trial") for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} of {len(rows)} trials failed: {failed} (`error` in sweep_summary.json says why)")
    interrupted = [r.get("trial") for r in rows if r["status"] == "interrupted"]
    if interrupted:
        print(f"{len(interrupted)} of {len(rows)} trials interrupted: {interrupted} (the same command resumes them)")
    done = [r for r in rows if r["status"] == "done"]
    if done and any("alpha" in key for key in params):
        from icon_lightning.callbacks.plots import plot_alpha_sweep

        print(f"α-sweep plot: {plot_alpha_sweep(done, out / 'alpha_sweep.png')}")
    print(f"summary: {out / 'sweep_summary.json'}")


def print_table(rows: list[dict], params: list[str]) -> None:
    shown = [c for c in ("train/loss", "val/hungarian_acc/best", "val/nmi", "val/ari") if any(c in r for r in rows)]
    names = [p.split(".")[-1] if p.count(".") < 3 else ".".join(p.split(".")[-3:]) for p in params]
    print("\n" + "  ".join(f"{n:>12}" for n in ["trial", *names, *shown, "status"]))
    for r in rows:
        scores = [f"{r[c]:.4f}" if c in r else "-" for c in shown]
        cells = [str(r.get("trial", "-")), *[str(r.get(p, "-")) for p in params], *scores, r["status"]]
        print("  ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
