"""What this machine offers, in one place: the CPUs this process may use, llama.cpp's default thread count,
the sha256 of a file, and a model already in the local Hugging Face cache.

Standard library only at import (psutil and huggingface_hub are used when installed): the llama.cpp build
and `care --help` import it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or a container quota)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings are no extra decode speed for llama.cpp)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        n = os.cpu_count() or 1
    return max(1, min(n, usable_cpus()))


def default_threads() -> int:
    """Idle physical cores (or $CARE_THREADS). llama.cpp's workers spin-wait, so asking for a busy core stalls
    every token."""
    env = os.environ.get("CARE_THREADS")
    if env:
        return max(1, int(env))
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, physical_cores() - busy)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (model files are GBs)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def local_snapshot(repo_id_or_path: str | os.PathLike[str], *,
                   cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """A local model folder for `repo_id_or_path`: the folder itself if it is one, else the hub id's snapshot in
    the local Hugging Face cache (`cache_dir`, default $HF_HUB_CACHE / ~/.cache/huggingface/hub); None when it
    is neither (not cached, not a repo id, or huggingface_hub not installed). Never downloads."""
    folder = Path(repo_id_or_path).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        found = snapshot_download(str(repo_id_or_path), local_files_only=True,
                                  cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached" / "not a repo id"
        return None
    return Path(found)
