"""The source patches the one build module (care/toolchain/llamacpp/) applies to llama-cpp-python's sdist.

Each patch names its anchor text; a version whose source lacks it fails the build in one line naming the
file and this module, never silently. Standard library only (`make setup` runs before care is installed).

1. The binding (`llama_cpp/llama_cpp.py`): load ggml's per-CPU-family modules from the folder the binding
   loads libllama from (the package's lib/, or $LLAMA_CPP_LIB_PATH: care/runtime/cpu_guard.py points that at
   a folder of links without a module that failed on this CPU). llama-cpp-python 0.3.36 does not load them.

2. ggml's AMX tile configuration (`ggml/src/ggml-cpu/amx/mmq.cpp`). First root cause of issue 22, "SIGILL
   on an Intel Xeon with AMX":
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

3. The tile config is per-thread CPU state, loaded once per thread (`static thread_local bool done` in
   ggml_tile_config_init). After patch 2, the AMX module still gave wrong greedy tokens on the Xeon (SmolLM2
   Q4_K_M, "L'Étoile, la Mar" for "The capital of") and one SIGILL in decode during the full suite, in
   processes the short probe does not imitate. Likely cause (2026-12-04, shown in software emulation only; no
   AMX machine since): any other AMX user on the same thread (oneDNN in PyTorch, onnxruntime's MLAS) replaces
   the config or releases the tiles (tilerelease), and ggml never reloads it.
   - Evidence: the real ggml_backend_amx_convert_weight + ggml_backend_amx_mul_mat of this mmq.cpp, built by
     GCC 12 with the wheel's sapphirerapids flags, run with the tile instructions emulated (the SDM's
     semantics and shape checks that raise #UD), against a float64 reference: q4_0, q4_1, q8_0, q4_K, q5_K,
     q6_K and iq4_xs, M in 1..65, N 32..576, K 256..1536, 1,386 shapes: worst relative error 0.013 (the q8
     activations). With a foreign config (all tiles 16 x 64) loaded between two calls: garbage (relative error
     2 to 69) in 1,259 of the 1,260 cases with M > 1, with no fault. With tilerelease between calls: #UD, a
     SIGILL on hardware. With this patch every case passes in all three modes.
   - The same bug, fixed the same way (read the live config back), elsewhere: onnxruntime PR #15387, libxsmm
     #824. The newer upstream mmq.cpp drops the latch but compares against its own copy in memory.
   - The fix: read the live config back with `sttilecfg` and load ggml's when it differs (one sttilecfg per
     thread per AMX matmul). With it, the intrinsics GCC declares too narrowly are redefined for GCC (4): the
     sttilecfg operand must be the whole 64 bytes for the comparison to be sound.

4. GCC's <amxtileintrin.h> (12; 13 before 13.2.1) declares ldtilecfg / sttilecfg with an 8-byte operand, and
   every GCC declares tileloadd with register inputs only (no memory operand, no "memory" clobber), so GCC may
   drop or move the stores that fill memory a tile load reads (shown in a small test: GCC 12 deletes every
   store to a stack buffer that only tileloadd reads). In this mmq.cpp the generated code is the same with and
   without the redefinition (its tile buffers are static thread_local and each refill is followed by a
   tilestored, which clobbers memory); it is carried so that a later ggml cannot fall into it.

Not known without an AMX machine: whether a foreign config really occurs in care's processes (PyTorch's
oneDNN in the export verification and in the test process are the candidates), and whether the hardware
matches the emulation. So care/runtime/cpu_guard.py still refuses the AMX module by policy (DISTRUSTED) until
bench/cpu_modules.py, run on a Xeon with CARE_CPU_ALLOW_AMX=1, shows it right; and it checks every variant at
run time, for the next bug of this class.
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
        if self.replacement and self.replacement in text:
            raise PatchError(f"Patch '{self.name}': already applied to this source", path=path,
                             hint="Patch a freshly extracted llama-cpp-python source")
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

_INTRIN_ANCHOR = "#include <type_traits>\n"
_INTRIN_FIX = _INTRIN_ANCHOR + r"""
// care patch (care/toolchain/llamacpp/patches.py, 4): GCC's <amxtileintrin.h> (12.x; 13.x before 13.2.1) declares
// ldtilecfg/sttilecfg with an 8-byte memory operand, and every GCC declares tileloadd/tileloaddt1 with register
// inputs only (no memory operand, no "memory" clobber): GCC may then drop or move the stores that fill memory a
// tile instruction reads. Redefine them for GCC (clang's are builtins that model memory).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__AMX_TILE__)
#include <immintrin.h>
static inline __attribute__((__always_inline__)) void ggml_amx_ldtilecfg(const void * cfg) {
    __asm__ volatile("ldtilecfg\t%0" :: "m"(*(const unsigned char (*)[64]) cfg) : "memory");
}
static inline __attribute__((__always_inline__)) void ggml_amx_sttilecfg(void * cfg) {
    __asm__ volatile("sttilecfg\t%0" : "=m"(*(unsigned char (*)[64]) cfg) :: "memory");
}
#undef _tile_loadd
#undef _tile_stream_loadd
#define _tile_loadconfig(cfg)  ggml_amx_ldtilecfg(cfg)
#define _tile_storeconfig(cfg) ggml_amx_sttilecfg(cfg)
#define _tile_loadd(dst, base, stride)        ggml_amx_tileload_(tileloadd, dst, base, stride)
#define _tile_stream_loadd(dst, base, stride) ggml_amx_tileload_(tileloaddt1, dst, base, stride)
#define ggml_amx_tileload_(insn, dst, base, stride)                                               \
    __asm__ volatile("{" #insn "\t(%0,%1,1), %%tmm" #dst "|" #insn "\t%%tmm" #dst ", [%0+%1*1]}"   \
                     :: "r"((const void *) (base)), "r"((long) (stride)) : "memory")
