"""care.toolchain.llamacpp: cache keys, the binding patch, one-line errors. No compiling here (see the slow
portability tests for the real builds)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from care.errors import DependencyMissingError, ModelNotFoundError
from care.toolchain import llamacpp
from care.toolchain.llamacpp import BuildError


def test_build_key_changes_with_version_target_and_flags():
    args, rev = llamacpp.PORTABLE_WHEEL_ARGS, llamacpp._PATCH_REV
    base = llamacpp.build_key("0.3.36", "wheel-x86_64-portable", args, rev)
    assert base.startswith("0.3.36-wheel-x86_64-portable-")
    assert base == llamacpp.build_key("0.3.36", "wheel-x86_64-portable", args, rev)
    assert base != llamacpp.build_key("0.3.37", "wheel-x86_64-portable", args, rev)
    assert base != llamacpp.build_key("0.3.36", "wheel-x86_64-portable", (*args, "-DX=1"), rev)
    assert base != llamacpp.build_key("0.3.36", "wheel-x86_64-portable", args, rev + 1)


def test_the_binding_patch_does_not_change_the_tools_keys(monkeypatch):
    # a new binding patch rebuilds the wheel (~12 min), never the cross-built tools (~1 h on 2 cores)
    before = {t: llamacpp.tools_dir(t, "0.3.36") for t in llamacpp.TARGETS}
    monkeypatch.setattr(llamacpp, "_PATCH_REV", llamacpp._PATCH_REV + 1)
    assert {t: llamacpp.tools_dir(t, "0.3.36") for t in llamacpp.TARGETS} == before


def test_cache_root_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path / "c"))
    assert llamacpp.cache_root() == tmp_path / "c"
    assert llamacpp.find_wheel("0.3.36") is None  # empty cache: nothing found, nothing built


def test_binding_patch_inserted_once_and_refuses_unknown_layout(tmp_path):
    pkg = tmp_path / "llama_cpp"
    pkg.mkdir()
    source = "import ctypes\n" + llamacpp._BINDING_ANCHOR + "ctypes_function = 1\n"
    (pkg / "llama_cpp.py").write_text(source)
    llamacpp._patch_binding(tmp_path)
    patched = (pkg / "llama_cpp.py").read_text()
    assert patched.count("ggml_backend_load_all_from_path") == 2
    assert patched.index(llamacpp._BINDING_ANCHOR) < patched.index("ggml_backend_load_all_from_path")
    compile(patched, "llama_cpp.py", "exec")
    # ggml's load messages go to Python logging only while the modules load; then ggml's own logger is back
    assert patched.index("_lib.ggml_log_set(ctypes.cast") < patched.index("_lib.ggml_backend_load_all_from_path(")
    assert "finally:\n        _lib.ggml_log_set(None, None)" in patched
    (pkg / "llama_cpp.py").write_text("import ctypes\n_lib = something_else()\n")
    with pytest.raises(BuildError, match="load_shared_library"):
        llamacpp._patch_binding(tmp_path)


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
        llamacpp._run(["sh", "-c", "echo compiling; echo 'foo.c:1: error: boom' ; exit 3"], log)
    assert "error: boom" in err.value.one_line() and str(log) in err.value.one_line()
    with pytest.raises(BuildError, match="Disk full"):
        llamacpp._run(["sh", "-c", "echo 'write: No space left on device'; exit 1"], log)


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
    assert not llamacpp._moved_tree(tree)  # not configured yet
    (tree / "CMakeCache.txt").write_text(f"# comment\nCMAKE_CACHEFILE_DIR:INTERNAL={tree}\nX:BOOL=ON\n")
    assert not llamacpp._moved_tree(tree)
    (tmp_path / "link").symlink_to(tmp_path / "cache")  # the same folder by another name is not a move
    (tree / "CMakeCache.txt").write_text(f"CMAKE_CACHEFILE_DIR:INTERNAL={tmp_path / 'link' / 'tree'}\n")
    assert not llamacpp._moved_tree(tree)
    (tree / "CMakeCache.txt").write_text("CMAKE_CACHEFILE_DIR:INTERNAL=/work/build/.cache/llama.cpp/x/tree\n")
    assert llamacpp._moved_tree(tree)
