"""The phone-class trade-off table: KV-cache type x n_ctx x weight repacking -> peak RSS, decode, prefill,
and the KV quantization's effect on next-token agreement.

Part 1 (default, ~5 min on 2 cores): the embedded SmolLM2-135M, requantized to Q4_0 (a type llama.cpp
repacks; K-quants do not fit its 576-wide rows), every combination in its own child process.
Part 2 (--phi35, ~15-25 min, ~10 GB disk): a Phi-3.5-mini-shaped model (real dimensions: 32 layers,
hidden 3072, 32 heads without GQA, FFN 8192; random weights; SmolLM2's 49,152-token vocabulary instead
of Phi's 32,064) written straight to an F16 GGUF with gguf-py, quantized to Q4_K_M by llama.cpp, then
measured at 2 threads against the raw llama-cpp-python default (f16 KV, repack on, no flash attention).
KNOWN BROKEN: the build and quantization work (7.85 GB F16 -> 2.47 GB Q4_K_M in ~10 min here), but
llama.cpp then refuses the borrowed vocabulary under the phi3 architecture ("error loading model
vocabulary: unordered_map::at", also with a `<|end|>` token added); it needs a Phi-3 (SPM) vocabulary.

    .venv/bin/python bench/phone_profile.py [--out phone_profile.json] [--phi35 --work /tmp/phi35]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from care.models import embedded_gguf
from care.paths import cache_dir
from care.runtime.bench import BenchConfig, run_isolated


def quantize(src: Path, dst: Path, ftype: str = "Q4_K_M", threads: int = 2) -> Path:
    """llama.cpp's own quantizer through llama-cpp-python's bindings."""
    import llama_cpp

    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = threads
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".part")
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"quantize failed ({rc}) for {src}")
    tmp.rename(dst)
    print(f"quantized {src.name} -> {dst.name} ({dst.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s")
    return dst


def write_phi35_shaped_f16(out: Path, seed: int = 0) -> Path:
    """A GGUF with Phi-3.5-mini's layer shapes and random weights, one tensor in memory at a time."""
    import gguf
    import numpy as np

    if out.is_file():
        return out
    src = gguf.GGUFReader(str(embedded_gguf()))  # borrow a working tokenizer (SmolLM2's)
    tok = {name: src.fields[name] for name in src.fields if name.startswith("tokenizer.ggml.")}
    tokens = [bytes(tok["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
              for i in tok["tokenizer.ggml.tokens"].data]
    vocab, hidden, ffn, layers, heads = len(tokens), 3072, 8192, 32, 32
    w = gguf.GGUFWriter(str(out.with_suffix(".part")), "phi3")
    w.add_name("phi35-mini-shaped-random")
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(bytes(tok["tokenizer.ggml.pre"].parts[-1]).decode())
    w.add_token_list(tokens)
    w.add_token_types([int(tok["tokenizer.ggml.token_type"].parts[i][0]) for i in tok["tokenizer.ggml.token_type"].data])
    w.add_token_merges([bytes(tok["tokenizer.ggml.merges"].parts[i]).decode("utf-8")
                        for i in tok["tokenizer.ggml.merges"].data])
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        fn(int(tok[f"tokenizer.ggml.{key}"].parts[-1][0]))
    w.add_chat_template(bytes(src.fields["tokenizer.chat_template"].parts[-1]).decode("utf-8"))
    shapes: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (vocab, hidden), "f16")]
    for i in range(layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (hidden,), "f32"),
                   (f"blk.{i}.attn_qkv.weight", (3 * hidden, hidden), "f16"),
                   (f"blk.{i}.attn_output.weight", (hidden, hidden), "f16"),
                   (f"blk.{i}.ffn_norm.weight", (hidden,), "f32"),
                   (f"blk.{i}.ffn_up.weight", (2 * ffn, hidden), "f16"),
                   (f"blk.{i}.ffn_down.weight", (hidden, ffn), "f16")]
    shapes += [("output_norm.weight", (hidden,), "f32"), ("output.weight", (vocab, hidden), "f16")]
    for name, shape, dt in shapes:
        dtype = np.dtype(np.float16 if dt == "f16" else np.float32)
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _name, shape, dt in shapes:
        if dt == "f32":
            arr = np.ones(shape, dtype=np.float32)
        else:
            arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        w.write_tensor_data(arr)
        del arr
    w.close()
    out.with_suffix(".part").rename(out)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB)")
    return out


