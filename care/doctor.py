"""`care doctor`'s checks: what CARE Edge will do on this machine, as a structured report.

Loads no model and imports torch only inside `_torch_section` (skipped with torch=False, so a care[runtime]
install, which has no torch, still gets a report). Every problem carries a one-line fix.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from care.errors import WorkerError
from care.proc import run_worker, worker_main
from care.runtime.llama_build import CPU_FLAGS, classify_build, host_cpu_flags, system_info_features, zmm_in

log = logging.getLogger(__name__)

GB = 1e9
# What each stage needs, in GB. ESTIMATES from parameter counts x bytes per weight (SmolLM2-135M: 0.135B,
# Phi-3.5-mini: 3.82B), except where marked measured (docs/bundle-and-phones.md, bench/phone_profile.py: the Phi-3.5-shaped
# Q4_K_M is 2.40 GB and chats at 3.15 GB peak RSS with the phone profile). Why each figure:
#   train  - Phi-3.5: the 7.6 GB bf16 base on disk, NF4 on the GPU (gpu_check.sh measures the 14 GB target);
#            RAM for loading shard by shard. SmolLM2: the dequantized fp32 base (0.54 GB) cached, CPU training.
#   merge  - care/train/merge.py reloads the base in fp32 (3.82B x 4 B = 15.3 GB) next to the NF4 copy, and
#            saves the merged model in fp32 (15.3 GB on disk). On a GPU that fp32 copy lives on the GPU.
#   export - the f16 GGUF (7.6 GB) + q4_k_m (2.40 GB, measured); peak RSS: verification's fp32 HF reference
#            (care/export/verify.py hf_dtype=float32, 15.3 GB) beside the GGUF.
#   chat   - the q4_k_m file and the phone profile's peak RSS (measured).
STAGE_NEEDS: dict[str, dict[str, dict[str, float]]] = {
    "embedded SmolLM2-135M": {
        "train": {"ram_gb": 3.0, "disk_gb": 1.0},
        "merge": {"ram_gb": 2.0, "disk_gb": 0.6},
        "export": {"ram_gb": 2.0, "disk_gb": 0.4},
        "chat": {"ram_gb": 0.4, "disk_gb": 0.1},
    },
    "Phi-3.5-mini (3.8B)": {
        "train": {"ram_gb": 8.0, "disk_gb": 8.2, "gpu_gb": 14.0},
        "merge": {"ram_gb": 18.0, "disk_gb": 15.3},
        "export": {"ram_gb": 17.0, "disk_gb": 10.0},
        "chat": {"ram_gb": 3.15, "disk_gb": 2.40},
    },
}
# care merge on a GPU: the fp32 base (15.3 GB) and the NF4 copy (~2.2 GB) both on the GPU (estimate).
PHI35_MERGE_GPU_GB = 17.5
NEEDS_SOURCE = ("estimates from parameter counts x bytes per weight (SmolLM2 0.135B, Phi-3.5-mini 3.82B; merge "
                "and export verification hold an fp32 copy); Phi-3.5 chat figures measured (docs/bundle-and-phones.md: Q4_K_M 2.40 GB, "
                "phone profile 3.15 GB peak RSS); Phi-3.5 train GPU figure is the 14 GB target, not a measurement")
def _problem(report: dict[str, Any], check: str, message: str, fix: str, severity: str = "warning") -> None:
    report["problems"].append({"check": check, "severity": severity, "message": message, "fix": fix})


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# -- torch, GPUs, precision, bitsandbytes ------------------------------------------------------------------

def _torch_section(report: dict[str, Any], bnb_proc: Future[dict[str, Any]] | None) -> None:
    if importlib.util.find_spec("torch") is None:
        report["torch"] = {"installed": False}
        report["gpus"] = []
        _problem(report, "torch", "torch is not installed: chat, serve and bench work, training does not",
                 "pip install 'care[train]' (or `make setup`) to fine-tune on this machine", "info")
        return
    import torch

    from care.train.precision import detect_devices, resolve_precision

    report["torch"] = {"installed": True, "version": torch.__version__, "cuda": torch.version.cuda,
                       "hip": getattr(torch.version, "hip", None), "cuda_available": torch.cuda.is_available()}
    devices = detect_devices()
    arch_list = torch.cuda.get_arch_list() if torch.cuda.is_available() else []
    report["torch"]["arch_list"] = arch_list
    gpus = []
    for i, dev in enumerate(d for d in devices if d.kind != "cpu"):
        prec = resolve_precision(dev, "auto")
        props = torch.cuda.get_device_properties(i)
        entry = {"index": i, "name": dev.name, "kind": dev.kind,
                 "capability": f"{dev.capability[0]}.{dev.capability[1]}" if dev.capability else None,
                 "arch": dev.arch, "memory_gb": round(props.total_memory / GB, 2), "precision": prec.to_dict()}
        gpus.append(entry)
        if dev.kind == "cuda" and dev.capability and arch_list and not torch_has_kernels(arch_list, dev.capability):
            _problem(report, "gpu", f"GPU {i} ({dev.name}, sm_{dev.capability[0]}{dev.capability[1]}) is not among "
                     f"this torch build's kernels ({', '.join(arch_list)})", "install a torch wheel built for this "
                     "GPU (the cu126 wheels still include sm_60/sm_70: pip install torch --index-url "
                     "https://download.pytorch.org/whl/cu126)", "error")
        if entry["memory_gb"] < STAGE_NEEDS["Phi-3.5-mini (3.8B)"]["train"]["gpu_gb"]:
            _problem(report, "gpu", f"GPU {i} has {entry['memory_gb']} GB; Phi-3.5-mini QLoRA at batch 4 x 1024 "
                     "targets <= 14 GB", "lower training.batch or max_length, or set "
                     "training.gradient_checkpointing: true")
        if entry["memory_gb"] < PHI35_MERGE_GPU_GB:
            _problem(report, "gpu", f"GPU {i} has {entry['memory_gb']} GB: merging Phi-3.5-mini there needs about "
                     f"{PHI35_MERGE_GPU_GB} GB (care merge reloads the base in fp32 on the GPU beside the NF4 copy; "
                     "estimate)", "merge on the CPU instead: CUDA_VISIBLE_DEVICES= care merge ... (needs ~18 GB RAM)",
                     "info")
    report["gpus"] = gpus
    train_dev = devices[0]
    report["training_precision"] = {"device": train_dev.label()} | resolve_precision(train_dev, "auto").to_dict()
    bnb_device = "cuda" if torch.cuda.is_available() else "cpu"
    report["bitsandbytes"] = _finish_bnb_check(bnb_proc or _start_bnb_check(bnb_device), bnb_device)
    if not report["bitsandbytes"].get("works"):
        _problem(report, "bitsandbytes", f"bitsandbytes 4-bit does not work here: {report['bitsandbytes']['error']}",
                 "use --no-quant (plain LoRA), or pip install -U 'bitsandbytes>=0.48'",
                 "error" if torch.cuda.is_available() else "warning")


def torch_has_kernels(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Whether a torch build with `arch_list` (torch.cuda.get_arch_list()) runs on `capability`: a cubin for
    the same major and a lower-or-equal minor, or PTX (compute_XY) at or below it, which the driver JITs."""
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        digits = re.sub(r"[^0-9]", "", num)
        if len(digits) < 2:
            continue
        cap = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and cap[0] == capability[0] and cap[1] <= capability[1]:
            return True
        if kind == "compute" and cap <= tuple(capability):
            return True
    return False


