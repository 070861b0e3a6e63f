"""The phone-class trade-off table: KV-cache type x weight memory (repack, mmap) x n_ctx -> peak RSS, decode,
prefill, and the KV quantization's effect on next-token agreement; then the phone profile against the raw
llama-cpp-python default, alternated round by round.

Part 1 (default, ~1.5 min on 2 cores): the embedded SmolLM2-135M, requantized to Q4_0 (a type llama.cpp
repacks; K-quants do not fit its 576-wide rows), every combination in its own child process, with the
greedy next-token agreement against the f16-KV run over 128 teacher-forced tokens.
Part 2 (--phi35, ~12 min the first time, ~10 GB disk while building): a Phi-3.5-mini-shaped model -- the
real metadata (32 layers, hidden 3072, 32 KV heads without grouped-query attention, FFN 8192, LongRoPE
factors, 128k context) and the real Phi-3 vocabulary (llama.cpp's models/ggml-vocab-phi-3.gguf, which
`care export setup` extracts), random weights -- written straight to an F16 GGUF with gguf-py (80 s),
quantized to Q4_K_M by llama.cpp (2.40 GB, 150 s), and measured at 2 threads, n_ctx 4096. The Q4_K_M file
is kept in the care cache, so later runs skip the build. A borrowed BPE vocabulary cannot stand in: a
model name with "phi3" in it makes llama.cpp look up Phi-3's tokens and abort (std::out_of_range).

    .venv/bin/python bench/phone_profile.py [--out phone_profile.json] [--phi35 [--skip-smollm] [--skip-table]
        [--check-rounds 5] [--check q8_0/q4_0,on,off]] [--work DIR]

Measured figures are in the README and in care/runtime/profiles.py, which the phone profile comes from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from phi35_shaped import PHI35_CONFIG, PHI35_TEMPLATE  # bench/ is on sys.path when a bench script runs

from care.models import embedded_gguf
from care.paths import cache_dir
from care.runtime import llama_compat
from care.runtime.bench import BenchConfig, run_isolated
from care.runtime.profiles import PROFILES, kv_label, parse_kv_type


def quantize(src: Path, dst: Path, ftype: str = "Q4_K_M", threads: int = 2) -> Path:
    """llama.cpp's own quantizer through llama-cpp-python's bindings."""
    llama_cpp = llama_compat.load()

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


# Phi-3.5-mini-instruct's config.json (one copy, shared with the HF-folder builder bench/phi35_shaped.py),
# as llama.cpp's converter writes it into a GGUF (conversion/phi.py).
_C = PHI35_CONFIG
PHI35 = {"hidden": _C["hidden_size"], "ffn": _C["intermediate_size"], "layers": _C["num_hidden_layers"],
         "heads": _C["num_attention_heads"], "kv_heads": _C["num_key_value_heads"],
         "context": _C["max_position_embeddings"], "orig_context": _C["original_max_position_embeddings"],
         "sliding_window": _C["sliding_window"], "rope_theta": _C["rope_theta"], "rms_eps": _C["rms_norm_eps"]}


# PHI35_TEMPLATE (bench/phi35_shaped.py) is Phi-3.5-mini's own: the Phi-3 vocabulary GGUF carries Phi-3-mini's,
# which drops system messages, so a domain prompt would never reach the model.


def write_phi35_shaped_f16(out: Path, seed: int = 0) -> Path:
    """A GGUF with Phi-3.5-mini's metadata and tensor shapes and random weights, one tensor in memory at a time.

    The vocabulary is the real Phi-3 one (32,064 tokens, SentencePiece, `<|end|>` ...) from llama.cpp's
    models/ggml-vocab-phi-3.gguf, which `care export setup` extracts from the llama-cpp-python sdist: with
    a borrowed BPE vocabulary llama.cpp's Phi-3 token rules abort the load (std::out_of_range)."""
    import math

    import gguf
    import numpy as np

    from care.toolchain.llamacpp.converter_setup import phi3_vocab

    if out.is_file():
        return out
    vocab_reader = gguf.GGUFReader(str(phi3_vocab()))
    tokenizer_fields = {k: f for k, f in vocab_reader.fields.items()
                        if k.startswith("tokenizer.") and k != "tokenizer.chat_template"}
    vocab = len(tokenizer_fields["tokenizer.ggml.tokens"].data)
    c = PHI35
    hidden, ffn, layers = c["hidden"], c["ffn"], c["layers"]
    rope_dims = hidden // c["heads"]
    w = gguf.GGUFWriter(str(out.with_suffix(".part")), "phi3")
    w.add_name("Phi-3.5-mini-shaped-random")
    w.add_context_length(c["context"])
    w.add_rope_scaling_orig_ctx_len(c["orig_context"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_sliding_window(c["sliding_window"])
    scale = c["context"] / c["orig_context"]  # LongRoPE ("su") attention factor, as the converter computes it
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(c["orig_context"])))
    for key, field in tokenizer_fields.items():
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)
    w.add_chat_template(PHI35_TEMPLATE)
    shapes: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (vocab, hidden), "f16")]
    for i in range(layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (hidden,), "f32"),
                   (f"blk.{i}.attn_qkv.weight", (3 * hidden, hidden), "f16"),
                   (f"blk.{i}.attn_output.weight", (hidden, hidden), "f16"),
                   (f"blk.{i}.ffn_norm.weight", (hidden,), "f32"),
                   (f"blk.{i}.ffn_up.weight", (2 * ffn, hidden), "f16"),
                   (f"blk.{i}.ffn_down.weight", (hidden, ffn), "f16")]
    shapes += [("output_norm.weight", (hidden,), "f32"), ("output.weight", (vocab, hidden), "f16"),
               ("rope_factors_long.weight", (rope_dims // 2,), "rope"),
               ("rope_factors_short.weight", (rope_dims // 2,), "rope")]
    for name, shape, dt in shapes:
        dtype = np.dtype(np.float16 if dt == "f16" else np.float32)
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, dt in shapes:
        if dt == "f32":
            arr = np.ones(shape, dtype=np.float32)
        elif dt == "rope":  # LongRoPE rescale factors: ~1 for the short (<= 4k) ones, larger for long
            base = 1.0 if "short" in name else 1.0 + np.arange(shape[0], dtype=np.float32) / 2
            arr = base * np.ones(shape, dtype=np.float32)
        else:
            arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        w.write_tensor_data(arr)
        del arr
    w.close()
    out.with_suffix(".part").rename(out)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB)")
    return out


# Weight-memory modes: (repack, use_mmap). With mmap on, llama.cpp's repacked copy of Q4 weights sits
# beside the mapped original pages (both in RSS); with mmap off, repacked tensors are read straight into
# the repack buffer, so the repack speed comes without the duplicate. (repack off, mmap off) adds nothing.
MEMORY_MODES = [(True, True), (False, True), (True, False)]
KV_TYPES = ["f16", "q8_0", "q8_0/q4_0", "q4_0"]  # "K/V"; one name: both


def raw_default(model: Path, n_ctx: int, threads: int, prompt_tokens: int, gen_tokens: int, agreement: int) -> dict:
    """llama-cpp-python's defaults: f16 KV, repacked weights beside the mmap, flash attention off."""
    cfg = BenchConfig(model=str(model), n_ctx=n_ctx, threads=threads, flash_attn=False,
                      prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, agreement_tokens=agreement)
    return {**run_isolated(cfg), "label": "raw default (no fa)"}


def one(model: Path, n_ctx: int, kv: str, repack: bool, mmap: bool, threads: int, prompt_tokens: int,
        gen_tokens: int, agreement: int) -> dict:
    type_k, type_v = parse_kv_type(kv)
    cfg = BenchConfig(model=str(model), n_ctx=n_ctx, threads=threads, type_k=type_k, type_v=type_v,
                      flash_attn=True, repack=repack, use_mmap=mmap, prompt_tokens=prompt_tokens,
                      gen_tokens=gen_tokens, agreement_tokens=agreement)
    label = f"kv {kv}, repack {'on' if repack else 'off'}, mmap {'on' if mmap else 'off'}"
    return {**run_isolated(cfg), "label": label, "kv": kv, "use_mmap": mmap}


def table(model: Path, n_ctxs: list[int], threads: int, prompt_tokens: int, gen_tokens: int,
          agreement: int) -> list[dict]:
    rows = [raw_default(model, max(n_ctxs), threads, prompt_tokens, gen_tokens, agreement)]
    print(_fmt(rows[-1]), flush=True)
    for n_ctx in n_ctxs:
        for repack, mmap in MEMORY_MODES:
            for kv in KV_TYPES:
                rows.append(one(model, n_ctx, kv, repack, mmap, threads, prompt_tokens, gen_tokens, agreement))
                print(_fmt(rows[-1]), flush=True)
    # Next-token agreement of each run with the f16-KV run of the same n_ctx (flash attention on, repack on,
    # mmap on), so the column shows what the KV-cache type alone changes.
    ref_by_ctx = {r["n_ctx"]: r for r in rows if r.get("kv") == "f16" and r.get("repack") is True
                  and r.get("use_mmap") and "argmax" in r}
    for r in rows:
        ref = ref_by_ctx.get(r.get("n_ctx"))
        if ref and "argmax" in r:
            a, b = r["argmax"], ref["argmax"]
            r["agreement_vs_f16"] = sum(x == y for x, y in zip(a, b, strict=False)) / max(1, min(len(a), len(b)))
    if agreement:  # the rows again, now with the agreement column filled in
        print("\n" + HEADER)
        for r in rows:
            print(_fmt(r))
    return rows


def decode_check(model: Path, n_ctx: int, kv: str, repack: bool, mmap: bool, threads: int, rounds: int,
                 prompt_tokens: int, gen_tokens: int) -> dict:
    """The chosen profile against the raw default, alternated `rounds` times so load drift hits both; medians."""
    import statistics

    pairs = []
    for i in range(rounds):
        runs = {}
        order = ("raw", "profile") if i % 2 == 0 else ("profile", "raw")
        for side in order:
            runs[side] = (raw_default(model, n_ctx, threads, prompt_tokens, gen_tokens, 0) if side == "raw" else
                          one(model, n_ctx, kv, repack, mmap, threads, prompt_tokens, gen_tokens, 0))
        pairs.append(runs)
        print(f"  round {i + 1}: raw {runs['raw'].get('decode_tok_s', 0):.2f} tok/s, "
              f"{runs['raw'].get('peak_rss_gb', 0):.2f} GB | profile {runs['profile'].get('decode_tok_s', 0):.2f} "
              f"tok/s, {runs['profile'].get('peak_rss_gb', 0):.2f} GB", flush=True)
    out = {}
    for side in ("raw", "profile"):
        for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "peak_rss_gb", "load_s"):
            out[f"{side}_{key}"] = statistics.median(p[side][key] for p in pairs if key in p[side])
    out["decode_ratio"] = out["profile_decode_tok_s"] / out["raw_decode_tok_s"]
    out["prefill_ratio"] = out["profile_prefill_tok_s"] / out["raw_prefill_tok_s"]
    out["profile"] = {"kv": kv, "repack": repack, "use_mmap": mmap, "n_ctx": n_ctx, "threads": threads}
    out["rounds"] = pairs
    return out


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"| {r.get('label', ''):<32} | ERROR {r['error']}"
    agree = r.get("agreement_vs_f16")
    return (f"| {r['label']:<32} | {r['n_ctx']:>5} | {r['peak_rss_gb']:6.2f} | {r['peak_rss_gb'] * 1e9 / 2**30:7.2f} | "
            f"{r['decode_tok_s']:6.2f} | {r['prefill_tok_s']:7.1f} | {r['ttft_s']:6.2f} | {r['load_s']:5.2f} | "
            f"{'' if agree is None else f'{agree:.3f}':>6} |")


HEADER = ("| config                           | n_ctx | RSS GB | RSS GiB | dec/s  | pre/s   | TTFT s | load  | agree  |\n"
          "|----------------------------------|-------|--------|---------|--------|---------|--------|-------|--------|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="phone_profile.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phi35", action="store_true", help="also build and measure the Phi-3.5-mini-shaped model")
    ap.add_argument("--work", default=None, help="folder for the Phi-3.5-shaped files (default: the care cache)")
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--skip-table", action="store_true", help="Phi-3.5: only the decode check")
    ap.add_argument("--check-rounds", type=int, default=3,
                    help="Phi-3.5: alternated rounds of the phone profile against the raw default")
    ap.add_argument("--check", default=None, metavar="KV,REPACK,MMAP",
                    help="decode-check this setting instead of the phone profile, e.g. q8_0/q4_0,on,off")
    args = ap.parse_args()
    results: dict[str, object] = {}
    if not args.skip_smollm:
        # Q4_0, not Q4_K_M: SmolLM2's 576-wide rows are not a multiple of 256, so K-quants fall back to
        # q5_0 for most tensors; Q4_0 is a type llama.cpp repacks on x86, which is what the table is about.
        q4 = quantize(embedded_gguf(), cache_dir() / "bench" / "SmolLM2-135M-Instruct.Q4_0.gguf", "Q4_0")
        print(f"\nSmolLM2-135M Q4_0, {args.threads} threads (agree = next-token argmax agreement with f16 KV "
              "over 128 teacher-forced tokens)\n" + HEADER)
        results["smollm2_q4_0"] = table(q4, [2048, 4096], args.threads, 256, 64, 128)
    if args.phi35:
        work = Path(args.work) if args.work else cache_dir() / "bench"
        work.mkdir(parents=True, exist_ok=True)
        q4 = work / "phi35-shaped.Q4_K_M.gguf"
        if not q4.is_file():
            f16 = write_phi35_shaped_f16(work / "phi35-shaped.f16.gguf")
            quantize(f16, q4, threads=args.threads)
            f16.unlink()  # 7.6 GB no longer needed
        if not args.skip_table:
            print(f"\nPhi-3.5-mini-shaped Q4_K_M ({q4.stat().st_size / 1e9:.2f} GB), {args.threads} threads\n"
                  + HEADER)
            results["phi35_shaped_q4_k_m"] = table(q4, [4096], args.threads, 128, 32, 0)
        phone = PROFILES["phone"]
        kv = kv_label(phone["type_k"], phone["type_v"])
        repack, mmap = phone["repack"], phone["use_mmap"]
        if args.check:
            kv, rp, mm = args.check.split(",")
            repack, mmap = rp == "on", mm == "on"
        print(f"\nDecode check: {'phone profile' if not args.check else 'setting'} (kv {kv}, repack {repack}, "
              f"mmap {mmap}) vs raw default, {args.check_rounds} alternated rounds")
        check = decode_check(q4, phone["n_ctx"], kv, repack, mmap, args.threads, args.check_rounds, 128, 48)
        results["phi35_decode_check"] = check
        print(f"medians: raw {check['raw_decode_tok_s']:.2f} tok/s decode, {check['raw_peak_rss_gb']:.2f} GB | phone "
              f"{check['profile_decode_tok_s']:.2f} tok/s, {check['profile_peak_rss_gb']:.2f} GB "
              f"({check['profile_peak_rss_gb'] * 1e9 / 2**30:.2f} GiB) -> decode ratio {check['decode_ratio']:.3f}, "
              f"prefill ratio {check['prefill_ratio']:.3f}; goal RSS <= 3.2 GB: "
              f"{'met' if check['profile_peak_rss_gb'] <= 3.2 else 'NOT met'}")
    for rows in results.values():
        for r in rows if isinstance(rows, list) else []:
            r.pop("argmax", None)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
