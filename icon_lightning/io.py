"""Files that are complete or absent: every record, cache entry and prediction is written under a temporary name
beside its target and renamed into place, with the permissions any ordinary file would get (``0666 & ~umask``,
not ``tempfile``'s private 0600), and no partial file left behind when the write fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")  # what counts as an image file


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process umask (read from /proc on Linux;
    elsewhere set and restored, which another thread could see for an instant)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def write_error(path: Path | str, error: OSError, what: str = "write") -> OSError:
    """``error`` as one line that names ``path`` (disk full, read-only, no permission, …)."""
    if str(error).startswith(str(path)):
        return error  # already one line about this path
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return with_errno(type(error)(f"{path}: could not {what}: {reason}"), error.errno)


def with_errno(error: OSError, number: int | None) -> OSError:
    """``error`` carrying ``number`` as its errno while its message stays one plain line (no "[Errno N]")."""
    error.errno = number
    return error


@contextlib.contextmanager
def publishing(path: Path | str, publish: bool = True) -> Iterator[Path]:
    """A temporary name beside ``path`` (``temporary_name``) for the block to write; renamed to ``path`` with an
    ordinary file's mode when the block ends without error (and ``publish``), removed otherwise. OS errors name
    ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if publish:
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_error(path, error) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """A file object under a temporary name in ``path``'s folder, flushed to disk and renamed to ``path`` when the
    block ends without error, removed otherwise (``publishing``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(path, error) from None
    with publishing(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path | str, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file and publish it as ``path`` (see ``atomic_open``)."""
    with atomic_open(path, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
        write(f)
    return Path(path)


def atomic_write_json(path: Path | str, payload: dict) -> Path:
    """Write JSON so that readers never see half a file."""
    return atomic_write(path, lambda f: json.dump(payload, f, indent=2))


def temporary_name(path: Path) -> Path:
    """``path``'s in-progress name, owned by this host and process: ``<name>.<host>.<pid>.tmp``."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``temporary_name`` files in ``folder`` whose process (on this host) no longer runs: what an
    interrupted or crashed write left behind. Files of live processes and of other hosts are kept."""
    host = socket.gethostname()
    removed = []
    for tmp in folder.glob(f"*.{host}.*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reserve(path: Path, size: int, name: Path | None = None) -> None:
    """Allocate ``size`` bytes of ``path`` on disk now, so that a full disk fails here with a message naming
    ``name`` (default ``path``), not later as SIGBUS inside a memory map. Filesystems without
    ``posix_fallocate`` are left to fail on write."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return
        raise write_error(name or path, error, f"reserve {size / 2**30:.2f} GiB for it") from None
    finally:
        os.close(fd)


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with newlines folded, prefixed by its type unless the message is
    already a sentence about an argument or path."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (ValueError, OSError, KeyError)) else f"{type(error).__name__}: {text}"