def bnb_roundtrip(device: str | None = None) -> dict[str, Any]:
    """Quantize a tiny tensor to NF4 and back on `device` (default: the GPU if any, else the CPU); catch
    everything (bnb fails in many ways on odd setups). Runs in the child process `_start_bnb_check` starts."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"version": _version("bitsandbytes"), "device": device, "works": False}
    if out["version"] is None:
        out["error"] = "not installed"
        return out
    t0 = time.perf_counter()
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional-kernel notices are noise here
        import bitsandbytes.functional as F  # noqa: N812 - bnb's own idiom

        x = torch.randn(64, 64, device=device, dtype=torch.float32 if device == "cpu" else torch.float16)
        q, state = F.quantize_4bit(x, quant_type="nf4")
        back = F.dequantize_4bit(q, state).float()
        err = (back - x.float()).abs().mean().item() / x.float().abs().mean().item()
        out["relative_error"] = round(err, 4)
        # NF4 round trip of a Gaussian is ~10% mean relative error; far more means broken kernels.
        out["works"] = err < 0.25
        if not out["works"]:
            out["error"] = f"NF4 round trip error {err:.2f} (expected ~0.1)"
    except Exception as exc:  # noqa: BLE001 - report whatever bnb raises, never crash the doctor
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _start_bnb_check(device: str | None = None) -> Future[dict[str, Any]]:
    """bitsandbytes in a child process (a care.proc worker: this module), from a thread: importing it takes
    seconds (run alongside the other checks), and a broken CUDA setup can kill the process that tries it."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="care-bnb-check")
    try:
        return pool.submit(_bnb_child, device)
    finally:
        pool.shutdown(wait=False)  # the check runs on; the thread ends with it


