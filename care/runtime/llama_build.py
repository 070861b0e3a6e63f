"""What the installed llama.cpp was built for, against this CPU: the features its system info line reports, AVX-512
code found in its library, and whether the build is portable, native or native for another CPU.

`care doctor` (care/doctor.py) reports it; the system info is read in a child process (this module is its
care.proc worker), since a build for another CPU dies with SIGILL when it loads.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from care.errors import ToolError, WorkerError
from care.proc import run_tool, run_worker, worker_main

# CPU features llama.cpp reports in its system info, and the /proc/cpuinfo flag for each.
CPU_FLAGS = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
             "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
             "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni", "AMX_INT8": "amx_int8"}


def host_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


@functools.lru_cache(maxsize=4)
def system_info_features(lib_stamp: tuple = ()) -> dict[str, bool]:  # noqa: ARG001 - lib_stamp: the cache key
    """The CPU features llama.cpp was compiled to use (its system info line), in a child process (a care.proc
    worker: this module): loading the library is cheap, and a native build for another CPU that dies on an
    illegal instruction must not take the caller down with it. Raises RuntimeError naming why it failed."""
    with tempfile.TemporaryDirectory(prefix="care-llama-build-") as work:
        try:
            out = run_worker("care.runtime.llama_build", {}, workdir=Path(work), timeout=30, what="loading llama_cpp")
        except WorkerError as exc:
            raise RuntimeError(exc.message) from exc
    return {k: v == "1" for k, v in re.findall(r"([A-Z0-9_]+) = ([01])", str(out["system_info"]))}


def _system_info(job: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001 - the job has no fields
    from care.runtime import llama_compat

    return {"system_info": llama_compat.load().llama_print_system_info().decode()}


@functools.lru_cache(maxsize=4)
def zmm_in(lib: Path, lib_stamp: tuple = ()) -> int | None:  # noqa: ARG001 - lib_stamp: the cache key
    """AVX-512 (zmm register) instructions in a shared library, by objdump; None without objdump."""
    if not shutil.which("objdump"):
        return None
    found = [0]

    def count(line: str) -> None:
        found[0] += line.count("%zmm")

    try:
        run_tool(["objdump", "-d", "--no-show-raw-insn", lib], what="objdump", on_line=count, timeout=60)
    except ToolError:
        return None
    return found[0]


def classify_build(host: set[str], used: set[str], variants: list[str], zmm: int | None = None
                   ) -> tuple[str, list[str], list[str]]:
    """(build kind, features the build uses that the host lacks, host features the build leaves unused).
    Per-variant libggml-cpu-*.so files mean runtime dispatch (GGML_CPU_ALL_VARIANTS): portable by design.
    Otherwise the compiled-in features decide; AVX-512 (zmm) instructions found in libggml-cpu.so count as
    used AVX512 even where the system info line does not say so."""
    if zmm and "AVX512" not in used:
        used = used | {"AVX512"}
    if variants:
        return "portable (runtime CPU dispatch: " + ", ".join(variants) + ")", [], []
    missing = sorted(used - host)
    unused = sorted(host - used)
    if missing:
        return "native for another CPU", missing, unused
    if not unused:
        extra = sorted(used - {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"})
        note = f"; a copy runs only on CPUs with {', '.join(extra)}" if extra else ""
        return f"native (uses every feature this CPU has{note})", [], []
    return "portable (baseline features)", [], unused


if __name__ == "__main__":
    raise SystemExit(worker_main(_system_info))
