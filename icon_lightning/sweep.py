"""Run a W&B sweep file offline: `icon sweep experiments/digits/sweep.yaml [--count N] [--out DIR]`.

`wandb sweep` + `wandb agent` need the W&B server. This runner executes the same file locally: the grid
(every combination of ``values``/``value``) or ``random`` draws (``values``, ``min``/``max`` uniform,
``distribution: int_uniform``), each trial a normal `icon` run with its own run directory and
``metrics.json``, then prints a summary table and writes ``sweep_summary.json`` (and, for debias-α sweeps,
``alpha_sweep.png``). Rerunning skips the trials that already finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
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


def trial_args(sweep: dict, trial: dict) -> list[str]:
    """The `icon` arguments of one trial: the sweep's command with ``${args}`` expanded."""
    args = []
    command = list(sweep["command"])
    if command and command[0] in (sweep.get("program"), "icon"):
        command = command[1:]  # the program itself; the runner calls it in-process
    for token in command:
        if token == "${args}":
            args += [f"--{k}={v}" for k, v in trial.items()]
        elif token not in PLACEHOLDERS:
            args.append(str(token))
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="icon sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep")
    parser.add_argument("--count", type=int, default=None, help="at most this many trials")
    parser.add_argument("--out", default=None, help="folder of the trials' run directories")
    parser.add_argument("--dry-run", action="store_true", help="print the trials' commands only")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    out = Path(args.out or Path("runs") / "sweeps" / Path(args.sweep).parent.name)
    rows = []
    for i, trial in enumerate(trials(sweep, args.count)):
        run_dir = out / f"trial_{i:03d}"
        argv_i = trial_args(sweep, trial) + [
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.logger.init_args.save_dir={run_dir}",
        ]
        print(f"[{i + 1}] icon {' '.join(argv_i)}", flush=True)
        if args.dry_run:
            continue
        done = run_dir / "metrics.json"  # written atomically at the end of a run: a rerun skips finished trials
        if not (done.is_file() and json.loads(done.read_text()).get("subcommand") == "fit"):
            from icon_lightning.cli import cli_main

            cli_main(argv_i)
        metrics = json.loads(done.read_text())
        rows.append({"trial": i, **trial, **{k: v for k, v in metrics["metrics"].items() if "/head_" not in k}})
    if rows:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep_summary.json").write_text(json.dumps(rows, indent=2))
        print_table(rows, list(sweep["parameters"]))
        if any("alpha" in key for key in sweep["parameters"]):
            from icon_lightning.callbacks.plots import plot_alpha_sweep

            print(f"α-sweep plot: {plot_alpha_sweep(rows, out / 'alpha_sweep.png')}")
    return rows


def print_table(rows: list[dict], params: list[str]) -> None:
    shown = [c for c in ("train/loss", "val/hungarian_acc/best", "val/nmi", "val/ari") if c in rows[0]]
    names = [p.split(".")[-1] if p.count(".") < 3 else ".".join(p.split(".")[-3:]) for p in params]
    print("\n" + "  ".join(f"{n:>12}" for n in ["trial", *names, *shown]))
    for r in rows:
        cells = [str(r["trial"]), *[str(r[p]) for p in params], *[f"{r[c]:.4f}" for c in shown]]
        print("  ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
