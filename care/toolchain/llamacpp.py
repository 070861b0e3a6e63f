"""The one place that compiles llama.cpp: the portable Python wheel, llama.cpp's own tools, the aarch64 build.

Everything builds from the llama.cpp source inside the llama-cpp-python sdist of one version (the one
`care export setup` also extracts the converter from), so libllama, the tools and the converter always match.

- `build_wheel()`: llama-cpp-python with `GGML_NATIVE=OFF` + `GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`:
  ggml's CPU kernels become one module per CPU family (libggml-cpu-haswell.so, -skylakex.so, ...) and ggml
  scores them against CPUID at load time, so one wheel runs on any x86-64 CPU and still uses AVX-512 where
  there is one. llama-cpp-python 0.3.36 does not find those modules by itself (llama_backend_init() only
  searches the executable's folder and the cwd), so the build patches llama_cpp/llama_cpp.py to load them
  from the package's lib folder, and ggml's AMX tile config (the SIGILL of issue 22): care/toolchain/patches.py.
- `build_tools(["llama-server"])`: llama.cpp's CLI tools, static, for this machine ("native") or for
  "linux-aarch64" (cross-compiled with Debian's gcc-aarch64-linux-gnu, ARMv8.2-A + dotprod + fp16).

Builds are cached under $CARE_LLAMA_CPP_CACHE (default: <user cache>/llama.cpp) by (version, target, a hash
of the flags), built in a temp folder and renamed into place, and guarded by a file lock.
Standard library only: `make setup` runs this before care and its dependencies are installed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from care.errors import CareError, DependencyMissingError, ExportError, ModelNotFoundError
from care.io import check_free_space
from care.toolchain import patches

log = logging.getLogger(__name__)

SDIST_ENV = "CARE_LLAMA_CPP_SDIST"
CACHE_ENV = "CARE_LLAMA_CPP_CACHE"
JOBS_ENV = "CARE_BUILD_JOBS"
# A full build tree of llama.cpp with all CPU variants takes ~1.5 GB; keep a margin.
BUILD_SPACE = 3 * 2**30

PORTABLE_WHEEL_ARGS = (
    "-DLLAVA_BUILD=OFF",  # text generation needs no multimodal library; halves the build
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    # ggml's own thread pool instead of libgomp: one shared library fewer to find on a clinic laptop.
    "-DGGML_OPENMP=OFF",
    # The CPU-variant modules install to CMAKE_INSTALL_BINDIR; put them next to libllama in the wheel.
    "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib",
)


# Tools: llama.cpp CMake target -> what it is for.
TOOLS = {
    "llama-server": "OpenAI-compatible HTTP server",
    "llama-quantize": "requantize a GGUF (Q4_0, Q4_K_M, ...)",
    "llama-imatrix": "importance matrix for low-bit quantization",
    "llama-cli": "interactive chat in a terminal",
    "llama-completion": "plain text completion",
    "llama-simple": "greedy completion of one prompt (minimal; used for cross-platform token checks)",
}
_TOOL_COMMON = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_EXAMPLES=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_OPENMP=OFF",
)
# The ARM baseline: ARMv8.2-A with dotprod and fp16 arithmetic (Cortex-A75/A76 and later: most phones
# since 2018, Raspberry Pi 5). dotprod is what llama.cpp's Q4_0 repacking for ARM needs; i8mm (ARMv8.6,
# Cortex-A710+) is left out on purpose, it would SIGILL on a Pi 5 or a 2019-2021 phone.
ARM_ARCH = "armv8.2-a+dotprod+fp16"
# CARE_NATIVE_NO_AMX=1: native tools without ggml's AMX kernels (a fallback should another AMX bug appear;
# the wheel has its own run-time fallback, care/runtime/cpu_guard.py).
_NO_AMX = ("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
           "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16") if os.environ.get("CARE_NATIVE_NO_AMX") else ()
TARGETS: dict[str, dict[str, object]] = {
    "native": {"args": ("-DGGML_NATIVE=ON", *_NO_AMX), "compilers": ("gcc", "g++"), "static": False},
    "linux-aarch64": {
        "args": (
            "-DCMAKE_SYSTEM_NAME=Linux",
            "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
            "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
            "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
            "-DGGML_NATIVE=OFF",
            f"-DGGML_CPU_ARM_ARCH={ARM_ARCH}",
            "-DGGML_LLAMAFILE=OFF",  # as llama.cpp's Android guide builds it
            "-DCMAKE_EXE_LINKER_FLAGS=-static",
        ),
        "compilers": ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++"),
        "static": True,
        "apt": "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu",
    },
}


class BuildError(ExportError):
    """A llama.cpp build failed or cannot start (no compiler, no cmake, no disk)."""


# --------------------------------------------------------------------------------------------------------
# Where things live


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


# Bump when the tools' recipe changes in a way their CMake args do not show. The source patches that apply to a
# target are hashed in too (patches.fingerprint): the AMX fix rebuilds x86 tools and the wheel, and leaves the
# cached aarch64 tools (an hour to cross-build on 2 cores) valid, since no patch applies to them.
_TOOLS_REV = 1
_WHEEL_REV = 2  # the binding patch's own history before patches.py (revisions 1-2)


def is_x86(target: str) -> bool:
    if target == "linux-aarch64":
        return False
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def wheel_rev() -> object:
    return [_WHEEL_REV, patches.fingerprint(patches.applicable(patches.WHEEL_PATCHES, is_x86("native")))]


def tools_rev(target: str) -> object:
    applied = patches.applicable(patches.TOOL_PATCHES, is_x86(target))
    return [_TOOLS_REV, patches.fingerprint(applied)] if applied else _TOOLS_REV


def build_key(version: str, target: str, args: Sequence[str], rev: object) -> str:
    """Folder name of one build: version, target and a hash of everything that changes the binaries (the
    CMake args and `rev`: wheel_rev() for the wheel, tools_rev(target) for the tools)."""
    flags = json.dumps({"args": list(args), "patch": rev}, sort_keys=True)
    return f"{version}-{target}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def jobs() -> int:
    env = os.environ.get(JOBS_ENV)
    return max(1, int(env)) if env and env.isdigit() else max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build per key at a time, across processes (a second `make setup` or test waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
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


def _require(programs: Sequence[str], apt: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise DependencyMissingError(f"{', '.join(missing)} not found: building llama.cpp needs a C/C++ "
                                     "compiler and cmake", hint=f"Install them: apt-get install -y {apt}")


# --------------------------------------------------------------------------------------------------------
# The source


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
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not files:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"Could not download the llama-cpp-python {version} sdist ({last})", hint=hint)
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


def _run(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run a build step with its output in `log_path`; a failure is one line naming the log."""
    log.info("$ %s", " ".join(map(str, cmd)))
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if proc.returncode != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        if any("No space left on device" in line for line in lines[-200:]):
            raise BuildError("Disk full while building llama.cpp", path=log_path,
                             hint=f"Free some space or point {CACHE_ENV} at a bigger disk")
        err = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
        raise BuildError(f"llama.cpp build step failed: {err[:200]}", path=log_path,
                         hint="See the full log for the first error")


