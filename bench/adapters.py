"""Per-domain LoRA adapters at run time: size, switch time, decode cost, memory, and fidelity.

Part 1 (the embedded SmolLM2-135M, ~5 min on 2 busy cores): three r=8 all-linear adapters with random non-zero B
made with peft on the dequantized base, exported with `care export gguf-lora` (the first one verified on the
shipped GGUF itself: base+adapter vs the peft-merged model, beside a merged export of the same quant), then:
  - adapter size vs the full GGUF;
  - switch time: llama_set_adapters_lora + the KV/prefix reset (target <= 50 ms);
  - decode tokens/s with an adapter vs without, alternated round by round (target >= 0.9x);
  - peak RSS of a child process with the base alone vs with the 3 adapters loaded and used
    (target <= base + the adapters' file sizes + 5%).
Part 2 (--phi35 [PATH], when bench/phone_profile.py --phi35 has built its Phi-3.5-mini-shaped Q4_K_M): an r=8
all-linear adapter with random non-zero B written straight to GGUF (Phi-3's fused qkv / gate_up layout, the size
the issue predicts: 12.6 M parameters), its size, and decode with vs without it under the phone profile.

    CARE_THREADS=1 .venv/bin/python bench/adapters.py [--out adapters.json] [--phi35 [PATH]] [--skip-smollm]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from care.models import embedded_gguf
from care.paths import cache_dir

PROMPT = [{"role": "user", "content": "Write three sentences about keeping a clinic's vaccine fridge cold."}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _engine(model: Path, adapters: dict[str, str] | None, profile: str = "laptop", n_ctx: int = 1024):
    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.engine import ChatEngine
    from care.runtime.profiles import resolve

    prof = resolve(profile)
    threads = int(os.environ.get("CARE_THREADS", "0")) or prof["threads"]
    return ChatEngine(model, EngineConfig(
        n_ctx=n_ctx, n_threads=threads, type_k=prof["type_k"], type_v=prof["type_v"], flash_attn=prof["flash_attn"],
        repack=prof["repack"], use_mmap=prof["use_mmap"], adapters=adapters,
        sampling=SamplingConfig(temperature=0.0, seed=0, max_tokens=64, repeat_penalty=1.0)))


def _decode(engine, adapters: tuple, tokens: int) -> float:
    from care.runtime.backend import SamplingConfig

    s = SamplingConfig(temperature=0.0, seed=0, max_tokens=tokens, repeat_penalty=1.0, adapters=adapters,
                       stop=())
    return engine.generate(PROMPT, s).tokens_per_s


def decode_compare(engine, name: str, rounds: int, tokens: int) -> dict:
    """Alternate base / base+adapter rounds (so machine load hits both alike); median tokens/s of each."""
    base, with_adapter = [], []
    for _ in range(rounds):
        base.append(_decode(engine, (), tokens))
        with_adapter.append(_decode(engine, ((name, 1.0),), tokens))
    b, a = statistics.median(base), statistics.median(with_adapter)
    return {"base_tok_s": round(b, 2), "adapter_tok_s": round(a, 2), "ratio": round(a / b, 3), "rounds": rounds,
            "tokens": tokens}


def switch_times(engine, names: list[str], n: int = 30) -> dict:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        engine.adapters.apply(((names[i % len(names)], 1.0),))
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "max_ms": round(max(times), 3), "switches": n}


def rss_child(model: str, adapters_json: str) -> None:
    """Child process: load (with adapters or not), generate once under each, print its RSS in bytes."""
    import psutil

    adapters = json.loads(adapters_json) or None
    before = psutil.Process().memory_info().rss  # the interpreter and imports, before any model
    engine = _engine(Path(model), adapters)
    for name in [None, *(adapters or {})]:
        _decode(engine, ((name, 1.0),) if name else (), 16)
    rss = psutil.Process().memory_info().rss
    print(json.dumps({"rss": rss, "model_rss": rss - before,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def child_rss(model: Path, adapters: dict[str, str] | None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(model), json.dumps(adapters or {})],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ttft_after_switch(engine, names: list[str], rounds: int = 3) -> dict:
    """Time to first token for the same prompt: prefix reused (same adapter) vs re-evaluated (after a switch)."""
    from care.runtime.backend import SamplingConfig

    def ttft(name: str) -> float:
        s = SamplingConfig(temperature=0.0, seed=0, max_tokens=2, repeat_penalty=1.0, adapters=((name, 1.0),))
        return float(engine.generate(PROMPT, s).ttft_s or 0.0) * 1000

    same, switched = [], []
    for _ in range(rounds):
        ttft(names[0])
        same.append(ttft(names[0]))
        switched.append(ttft(names[1]))
    return {"same_adapter_ms": round(statistics.median(same), 1), "after_switch_ms": round(statistics.median(switched), 1)}


def _verify_summary(r: dict) -> dict:
    out = {"quant": r["quant"], "adapter_effect_kl": r["adapter_effect_kl"], "base_alone_kl": r["base_alone_kl"],
           "passed": r["passed"]}
    for label, e in r["files"].items():
        out[label] = {"kl_mean": e["kl_mean"], "top1": e["top1_agreement"], "kl_limit": e["kl_limit"]}
    return out


def smollm(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from care.export.lora import export_gguf_lora
    from care.train.modeling import gguf_to_folder

    gguf = embedded_gguf()
    base_dir = gguf_to_folder(gguf)
    work = cache_dir() / "bench" / "adapters"  # reused by later runs (delete it to export again)
    files: dict[str, str] = {}
    verify = None
    for i, name in enumerate(("medical", "banking", "telecom")):
        done = work / name / "manifest.json"
        if done.is_file():
            manifest = json.loads(done.read_text())
            files[name] = str(done.parent / manifest["adapter"]["file"])
            if (done.parent / "verify.json").is_file():
                verify = _verify_summary(json.loads((done.parent / "verify.json").read_text()))
            continue
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                                      task_type="CAUSAL_LM"))
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.01)
        hf = work / f"{name}-hf"
        peft_model.save_pretrained(str(hf))
        (hf / "care_adapter.json").write_text(json.dumps({"base_model": str(base_dir), "recipe_base": "embedded"}))
        t0 = time.perf_counter()
        res = export_gguf_lora(hf, work / name, name=name, verify=(i == 0), n_threads=1)
        print(f"exported {name}: {res.adapter.stat().st_size / 2**20:.2f} MiB in {time.perf_counter() - t0:.0f} s")
        files[name] = str(res.adapter)
        if res.verify_report is not None:
            verify = _verify_summary(res.verify_report)
    sizes = {k: Path(v).stat().st_size for k, v in files.items()}
    engine = _engine(gguf, files)
    try:
        switch = switch_times(engine, list(files))
        switch.update(ttft_after_switch(engine, list(files)))
        decode = decode_compare(engine, "medical", args.rounds, args.tokens)
    finally:
        engine.close()
    base_rss, three_rss = child_rss(gguf, None), child_rss(gguf, files)
    rss_base, rss_three = base_rss["rss"], three_rss["rss"]
    budget = (rss_base + sum(sizes.values())) * 1.05
    out = {
        "model": gguf.name, "gguf_size": gguf.stat().st_size, "adapter_sizes": sizes,
        "adapter_vs_gguf": round(sizes["medical"] / gguf.stat().st_size, 4),
        "switch": switch, "decode": decode, "verify": verify,
        "rss": {"base": rss_base, "three_adapters": rss_three, "budget": int(budget),
                "peak_base": base_rss["peak_rss"], "peak_three": three_rss["peak_rss"],
                "within": rss_three <= budget, "extra_over_adapter_files": rss_three - rss_base - sum(sizes.values())},
    }
    return out


# --------------------------------------------------------------------------------------------------------
# Phi-3.5-mini-shaped


def write_phi35_adapter(path: Path, r: int = 8, alpha: float = 16.0, layers: int = 32, hidden: int = 3072,
                        ffn: int = 8192, seed: int = 0) -> int:
    """An r=8 all-linear LoRA for Phi-3.5-mini's layout, random A and non-zero B, as an f16 GGUF adapter.
    Returns its parameter count."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = {"attn_qkv": (hidden, 3 * hidden), "attn_output": (hidden, hidden), "ffn_up": (hidden, 2 * ffn),
              "ffn_down": (ffn, hidden)}  # (in, out); Phi-3 fuses q/k/v and gate/up
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    n = 0
    for i in range(layers):
        for name, (n_in, n_out) in shapes.items():
            a = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float16)
            b = (rng.standard_normal((n_out, r)) * 0.01).astype(np.float16)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_b", b)
            n += a.size + b.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n


