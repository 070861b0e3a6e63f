"""care.toolchain.llamacpp: cache keys, the binding patch, one-line errors. No compiling here (see the slow
portability tests for the real builds)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from care.errors import DependencyMissingError, ModelNotFoundError
from care.toolchain import llamacpp
from care.toolchain.llamacpp import BuildError, patches


def test_build_key_changes_with_version_target_and_flags():
    args, rev = llamacpp.PORTABLE_WHEEL_ARGS, llamacpp.wheel_rev()
    base = llamacpp.build_key("0.3.36", "wheel-x86_64-portable", args, rev)
    assert base.startswith("0.3.36-wheel-x86_64-portable-")
    assert base == llamacpp.build_key("0.3.36", "wheel-x86_64-portable", args, rev)
    assert base != llamacpp.build_key("0.3.37", "wheel-x86_64-portable", args, rev)
    assert base != llamacpp.build_key("0.3.36", "wheel-x86_64-portable", (*args, "-DX=1"), rev)
    assert base != llamacpp.build_key("0.3.36", "wheel-x86_64-portable", args, [*rev, "x"])


def test_a_patch_rebuilds_only_the_builds_it_applies_to(monkeypatch):
    # the AMX fix rebuilds the x86 wheel and tools; the cross-built aarch64 tools (~1 h) keep their key, which
    # is the one they had before patches.py existed (revision 1, no patch)
    assert llamacpp.tools_rev("linux-aarch64") == 1
    before = {t: llamacpp.tools_dir(t, "0.3.36") for t in llamacpp.TARGETS}
    wheel_before = llamacpp.wheel_rev()
    fixed = patches.Patch(patches.AMX_TILE_CONFIG.name, patches.AMX_TILE_CONFIG.path, patches.AMX_TILE_CONFIG.anchor,
                          patches.AMX_TILE_CONFIG.replacement + "// changed\n", x86_only=True)
    monkeypatch.setattr(patches, "TOOL_PATCHES", (fixed,))
    monkeypatch.setattr(patches, "WHEEL_PATCHES", (patches.BINDING, fixed))
    after = {t: llamacpp.tools_dir(t, "0.3.36") for t in llamacpp.TARGETS}
    assert after["linux-aarch64"] == before["linux-aarch64"]
    if llamacpp.is_x86("native"):
        assert after["native"] != before["native"] and llamacpp.wheel_rev() != wheel_before


def test_cache_root_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path / "c"))
    assert llamacpp.cache_root() == tmp_path / "c"
    assert llamacpp.find_wheel("0.3.36") is None  # empty cache: nothing found, nothing built


def test_binding_patch_inserted_once_and_refuses_unknown_layout(tmp_path):
    pkg = tmp_path / "llama_cpp"
    pkg.mkdir()
    anchor = patches.BINDING.anchor
    source = "import ctypes\n" + anchor + "ctypes_function = 1\n"
    (pkg / "llama_cpp.py").write_text(source)
    patches.BINDING.apply(tmp_path)
    patched = (pkg / "llama_cpp.py").read_text()
    assert patched.count("ggml_backend_load_all_from_path") == 2
    assert patched.index(anchor) < patched.index("ggml_backend_load_all_from_path")
    compile(patched, "llama_cpp.py", "exec")
    # ggml's load messages go to Python logging only while the modules load; then ggml's own logger is back
    assert patched.index("_lib.ggml_log_set(ctypes.cast") < patched.index("_lib.ggml_backend_load_all_from_path(")
    assert "finally:\n        _lib.ggml_log_set(None, None)" in patched
    (pkg / "llama_cpp.py").write_text("import ctypes\n_lib = something_else()\n")
    with pytest.raises(patches.PatchError, match="anchor text") as err:
        patches.BINDING.apply(tmp_path)
    assert "llama_cpp.py" in err.value.one_line() and "patches.py" in err.value.one_line()


def test_patches_apply_to_the_real_sdist(tmp_path):
    """Both patches find their anchor in the pinned llama-cpp-python source, and the AMX config becomes a
    constant object loaded by ldtilecfg (compiled and disassembled where an x86 g++ with AMX is present)."""
    pinned = (Path(__file__).resolve().parents[1] / "constraints.txt").read_text()
    version = next(ln.split("==")[1].strip() for ln in pinned.splitlines() if ln.startswith("llama-cpp-python=="))
    sdist = llamacpp.find_cached_sdist(version)
    if sdist is None:
        pytest.skip("no cached llama-cpp-python sdist (make setup downloads it)")
    top = llamacpp.extract_source(sdist, tmp_path / "src")
    patches.apply_all(top, patches.WHEEL_PATCHES)
    mmq = (top / patches.AMX_TILE_CONFIG.path).read_text()
    common = (top / patches.AMX_INTRINSICS.path).read_text()
    assert "static const tile_config_t tc" in mmq and "tc.rows[0] = 8;" not in mmq
    assert "static thread_local bool done" not in mmq and "_tile_storeconfig(&cur);" in mmq  # no once-per-thread latch
    assert common.count("#define _tile_loadd(") == 1
    for patch in patches.AMX_PATCHES:  # applied twice: refused (the anchor is gone, or the patch is there)
        with pytest.raises(patches.PatchError, match="anchor text|already applied"):
            patch.apply(top)
    _compile_and_read_tile_config(mmq, common, tmp_path)


_PROBE_MAIN = r"""
#include <immintrin.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
void ggml_tile_config_init(void);
int main(int argc, char ** argv) {
    if (argc > 1) {  /* run: only where the CPU has AMX */
        if (syscall(SYS_arch_prctl, 0x1023, 18)) return 2;
        /* ggml's config; then after another AMX user's config (all tiles 16 x 64); then after tilerelease */
        alignas(64) unsigned char foreign[64] = {1};
        for (int i = 0; i < 8; i++) { foreign[16 + 2 * i] = 64; foreign[48 + i] = 16; }
        for (int round = 0; round < 3; round++) {
            if (round == 1) _tile_loadconfig(foreign);
            if (round == 2) _tile_release();
            ggml_tile_config_init();
            alignas(64) unsigned char c[64];
            _tile_storeconfig(c);
            printf("%d", c[0]);
            for (int i = 0; i < 8; i++) printf(" %d:%d", c[48 + i], c[16 + 2 * i] | (c[17 + 2 * i] << 8));
            printf("\n");
        }
    }
    return 0;
}
"""


def _compile_and_read_tile_config(mmq: str, common: str, tmp: Path) -> None:
    """The patched ggml_tile_config_init, cut out of mmq.cpp and compiled at -O3 with AMX on, in a unit of its
    own (where GCC 12 drops the unpatched function's stores, as it does inside ggml_backend_amx_mul_mat), with
    the patched intrinsics of amx/common.h: the config it loads must configure all 8 tiles (rows x colsb of the
    kernels' 2-2-4 layout), also after another AMX user loaded its own config or released the tiles."""
    import re
    import shutil
    import subprocess

    gxx = shutil.which("g++")
    if gxx is None or not llamacpp.is_x86("native"):
        return
    struct = re.search(r"struct tile_config_t\s*\{.*?\n\};", mmq, re.S).group(0)
    func = re.search(r"inline void ggml_tile_config_init\(void\) \{.*?\n\}\n", mmq, re.S).group(0)
    func = func.replace("inline void ggml_tile_config_init", "void ggml_tile_config_init", 1)
    intrin = re.search(r"#if defined\(__GNUC__\) && !defined\(__clang__\).*?\n#endif\n", common, re.S).group(0)
    (tmp / "tilecfg.cpp").write_text("#include <immintrin.h>\n#include <stdint.h>\n#include <string.h>\n" + intrin
                                     + struct + "\n" + func)
    (tmp / "main.cpp").write_text("#include <immintrin.h>\n" + intrin + _PROBE_MAIN)
    exe = tmp / "tilecfg"
    proc = subprocess.run([gxx, "-std=c++17", "-O3", "-mamx-tile", "-mamx-int8", "-mavx512f", str(tmp / "tilecfg.cpp"),
                           str(tmp / "main.cpp"), "-o", str(exe)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this g++ cannot build AMX code: {proc.stderr.strip().splitlines()[-1:]}")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if " amx_tile" not in flags:
        return  # compiled; running ldtilecfg needs an AMX CPU
    out = subprocess.run([str(exe), "run"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"tile config probe died: {out.returncode}"
    ggml = "1 8:64 8:64 16:32 16:32 16:64 16:64 16:64 16:64"
    assert out.stdout.splitlines() == [ggml, ggml, ggml]


def test_sdist_env_must_exist_and_match_version(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.SDIST_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(ModelNotFoundError):
        llamacpp.fetch_sdist("0.3.36")
    other = tmp_path / "llama_cpp_python-0.3.1.tar.gz"
    other.write_bytes(b"x")
    monkeypatch.setenv(llamacpp.SDIST_ENV, str(other))
    with pytest.raises(BuildError, match="not llama-cpp-python 0.3.36"):
        llamacpp.fetch_sdist("0.3.36")


def test_missing_compiler_is_one_line_with_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compilers
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(DependencyMissingError) as err:
        llamacpp.build_tools(["llama-simple"], target="linux-aarch64", version="0.3.36")
    line = err.value.one_line()
    assert "cmake" in line and "aarch64-linux-gnu-gcc" in line and "apt-get install" in line
    assert "\n" not in line


def test_unknown_tool_and_target(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path))
    with pytest.raises(BuildError, match="llama-foo"):
        llamacpp.build_tools(["llama-foo"], version="0.3.36")
    with pytest.raises(BuildError, match="Unknown build target"):
        llamacpp.build_tools(["llama-server"], target="windows-arm", version="0.3.36")


def test_failed_step_names_the_log_and_the_error(tmp_path):
    log = tmp_path / "build.log"
    with pytest.raises(BuildError) as err:
        llamacpp.run_step(["sh", "-c", "echo compiling; echo 'foo.c:1: error: boom' ; exit 3"], log)
    assert "error: boom" in err.value.one_line() and str(log) in err.value.one_line()
    with pytest.raises(BuildError, match="Disk full"):
        llamacpp.run_step(["sh", "-c", "echo 'write: No space left on device'; exit 1"], log)


def test_cpu_variants_read_from_the_wheel(tmp_path):
    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in ("llama_cpp/lib/libllama.so", "llama_cpp/lib/libggml-cpu-haswell.so",
                     "llama_cpp/lib/libggml-cpu-skylakex.so", "llama_cpp/lib/libggml-base.so"):
            zf.writestr(name, b"")
    assert llamacpp.cpu_variants(wheel) == ["haswell", "skylakex"]
    assert llamacpp.cpu_variants(Path(wheel)) != []


def test_a_moved_cmake_tree_is_detected(tmp_path):
    tree = tmp_path / "cache" / "tree"
    tree.mkdir(parents=True)
    assert not llamacpp.moved_tree(tree)  # not configured yet
    (tree / "CMakeCache.txt").write_text(f"# comment\nCMAKE_CACHEFILE_DIR:INTERNAL={tree}\nX:BOOL=ON\n")
    assert not llamacpp.moved_tree(tree)
    (tmp_path / "link").symlink_to(tmp_path / "cache")  # the same folder by another name is not a move
    (tree / "CMakeCache.txt").write_text(f"CMAKE_CACHEFILE_DIR:INTERNAL={tmp_path / 'link' / 'tree'}\n")
    assert not llamacpp.moved_tree(tree)
    (tree / "CMakeCache.txt").write_text("CMAKE_CACHEFILE_DIR:INTERNAL=/work/build/.cache/llama.cpp/x/tree\n")
    assert llamacpp.moved_tree(tree)