def _preflight(where: Path, programs: Sequence[str], apt: str) -> None:
    _require(["cmake", *programs], apt)
    where.mkdir(parents=True, exist_ok=True)
    check_free_space(where, BUILD_SPACE, "llama.cpp build")


# --------------------------------------------------------------------------------------------------------
# The portable Python wheel


def wheel_target() -> str:
    return f"wheel-{platform.machine().lower()}-portable"


def find_wheel(version: str | None = None) -> Path | None:
    """The cached portable wheel for `version`, or None (never builds)."""
    version = resolve_version(version)
    folder = cache_root() / build_key(version, wheel_target(), PORTABLE_WHEEL_ARGS, wheel_rev())
    try:
        info = json.loads((folder / "build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wheel = folder / info.get("wheel", "")
    return wheel if wheel.is_file() and wheel.suffix == ".whl" else None


def build_wheel(version: str | None = None, *, force: bool = False) -> Path:
    """Build (or reuse) the portable llama-cpp-python wheel; return its path."""
    version = resolve_version(version)
    folder = cache_root() / build_key(version, wheel_target(), PORTABLE_WHEEL_ARGS, wheel_rev())
    with _locked(folder.with_name(folder.name + ".lock")):
        found = None if force else find_wheel(version)
        if found:
            return found
        _preflight(folder.parent, ("gcc", "g++"), "cmake gcc g++")
        sdist = fetch_sdist(version)
        started = time.monotonic()
        with _staging(folder) as tmp:
            log_path = tmp / "build.log"
            src = extract_source(sdist, tmp / "src")
            patches.apply_all(src, patches.applicable(patches.WHEEL_PATCHES, is_x86("native")))
            env = {**os.environ, "CMAKE_ARGS": " ".join(PORTABLE_WHEEL_ARGS),
                   "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs())}
            log.info("Building the portable llama-cpp-python %s wheel (all CPU variants; 10-25 min on 2 cores, "
                     "log: %s)", version, folder / "build.log")
            _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp / "out", src], log_path, env)
            wheels = sorted((tmp / "out").glob("*.whl"))
            if len(wheels) != 1:
                raise BuildError("pip wheel produced no llama-cpp-python wheel", path=log_path)
            variants = cpu_variants(wheels[0])
            if not variants:
                raise BuildError("The wheel holds no libggml-cpu-<variant>.so modules", path=wheels[0],
                                 hint="Check that this llama.cpp version supports GGML_CPU_ALL_VARIANTS")
            wheel = tmp / wheels[0].name
            os.replace(wheels[0], wheel)
            shutil.rmtree(src)
            shutil.rmtree(tmp / "out")
            info = {"version": version, "target": wheel_target(), "cmake_args": list(PORTABLE_WHEEL_ARGS),
                    "wheel": wheel.name, "sha256": sha256_file(wheel), "bytes": wheel.stat().st_size,
                    "cpu_variants": variants, "build_seconds": round(time.monotonic() - started, 1)}
            (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        log.info("Portable wheel ready in %.0f s: %s", info["build_seconds"], folder / wheel.name)
        return folder / wheel.name


def cpu_variants(wheel: Path) -> list[str]:
    """CPU-variant modules inside a llama-cpp-python wheel (empty for a native build)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [Path(n).name for n in zf.namelist()]
    prefix = "libggml-cpu-"
    return sorted(n[len(prefix):].split(".so")[0] for n in names if n.startswith(prefix) and ".so" in n)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# llama.cpp's own tools


def tools_dir(target: str = "native", version: str | None = None) -> Path:
    if target not in TARGETS:
        raise BuildError(f"Unknown build target '{target}'", hint=f"Use one of: {', '.join(TARGETS)}")
    args = (*_TOOL_COMMON, *TARGETS[target]["args"])  # type: ignore[misc]
    return cache_root() / build_key(resolve_version(version), f"tools-{target}", args, tools_rev(target))


def _moved_tree(tree: Path) -> bool:
    """True if `tree` was configured at another path: CMake trees hold absolute paths and cannot move (ninja
    then fails "rebuilding 'build.ninja'"), so a moved cache needs a fresh configure (and a full build)."""
    try:
        text = (tree / "CMakeCache.txt").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    configured = next((ln.split("=", 1)[1].strip() for ln in text.splitlines()
                       if ln.startswith("CMAKE_CACHEFILE_DIR:")), None)
    return configured is not None and Path(configured).resolve() != tree.resolve()


def find_tools(names: Sequence[str], target: str = "native", version: str | None = None) -> dict[str, Path] | None:
    """Cached binaries for all of `names`, or None if any is missing (never builds)."""
    folder = tools_dir(target, version) / "bin"
    paths = {n: folder / n for n in names}
    return paths if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()) else None


def build_tools(names: Sequence[str], target: str = "native", version: str | None = None,
                *, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) llama.cpp tools, e.g. build_tools(["llama-server"]) -> {"llama-server": path}.

    `target` is "native" (this machine's CPU, static libllama) or "linux-aarch64" (static, cross-compiled).
    The CMake tree is kept in the cache, so asking for another tool later only compiles that tool.
    """
    unknown = [n for n in names if n not in TOOLS]
    if unknown or not names:
        raise BuildError(f"Unknown llama.cpp tool {', '.join(unknown) or '(none given)'}",
                         hint=f"Choose from: {', '.join(TOOLS)}")
    version = resolve_version(version)
    folder = tools_dir(target, version)
    spec = TARGETS[target]
    if target == "native" and "llama-simple" not in names:
        names = [*names, "llama-simple"]  # the post-build check runs it (check_tools)
    args = (*_TOOL_COMMON, *spec["args"])  # type: ignore[misc]
    with _locked(folder.with_name(folder.name + ".lock")):
        found = None if force else find_tools(names, target, version)
        if found:
            return found
        _preflight(folder.parent, spec["compilers"], str(spec.get("apt", "cmake gcc g++")))  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "build.log"
        src = folder / "src"
        if not (src / ".care-complete").is_file():
            sdist = fetch_sdist(version)
            with _staging(src) as tmp:
                top = extract_source(sdist, tmp / "x")
                patches.apply_all(top, patches.applicable(patches.TOOL_PATCHES, is_x86(target)))
                os.replace(top / "vendor" / "llama.cpp", tmp / "llama.cpp")
                shutil.rmtree(tmp / "x")
                (tmp / ".care-complete").write_text(sdist.name + "\n", encoding="utf-8")
        tree = folder / "tree"
        started = time.monotonic()
        if _moved_tree(tree):
            log.info("The CMake tree %s was configured in another folder (the cache was moved): reconfiguring", tree)
            shutil.rmtree(tree)
        if not (tree / "CMakeCache.txt").is_file():
            _run(["cmake", "-S", src / "llama.cpp", "-B", tree, "-G", "Ninja" if shutil.which("ninja") else
                  "Unix Makefiles", *args], log_path)
        log.info("Building %s for %s (log: %s)", ", ".join(names), target, log_path)
        _run(["cmake", "--build", tree, "--config", "Release", "-j", str(jobs()), "--target", *names], log_path)
        out = folder / "bin"
        out.mkdir(exist_ok=True)
        paths: dict[str, Path] = {}
        for name in names:
            built = next((p for p in (tree / "bin" / name, tree / name) if p.is_file()), None)
            if built is None:
                raise BuildError(f"{name} was not produced by the build", path=tree, hint="See build.log")
            with tempfile.NamedTemporaryFile(dir=out, prefix=f".{name}.", delete=False) as tmpf, \
                    open(built, "rb") as src_fh:
                shutil.copyfileobj(src_fh, tmpf)
            os.chmod(tmpf.name, 0o755)
            os.replace(tmpf.name, out / name)
            paths[name] = out / name
        if target == "native":
            check_tools(folder, paths)
        times = folder / "build-times.json"
        record = json.loads(times.read_text()) if times.is_file() else {}
        record[",".join(names)] = round(time.monotonic() - started, 1)
        times.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return paths


def check_tools(folder: Path, paths: dict[str, Path]) -> None:
    """Once after a native build: llama-simple (same static ggml as llama-server, -imatrix, -quantize) runs a
    prefill and a few decode steps of the CPU guard's tiny model in each shipped quant type. A kernel that
    dies on this CPU (issue 22: SIGILL in the AMX tiles) fails the build here, not in a clinic."""
    simple = paths.get("llama-simple") or folder / "bin" / "llama-simple"
    probe = folder / "probe"
    made = subprocess.run([sys.executable, "-m", "care.runtime.cpu_probe", "models", "--out", str(probe)],
                          capture_output=True, text=True)
    if made.returncode != 0:  # llama-cpp-python (which quantises the probe models) is not installed yet
        log.info("tools check skipped: no probe models (%s)", (made.stderr.strip().splitlines() or ["?"])[-1])
        return
    models = json.loads(made.stdout.strip().splitlines()[-1])
    for qtype, model in models.items():
        proc = subprocess.run([str(simple), "-m", model, "-n", "4", "The clinic opens at eight; bring the card."],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            died = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            raise BuildError(f"The llama.cpp tools built here die on this CPU ({died} running a {qtype} model)",
                             path=folder, hint="Report it with `care doctor`; CARE_NATIVE_NO_AMX=1 make tools builds "
                             "them without the AMX kernels")
    log.info("tools checked on this CPU: %s", ", ".join(models))


# --------------------------------------------------------------------------------------------------------
# `python -m care.toolchain.llamacpp`: what `make setup` calls before care is installed.


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m care.toolchain.llamacpp", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["wheel", "tools", "sdist"])
    parser.add_argument("names", nargs="*", help="tools: llama.cpp tool names")
    parser.add_argument("--version", default=None, help="llama-cpp-python version (default: the installed one)")
    parser.add_argument("--target", default="native", choices=sorted(TARGETS))
    parser.add_argument("--cached-only", action="store_true", help="print the cached path, never build")
    parser.add_argument("--force", action="store_true")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if opts.what == "sdist":
            paths = [fetch_sdist(opts.version)]
        elif opts.what == "wheel":
            found = find_wheel(opts.version) if opts.cached_only else build_wheel(opts.version, force=opts.force)
            if found is None:
                return 1
            paths = [found]
        else:
            tools = (find_tools(opts.names, opts.target, opts.version) if opts.cached_only
                     else build_tools(opts.names, opts.target, opts.version, force=opts.force))
            if tools is None:
                return 1
            paths = list(tools.values())
    except CareError as exc:
        sys.stderr.write(f"Error: {exc.one_line()}\n")
        return 2
    sys.stdout.write("".join(f"{p}\n" for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