def table(model: Path, kv_types: list[str], n_ctxs: list[int], repacks: list[bool], threads: int,
          prompt_tokens: int, gen_tokens: int, agreement: int, baseline: bool) -> list[dict]:
    rows = []
    if baseline:  # raw llama-cpp-python defaults: f16 KV, repack on, flash attention off
        cfg = BenchConfig(model=str(model), n_ctx=max(n_ctxs), threads=threads, flash_attn=False,
                          prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, agreement_tokens=agreement)
        rows.append({**run_isolated(cfg), "label": "raw default"})
        print(_fmt(rows[-1]), flush=True)
    for n_ctx in n_ctxs:
        for repack in repacks:
            for kv in kv_types:
                cfg = BenchConfig(model=str(model), n_ctx=n_ctx, threads=threads,
                                  type_k=None if kv == "f16" else kv, type_v=None if kv == "f16" else kv,
                                  flash_attn=True, repack=repack, prompt_tokens=prompt_tokens,
                                  gen_tokens=gen_tokens, agreement_tokens=agreement)
                rows.append({**run_isolated(cfg), "label": f"kv {kv}, repack {'on' if repack else 'off'}, fa"})
                print(_fmt(rows[-1]), flush=True)
    # Next-token agreement of each run with the f16-KV run of the same n_ctx and repack setting.
    for r in rows:
        ref = next((x for x in rows if x.get("n_ctx") == r.get("n_ctx") and x.get("type_k") == "f16"
                    and x.get("repack") == r.get("repack") and "argmax" in x), None)
        if ref and "argmax" in r:
            a, b = r["argmax"], ref["argmax"]
            r["agreement_vs_f16"] = sum(x == y for x, y in zip(a, b, strict=False)) / max(1, min(len(a), len(b)))
    return rows


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r.get('label', '')}: ERROR {r['error']}"
    agree = r.get("agreement_vs_f16")
    return (f"| {r['label']:<24} | {r['n_ctx']:>5} | {r['peak_rss_gb']:6.2f} | {r['decode_tok_s']:6.2f} | "
            f"{r['prefill_tok_s']:7.1f} | {r['ttft_s']:6.2f} | {r['load_s']:5.2f} | "
            f"{'' if agree is None else f'{agree:.3f}':>6} |")


HEADER = ("| config                   | n_ctx | RSS GB | dec/s  | pre/s   | TTFT s | load  | agree  |\n"
          "|--------------------------|-------|--------|--------|---------|--------|-------|--------|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="phone_profile.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phi35", action="store_true", help="also build and measure the Phi-3.5-mini-shaped model")
    ap.add_argument("--work", default=None, help="folder for the Phi-3.5-shaped files (default: the care cache)")
    ap.add_argument("--skip-smollm", action="store_true")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {}
    if not args.skip_smollm:
        # Q4_0, not Q4_K_M: SmolLM2's 576-wide rows are not a multiple of 256, so K-quants fall back to
        # q5_0 for most tensors; Q4_0 is a type llama.cpp repacks on x86, which is what the table is about.
        q4k = quantize(embedded_gguf(), cache_dir() / "bench" / "SmolLM2-135M-Instruct.Q4_0.gguf", "Q4_0")
        print(f"\nSmolLM2-135M Q4_0, {args.threads} threads (agree = next-token argmax agreement with f16 KV "
              "over 128 teacher-forced tokens)\n" + HEADER)
        results["smollm2_q4_0"] = table(q4k, ["f16", "q8_0", "q4_0"], [2048, 4096], [True, False],
                                          args.threads, 256, 64, 128, baseline=True)
    if args.phi35:
        work = Path(args.work) if args.work else cache_dir() / "bench"
        work.mkdir(parents=True, exist_ok=True)
        f16 = write_phi35_shaped_f16(work / "phi35-shaped.f16.gguf")
        q4 = quantize(f16, work / "phi35-shaped.Q4_K_M.gguf", threads=args.threads)
        f16.unlink()  # 7.6 GB no longer needed
        print(f"\nPhi-3.5-mini-shaped Q4_K_M, {args.threads} threads\n" + HEADER)
        results["phi35_shaped_q4_k_m"] = table(q4, ["f16", "q8_0", "q4_0"], [4096], [True, False], args.threads,
                                               128, 32, 0, baseline=True)
    for rows in results.values():
        for r in rows:
            r.pop("argmax", None)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
