"""Proof that the portable build runs where the clinic is (slow suite; reuses cached builds, never compiles).

- the portable llama-cpp-python wheel under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512) and `-cpu Nehalem`
  (SSE4.2, no AVX at all) gives the same greedy tokens as natively, and ggml picked the matching CPU module;
  on a Core 2 (no SSE4.1) numpy dies with SIGILL, which is why install.sh refuses such CPUs;
- a bundle installs into a fresh venv inside a network namespace with no network and answers `care chat --once`;
(The aarch64 runtime: tests/test_arm_slow.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from care.toolchain import llamacpp

pytestmark = pytest.mark.slow
GREEDY = Path(__file__).with_name("portable_greedy.py")
PROMPT = "The three most common causes of fever in children are"
N_TOKENS = 6  # emulation is slow: a handful of tokens is enough to catch a different kernel result
# Kernels of different CPU families round differently, by a few hundredths of a logit. Where the native run's best
# two tokens are closer than that, either pick is right (a Haswell run took the runner-up at a 0.018 gap).
NEAR_TIE = 0.1


def _version() -> str:
    return llamacpp.resolve_version()


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory) -> Path:
    wheel = llamacpp.find_wheel(_version())
    if wheel is None:
        pytest.skip(f"no cached portable llama-cpp-python wheel under {llamacpp.cache_root()}: `make setup` "
                    "builds it (python -m care.toolchain.llamacpp wheel)")
    folder = tmp_path_factory.mktemp("portable")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(folder)
    for lib in (folder / "llama_cpp" / "lib").iterdir():
        lib.chmod(0o755)
    return folder


def clean_env(**extra: str) -> dict[str, str]:
    """The environment, minus OPENBLAS_CORETYPE: a machine may force OpenBLAS's kernels (this one sets
    Haswell), and numpy's import-time sanity check (a float32 dot) would then run AVX code on an emulated CPU
    that has none: that was the Nehalem SIGILL, in numpy's OpenBLAS (sdot_k_HASWELL), not in ggml."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    return {**env, **extra}


def greedy(model: Path, *, pythonpath: Path | None = None, qemu_cpu: str | None = None) -> dict:
    cmd = [sys.executable, str(GREEDY), str(model), str(N_TOKENS), PROMPT]
    if qemu_cpu:
        cmd = ["qemu-x86_64", "-cpu", qemu_cpu, *cmd]
    env = clean_env(PYTHONPATH=str(pythonpath) if pythonpath else "")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout)
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(f"{qemu_cpu or 'native'}: {out['seconds']} s, variant {out['cpu_variants']}, {out['pieces']}")
    return out


@pytest.fixture(scope="module")
def native_run(portable_lib, embedded_gguf) -> dict:
    return greedy(embedded_gguf, pythonpath=portable_lib)


