"""The llama-cpp-python source, the build cache and its keys, and running one build step (standard library only:
`make setup` runs this before care and its dependencies are installed)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from care.errors import DependencyMissingError, ExportError, ModelNotFoundError, ToolError
from care.io import check_free_space
from care.proc import error_line, run_tool

log = logging.getLogger(__name__)

SDIST_ENV = "CARE_LLAMA_CPP_SDIST"
CACHE_ENV = "CARE_LLAMA_CPP_CACHE"
JOBS_ENV = "CARE_BUILD_JOBS"
# A full build tree of llama.cpp with all CPU variants takes ~1.5 GB; keep a margin.
BUILD_SPACE = 3 * 2**30

class BuildError(ExportError):
    """A llama.cpp build failed or cannot start (no compiler, no cmake, no disk)."""


def cache_root() -> Path:
    """$CARE_LLAMA_CPP_CACHE, else <user cache>/llama.cpp (tests and `make setup` share one per checkout)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from care.paths import cache_dir

    return cache_dir() / "llama.cpp"


def resolve_version(version: str | None = None) -> str:
    if version:
        return version
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as exc:
        raise BuildError("No llama-cpp-python version to build: it is not installed",
                         hint="Pass the version, e.g. --version 0.3.36 (see constraints.txt)") from exc


def build_key(version: str, target: str, args: Sequence[str], rev: object) -> str:
    """Folder name of one build: version, target and a hash of everything that changes the binaries (the
    CMake args and `rev`: wheel_rev() for the wheel, tools_rev(target) for the tools)."""
    flags = json.dumps({"args": list(args), "patch": rev}, sort_keys=True)
    return f"{version}-{target}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def jobs() -> int:
    env = os.environ.get(JOBS_ENV)
    return max(1, int(env)) if env and env.isdigit() else max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One build per key at a time, across processes (a second `make setup` or test waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A temp folder beside `final`, renamed onto it only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def require_programs(programs: Sequence[str], apt: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise DependencyMissingError(f"{', '.join(missing)} not found: building llama.cpp needs a C/C++ "
                                     "compiler and cmake", hint=f"Install them: apt-get install -y {apt}")


def fetch_sdist(version: str | None = None) -> Path:
    """The llama-cpp-python sdist of `version`: $CARE_LLAMA_CPP_SDIST, the cached copy, or a pip download
    (then cached, so the converter, the wheel and the tools share one download)."""
    version = resolve_version(version)
    name = f"llama_cpp_python-{version}.tar.gz"
    env = os.environ.get(SDIST_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ModelNotFoundError("llama-cpp-python sdist not found", path=path,
                                     hint=f"Point {SDIST_ENV} at a local {name}")
        if f"-{version}." not in path.name:
            raise BuildError(f"The sdist is not llama-cpp-python {version}", path=path,
                             hint=f"Pass {name} so llama.cpp matches the Python binding")
        return path
    cached = cache_root() / "sdist" / name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(cached.parent, 200 * 2**20, "llama-cpp-python source")
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=cached.parent) as tmp:
        os.replace(download_sdist(version, Path(tmp), hint=f"Connect to PyPI once, or set {SDIST_ENV} to a "
                                  f"local {name}"), cached)
    return cached


def find_cached_sdist(version: str | None = None) -> Path | None:
    """The sdist of `version` in $CARE_LLAMA_CPP_SDIST or the cache, or None (never downloads)."""
    version = resolve_version(version)
    env = os.environ.get(SDIST_ENV)
    cached = Path(env).expanduser() if env else cache_root() / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    return cached if cached.is_file() else None


def download_sdist(version: str, dest: Path, *, hint: str) -> Path:
    """pip-download the llama-cpp-python `version` sdist into `dest` (also what `care export setup` uses)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(dest), "-q"]
    log.info("Fetching the llama-cpp-python %s source: %s", version, " ".join(cmd))
    try:
        run = run_tool(cmd, what="pip download")
    except ToolError as exc:
        raise BuildError(f"Could not download the llama-cpp-python {version} sdist ({exc.detail or 'no output'})",
                         hint=hint) from exc
    files = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not files:
        raise BuildError(f"Could not download the llama-cpp-python {version} sdist "
                         f"({error_line(run.lines) or 'pip wrote no sdist'})", hint=hint)
    return files[0]


def extract_source(sdist: Path, dest: Path) -> Path:
    """Unpack the whole sdist into `dest`; return its top folder (llama_cpp_python-<version>)."""
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python < 3.10.12 has no extraction filters; the sdist is from PyPI
            tar.extractall(dest)  # noqa: S202
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise BuildError("The sdist holds no vendor/llama.cpp source", path=sdist,
                         hint="Use a llama-cpp-python >= 0.3 sdist from PyPI")
    return tops[0]


def run_step(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run a build step (care.proc.run_tool) with its output in `log_path`; a failure is one line naming the
    log and the step's error line."""
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        try:
            run_tool(cmd, what="llama.cpp build step", on_line=lambda line: fh.write(line + "\n"), env=env, cwd=cwd,
                     path=log_path)
        except ToolError as exc:
            if any("No space left on device" in line for line in exc.lines):
                raise BuildError("Disk full while building llama.cpp", path=log_path,
                                 hint=f"Free some space or point {CACHE_ENV} at a bigger disk") from exc
            raise BuildError(f"llama.cpp build step failed: {(exc.detail or exc.message)[:200]}", path=log_path,
                             hint="See the full log for the first error") from exc


def preflight(where: Path, programs: Sequence[str], apt: str) -> None:
    require_programs(["cmake", *programs], apt)
    where.mkdir(parents=True, exist_ok=True)
    check_free_space(where, BUILD_SPACE, "llama.cpp build")
