"""The llama-cpp-python wheels.

- native (x86-64 here): portable, GGML_NATIVE=OFF + GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS, one ggml CPU module
  per CPU family chosen at run time (care/runtime/cpu_guard.py checks the choice), the binding and AMX patches
  applied (patches.py).
- "linux-aarch64": cross-compiled with Debian's gcc-aarch64-linux-gnu for the ARM baseline of the tools
  (tools.ARM_ARCH: ARMv8.2-A + dotprod + fp16), one CPU library. The binding is pure Python that loads its
  libraries through ctypes, so the cross-built libllama/libggml* and the package make the wheel; it is retagged
  py3-none-linux_aarch64 (pip builds it on x86, and would tag it for x86). glibc-based Linux only (Debian,
  Ubuntu, Raspberry Pi OS): Termux's bionic needs the on-device build (care/data/bundle/termux-build.sh).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
import zipfile
from pathlib import Path

from care.errors import ToolError
from care.proc import run_tool
from care.system import sha256_file
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
from care.toolchain.llamacpp.tools import ARM_ARCH, TARGETS, is_x86

log = logging.getLogger(__name__)

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
_WHEEL_REV = 2  # the binding patch's own history before patches.py (revisions 1-2)


ARM_WHEEL_ARGS = (
    "-DLLAVA_BUILD=OFF",
    "-DGGML_NATIVE=OFF",
    f"-DGGML_CPU_ARM_ARCH={ARM_ARCH}",
    "-DGGML_LLAMAFILE=OFF",  # as llama.cpp's Android guide builds it
    "-DGGML_OPENMP=OFF",
    *(a for a in TARGETS["linux-aarch64"]["args"] if "COMPILER" in a or "SYSTEM" in a),  # type: ignore[attr-defined]
)


# "device": built on the machine that will run it, for its CPU only (GGML_NATIVE): what Termux on an Android
# phone needs (bionic libc: no manylinux wheel runs there), built on the phone by care/data/bundle/termux-build.sh.
DEVICE_WHEEL_ARGS = (
    "-DLLAVA_BUILD=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_OPENMP=OFF",  # Termux's clang has no libgomp
)
WHEEL_TARGETS = ("native", "linux-aarch64", "device")


def wheel_args(target: str = "native") -> tuple[str, ...]:
    if target not in WHEEL_TARGETS:
        raise BuildError(f"Unknown wheel target '{target}'", hint=f"Use one of: {', '.join(WHEEL_TARGETS)}")
    return {"linux-aarch64": ARM_WHEEL_ARGS, "device": DEVICE_WHEEL_ARGS}.get(target, PORTABLE_WHEEL_ARGS)


def wheel_rev(target: str = "native") -> object:
    return [_WHEEL_REV, patches.fingerprint(patches.applicable(patches.WHEEL_PATCHES, is_x86(target)))]


def wheel_target(target: str = "native") -> str:
    if target == "linux-aarch64":
        return "wheel-aarch64-armv8.2"
    return f"wheel-{platform.machine().lower()}-{'device' if target == 'device' else 'portable'}"


def _folder(version: str, target: str) -> Path:
    return cache_root() / build_key(version, wheel_target(target), wheel_args(target), wheel_rev(target))


def find_wheel(version: str | None = None, target: str = "native") -> Path | None:
    """The cached wheel for `version` and `target`, or None (never builds)."""
    version = resolve_version(version)
    folder = _folder(version, target)
    try:
        info = json.loads((folder / "build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wheel = folder / info.get("wheel", "")
    return wheel if wheel.is_file() and wheel.suffix == ".whl" else None


def build_wheel(version: str | None = None, *, target: str = "native", force: bool = False) -> Path:
    """Build (or reuse) the llama-cpp-python wheel for `target`; return its path."""
    version = resolve_version(version)
    folder = _folder(version, target)
    arm = target == "linux-aarch64"
    with locked(folder.with_name(folder.name + ".lock")):
        found = None if force else find_wheel(version, target)
        if found:
            return found
        spec = TARGETS["linux-aarch64" if arm else "native"]
        compilers = (os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")) if target == "device" else spec["compilers"]
        preflight(folder.parent, compilers, str(spec.get("apt", "cmake gcc g++")))  # type: ignore[arg-type]
        sdist = fetch_sdist(version)
        started = time.monotonic()
        with staging(folder) as tmp:
            log_path = tmp / "build.log"
            src = extract_source(sdist, tmp / "src")
            patches.apply_all(src, patches.applicable(patches.WHEEL_PATCHES, is_x86(target)))
            env = {**os.environ, "CMAKE_ARGS": " ".join(wheel_args(target)), "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs())}
            log.info("Building the llama-cpp-python %s wheel for %s (%s; log: %s)", version, target,
                     {"linux-aarch64": "cross-compiled, 10-15 min on 2 cores", "device": "for this CPU only, 5-20 min"}
                     .get(target, "all CPU variants, 10-25 min on 2 cores"),
                     folder / "build.log")
            run_step([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp / "out", src], log_path, env)
            wheels = sorted((tmp / "out").glob("*.whl"))
            if len(wheels) != 1:
                raise BuildError("pip wheel produced no llama-cpp-python wheel", path=log_path)
            variants = cpu_variants(wheels[0])
            if not variants and target == "native":
                raise BuildError("The wheel holds no libggml-cpu-<variant>.so modules", path=wheels[0],
                                 hint="Check that this llama.cpp version supports GGML_CPU_ALL_VARIANTS")
            wheel = retag_aarch64(wheels[0], tmp) if arm else tmp / wheels[0].name
            if not arm:
                os.replace(wheels[0], wheel)
            shutil.rmtree(src)
            shutil.rmtree(tmp / "out")
            info = {"version": version, "target": wheel_target(target), "cmake_args": list(wheel_args(target)),
                    "wheel": wheel.name, "sha256": sha256_file(wheel), "bytes": wheel.stat().st_size,
                    "cpu_variants": variants, "build_seconds": round(time.monotonic() - started, 1)}
            (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        log.info("llama-cpp-python wheel ready in %.0f s: %s", info["build_seconds"], folder / wheel.name)
        return folder / wheel.name


def cpu_variants(wheel: Path) -> list[str]:
    """CPU-variant modules inside a llama-cpp-python wheel (empty for a native build)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [Path(n).name for n in zf.namelist()]
    prefix = "libggml-cpu-"
    return sorted(n[len(prefix):].split(".so")[0] for n in names if n.startswith(prefix) and ".so" in n)


