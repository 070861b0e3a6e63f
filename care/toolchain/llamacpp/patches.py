"""The source patches the one build module (care/toolchain/llamacpp/) applies to llama-cpp-python's sdist.

Each patch names its anchor text; a version whose source lacks it fails the build in one line naming the
file and this module, never silently. Standard library only (`make setup` runs before care is installed).

1. The binding (`llama_cpp/llama_cpp.py`): load ggml's per-CPU-family modules from the folder the binding
   loads libllama from (the package's lib/, or $LLAMA_CPP_LIB_PATH: care/runtime/cpu_guard.py points that at
   a folder of links without a module that failed on this CPU). llama-cpp-python 0.3.36 does not load them.

2. ggml's AMX tile configuration (`ggml/src/ggml-cpu/amx/mmq.cpp`). Root cause of issue 22, "SIGILL on an
   Intel Xeon with AMX":
   - ggml_tile_config_init() builds a 64-byte tile config on the stack and loads it with
     `_tile_loadconfig(&tc)`. GCC 12's <amxtileintrin.h> declares that intrinsic's operand as
     `"m" (*((const void **)__config))`: an 8-byte object. So the compiler believes `ldtilecfg` reads only
     the first 8 bytes, and drops the stores of `rows[]` and `colsb[]` as dead.
   - Evidence (GCC 12.2.0, Debian 12, -O3 -march=sapphirerapids): the function compiles to
     `vmovdqa64 %zmm0,(%rsp); movb $0x1,(%rsp); ldtilecfg (%rsp)`, palette 1 with every tile 0 x 0.
     Read back with `sttilecfg`: palette=1, rows[4]=0, colsb[4]=0. The next `tilezero %tmm4` raises #UD
     (an unconfigured tile), the SIGILL seen in gdb under ggml_backend_amx_mul_mat. That is every prefill
     batch (M > 1) on an AMX buffer: q4_0, q4_1, q8_0, q4_K, q5_K, q6_K and iq4_xs weights, in the
     wheel's sapphirerapids variant and in natively built tools alike.
   - AMX itself is fine on such a machine: a C program that loads a complete config runs tile ops, also
     after sleeps, yields, AVX-512 work, page faults and CPU migration.
   - The fix: the config becomes a constant-initialised `static const` object (in .rodata), so no store
     can be dropped; the same function then compiles to `ldtilecfg <.rodata>` and the tile ops run.
     Upstream llama.cpp PR #26954 ("place the tile config in .rodata instead of on the stack") moves it
     the same way. Its other change (arch_prctl per thread) is not needed: Linux grants XTILEDATA
     permission per process.
   care/runtime/cpu_guard.py still checks every variant at run time, for the next bug of this class.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from care.errors import ExportError


class PatchError(ExportError):
    """The llama-cpp-python source does not hold the text a patch expects (another version)."""


@dataclass(frozen=True)
class Patch:
    name: str
    path: str  # relative to the sdist's top folder (llama_cpp_python-<version>)
    anchor: str  # must occur exactly once
    replacement: str  # what the anchor becomes
    x86_only: bool = False  # applies to x86 builds only (its file is compiled only there)

    def apply(self, top: Path) -> None:
        path = top / self.path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PatchError(f"Patch '{self.name}': cannot read the file it patches ({exc.strerror})", path=path,
                             hint="Use the llama-cpp-python version in constraints.txt") from exc
        if text.count(self.anchor) != 1:
            raise PatchError(f"Patch '{self.name}': its anchor text is not in this source exactly once", path=path,
                             hint="Update the patch in care/toolchain/patches.py for this llama-cpp-python version")
        path.write_text(text.replace(self.anchor, self.replacement), encoding="utf-8")


_BINDING_ANCHOR = "_lib = load_shared_library(_lib_base_name, _base_path)\n"
_BINDING_CODE = '''
# care portable build: ggml's CPU kernels are per-CPU-family modules (libggml-cpu-<variant>.so) next to this
# library; llama_backend_init() only searches the executable's folder and the cwd, so load them from here.
# ggml reports the module it picks ("load_backend: loaded CPU backend from ...") at INFO, straight to stderr:
# route that through the "llama-cpp-python" logger while loading, so it shows only where logging asks for INFO
# (`care -v`), then give ggml its default logger back (llama-cpp-python sets its own on import).
if not _lib.ggml_backend_reg_count() and any(_base_path.glob("libggml-cpu-*.so")):
    import logging as _care_logging

    def _care_ggml_log(level, text, _user):
        _care_logging.getLogger("llama-cpp-python").log(
            {1: _care_logging.DEBUG, 3: _care_logging.WARNING, 4: _care_logging.ERROR}.get(level, _care_logging.INFO),
            "%s", (text or b"").decode("utf-8", "replace").rstrip("\\n"))

    _care_log_cb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(_care_ggml_log)
    _lib.ggml_log_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _lib.ggml_log_set(ctypes.cast(_care_log_cb, ctypes.c_void_p), None)
    try:
        _lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        _lib.ggml_backend_load_all_from_path(str(_base_path).encode())
    finally:
        _lib.ggml_log_set(None, None)
    del _care_log_cb, _care_ggml_log, _care_logging
'''

_AMX_ANCHOR = """    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    tc.start_row = 0;
    tc.rows[0] = 8;   tc.colsb[0] = 64;
    tc.rows[1] = 8;   tc.colsb[1] = 64;
    tc.rows[2] = 16;  tc.colsb[2] = 32;
    tc.rows[3] = 16;  tc.colsb[3] = 32;
    tc.rows[4] = 16;  tc.colsb[4] = 64;
    tc.rows[5] = 16;  tc.colsb[5] = 64;
    tc.rows[6] = 16;  tc.colsb[6] = 64;
    tc.rows[7] = 16;  tc.colsb[7] = 64;
