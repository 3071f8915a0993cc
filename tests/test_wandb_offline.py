"""W&B on a node without network: a logged-in run logs offline within seconds and says so, the fit is not lost.

Only loopback addresses are used: a closed port stands for an unreachable server, a listening socket for a
reachable one."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from icon_lightning.cli import WANDB_PROBE_S, wandb_offline_unless_logged_in

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def logged_in(tmp_path, monkeypatch):
    """A netrc entry for a W&B server on loopback, no WANDB_MODE: a logged-in user's environment, in a fresh W&B
    session (an earlier test in this process may have started one, which would ignore these variables)."""
    import wandb

    wandb.teardown()
    netrc = tmp_path / "netrc"
    entry = "  login user\n  password " + "0" * 40 + "\n"
    netrc.write_text(f"machine api.wandb.ai\n{entry}machine 127.0.0.1\n{entry}")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return monkeypatch


def test_a_logged_in_run_without_network_goes_offline_in_seconds_and_says_so(logged_in, capsys):
    """A logged-in fit on a node without network failed after about 106 s with W&B's CommError."""
    logged_in.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    assert wandb_offline_unless_logged_in() is True
    assert time.monotonic() - start < 2 * WANDB_PROBE_S
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("W&B: cannot reach 127.0.0.1:") and "logging offline" in line


def test_a_logged_in_run_with_a_reachable_server_stays_online(logged_in, capsys):
    import os

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        logged_in.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_offline_unless_logged_in() is False
    assert "WANDB_MODE" not in os.environ and capsys.readouterr().err == ""


def test_no_credentials_means_offline_without_a_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert wandb_offline_unless_logged_in() is True and capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_logged_in_fit_without_network_completes_with_the_default_logger(logged_in, tmp_path):
    """README's first command, W&B's logger as configured by default, the server unreachable: the fit's record is
    written and W&B's files are kept offline in the run's folder."""
    from icon_lightning.entry import main

    logged_in.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    logged_in.setenv("WANDB_DIR", str(tmp_path))
    recipe = str(ROOT / "configs" / "recipes" / "icon_clustering.yaml")
    main(["fit", "--config", recipe, "--data.dataset=icon_lightning.data.DigitsDataset", "--data.views=clean",
          f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=3", "--model.num_heads=1",
          f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"])  # fmt: skip
    (path,) = (tmp_path / "runs").glob("**/metrics.json")
    assert json.loads(path.read_text())["steps"] == 3
    assert list(path.parent.glob("wandb/offline-run-*"))