def _bnb_child(device: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="care-doctor-") as work:
        try:
            return run_worker("care.doctor", {"device": device}, workdir=Path(work), timeout=120,
                              what="the 4-bit check")["report"]
        except WorkerError as exc:
            why = ("the 4-bit round trip did not finish in 120 s" if exc.timed_out
                   else f"the check process died: {(exc.detail or exc.message)[:300]}")
            return {"version": _version("bitsandbytes"), "device": device, "works": False, "error": why}


def _finish_bnb_check(check: Future[dict[str, Any]], device: str) -> dict[str, Any]:
    """The child's report, or why there is none."""
    report = check.result()
    return {**report, "device": report.get("device") or device}


# -- llama.cpp build -----------------------------------------------------------------------------------------

def llama_cpp_section(report: dict[str, Any]) -> None:
    out: dict[str, Any] = {"version": _version("llama-cpp-python")}
    report["llama_cpp"] = out
    if out["version"] is None:
        _problem(report, "llama.cpp", "llama-cpp-python is not installed: no chat, serve or GGUF export",
                 "pip install 'care[runtime]'", "error")
        return
    spec = importlib.util.find_spec("llama_cpp")
    lib_dir = Path(spec.origin).parent / "lib" if spec and spec.origin else None
    libs = sorted(p.name for p in lib_dir.glob("*.so*")) if lib_dir and lib_dir.is_dir() else []
    out["lib_dir"] = str(lib_dir) if lib_dir else None
    variants = [n for n in libs if re.match(r"libggml-cpu-.+\.so", n)]
    host = host_cpu_flags()
    # Both probes take a second or so; a process asking twice (tests) reuses them while the library is unchanged.
    stamp = tuple((n, (lib_dir / n).stat().st_mtime_ns) for n in libs) if lib_dir else ()
    out["host_features"] = sorted(k for k, flag in CPU_FLAGS.items() if flag in host)
    if not cpu_module_section(report, out):
        return
    try:
        used = system_info_features(stamp)
    except RuntimeError as exc:
        out["error"] = str(exc)
        _problem(report, "llama.cpp", f"the llama.cpp library does not load: {exc}",
                 "reinstall a portable build: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall "
                 "--no-cache-dir llama-cpp-python", "error")
        return
    out["used_features"] = sorted(k for k in CPU_FLAGS if used.get(k))
    cpu_lib = lib_dir / "libggml-cpu.so" if lib_dir else None
    if cpu_lib is not None and cpu_lib.is_file() and not variants:
        out["zmm_instructions"] = zmm_in(cpu_lib, stamp)
    build, missing, unused = classify_build(set(out["host_features"]), set(out["used_features"]), variants,
                                            out.get("zmm_instructions"))
    out["build"], out["unused_host_features"] = build, unused
    if not host and platform.machine().lower() not in ("x86_64", "amd64"):
        # The feature table is x86's; on Arm (NEON, SVE...) only the runtime-dispatch check above applies.
        out["build"] = build if variants else f"not classified on {platform.machine()} (x86-64 only)"
        return
    if missing:
        _problem(report, "llama.cpp", f"llama.cpp was built for {', '.join(missing)}, which this CPU lacks: "
                 "it will crash with an illegal instruction", "rebuild here: CMAKE_ARGS='-DGGML_NATIVE=ON' pip install "
                 "--force-reinstall --no-cache-dir llama-cpp-python", "error")
    elif unused and not variants and ("AVX2" in unused or "AVX512" in unused):
        _problem(report, "llama.cpp", f"llama.cpp leaves {', '.join(unused)} of this CPU unused (slower chat)",
                 "for speed on this machine only: CMAKE_ARGS='-DGGML_NATIVE=ON' pip install --force-reinstall "
                 "--no-cache-dir llama-cpp-python", "info")


def cpu_module_section(report: dict[str, Any], out: dict[str, Any]) -> bool:
    """The CPU module the guard proved to run here (care/runtime/cpu_guard.py), and any it refused; False when
    none runs (then nothing else of llama.cpp can be checked)."""
    from care.runtime import cpu_guard

    try:
        choice = cpu_guard.choose()
    except cpu_guard.CpuUnsupportedError as exc:
        out["error"] = exc.message
        _problem(report, "llama.cpp", exc.message, exc.hint or "", "error")
        return False
    out["cpu_module"] = choice.name
    out["cpu_module_refused"] = choice.refused
    out["cpu_module_checked"] = sorted(choice.gaps)
    for refused in choice.refused:
        _problem(report, "llama.cpp", f"CPU module {refused['variant']} refused on this CPU: {refused['why']}; "
                 f"using {choice.name}", "nothing to do (chat works); run `python -m care.runtime.cpu_guard --recheck` "
                 "after updating llama-cpp-python", "info")
    return True