"""
_AMX_FIX = """    // care patch (care/toolchain/patches.py): a constant config in .rodata. Built on the stack, GCC 12 drops
    // the rows/colsb stores (its _tile_loadconfig operand is declared 8 bytes wide) and every tile op #UDs.
    alignas(64) static const tile_config_t tc = [] {
        tile_config_t c = {};
        c.palette_id = 1;
        c.start_row = 0;
        c.rows[0] = 8;   c.colsb[0] = 64;
        c.rows[1] = 8;   c.colsb[1] = 64;
        c.rows[2] = 16;  c.colsb[2] = 32;
        c.rows[3] = 16;  c.colsb[3] = 32;
        c.rows[4] = 16;  c.colsb[4] = 64;
        c.rows[5] = 16;  c.colsb[5] = 64;
        c.rows[6] = 16;  c.colsb[6] = 64;
        c.rows[7] = 16;  c.colsb[7] = 64;
        return c;
    }();
"""

BINDING = Patch("binding-cpu-variants", "llama_cpp/llama_cpp.py", _BINDING_ANCHOR, _BINDING_ANCHOR + _BINDING_CODE)
AMX_TILE_CONFIG = Patch("amx-tile-config", "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp", _AMX_ANCHOR, _AMX_FIX,
                        x86_only=True)

WHEEL_PATCHES = (BINDING, AMX_TILE_CONFIG)
TOOL_PATCHES = (AMX_TILE_CONFIG,)  # the tools build from vendor/llama.cpp alone


def applicable(patches: tuple[Patch, ...], x86: bool) -> tuple[Patch, ...]:
    return tuple(p for p in patches if x86 or not p.x86_only)


def apply_all(top: Path, patches: tuple[Patch, ...]) -> None:
    for patch in patches:
        patch.apply(top)


def fingerprint(patches: tuple[Patch, ...]) -> str:
    """A short hash of the patches' text: part of a build's cache key, so a changed patch rebuilds."""
    blob = json.dumps([[p.name, p.path, p.anchor, p.replacement] for p in patches], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
