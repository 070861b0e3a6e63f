"""The CPU guard (care/runtime/cpu_guard.py): a CPU module that dies on this CPU is refused for real, the next
best one is used, and the choice is cached.

The failing module is a real shared library compiled here: it tells ggml it is the best module for this CPU
(a score above every real one) and executes an illegal instruction (ud2) when ggml initialises it, so the
probe child dies with SIGILL exactly as issue 22's AMX module did."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from care.runtime import cpu_guard

FAKE_C = r"""
int ggml_backend_score(void) { return 1 << 30; }
void * ggml_backend_init(void) { __builtin_trap(); return 0; }
"""


@pytest.fixture(scope="module")
def lib_with_a_bad_module(tmp_path_factory) -> Path:
    real = cpu_guard.lib_dir()
    if real is None or not any(real.glob("libggml-cpu-*.so")):
        pytest.skip("llama-cpp-python is not the portable build (no libggml-cpu-*.so): run make setup")
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("gcc") is None:
        pytest.skip("the failing module is built with gcc for x86-64 (ud2)")
    lib = tmp_path_factory.mktemp("lib")
    for path in real.iterdir():
        (lib / path.name).symlink_to(path)
    src = lib / "fake.c"
    src.write_text(FAKE_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", str(src), "-o", str(lib / "libggml-cpu-zzbroken.so")], check=True)
    return lib


def test_a_module_that_dies_is_refused_and_the_next_is_cached(lib_with_a_bad_module, tmp_path, monkeypatch):
    lib = lib_with_a_bad_module
    monkeypatch.setenv(cpu_guard.CACHE_ENV, str(tmp_path / "guard"))
    monkeypatch.delenv(cpu_guard.DONE_ENV, raising=False)
    choice = cpu_guard.choose(lib)
    bad = [r for r in choice.refused if r["variant"] == "zzbroken"]
    assert len(bad) == 1 and "SIGILL" in bad[0]["why"]
    if any("sapphirerapids" in v for v, s in choice.scores.items() if s > 0):  # AMX: refused by policy here
        assert any(r["variant"] == "sapphirerapids" and "distrusted" in r["why"] for r in choice.refused)
    assert choice.variant not in (None, "libggml-cpu-zzbroken.so")
    # the next best by ggml's own score that runs here (a real module, checked on every shipped type)
    real_ranked = sorted((v for v, s in choice.scores.items() if s > 0 and "zzbroken" not in v),
                         key=lambda v: -choice.scores[v])
    refused_real = {r["variant"] for r in choice.refused if r["variant"] != "zzbroken"}
    assert choice.variant == next(v for v in real_ranked if cpu_guard.variant_name(v) not in refused_real)
    assert set(choice.gaps) == {"f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q3_k_m", "iq4_xs"}
    cached = tmp_path / "guard" / f"{choice.key}.json"
    assert json.loads(cached.read_text())["variant"] == choice.variant

    def no_children(*args, **kwargs):
        raise AssertionError("the cached choice must not probe again")

    monkeypatch.setattr(cpu_guard, "_child", no_children)
    again = cpu_guard.choose(lib)
    assert again.cached and again.variant == choice.variant and again.refused == choice.refused


def test_a_process_loading_llama_cpp_uses_the_checked_module(lib_with_a_bad_module, tmp_path):
    """A real chat process (llama_compat.load, then a prefill) with the bad module present survives, and the
    module mapped into it is the guard's choice, never the broken one."""
    code = r"""
import json, re, sys
from care.runtime import cpu_guard, llama_compat
llama_cpp = llama_compat.load()
models = sorted((cpu_guard.cache_dir()).glob("models-*/probe-q4_0.gguf"))
llm = llama_cpp.Llama(model_path=str(models[0]), n_ctx=64, n_batch=64, verbose=False)
llm.eval(list(range(3, 40)))
maps = open("/proc/self/maps").read()
print(json.dumps({"chosen": cpu_guard.ensure().variant,
                  "mapped": sorted(set(re.findall(r"libggml-cpu-[\w-]+\.so", maps)))}))
"""
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib_with_a_bad_module),
           cpu_guard.CACHE_ENV: str(tmp_path / "guard")}
    env.pop(cpu_guard.DONE_ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mapped"] == [out["chosen"]] and "zzbroken" not in out["chosen"]
    assert "refused" in proc.stderr and "zzbroken" in proc.stderr  # the one warning line


def test_no_module_runs_is_one_line(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libggml-cpu-none.so").write_bytes(b"not an ELF file")
    monkeypatch.setenv(cpu_guard.CACHE_ENV, str(tmp_path / "guard"))
    with pytest.raises(cpu_guard.CpuUnsupportedError) as err:
        cpu_guard.choose(lib)
    line = err.value.one_line()
    assert "No llama.cpp CPU module" in line and str(lib) in line and "\n" not in line
