"""llama.cpp's own tools (llama-server, llama-imatrix, llama-quantize, llama-cli, llama-simple), static, for this
machine ("native") or cross-compiled for "linux-aarch64"; a native build is checked on this CPU once."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from care.errors import ToolError, WorkerError
from care.io import atomic_path, write_json
from care.proc import run_tool, run_worker
from care.toolchain.llamacpp import patches
from care.toolchain.llamacpp.source import (
    BuildError,
    build_key,
    cache_root,
    extract_source,
    fetch_sdist,
    jobs,
    locked,
    preflight,
    resolve_version,
    run_step,
    staging,
)

log = logging.getLogger(__name__)

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


# Bump when the tools' recipe changes in a way their CMake args do not show. The source patches that apply to a
# target are hashed in too (patches.fingerprint): the AMX fix rebuilds x86 tools and the wheel, and leaves the
# cached aarch64 tools (an hour to cross-build on 2 cores) valid, since no patch applies to them.
_TOOLS_REV = 1


def is_x86(target: str) -> bool:
    if target == "linux-aarch64":
        return False
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def tools_rev(target: str) -> object:
    applied = patches.applicable(patches.TOOL_PATCHES, is_x86(target))
    return [_TOOLS_REV, patches.fingerprint(applied)] if applied else _TOOLS_REV


def tools_dir(target: str = "native", version: str | None = None) -> Path:
    if target not in TARGETS:
        raise BuildError(f"Unknown build target '{target}'", hint=f"Use one of: {', '.join(TARGETS)}")
    args = (*_TOOL_COMMON, *TARGETS[target]["args"])  # type: ignore[misc]
    return cache_root() / build_key(resolve_version(version), f"tools-{target}", args, tools_rev(target))


def moved_tree(tree: Path) -> bool:
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
    with locked(folder.with_name(folder.name + ".lock")):
        found = None if force else find_tools(names, target, version)
        if found:
            return found
        preflight(folder.parent, spec["compilers"], str(spec.get("apt", "cmake gcc g++")))  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "build.log"
        src = folder / "src"
        if not (src / ".care-complete").is_file():
            sdist = fetch_sdist(version)
            with staging(src) as tmp:
                top = extract_source(sdist, tmp / "x")
                patches.apply_all(top, patches.applicable(patches.TOOL_PATCHES, is_x86(target)))
                os.replace(top / "vendor" / "llama.cpp", tmp / "llama.cpp")
                shutil.rmtree(tmp / "x")
                (tmp / ".care-complete").write_text(sdist.name + "\n", encoding="utf-8")
        tree = folder / "tree"
        started = time.monotonic()
        if moved_tree(tree):
            log.info("The CMake tree %s was configured in another folder (the cache was moved): reconfiguring", tree)
            shutil.rmtree(tree)
        if not (tree / "CMakeCache.txt").is_file():
            run_step(["cmake", "-S", src / "llama.cpp", "-B", tree, "-G", "Ninja" if shutil.which("ninja") else
                  "Unix Makefiles", *args], log_path)
        log.info("Building %s for %s (log: %s)", ", ".join(names), target, log_path)
        run_step(["cmake", "--build", tree, "--config", "Release", "-j", str(jobs()), "--target", *names], log_path)
        out = folder / "bin"
        out.mkdir(exist_ok=True)
        paths: dict[str, Path] = {}
        for name in names:
            built = next((p for p in (tree / "bin" / name, tree / name) if p.is_file()), None)
            if built is None:
                raise BuildError(f"{name} was not produced by the build", path=tree, hint="See build.log")
            with atomic_path(out / name, mode=0o777) as tmp_bin:
                shutil.copyfile(built, tmp_bin)
            paths[name] = out / name
        if target == "native":
            check_tools(folder, paths)
        times = folder / "build-times.json"
        record = json.loads(times.read_text()) if times.is_file() else {}
        record[",".join(names)] = round(time.monotonic() - started, 1)
        write_json(times, record)
        return paths


def check_tools(folder: Path, paths: dict[str, Path]) -> None:
    """Once after a native build: llama-simple (same static ggml as llama-server, -imatrix, -quantize) runs a
    prefill and a few decode steps of the CPU guard's tiny model in each shipped quant type. A kernel that
    dies on this CPU (issue 22: SIGILL in the AMX tiles) fails the build here, not in a clinic."""
    simple = paths.get("llama-simple") or folder / "bin" / "llama-simple"
    probe = folder / "probe"
    try:
        made = run_worker("care.runtime.cpu_probe", {"what": "models", "out": str(probe)}, workdir=probe / "job",
                          what="the CPU probe")
    except WorkerError as exc:  # llama-cpp-python (which quantises the probe models) is not installed yet
        log.info("tools check skipped: no probe models (%s)", exc.detail or exc.message)
        return
    models = made["models"]
    for qtype, model in models.items():
        try:
            run_tool([simple, "-m", model, "-n", "4", "The clinic opens at eight; bring the card."],
                     what="llama-simple", timeout=120)
        except ToolError as exc:
            died = exc.signal or ("timed out" if exc.timed_out else f"exit {exc.returncode}")
            raise BuildError(f"The llama.cpp tools built here die on this CPU ({died} running a {qtype} model)",
                             path=folder, hint="Report it with `care doctor`; CARE_NATIVE_NO_AMX=1 make tools builds "
                             "them without the AMX kernels") from exc
    log.info("tools checked on this CPU: %s", ", ".join(models))
