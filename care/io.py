"""Safe writes: everything the user keeps is written to a temp file beside the target and renamed."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from care.errors import DiskFullError


def check_free_space(folder: Path, needed_bytes: int, what: str = "output") -> None:
    """Raise DiskFullError before starting a write that cannot fit."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise DiskFullError(
            f"Not enough disk space for the {what}: need {needed_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free",
            path=folder,
            hint="Free some space or choose another --out folder",
        )


def process_umask() -> int:
    """This process's umask. On Linux it is read from /proc/self/status, which changes nothing; elsewhere the
    only way is os.umask(), which sets it, and setting it races with other threads creating files, so there it
    is read once per process and cached (a later os.umask() call is then not seen)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_once()


@functools.lru_cache(maxsize=1)
def _umask_once() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask (process_umask): what open() would give a new file. The one file-mode rule
    for outputs: mkstemp's 0600 would hide a shared model folder's files from other users (Ollama's server, a
    clinic's second account)."""
    return mode & ~process_umask()


def make_readable(path: str | os.PathLike[str], mode: int = 0o666) -> None:
    """Give a file written through a temp file the mode a plain open() would have given it (`mode` 0o777 for an
    executable, less the umask)."""
    path = Path(path)
    if path.is_file():
        os.chmod(path, umask_mode(mode))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "", mode: int = 0o666) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds (with the mode a
    plain open() would give it: umask_mode(mode); 0o777 for an executable)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        make_readable(tmp_path, mode)
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError("Disk full while writing", path=target, hint="Free some space and run again") from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