#endif
"""
_LATCH_ANCHOR = "    static thread_local bool done = false;\n\n    if (done) {\n        return;\n    }\n"
_RELOAD_ANCHOR = "    _tile_loadconfig(&tc);\n    done = true;\n}\n"
_RELOAD_FIX = """    // care patch (care/toolchain/llamacpp/patches.py, 3): the tile config is per-thread CPU state that any other
    // AMX user on this thread (oneDNN in PyTorch, onnxruntime's MLAS, ...) may replace or release (tilerelease).
    // A once-per-thread flag would then run ggml's tiles with foreign shapes (wrong results) or none (#UD,
    // SIGILL). Read the live config back (sttilecfg) and load ours only when it differs.
    alignas(64) tile_config_t cur;
    _tile_storeconfig(&cur);
    if (memcmp(&cur, &tc, sizeof(tc)) != 0) {
        _tile_loadconfig(&tc);
    }
}
"""
_AMX_DIR = "vendor/llama.cpp/ggml/src/ggml-cpu/amx/"
AMX_INTRINSICS = Patch("amx-gcc-intrinsics", _AMX_DIR + "common.h", _INTRIN_ANCHOR, _INTRIN_FIX, x86_only=True)
AMX_NO_LATCH = Patch("amx-config-no-latch", _AMX_DIR + "mmq.cpp", _LATCH_ANCHOR, "", x86_only=True)
AMX_RELOAD = Patch("amx-config-reload", _AMX_DIR + "mmq.cpp", _RELOAD_ANCHOR, _RELOAD_FIX, x86_only=True)
AMX_PATCHES = (AMX_TILE_CONFIG, AMX_INTRINSICS, AMX_NO_LATCH, AMX_RELOAD)  # in this order

WHEEL_PATCHES = (BINDING, *AMX_PATCHES)
TOOL_PATCHES = AMX_PATCHES  # the tools build from vendor/llama.cpp alone


def applicable(patches: tuple[Patch, ...], x86: bool) -> tuple[Patch, ...]:
    return tuple(p for p in patches if x86 or not p.x86_only)


def apply_all(top: Path, patches: tuple[Patch, ...]) -> None:
    for patch in patches:
        patch.apply(top)


def fingerprint(patches: tuple[Patch, ...]) -> str:
    """A short hash of the patches' text: part of a build's cache key, so a changed patch rebuilds."""
    blob = json.dumps([[p.name, p.path, p.anchor, p.replacement] for p in patches], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
