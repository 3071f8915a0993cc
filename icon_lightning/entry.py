"""The `icon` command: `icon fit|validate|test|predict …` (`icon_lightning.cli`) or `icon sweep SWEEP.yaml`
(`icon_lightning.sweep`). Every error ends in one line on stderr; ``--debug`` or ``ICON_DEBUG=1`` shows the
traceback. `icon --help` and usage errors answer before Lightning is imported (about 5 s of a process's start): the
CLI and the sweep runner are imported only when a subcommand runs."""

from __future__ import annotations

import os
import sys

from icon_lightning.io import one_line
from icon_lightning.runs import DEBUG_ENV

SUBCOMMANDS = ("fit", "validate", "test", "predict", "sweep")
USAGE = (
    "usage: icon {fit,validate,test,predict} [--config FILE] [--KEY VALUE ...]\n"
    "       icon sweep SWEEP.yaml [--count N] [--out DIR] [--dry-run]   (a W&B sweep file's trials, offline)"
)
HELP = f"""{USAGE}

I-Con clustering and representation learning on frozen features (PyTorch Lightning).

subcommands:
  fit        train the heads of a recipe on a dataset; writes config.yaml, metrics.json and checkpoints/last.ckpt
             into a run folder of its own (--trainer.default_root_dir, default runs/)
  validate   score a checkpoint (--ckpt_path FILE, or 'last': the newest of the same settings)
  test       the same on the test split
  predict    cluster labels of a dataset's rows with a checkpoint: predictions.csv and predictions.npy
  sweep      run a W&B sweep file's trials offline, each a normal `icon fit`, with a summary table

  icon fit --help          every option of fit (and of the model, the data and the trainer)
  icon sweep --help        the sweep runner's options

first command on your own features (README.md):
  icon fit --config configs/recipes/icon_clustering.yaml --data.dataset icon_lightning.data.FeaturesFile \\
      --data.dataset.path features.npz --data.views clean

errors end in one line; --debug or {DEBUG_ENV}=1 shows the traceback."""


def main(argv: list[str] | None = None) -> None:
    """`icon …`: errors end in one line on stderr (exit 1) naming what was wrong; ``--debug`` or ``ICON_DEBUG=1``
    shows the traceback instead."""
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    words = [w for w in words if w != "--debug"]
    before = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # the parser shows its usage page and raises where it would exit
    if not words or (not words[0].startswith("-") and words[0] not in SUBCOMMANDS):
        given = f"unknown subcommand {words[0]!r}" if words else "no subcommand"
        sys.exit(f"{USAGE}\nicon: error: {given}: expected one of {', '.join(SUBCOMMANDS)}")
    if words[0] in ("-h", "--help"):
        print(HELP)
        return
    try:
        if words and words[0] == "sweep":
            from icon_lightning.sweep import main as sweep_main

            sweep_main(words[1:])
        else:
            from icon_lightning.cli import cli_main

            if argv is None:  # LightningCLI reads sys.argv (its DDP launcher re-runs it), less `--debug`
                sys.argv[1:] = words
            cli_main(None if argv is None else words)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        if debug:
            raise
        sys.exit(f"icon: error: {one_line(error)}  (--debug or {DEBUG_ENV}=1 shows the traceback)")
    finally:
        if before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = before