# -- converter, data, resources ------------------------------------------------------------------------------

def converter_section(report: dict[str, Any]) -> None:
    from care.toolchain.llamacpp.converter_setup import converter_dir, find_converter

    version = report.get("llama_cpp", {}).get("version")
    if version is None:
        report["converter"] = {"present": False, "dir": None}
        return
    found = find_converter(version)
    report["converter"] = {"present": found is not None, "dir": str(found or converter_dir(version))}
    if found is None:
        _problem(report, "converter", f"llama.cpp's GGUF converter is not set up ({converter_dir(version)})",
                 "run `care export setup` once (offline: CARE_LLAMA_CPP_SDIST=/path/to/sdist care export setup)")


def shared_data_section(report: dict[str, Any]) -> None:
    from care.paths import shared_data_dir

    found = shared_data_dir()
    report["shared_data"] = {"present": found is not None, "dir": str(found) if found else None}
    if found is None:
        _problem(report, "shared data", "../shared/data (the public datasets) is not beside this checkout",
                 "set CARE_SHARED_DATA=/path/to/shared/data; tests that need it skip, recipes need their data",
                 "info")


def _available_ram() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
        kb = int(re.search(r"^MemAvailable:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        return kb * 1024 / GB
    except (OSError, AttributeError, ValueError):
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / GB
    except ImportError:
        return None


def _free_disk(path: Path) -> float:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / GB


def resources_section(report: dict[str, Any]) -> None:
    from care.paths import cache_dir

    ram = _available_ram()
    disk_at = cache_dir()
    disk = _free_disk(disk_at)
    gpu_gb = max((g["memory_gb"] for g in report.get("gpus") or []), default=None)
    stages: list[dict[str, Any]] = []
    for model, needs in STAGE_NEEDS.items():
        for stage, need in needs.items():
            row: dict[str, Any] = {"model": model, "stage": stage, **need}
            short = []
            if ram is not None and need["ram_gb"] > ram:
                short.append(f"RAM {ram:.1f} < {need['ram_gb']} GB")
            if need["disk_gb"] > disk:
                short.append(f"disk {disk:.1f} < {need['disk_gb']} GB")
            if "gpu_gb" in need and gpu_gb is None:
                short.append("no GPU")
            row["fits"] = not short
            row["short"] = short
            stages.append(row)
            if short and not (model.startswith("Phi") and stage == "train" and short == ["no GPU"]):
                fixes = []
                if ram is not None and need["ram_gb"] > ram:
                    fixes.append(f"close other programs or run {stage} on a machine with >= {need['ram_gb']} GB RAM")
                if need["disk_gb"] > disk:
                    fixes.append(f"free {need['disk_gb'] - disk:.1f} GB or point CARE_HOME at a disk with room")
                if "gpu_gb" in need and gpu_gb is None:
                    fixes.append(f"train on a GPU with >= {need['gpu_gb']} GB")
                _problem(report, "resources", f"{model} {stage}: {'; '.join(short)} (estimate)", "; ".join(fixes),
                         "info")
    report["resources"] = {"ram_available_gb": round(ram, 2) if ram is not None else None,
                           "disk_free_gb": round(disk, 2), "disk_path": str(disk_at), "cpu_count": os.cpu_count(),
                           "stages": stages, "needs_are": "estimates", "needs_source": NEEDS_SOURCE}


def run_checks(torch: bool = True) -> dict[str, Any]:
    """The whole report. torch=False skips torch, GPUs, precision and bitsandbytes (runtime-only question)."""
    from care import __version__

    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "care": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": {"system": platform.system(), "machine": platform.machine(), "release": platform.release()},
        "problems": [],
    }
    # The slow checks (importing bitsandbytes, loading llama.cpp) run in child processes alongside the rest.
    has_torch = torch and importlib.util.find_spec("torch") is not None
    bnb_proc = _start_bnb_check() if has_torch and _version("bitsandbytes") else None
    llama_cpp_section(report)
    if torch:
        _torch_section(report, bnb_proc)
    converter_section(report)
    shared_data_section(report)
    resources_section(report)
    report["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return report


if __name__ == "__main__":  # the bitsandbytes check's child (_start_bnb_check)
    raise SystemExit(worker_main(lambda job: {"report": bnb_roundtrip(job.get("device"))}))
