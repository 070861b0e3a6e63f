"""`care doctor`: what CARE Edge will do on this machine (precision, bitsandbytes, llama.cpp build, RAM/disk per
stage, converter, datasets), each problem with a one-line fix. Loads no model; takes seconds."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip torch, GPUs and bitsandbytes (runtime-only questions; never imports torch)")


def _yes(flag: Any) -> str:
    return "yes" if flag else "NO"


def format_report(r: dict[str, Any]) -> list[str]:
    lines = [f"CARE Edge {r['care']} doctor ({r['elapsed_s']} s)",
             f"Python      {r['python']['version']} on {r['platform']['system']} {r['platform']['machine']}"]
    t = r.get("torch")
    if t is None:
        lines.append("torch       not checked (--no-torch)")
    elif not t["installed"]:
        lines.append("torch       not installed (care[runtime]-only install: no training)")
    else:
        gpu_rt = f"CUDA {t['cuda']}" if t["cuda"] else (f"ROCm/HIP {t['hip']}" if t["hip"] else "CPU-only build")
        lines.append(f"torch       {t['version']} ({gpu_rt}; GPU available: {_yes(t['cuda_available'])})")
        for g in r["gpus"]:
            p = g["precision"]
            lines.append(f"  GPU {g['index']}     {g['name']} (capability {g['capability']}, {g['memory_gb']} GB): "
                         f"{p['compute']}{' + loss scaling' if p['loss_scaling'] else ''}")
        tp = r["training_precision"]
        lines.append(f"precision   training on {tp['device']}: {tp['compute']} compute, {tp['lora_weights']} LoRA "
                     f"weights, loss scaling {'on' if tp['loss_scaling'] else 'off'} ({tp['reason']})")
        b = r["bitsandbytes"]
        state = f"works (NF4 round trip error {b.get('relative_error')})" if b["works"] else f"FAILS: {b.get('error')}"
        lines.append(f"bnb 4-bit   {b['version'] or '-'} on {b['device']}: {state}")
    lc = r["llama_cpp"]
    if lc.get("version") is None:
        lines.append("llama.cpp   llama-cpp-python not installed")
    else:
        lines.append(f"llama.cpp   llama-cpp-python {lc['version']}: {lc.get('build', lc.get('error'))}")
        if "cpu_module" in lc:
            refused = "; ".join(f"{r['variant']} refused: {r['why']}" for r in lc["cpu_module_refused"])
            lines.append(f"  module    {lc['cpu_module']} (checked: {', '.join(lc['cpu_module_checked']) or 'cached'})"
                         + (f"; {refused}" if refused else ""))
        if "used_features" in lc:
            lines.append(f"  CPU       host has {', '.join(lc['host_features']) or '-'}")
            lines.append(f"            build uses {', '.join(lc['used_features']) or '-'}"
                         + (f" (AVX-512 zmm instructions in libggml-cpu.so: {lc['zmm_instructions']})"
                            if lc.get("zmm_instructions") is not None else ""))
    c = r["converter"]
    lines.append(f"converter   {'present' if c['present'] else 'MISSING'} ({c['dir']})")
    d = r["shared_data"]
    where = f" ({d['dir']})" if d["dir"] else ""
    lines.append(f"shared data {'present' if d['present'] else 'absent'}{where}")
    res = r["resources"]
    ram = f"{res['ram_available_gb']} GB RAM available" if res["ram_available_gb"] is not None else "RAM unknown"
    lines.append(f"resources   {ram}, {res['disk_free_gb']} GB free disk at {res['disk_path']}, "
                 f"{res['cpu_count']} CPUs")
    lines.append("  needs (ESTIMATES, GB)      RAM   disk   GPU  fits here")
    for s in res["stages"]:
        gpu = str(s["gpu_gb"]) if "gpu_gb" in s else "-"
        lines.append(f"  {s['model'][:22]:<22} {s['stage']:<6} {s['ram_gb']:>4} {s['disk_gb']:>6} {gpu:>5}  "
                     f"{'yes' if s['fits'] else 'no: ' + '; '.join(s['short'])}")
    lines.append(f"  ({res['needs_source']})")
    if r["problems"]:
        lines.append("problems:")
        for p in r["problems"]:
            lines.append(f"  [{p['severity']}] {p['check']}: {p['message']}")
            lines.append(f"      fix: {p['fix']}")
    else:
        lines.append("problems:   none")
    return lines


def run(args: argparse.Namespace) -> int:
    from care.doctor import run_checks

    report = run_checks(torch=not args.no_torch)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_report(report)))
    return 0
