"""Export bench: convert + quantize time and peak RSS relative to model size, and the verification table.

    .venv/bin/python bench/export.py                     # SmolLM2-135M (from the embedded GGUF), all GGUF types
    .venv/bin/python bench/export.py --onnx              # + ONNX int4 (default RTN vs k_quant_mixed) and int8
    .venv/bin/python bench/export.py --phi35 [--layers N] # Phi-3.5-mini-shaped random model (not in CI:
                                                          # 3.8B params, ~7.6 GB f16; --layers trims depth)

Peak RSS is sampled (psutil, every 50 ms) over this process and all its children (the converter and the
quantizer run as subprocesses), per stage. Goal: peak RSS <= 1.2x the f16 GGUF size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class PeakRSS:
    """Peak of (this process + descendants) RSS while the block runs."""

    def __enter__(self):
        import psutil

        self.peak = 0
        self.children_peak = 0  # the converter / quantizer subprocesses alone
        self._stop = threading.Event()
        me = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                total = children = 0
                try:
                    for p in me.children(recursive=True):
                        try:
                            children += p.memory_info().rss
                        except psutil.Error:
                            pass
                    total = children + me.memory_info().rss
                except psutil.Error:
                    pass
                self.peak = max(self.peak, total)
                self.children_peak = max(self.children_peak, children)
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        return False


def smollm_hf(work: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (fp32), dequantized from the embedded GGUF; cached."""
    import torch
    from tiny_models import CACHE, _key
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from care.models import embedded_gguf

    gguf = embedded_gguf()
    out = CACHE / f"smollm2-hf-{_key(gguf)}"
    if (out / "model.safetensors").is_file():
        return out
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def phi35_shaped(work: Path, layers: int) -> Path:
    """Phi-3.5-mini's real dimensions (3072 hidden, 8192 MLP, 32 heads, 32064 vocab, LongRoPE 128k) with
    random bf16 weights, written shard by shard so building it never holds the whole model in memory."""
    import torch
    from safetensors.torch import save_file
    from test_export_gguf import build_sentencepiece_phi3
    from transformers import Phi3Config

    out = work / f"phi35-mini-shaped-{layers}L"
    if (out / "model.safetensors.index.json").is_file():
        return out
    shutil.rmtree(work / "sp", ignore_errors=True)
    _, tok_src = build_sentencepiece_phi3(work / "sp")
    long_f = [1.0 + 0.05 * i for i in range(48)]
    short_f = [1.0 + 0.001 * i for i in range(48)]
    cfg = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                     original_max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
                     pad_token_id=32000, tie_word_embeddings=False, dtype="bfloat16",
                     rope_parameters={"rope_type": "longrope", "long_factor": long_f, "short_factor": short_f,
                                      "rope_theta": 10000.0})
    out.mkdir(parents=True, exist_ok=True)
    cfg.architectures = ["Phi3ForCausalLM"]  # a bare config does not record it; the converter needs it
    cfg.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "care_merge.json"):
        if (tok_src / name).is_file():
            shutil.copy(tok_src / name, out / name)
    (out / "care_merge.json").write_text(json.dumps({"base_model": str(tok_src.parent / "phi3-base"),
                                                     "adapter": "bench", "recipe_hash": "bench"}))
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    h, m, v = 3072, 8192, 32064
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(v, h),
                                              "lm_head.weight": rand(v, h),
                                              "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.qkv_proj.weight": rand(3 * h, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "mlp.gate_up_proj.weight": rand(2 * m, h), p + "mlp.down_proj.weight": rand(h, m),
                       p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(shard, fname))
        shard.clear()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


