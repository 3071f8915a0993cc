"""`icon --help` and usage errors answer before Lightning, torch or W&B are imported (they took 5-11 s: `import
lightning` alone is about 4.5 s); `icon fit --help` still lists every option through LightningCLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, json, sys
from icon_lightning.entry import main
out, code = io.StringIO(), None
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        main(sys.argv[1:])
    except SystemExit as end:
        code = end.code
heavy = sorted(m for m in ("lightning", "torch", "wandb", "jsonargparse", "numpy") if m in sys.modules)
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": heavy}))
"""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "subcommands:"),
        (["-h"], "icon fit --help"),
        ([], "icon: error: no subcommand"),
        (["frobnicate"], "icon: error: unknown subcommand 'frobnicate'"),
    ],
)
def test_help_and_usage_errors_import_nothing_heavy(argv, expected):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    text = result["out"] + str(result["code"] or "")
    assert expected in text and result["heavy"] == [], result
    assert (result["code"] is None) == (argv[:1] in (["--help"], ["-h"]))  # help exits 0, usage errors do not


def test_the_help_names_every_subcommand():
    from icon_lightning.entry import HELP, SUBCOMMANDS

    listed = [line.split()[0] for line in HELP.split("subcommands:")[1].splitlines() if line.startswith("  ")]
    assert set(SUBCOMMANDS) <= set(listed)
