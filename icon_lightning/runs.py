"""Run directories: every `icon` run (fit, validate, test, predict, each sweep trial) writes into a folder of its own,

    <trainer.default_root_dir>/<config name>-<experiment key>/<subcommand>-<YYYYmmdd-HHMMSS>-<4 hex>/
        config.yaml  metrics.json  checkpoints/last.ckpt  predictions.{csv,npy}  <logger files>

so no run overwrites or is mistaken for another. A folder is claimed atomically (``CLAIM``, created with O_EXCL):
two runs started at the same instant with the same ``--run_dir`` never share it. The experiment key hashes every
setting that can change a run's result but its length (``RESULT_FREE_KEYS``, ``LENGTH_KEYS``): the runs that train
or evaluate the same model, on the same data, with the same seed share the parent folder, which is where
``--ckpt_path last`` looks.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path

from icon_lightning.io import with_errno

DEBUG_ENV = "ICON_DEBUG"  # set: `icon` shows tracebacks instead of one-line errors
RUN_DIR_ENV = "ICON_RUN_DIR"  # handed to the processes a DDP launcher starts, so all ranks share one run dir

# What a run's identity (its config hash and its experiment key) leaves out: the settings that cannot change its
# result. This is the one list: where a run writes and which checkpoint it loads, and how it shows its progress
# (which caches it reads or how it batches evaluation cannot change a trained head either: caches are verified and
# keyed by their content, evaluation is per row). Every other setting, the seed included, is part of the identity.
RESULT_FREE_KEYS = (
    "config",
    "run_dir",
    "ckpt_path",
    "allow_untrained",
    "verbose",  # validate and test
    "return_predictions",  # predict
    "trainer.default_root_dir",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.log_every_n_steps",
    "data.cache_dir",
    "data.val_batch_size",
    "data.num_workers",
)
# The model's facts linked from the data at instantiation (``cli.DATA_FACTS``): the data section decides them, and
# a parse with ``--ckpt_path FILE`` holds them (Lightning merges the checkpoint's hyper-parameters) while a fresh parse
# does not, so they stay out of a run's identity: a resumed run keeps its trial's hash and its experiment's folder.
LINKED_KEYS = ("model.feature_dim", "model.num_clusters", "model.num_classes", "model.num_samples", "model.backbone")
# How long a run trains: part of its config hash (a longer run ends elsewhere), not of its experiment key, because a
# checkpoint of a run that stopped earlier is the same run at an earlier step: `--ckpt_path last` with a larger
# budget trains it on.
LENGTH_KEYS = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.min_steps",
    "trainer.min_epochs",
    "convergence.max_steps",
    "convergence.budget_epochs",
    "convergence.budget_min_steps",
    "convergence.budget_max_steps",
)


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _without(config: dict, keys: tuple[str, ...]) -> dict:
    kept = json.loads(json.dumps(config, default=str))
    for key in keys:
        *parents, leaf = key.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return kept


def config_sha256(config: dict) -> str:
    """Hash of a parsed config (``Namespace.as_dict()``) less ``RESULT_FREE_KEYS`` and ``LINKED_KEYS``: two runs
    with the same hash give the same result wherever they write, whatever caches they read and however they log."""
    return _digest(_without(config, RESULT_FREE_KEYS + LINKED_KEYS))


def experiment_key(config: dict) -> str:
    """8 hex digits naming a run up to its length: the config hash less ``LENGTH_KEYS`` (the seed, the model, the
    data and the optimisation included). The runs of one key share a folder, which is where ``--ckpt_path last``
    looks: a requeued job of seed 1 resumes seed 1's checkpoint, never seed 2's."""
    return _digest(_without(config, RESULT_FREE_KEYS + LINKED_KEYS + LENGTH_KEYS))[:8]


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
        return claim(check_writable(run_dir, "trainer.default_root_dir"), "trainer.default_root_dir")
    raise FileExistsError(f"trainer.default_root_dir: could not find a free run folder name under {parent}")


CLAIM = ".icon-run"  # created with O_EXCL in a run's folder: the one process that creates it owns the folder
RECORDS = ("metrics.json", "config.yaml", "checkpoints")


def claim(run_dir: Path, argument: str) -> Path:
    """Own ``run_dir`` or fail: its ``CLAIM`` file is created exclusively (atomic on local and NFSv3+ file
    systems), so of two processes claiming one folder at the same instant exactly one succeeds."""
    try:
        fd = os.open(run_dir / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise FileExistsError(f"{argument}: {run_dir} already holds another run ({CLAIM}); give a new folder") from None
    except OSError as error:
        raise with_errno(OSError(f"{argument}: cannot claim {run_dir}: {error.strerror}"), error.errno) from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    return run_dir


def use_run_dir(path: str | Path) -> Path:
    """An explicit ``--run_dir``: created if absent, claimed (``claim``), refused if it already holds a run's
    records or another process's claim."""
    run_dir = Path(path).expanduser()
    taken = [name for name in RECORDS if (run_dir / name).exists()]
    if taken:
        raise FileExistsError(f"run_dir: {run_dir} already holds another run ({', '.join(taken)}); give a new folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise with_errno(OSError(f"run_dir: cannot create {run_dir}: {error.strerror}"), error.errno) from None
    return claim(check_writable(run_dir, "run_dir"), "run_dir")


def check_writable(folder: Path, argument: str) -> Path:
    """``folder`` if a file can be created in it; otherwise one line naming it (loggers would fall back to a
    temporary folder and the run's records would be lost)."""
    probe = folder / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"  # unique per process and thread
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