def bench_gguf(model_dir: Path, work: Path, quants: list[str], verify: bool, threads: int,
               verify_kwargs: dict) -> dict:
    from care.export.converter import convert_to_gguf
    from care.export.hf_source import inspect_model_dir
    from care.export.quantize import quantize_many
    from care.export.verify import format_table, verify_many

    src = inspect_model_dir(model_dir)
    out = work / f"{model_dir.name}-gguf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    f16 = out / "model-f16.gguf"
    with PeakRSS() as conv:
        convert_to_gguf(src, f16, outtype="f16")
    f16_size = f16.stat().st_size
    rows = [{"stage": "convert f16", "seconds": conv.seconds, "peak_rss": conv.peak, "worker_rss": conv.children_peak,
             "size": f16_size}]
    files = {"f16": f16}
    for q in quants:
        target = out / f"model-{q}.gguf"
        with PeakRSS() as qs:
            res = quantize_many(f16, {q: target}, n_threads=threads)[q]
        files[q] = target
        rows.append({"stage": f"quantize {q}", "seconds": qs.seconds, "peak_rss": qs.peak,
                     "worker_rss": qs.children_peak,
                     "size": target.stat().st_size, "fallback": f"{res.fallback_tensors}/{res.total_tensors}"})
    print(f"\n{model_dir.name}: weights on disk {src.weight_bytes / 2**20:.0f} MiB, f16 GGUF {f16_size / 2**20:.0f} MiB")
    print("peak RSS: 'all' = this process (torch/transformers loaded for the checks) + workers; 'worker' = the "
          "converter / quantizer subprocess alone")
    print(f"{'stage':<16}{'seconds':>9}{'all MiB':>9}{'all/f16':>8}{'worker MiB':>11}{'worker/f16':>11}"
          f"{'file MiB':>10}  fallback")
    for r in rows:
        print(f"{r['stage']:<16}{r['seconds']:>9.1f}{r['peak_rss'] / 2**20:>9.0f}{r['peak_rss'] / f16_size:>8.2f}"
              f"{r['worker_rss'] / 2**20:>11.0f}{r['worker_rss'] / f16_size:>11.2f}{r['size'] / 2**20:>10.1f}"
              f"  {r.get('fallback', '')}")
    result = {"model": str(model_dir), "f16_bytes": f16_size, "stages": rows}
    if verify:
        with PeakRSS() as vs:
            report = verify_many(files, model_dir, n_threads=threads, fail=False, **verify_kwargs)
        print(f"\nverification ({report['eval_tokens']} held-out tokens, {vs.seconds:.0f} s, "
              f"peak RSS {vs.peak / 2**20:.0f} MiB)")
        table = format_table(report)
        widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
        for r in table:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        for q, e in report["files"].items():
            print(f"  {q}: KL p99 {e['kl_p99']:.3g}, reply {e['reply'][:70]!r}")
            for f in e["failures"] + e["warnings"]:
                print(f"    - {f}")
        result["verify"] = report
    return result


def bench_onnx(model_dir: Path, work: Path, threads: int) -> list[dict]:
    from care.errors import VerificationError
    from care.export.onnx import export_onnx

    rows = []
    for precision, algo in (("int4", "default"), ("int4", "k_quant_mixed"), ("int8", None)):
        out = work / f"onnx-{precision}-{algo or 'default'}"
        shutil.rmtree(out, ignore_errors=True)
        with PeakRSS() as ps:
            try:
                r = export_onnx(model_dir, out, precision=precision, int4_algo=algo, n_threads=threads)
            except VerificationError as exc:  # the default RTN int4 is expected to miss the limit
                r = exc.result  # type: ignore[attr-defined]
        v = r.verify_report
        rows.append({"precision": precision, "algo": algo, "seconds": ps.seconds, "peak_rss": ps.peak,
                     "size": r.size_bytes, "kl": v["kl_mean"], "top1": v["top1_agreement"], "ppl": v["ppl"],
                     "ppl_hf": v["ppl_hf"], "passed": v["passed"], "reply": v.get("reply")})
    print(f"\nONNX (onnxruntime-genai builder) on {model_dir.name}")
    print(f"{'precision':<10}{'algo':<15}{'seconds':>8}{'MiB':>8}{'KL':>9}{'top1':>7}{'ppl':>8}  reply")
    for r in rows:
        print(f"{r['precision']:<10}{str(r['algo']):<15}{r['seconds']:>8.0f}{r['size'] / 2**20:>8.1f}"
              f"{r['kl']:>9.3f}{r['top1']:>7.3f}{r['ppl']:>8.2f}  {str(r['reply'])[:50]!r}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phi35", action="store_true", help="also the Phi-3.5-mini-shaped random model (big)")
    ap.add_argument("--layers", type=int, default=32, help="Phi-3.5-shaped depth (32 = the real model)")
    ap.add_argument("--onnx", action="store_true", help="also ONNX int4 (RTN, k_quant_mixed) and int8 on SmolLM2")
    ap.add_argument("--no-smollm", action="store_true")
    ap.add_argument("--no-verify", action="store_true", help="time and memory only")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("CARE_THREADS", "2")))
    ap.add_argument("--work", default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="care-bench-export-"))
    results: dict = {}
    try:
        if not args.no_smollm:
            model = smollm_hf(work)
            results["smollm2"] = bench_gguf(model, work, ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"],
                                            not args.no_verify,
                                            args.threads, {})
            if args.onnx:
                results["onnx"] = bench_onnx(model, work, args.threads)
        if args.phi35:
            model = phi35_shaped(work, args.layers)
            # Random weights: the verification checks plumbing (tokenizer, template, LongRoPE factors, stop
            # token, f16 exactness) more than quantization quality. A bf16 reference keeps memory in bounds.
            hf_dtype = "float32" if args.layers <= 8 else "bfloat16"  # 32 layers in fp32 would need 15 GB
            results["phi35"] = bench_gguf(model, work, ["q4_k_m"], not args.no_verify, args.threads,
                                          {"max_tokens": 64, "n_ctx": 512, "hf_dtype": hf_dtype})
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
