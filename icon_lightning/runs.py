"""Run directories: every `icon` run (fit, validate, test, predict, each sweep trial) writes into a folder of its own,

    <trainer.default_root_dir>/<config name>-<experiment key>/<subcommand>-<YYYYmmdd-HHMMSS>-<4 hex>/
        config.yaml  metrics.json  checkpoints/last.ckpt  predictions.{csv,npy}  <logger files>

so no run overwrites or is mistaken for another. The experiment key hashes the model and data settings: the runs
that trained or evaluate the same model on the same data share the parent folder, which is where
``--ckpt_path last`` looks.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

from icon_lightning.io import with_errno

RUN_DIR_ENV = "ICON_RUN_DIR"  # handed to the processes a DDP launcher starts, so all ranks share one run dir
LOCATION_KEYS = ("run_dir", "ckpt_path", "trainer.default_root_dir", "trainer.logger")


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def config_sha256(config: dict) -> str:
    """Hash of a parsed config (``Namespace.as_dict()``) less where it writes (run dir, root dir, logger) and
    which checkpoint it loads: two runs of the same settings get the same hash wherever they run."""
    kept = json.loads(json.dumps(config, default=str))
    kept.pop("config", None)
    for key in LOCATION_KEYS:
        *parents, leaf = key.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent) or {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return _digest(kept)


def experiment_key(config: dict) -> str:
    """8 hex digits naming the model and data settings (``model`` and ``data`` sections)."""
    return _digest({"model": config.get("model"), "data": config.get("data")})[:8]


def config_name(config_files) -> str:
    """A readable name from the first ``--config`` file: its stem, or its folder's name for ``config.yaml``."""
    if not config_files:
        return "run"
    first = Path(str(config_files[0]))
    return first.parent.name if first.stem == "config" and first.parent.name else first.stem


def new_run_dir(root: str | Path, experiment: str, subcommand: str) -> Path:
    """Create and return a fresh, writable ``<root>/<experiment>/<subcommand>-<time>-<hex>`` folder."""
    parent = Path(root).expanduser() / experiment
    for _ in range(100):
        run_dir = parent / f"{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as error:
            message = f"trainer.default_root_dir: cannot create {run_dir}: {error.strerror}"
            raise with_errno(OSError(message), error.errno) from None
        return check_writable(run_dir, "trainer.default_root_dir")
    raise FileExistsError(f"trainer.default_root_dir: could not find a free run folder name under {parent}")


def use_run_dir(path: str | Path) -> Path:
    """An explicit ``--run_dir``: created if absent, refused if it already holds a run's records."""
    run_dir = Path(path).expanduser()
    taken = [name for name in ("metrics.json", "config.yaml", "checkpoints") if (run_dir / name).exists()]
    if taken:
        raise FileExistsError(f"run_dir: {run_dir} already holds another run ({', '.join(taken)}); give a new folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise with_errno(OSError(f"run_dir: cannot create {run_dir}: {error.strerror}"), error.errno) from None
    return check_writable(run_dir, "run_dir")


def check_writable(folder: Path, argument: str) -> Path:
    """``folder`` if a file can be created in it; otherwise one line naming it (loggers would fall back to a
    temporary folder and the run's records would be lost)."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        message = f"{argument}: {folder} is not writable ({error.strerror})"
        raise with_errno(PermissionError(message), error.errno) from None
    return folder


def last_checkpoint(root: str | Path, experiment_key: str) -> Path:
    """The newest ``last.ckpt`` of any run of this experiment under ``root``; one line saying where it looked
    when there is none."""
    pattern = f"*-{experiment_key}/*/**/last.ckpt"
    found = [p for p in Path(root).expanduser().glob(pattern) if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"ckpt_path: 'last' found no checkpoint of this model and data: nothing matches "
            f"{Path(root).expanduser() / pattern} (fit first, or give a checkpoint file)"
        )
    return max(found, key=lambda p: p.stat().st_mtime_ns)


CHECKPOINT_WORDS = ("last", "best", "hpc", "registry")  # Lightning's names; `last` is resolved by `resolve_checkpoint`
EVALUATING = ("validate", "test", "predict")


def launched_rank() -> int:
    """This process's rank as its launcher set it (Lightning's DDP launcher, torchrun, SLURM, LSF); 0 when alone.
    Lightning's own lookup (the order in which it reads ``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``, …), read at
    call time: ``rank_zero_only.rank`` is fixed at import, before a test or launcher may have set the variables."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def check_checkpoint_file(path: str) -> None:
    """A checkpoint ``torch.save`` wrote is a zip archive; a truncated or foreign file is one line naming it (its
    central directory is read, not its tensors)."""
    import zipfile

    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"ckpt_path: {path} is not a readable checkpoint (truncated, or not written by torch.save: {err})"
        ) from None


def resolve_checkpoint(ckpt: str | None, subcommand: str, root: str, key: str, allow_untrained: bool) -> str | None:
    """``--ckpt_path``: ``last`` becomes the newest ``last.ckpt`` of this experiment under ``root``; a missing file
    or an evaluation without trained heads (unless ``allow_untrained``) is one line."""
    if ckpt == "last":
        ckpt = str(last_checkpoint(root, key))
        print(f"ckpt_path last: {ckpt}")
        check_checkpoint_file(ckpt)  # a given file was checked where Lightning reads it (cli.read_checkpoint_hparams)
    elif ckpt is not None and ckpt not in CHECKPOINT_WORDS and not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {ckpt}")
    if subcommand in EVALUATING and ckpt is None and not allow_untrained:
        raise ValueError(
            f"ckpt_path: `icon {subcommand}` needs trained heads: give a checkpoint file, or 'last' for the "
            f"newest of this config under {root}; --allow_untrained true evaluates untrained heads on purpose"
        )
    return ckpt


def choose_run_dir(root: str, experiment: str, subcommand: str, run_dir: str | None) -> Path:
    """This process's run folder: rank 0's for processes Lightning's launcher started (``ICON_RUN_DIR``), an
    unused name for other ranks of torchrun/SLURM (they write nothing), ``run_dir`` when given, else a new one."""
    rank = launched_rank()
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0") and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if rank > 0:
        return Path(root) / experiment / f"{subcommand}-rank{rank}"
    return use_run_dir(run_dir) if run_dir else new_run_dir(root, experiment, subcommand)