def phi35(args) -> dict:
    model = Path(args.phi35) if args.phi35 not in (None, "", "auto") else cache_dir() / "bench" / "phi35-shaped.Q4_K_M.gguf"
    if not model.is_file():
        return {"skipped": f"{model} not found: build it with bench/phone_profile.py --phi35"}
    adapter = Path(tempfile.mkdtemp(prefix="care-bench-phi35-")) / "phi35-r8-lora-f16.gguf"
    params = write_phi35_adapter(adapter)
    engine = _engine(model, {"medical": str(adapter)}, profile="phone", n_ctx=4096)
    try:
        switch = switch_times(engine, ["medical"], n=1)
        decode = decode_compare(engine, "medical", max(2, args.rounds - 1), args.phi35_tokens)
    finally:
        engine.close()
    return {"model": model.name, "gguf_size": model.stat().st_size, "adapter_params": params,
            "adapter_size": adapter.stat().st_size, "adapter_vs_gguf": round(adapter.stat().st_size /
                                                                              model.stat().st_size, 4),
            "first_switch_ms": switch["median_ms"], "decode_phone_profile": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--phi35", nargs="?", const="auto", default=None)
    ap.add_argument("--phi35-tokens", type=int, default=24)
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--rss-child", nargs=2, metavar=("MODEL", "ADAPTERS_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    result: dict = {}
    if not args.skip_smollm:
        s = result["smollm"] = smollm(args)
        mib = 2**20
        print(f"\nSmolLM2 ({s['model']}, {s['gguf_size'] / mib:.1f} MiB); adapters r=8 all-linear f16: "
              + ", ".join(f"{k} {v / mib:.2f} MiB" for k, v in s["adapter_sizes"].items())
              + f" ({s['adapter_vs_gguf'] * 100:.1f}% of the GGUF)")
        sw, d, m = s["switch"], s["decode"], s["rss"]
        print(f"switch: median {sw['median_ms']:.2f} ms, max {sw['max_ms']:.2f} ms over {sw['switches']} "
              f"(target <= 50 ms: {'ok' if sw['max_ms'] <= 50 else 'MISSED'}); then the prompt is evaluated "
              f"afresh: first token {sw['after_switch_ms']} ms vs {sw['same_adapter_ms']} ms with the prefix reused")
        print(f"decode: base {d['base_tok_s']} tok/s, with adapter {d['adapter_tok_s']} tok/s -> {d['ratio']}x "
              f"(target >= 0.9x: {'ok' if d['ratio'] >= 0.9 else 'MISSED'})")
        print(f"RSS after loading and generating: base {m['base'] / mib:.1f} MiB, with 3 adapters "
              f"{m['three_adapters'] / mib:.1f} MiB, budget base + files + 5% {m['budget'] / mib:.1f} MiB "
              f"({'ok' if m['within'] else 'MISSED'}); peak {m['peak_base'] / mib:.1f} / {m['peak_three'] / mib:.1f} MiB")
        v = s["verify"]
        if v:
            print(f"verify ({v['quant']} base): base+adapter KL {v['base+adapter']['kl_mean']:.2e} top-1 "
                  f"{v['base+adapter']['top1']:.3f}; merged {v['quant']} KL {v['merged']['kl_mean']:.2e} top-1 "
                  f"{v['merged']['top1']:.3f}; limit {v['base+adapter']['kl_limit']:g}; adapter effect "
                  f"KL(base+adapter||base) {v['adapter_effect_kl']:.2e}; passed {v['passed']}")
    if args.phi35 is not None:
        p = result["phi35"] = phi35(args)
        if "skipped" in p:
            print(f"\nPhi-3.5-shaped: skipped ({p['skipped']})")
        else:
            d = p["decode_phone_profile"]
            print(f"\nPhi-3.5-shaped {p['model']} ({p['gguf_size'] / 1e9:.2f} GB): r=8 all-linear adapter "
                  f"{p['adapter_params'] / 1e6:.2f} M params, {p['adapter_size'] / 1e6:.1f} MB f16 "
                  f"({p['adapter_vs_gguf'] * 100:.2f}% of the GGUF); phone profile decode base {d['base_tok_s']} "
                  f"tok/s, with adapter {d['adapter_tok_s']} tok/s -> {d['ratio']}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
