"""Run a W&B sweep file offline: `icon sweep experiments/digits/sweep.yaml [--count N] [--out DIR]`.

`wandb sweep` + `wandb agent` need the W&B server. This runner executes the same file locally: the grid
(every combination of ``values``/``value``) or ``random`` draws (``values``, ``min``/``max`` uniform,
``distribution: int_uniform``), each trial a normal `icon` run with its own run directory and
``metrics.json``, then prints a summary table and writes ``sweep_summary.json`` (and, for debias-α sweeps,
``alpha_sweep.png``).

Each trial is keyed by the hash of its whole parsed config (the sweep's command, its config files' contents and the
trial's parameters): its runs live in ``<out>/trial-<key>/``. A rerun skips a trial only when a finished fit with
that exact hash is there, so an edited sweep or config runs again, beside the old results. A trial that fails is
recorded (``failed-<time>.json``, and ``failed`` in the summary) and the sweep goes on; the summary is written
however the sweep ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
import traceback
from pathlib import Path

import yaml

PLACEHOLDERS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}"}


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep: no file at {path}")
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict) or "parameters" not in sweep or "command" not in sweep:
        raise ValueError(f"{path}: expected a W&B sweep with 'command' and 'parameters'")
    if sweep.get("method") not in ("grid", "random"):
        raise ValueError(f"{path}: method must be 'grid' or 'random' offline, got {sweep.get('method')!r}")
    return sweep


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


def finished_run(trial_dir: Path, sha: str) -> dict | None:
    """The metrics.json of a finished fit of exactly this config under ``trial_dir``, if any."""
    for path in sorted(trial_dir.glob("**/metrics.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable: not a finished run
        if record.get("subcommand") == "fit" and record.get("config_sha256") == sha:
            return record
    return None


def run_trial(argv: list[str], trial_dir: Path, sha: str) -> dict:
    """Run one trial in this process; its failure is recorded in ``trial_dir`` and returned, never raised."""
    from icon_lightning.cli import cli_main
    from icon_lightning.io import atomic_write_json, one_line

    try:
        cli_main([*argv, f"--trainer.default_root_dir={trial_dir}"])
    except (Exception, SystemExit) as error:  # a parse error exits; KeyboardInterrupt stops the sweep
        message = one_line(error) if isinstance(error, Exception) else f"the CLI exited with {error.code}"
        record = {"status": "failed", "error": message, "traceback": traceback.format_exc(), "argv": argv}
        atomic_write_json(trial_dir / f"failed-{time.strftime('%Y%m%d-%H%M%S')}.json", record)
        print(f"    failed: {message}", flush=True)
        return record
    record = finished_run(trial_dir, sha)
    if record is None:
        return {"status": "failed", "error": f"no metrics.json of this config under {trial_dir}", "argv": argv}
    return {"status": "done", **record}


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
    rows = []
    try:
        for i, trial in enumerate(trials(sweep, args.count)):
            argv_i = trial_args(sweep, trial, Path(args.sweep))
            print(f"[{i + 1}] icon {' '.join(argv_i)}", flush=True)
            if args.dry_run:
                continue
            rows.append({"trial": i, **trial, **trial_result(argv_i, out)})
    finally:
        if rows:
            write_summary(merged_with_earlier(rows, out), out, list(sweep["parameters"]))
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        raise RuntimeError(
            f"{failed} of {len(rows)} trials failed (`error` in {out / 'sweep_summary.json'}; tracebacks in "
            f"{out}/trial-*/failed-*.json)"
        )
    return rows


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
    """Key the trial by its config hash, then reuse its finished fit or run it."""
    from icon_lightning.cli import parse_config
    from icon_lightning.io import one_line
    from icon_lightning.runs import config_sha256

    try:
        sha = config_sha256(parse_config(argv).as_dict())
    except (Exception, SystemExit) as error:
        message = one_line(error) if isinstance(error, Exception) else "the trial's arguments do not parse"
        print(f"    failed: {message}", flush=True)
        return {"status": "failed", "error": message}
    trial_dir = out / f"trial-{sha[:12]}"
    record = finished_run(trial_dir, sha)
    result = {"status": "done", **record} if record is not None else run_trial(argv, trial_dir, sha)
    if record is not None:
        print(f"    finished earlier: {trial_dir}", flush=True)
    metrics = {k: v for k, v in result.get("metrics", {}).items() if "/head_" not in k}
    return {"status": result["status"], "config_sha256": sha, "dir": str(trial_dir), **metrics} | (
        {"error": result["error"]} if result["status"] == "failed" else {}
    )


def write_summary(rows: list[dict], out: Path, params: list[str]) -> None:
    from icon_lightning.io import atomic_write

    atomic_write(out / "sweep_summary.json", lambda f: json.dump(rows, f, indent=2))
    print_table(rows, params)
    failed = [r["trial"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} of {len(rows)} trials failed: {failed} (`error` in sweep_summary.json says why)")
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
