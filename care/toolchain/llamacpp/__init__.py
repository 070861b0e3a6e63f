"""The one place that compiles llama.cpp: the portable Python wheel, llama.cpp's own tools, the aarch64 build.

Everything builds from the llama.cpp source inside the llama-cpp-python sdist of one version (the one
`care export setup` also extracts the converter from), so libllama, the tools and the converter always match.

- `build_wheel()`: llama-cpp-python with `GGML_NATIVE=OFF` + `GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`:
  ggml's CPU kernels become one module per CPU family (libggml-cpu-haswell.so, -skylakex.so, ...) and ggml
  scores them against CPUID at load time, so one wheel runs on any x86-64 CPU and still uses AVX-512 where
  there is one. llama-cpp-python 0.3.36 does not find those modules by itself (llama_backend_init() only
  searches the executable's folder and the cwd), so the build patches llama_cpp/llama_cpp.py to load them
  from the package's lib folder, and ggml's AMX tile config (the SIGILL of issue 22): care/toolchain/llamacpp/patches.py.
- `build_tools(["llama-server"])`: llama.cpp's CLI tools, static, for this machine ("native") or for
  "linux-aarch64" (cross-compiled with Debian's gcc-aarch64-linux-gnu, ARMv8.2-A + dotprod + fp16).

Builds are cached under $CARE_LLAMA_CPP_CACHE (default: <user cache>/llama.cpp) by (version, target, a hash
of the flags), built in a temp folder and renamed into place, and guarded by a file lock.
Standard library only: `make setup` runs this before care and its dependencies are installed.
"""

from __future__ import annotations

from care.toolchain.llamacpp.source import (
    BUILD_SPACE,
    CACHE_ENV,
    JOBS_ENV,
    SDIST_ENV,
    BuildError,
    build_key,
    cache_root,
    download_sdist,
    extract_source,
    fetch_sdist,
    find_cached_sdist,
    jobs,
    resolve_version,
    run_step,
)
from care.toolchain.llamacpp.tools import (
    ARM_ARCH,
    TARGETS,
    TOOLS,
    build_tools,
    check_tools,
    find_tools,
    is_x86,
    moved_tree,
    tools_dir,
    tools_rev,
)
from care.toolchain.llamacpp.wheel import (
    PORTABLE_WHEEL_ARGS,
    build_wheel,
    cpu_variants,
    find_wheel,
    wheel_rev,
    wheel_target,
)

__all__ = ["ARM_ARCH", "BUILD_SPACE", "CACHE_ENV", "JOBS_ENV", "PORTABLE_WHEEL_ARGS", "SDIST_ENV", "TARGETS", "TOOLS",
           "BuildError", "build_key", "build_tools", "build_wheel", "cache_root", "check_tools", "cpu_variants",
           "download_sdist", "extract_source", "fetch_sdist", "find_cached_sdist", "find_tools", "find_wheel", "is_x86",
           "jobs", "moved_tree", "resolve_version", "run_step", "tools_dir", "tools_rev", "wheel_rev",
           "wheel_target"]