def test_portable_wheel_picks_a_cpu_module_natively(native_run):
    assert len(native_run["cpu_variants"]) == 1 and len(native_run["tokens"]) == N_TOKENS


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-x86_64 not installed (Debian's qemu-user; `make cross-tools` as root)")
@pytest.mark.parametrize(("cpu", "variant"), [("Haswell", "haswell"), ("Nehalem", "sse42")])
def test_portable_wheel_on_older_cpus_gives_the_same_tokens(portable_lib, embedded_gguf, native_run, cpu, variant):
    run = greedy(embedded_gguf, pythonpath=portable_lib, qemu_cpu=cpu)
    assert run["cpu_variants"] == [variant]
    assert run["prompt_tokens"] == native_run["prompt_tokens"]
    # equal, or first different at a near-tie of the native run where the old CPU took the runner-up
    diff = next((i for i, (a, b) in enumerate(zip(run["tokens"], native_run["tokens"], strict=False)) if a != b), None)
    if diff is None:
        assert len(run["tokens"]) == len(native_run["tokens"])
    else:
        assert native_run["margins"][diff] < NEAR_TIE and run["pieces"][diff] == native_run["runner_up"][diff], (
            diff, run["pieces"], native_run["pieces"], native_run["margins"])


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-x86_64 not installed (qemu-user)")
def test_pre_nehalem_cpu_cannot_run_the_runtime(portable_lib):
    """Why install.sh refuses CPUs without SSE4.2/POPCNT: on a Core 2, ggml would load its x64 module, but
    numpy (built for x86-64-v2) dies with SIGILL on import. The day this passes, relax install.sh's check."""
    proc = subprocess.run(["qemu-x86_64", "-cpu", "core2duo", sys.executable, "-c", "import llama_cpp"],
                          capture_output=True, text=True, env=clean_env(PYTHONPATH=str(portable_lib)), timeout=600)
    assert proc.returncode == -4, (proc.returncode, proc.stderr[-500:])  # SIGILL


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root for `unshare -n` (a network namespace without network)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "unshare -n is not permitted here (container without CAP_SYS_ADMIN)"
    return None


def test_bundle_installs_and_answers_with_no_network(tmp_path, embedded_gguf, portable_lib):
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    from care.toolchain.bundle import build_bundle

    t0 = time.monotonic()
    bundle = build_bundle(embedded_gguf, tmp_path / "care-bundle")
    built = time.monotonic() - t0
    # what the clinic gets: the archive, unpacked elsewhere
    unpack = tmp_path / "usb"
    unpack.mkdir()
    subprocess.run(["tar", "xzf", str(bundle.archive), "-C", str(unpack)], check=True)
    prefix = tmp_path / "clinic-pc" / "care-edge"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "clinic-pc"), "PYTHON": sys.executable, "LANG": "C.UTF-8"}
    script = (f"ip link show | grep -q 'state UP' && exit 9; "  # really no network in here
              f"./install.sh {prefix} && {prefix}/start.sh --once 'What helps a child with a fever?' "
              f"--max-tokens 12 --temperature 0 --seed 1")
    t1 = time.monotonic()
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=unpack / "care-bundle", env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = time.monotonic() - t1
    answer = proc.stdout.split("Done. Start the assistant with:", 1)[-1].split("\n", 1)[-1].strip()
    assert answer, proc.stdout
    assert "loaded CPU backend" not in proc.stderr, proc.stderr[-1000:]  # ggml's module line stays off stderr
    assert (prefix / "app" / "venv").is_dir() and not list(prefix.glob(".app-*"))
    assert not list((prefix / "app" / "venv" / "lib").glob("python*/site-packages/torch"))
    print(f"bundle: {bundle.folder_bytes / 2**20:.0f} MiB folder, {bundle.archive_bytes / 2**20:.0f} MiB tar.gz, "
          f"built in {built:.0f} s; offline install + one answer in {installed:.0f} s: {answer[:80]!r}")


def test_termux_script_builds_the_runtime_venv_and_installs(tmp_path, embedded_gguf, portable_lib):
    """care/data/bundle/termux-build.sh, run as far as this machine allows: everything but Termux's `pkg` and the
    on-phone llama.cpp compile (CARE_LLAMA_WHEEL hands it this machine's wheel), with no network, on an x86
    bundle. Its venv (the script's own, not the bundle's pip run) goes through install.sh and answers an
    emergency with the notice first. What it cannot show: bionic, Termux's clang, a phone's CPU."""
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    from care.toolchain import llamacpp
    from care.toolchain.bundle import build_bundle, template

    bundle = build_bundle(embedded_gguf, tmp_path / "care-bundle")
    folder = bundle.folder
    (folder / "termux-build.sh").write_text(template("termux-build.sh"))
    wheel = llamacpp.find_wheel()
    assert wheel is not None
    prefix = tmp_path / "phone" / "care-edge"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "phone"), "LANG": "C.UTF-8", "CARE_TERMUX_FORCE": "1",
           "CARE_TERMUX_NO_PKG": "1", "CARE_LLAMA_WHEEL": str(wheel), "PIP_NO_INDEX": "1"}
    py_dir = str(Path(sys.executable).resolve().parent)  # the python3 the script finds (Termux: $PREFIX/bin)
    env["PATH"] = f"{py_dir}:{env['PATH']}"
    script = (f"ip link show | grep -q 'state UP' && exit 9; sh ./termux-build.sh {prefix} && "
              f"{prefix}/start.sh --once 'my husband is sweating and has crushing chest pain going down his arm'")
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = (prefix / "app" / "venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg  # the script's venv, not install.sh's own
    answer = proc.stdout.split("Done. Start the assistant with:", 1)[-1].split("\n", 1)[-1]
    assert answer.lstrip().startswith("[SAFETY chest_pain]"), answer[:400]  # the notice first
    assert "While help comes:" in answer and "CPR" in answer, answer[:800]  # then the vetted card
    assert not list(prefix.glob(".venv-build.*")) and not list(prefix.glob(".app-*"))
