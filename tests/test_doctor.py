"""`care doctor`: the report on this machine, its JSON, and problems turning into one-line fixes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from care import doctor
from care.cli import main
from care.commands.doctor import format_report
from care.runtime import llama_build


@pytest.fixture(scope="module")
def report():
    """The full report on this machine, once (torch, bitsandbytes and llama.cpp included)."""
    return doctor.run_checks()


def test_report_on_this_machine_has_every_section(report):
    assert isinstance(report["elapsed_s"], float) and report["elapsed_s"] < 120
    assert report["python"]["version"].count(".") == 2
    t = report["torch"]
    assert t["installed"] is True and isinstance(t["version"], str)
    import torch

    assert t["cuda_available"] == torch.cuda.is_available()
    assert isinstance(report["gpus"], list) and len(report["gpus"]) == torch.cuda.device_count()
    tp = report["training_precision"]
    assert tp["compute"] in ("float32", "float16", "bfloat16") and isinstance(tp["loss_scaling"], bool)
    bnb = report["bitsandbytes"]
    assert isinstance(bnb["works"], bool) and bnb["device"] in ("cpu", "cuda")
    # the report agrees with a 4-bit quantize run here, independently of the doctor's own probe
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(64, 64, device=bnb["device"]), quant_type="nf4")
        runs = True
    except Exception:  # noqa: BLE001 - any failure means "does not work here"
        runs = False
    assert bnb["works"] is runs and (runs or bnb["error"])
    lc = report["llama_cpp"]
    assert isinstance(lc["version"], str) and isinstance(lc["build"], str)
    assert set(lc["used_features"]) <= set(llama_build.CPU_FLAGS)
    assert isinstance(report["converter"]["present"], bool)
    assert isinstance(report["shared_data"]["present"], bool)
    res = report["resources"]
    assert res["ram_available_gb"] > 0 and res["disk_free_gb"] > 0
    assert res["needs_are"] == "estimates" and "docs/bundle-and-phones.md" in res["needs_source"]
    assert {(s["model"], s["stage"]) for s in res["stages"]} == {
        (m, st) for m, needs in doctor.STAGE_NEEDS.items() for st in needs}
    for p in report["problems"]:
        assert p["fix"] and "\n" not in p["fix"] and p["severity"] in ("error", "warning", "info")


def test_text_output_names_every_section_and_fix(report):
    text = "\n".join(format_report(report))
    for word in ("torch", "precision", "bnb 4-bit", "llama.cpp", "converter", "shared data", "ESTIMATES"):
        assert word in text
    assert text.count("fix: ") == len(report["problems"])


def test_cli_json_parses_without_torch(capsys):
    assert main(["doctor", "--json", "--no-torch"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "torch" not in data and data["llama_cpp"]["version"]


def test_missing_converter_yields_a_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CARE_CONVERTER_DIR", str(tmp_path / "no-converter"))
    assert main(["doctor", "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert "converter   MISSING" in out
    line = out.splitlines()[out.splitlines().index(next(x for x in out.splitlines() if "converter:" in x)) + 1]
    assert line.strip().startswith("fix:") and "care export setup" in line


def test_low_memory_flags_the_stages_that_do_not_fit(monkeypatch):
    monkeypatch.setattr(doctor, "_available_ram", lambda: 4.0)
    report = doctor.run_checks(torch=False)
    short = {(s["model"], s["stage"]) for s in report["resources"]["stages"] if not s["fits"]}
    assert ("Phi-3.5-mini (3.8B)", "merge") in short and ("Phi-3.5-mini (3.8B)", "chat") not in short
    assert ("embedded SmolLM2-135M", "train") not in short
    msgs = [p for p in report["problems"] if p["check"] == "resources"]
    assert any("merge" in p["message"] and "RAM 4.0" in p["message"] and ">= 18.0 GB RAM" in p["fix"] for p in msgs)


def test_runtime_only_mode_never_imports_torch():
    code = ("import sys; from care.doctor import run_checks; r = run_checks(torch=False); "
            "print('torch' in sys.modules, 'bitsandbytes' in sys.modules, r['llama_cpp']['build'] != '')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


@pytest.mark.parametrize(("host", "used", "variants", "zmm", "kind", "missing"), [
    ({"AVX", "AVX2"}, {"AVX", "AVX2", "AVX512"}, [], None, "native for another CPU", ["AVX512"]),
    ({"AVX", "AVX2"}, {"AVX", "AVX2"}, [], 0, "native", []),
    ({"AVX", "AVX2", "AVX512"}, {"AVX"}, [], 0, "portable (baseline", []),
    ({"AVX", "AVX2"}, {"AVX", "AVX2"}, [], 120, "native for another CPU", ["AVX512"]),  # zmm code, no AVX-512
    ({"AVX"}, {"AVX", "AVX2", "AVX512"}, ["libggml-cpu-haswell.so", "libggml-cpu-x64.so"], None, "portable (runtime",
     []),
])
def test_llama_cpp_build_classification(host, used, variants, zmm, kind, missing):
    build, miss, _ = llama_build.classify_build(host, used, variants, zmm)
    assert build.startswith(kind) and miss == missing


@pytest.mark.parametrize(("arch_list", "cap", "ok"), [
    (["sm_75", "sm_80", "sm_86", "sm_90", "compute_90"], (6, 0), False),  # a cu128-style wheel on a P100
    (["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], (6, 0), True),
    (["sm_70"], (7, 5), True),  # a cubin runs on a later minor of the same major
    (["sm_80", "compute_80"], (9, 0), True),  # PTX JIT
    (["sm_80"], (9, 0), False),
])
def test_torch_kernels_for_capability(arch_list, cap, ok):
    assert doctor.torch_has_kernels(arch_list, cap) is ok


def test_simulated_p100_gets_fp16_and_fixes(monkeypatch):
    """The GPU branch on a simulated Tesla P100 (6.0, 16 GB) with a torch build lacking sm_60 kernels and a
    bitsandbytes check that fails there: fp16 + loss scaling, and a fix line for each problem."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    import torch

    p100 = SimpleNamespace(name="Tesla P100-PCIE-16GB", major=6, minor=0, total_memory=16 * 10**9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: p100)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    fail = {"version": "0.50.2", "device": "cuda", "works": False, "error": "RuntimeError: no kernel image"}

    def failing_check(device=None):  # what the child reports on such a GPU
        done: Future = Future()
        done.set_result(fail)
        return done

    monkeypatch.setattr(doctor, "_start_bnb_check", failing_check)
    report = {"problems": []}
    doctor._torch_section(report, None)
    (gpu,) = report["gpus"]
    assert gpu["capability"] == "6.0" and gpu["precision"]["compute"] == "float16"
    assert gpu["precision"]["loss_scaling"] and report["training_precision"]["fp16"]
    by_check = {(p["check"], p["severity"]): p for p in report["problems"]}
    assert "cu126" in by_check[("gpu", "error")]["fix"]
    assert "CUDA_VISIBLE_DEVICES=" in by_check[("gpu", "info")]["fix"]
    assert "--no-quant" in by_check[("bitsandbytes", "error")]["fix"]
    assert not any("targets <= 14 GB" in p["message"] for p in report["problems"])  # 16 GB is enough to train