def retag_aarch64(built: Path, out_dir: Path) -> Path:
    """The cross-built wheel (tagged for this x86 machine by pip) as py3-none-linux_aarch64: only the package and
    its dist-info (the build also installs a top-level lib/ and include/), each library once under the two names
    it is loaded by (lib*.so for the binding, lib*.so.0 the sonames they need: zip files hold no symlinks, so a
    third, fully versioned copy would only add size), stripped with the cross binutils, RECORD rewritten.
    Refuses a wheel whose libllama is not an aarch64 ELF file."""
    import base64
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp_s, zipfile.ZipFile(built) as zf:
        tmp = Path(tmp_s)
        zf.extractall(tmp)
        import re

        for top in list(tmp.iterdir()):
            if top.name != "llama_cpp" and not top.name.endswith(".dist-info"):
                shutil.rmtree(top) if top.is_dir() else top.unlink()
        for lib in tmp.glob("llama_cpp/lib/*.so.*"):
            if not re.search(r"\.so\.\d+$", lib.name):  # libggml.so.0.25.3: not loaded by that name
                lib.unlink()
        libs = sorted(tmp.glob("llama_cpp/lib/*.so*"))
        elf = next((p for p in libs if p.name.startswith("libllama") and not p.is_symlink()), None)
        if elf is None or elf.read_bytes()[18:20] != b"\xb7\x00":  # e_machine EM_AARCH64 (183)
            raise BuildError("The cross-built wheel holds no aarch64 libllama", path=built,
                             hint="Check the aarch64 compilers (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
        for lib in libs:
            if not lib.is_symlink():
                try:
                    run_tool(["aarch64-linux-gnu-strip", "--strip-unneeded", lib], what="aarch64-linux-gnu-strip")
                except ToolError as exc:  # a larger wheel, not a broken one
                    log.info("%s left unstripped: %s", lib.name, exc.message)
        dist = next(tmp.glob("*.dist-info"))
        wheel_file = dist / "WHEEL"
        text = wheel_file.read_text(encoding="utf-8")
        tags = [ln for ln in text.splitlines() if ln.startswith("Tag: ")]
        new_tag = "py3-none-linux_aarch64"
        wheel_file.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("Tag: "))
                              + f"\nTag: {new_tag}\n", encoding="utf-8")
        rows = []
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            if rel == f"{dist.name}/RECORD":
                continue
            digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
            rows.append(f"{rel},sha256={digest},{path.stat().st_size}")
        rows.append(f"{dist.name}/RECORD,,")
        (dist / "RECORD").write_text("\n".join(rows) + "\n", encoding="utf-8")
        old = tags[0].split(" ", 1)[1] if tags else ""
        name = built.name.replace(old, new_tag) if old and old in built.name else built.name.replace(
            built.name.rsplit("-", 3)[-1], new_tag + ".whl")
        target = out_dir / name
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                out.write(path, path.relative_to(tmp).as_posix())
    return target
