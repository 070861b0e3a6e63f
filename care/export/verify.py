"""Prove an exported GGUF matches its Hugging Face source.

Checks, per file (each GGUF is loaded in a subprocess: llama.cpp can abort the process on a bad vocab):
- metadata: name, chat template, BOS/EOS/EOT, context length, provenance; LongRoPE factors present and
  equal to the HF config's when the model has them; the template's end-of-turn token is an end-of-generation
  token for llama.cpp (Phi-3.5 must stop on <|end|>);
- tokenizer parity on a fixed multilingual / code / chat-markup corpus (HF tokenizer vs llama.cpp);
- the chat prompt the runtime renders from the GGUF's template == the HF template's rendering, and both
  tokenize the same;
- next-token top-1 agreement, mean KL(HF || GGUF) and perplexity on held-out text, fed the *same* token ids
  so tokenizer differences cannot hide in the logit numbers;
- a short greedy reply generated through the runtime engine (the path `care chat` uses).

n_ctx stays <= 4096: llama.cpp switches Phi-3.5 to its long RoPE factors above the original 4k context,
while HF uses the short ones for short inputs, so a larger n_ctx would make a correct file look wrong.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from care.errors import VerificationError, WorkerError
from care.export.hf_source import inspect_model_dir
from care.export.reference import EVAL_TEXTS, hf_reference, kl_limit, logit_metrics
from care.gguf_file import read_header
from care.models import check_gguf
from care.proc import how_it_ended, run_worker, worker_main
from care.runtime import llama_compat

log = logging.getLogger(__name__)

MAX_VERIFY_CTX = 4096

# f16 must be near-exact at any size (it only rounds weights to 11 significant bits): the same next token
# nearly always (ties in near-uniform tiny models may flip one), and no single position's KL above 2e-3
# (SmolLM2 measured max 5e-5, tiny models 1e-6; a mis-mapped tensor gives whole nats even where a random
# model's flat output keeps the mean small).
F16_MIN_TOP1 = 0.98
F16_MAX_POSITION_KL = 2e-3


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Key facts of a GGUF from its header (care.gguf_file: pure Python, cannot crash the process), and the
    LongRoPE factor tensors' values."""
    import numpy as np

    header = read_header(path)
    meta_kv = header.metadata
    arch = meta_kv.get("general.architecture")
    types: dict[str, int] = {}
    for t in header.tensors:
        types[tensor_type_name(t.ggml_type)] = types.get(tensor_type_name(t.ggml_type), 0) + 1
    file_type = header.file_type
    meta: dict[str, Any] = {
        "name": meta_kv.get("general.name"),
        "architecture": arch,
        "file_type": meta_kv.get("general.file_type"),
        "context_length": meta_kv.get(f"{arch}.context_length"),
        "chat_template": meta_kv.get("tokenizer.chat_template"),
        "bos_token_id": meta_kv.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta_kv.get("tokenizer.ggml.eos_token_id"),
        "eot_token_id": meta_kv.get("tokenizer.ggml.eot_token_id"),
        "add_bos_token": meta_kv.get("tokenizer.ggml.add_bos_token"),
        "tensor_types": types,
        "n_tensors": len(header.tensors),
        "n_params": int(sum(math.prod(t.shape) for t in header.tensors)),
        "provenance": {k: v for k, v in meta_kv.items() if k.startswith("care.")},
        # "Q4_K_M", "F16", "F32" (for ALL_F32); None for a number gguf-py does not know
        "file_type_name": None if file_type is None or file_type.startswith("ftype ")
        else file_type.removeprefix("ALL_"),
    }
    for which in ("long", "short"):
        t = next((t for t in header.tensors if t.name == f"rope_factors_{which}.weight"), None)
        dtype = None if t is None else {0: np.float32, 1: np.float16}.get(t.ggml_type)  # ggml F32, F16
        meta[f"rope_factors_{which}"] = None if dtype is None else [float(x) for x in np.fromfile(
            path, dtype=dtype, count=math.prod(t.shape), offset=header.data_offset + t.offset)]
    return meta


def tensor_type_name(ggml_type: int) -> str:
    """A ggml tensor type's name ("Q4_K", "F32") as gguf-py spells it."""
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# --------------------------------------------------------------------------------------------------------
# llama.cpp side (a child worker: llama.cpp can abort the process on a bad file)


def run_llama_worker(gguf_path: Path, job: dict[str, Any], workdir: Path, timeout: float | None) -> dict[str, Any]:
    try:
        return run_worker("care.export.verify", dict(job, workdir=str(workdir)), workdir=workdir, timeout=timeout,
                          what="llama.cpp")
    except WorkerError as exc:
        detail = exc.detail or (how_it_ended(exc.returncode) if exc.returncode is not None else exc.message)
        raise VerificationError(f"llama.cpp could not load or run the GGUF: {detail}", path=gguf_path,
                                hint="Re-export it with `care export gguf` (CARE_DEBUG=1 for the full log)") from exc


def llama_side(job: dict[str, Any]) -> dict[str, Any]:
    """The worker: load the GGUF with llama.cpp, tokenize, render, score, generate (logits saved as .npy)."""
    import numpy as np

    workdir = Path(job["workdir"])
    llama_cpp = llama_compat.load()

    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.engine import ChatEngine

    n_threads = job["n_threads"]
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_batch=min(512, job["n_ctx"]),
                          n_threads=n_threads, n_threads_batch=n_threads, logits_all=True,
                          lora_path=job.get("lora"), verbose=bool(os.environ.get("CARE_DEBUG")))
    res: dict[str, Any] = {"corpus": {}, "chats": [], "seq_files": []}
    for text in job["corpus"]:
        res["corpus"][text] = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    res["eos"] = llm.token_eos()
    res["bos"] = llm.token_bos()
    res["eot"] = llama_compat.token_eot(llm)
    res["is_eog"] = {str(t): llama_compat.is_eog(llm, int(t)) for t in job["eog_check"]}
    for i, ids in enumerate(job["seqs"]):
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        path = workdir / f"logits{i}.npy"
        np.save(path, logits)
        res["seq_files"].append(str(path))
    del llm
    if job["chat"]:
        engine = ChatEngine(job["gguf"], EngineConfig(
            n_ctx=job["n_ctx"], n_threads=n_threads, lora_path=job.get("lora"),
            sampling=SamplingConfig(temperature=0.0, seed=0, max_tokens=job["gen_tokens"], repeat_penalty=1.0)))
        for msgs in job["chats"]:
            text = engine.render(msgs)
            res["chats"].append({"text": text, "ids": engine.tokenize(text)})
        final = engine.chat(job["chats"][0])
        res["reply"] = final.text
        res["finish_reason"] = final.finish_reason
        res["stop_strings"] = engine.stop_strings
        engine.close()
    return res


# --------------------------------------------------------------------------------------------------------
# Comparison


def verify_many(
    files: dict[str, Path],
    hf_model_dir: str | os.PathLike[str],
    *,
    n_ctx: int = 2048,
    max_tokens: int = 160,
    n_threads: int | None = None,
    gen_tokens: int = 16,
    texts: tuple[str, ...] = EVAL_TEXTS,
    fail: bool = True,
    timeout: float | None = None,
    hf_dtype: str = "auto",
    loras: dict[str, Path] | None = None,
    quants: dict[str, str] | None = None,
    logits_out: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Verify several GGUFs (quant -> path) of one HF model; the HF reference is computed once, in
    `hf_dtype` (auto: the checkpoint's own 16-bit dtype, else float32; an fp32 copy of a 16-bit 3.8B model
    would need 15 GB).

    `loras` (label -> adapter GGUF) applies a LoRA adapter on top of that label's file, and `quants`
    (label -> quant) names the KL limit when a label is not a quant name (`care export gguf-lora`).
    `logits_out`, when given, receives each label's llama.cpp logits and the key "hf" the HF log-probs.
    Returns the report dict (see verify.json). Raises VerificationError when `fail` and a check fails.
    """
    hf_dir = Path(hf_model_dir).expanduser()
    inspect_model_dir(hf_dir)  # same one-line errors as export for a bad source folder
    n_ctx = min(n_ctx, MAX_VERIFY_CTX)
    max_tokens = min(max_tokens, n_ctx - 8)
    metas = {}
    for quant, path in files.items():
        check_gguf(Path(path))
        metas[quant] = read_gguf_metadata(Path(path))
    if n_threads is None:
        from care.system import default_threads

        n_threads = default_threads()
    if hf_dtype == "auto":
        from care.models import stored_dtype

        hf_dtype = stored_dtype(hf_dir)
    ref = hf_reference(hf_dir, max_tokens, texts, hf_dtype)
    report: dict[str, Any] = {"source": str(hf_dir.resolve()), "n_ctx": n_ctx, "hf_dtype": hf_dtype, "eval_tokens": sum(
        len(s) for s in ref["seqs"]), "hf_params": ref["n_params"], "files": {}, "failures": []}
    eot = ref["eot"]
    import numpy as np

    for quant, path in files.items():
        meta = metas[quant]
        job = {"gguf": str(path), "n_ctx": n_ctx, "n_threads": n_threads, "corpus": list(ref["corpus"]),
               "seqs": ref["seqs"], "chat": ref["has_template"] and bool(meta["chat_template"]),
               "chats": [c["messages"] for c in ref["chats"] if "text" in c], "gen_tokens": gen_tokens,
               "eog_check": [eot[0]] if eot else [], "lora": str((loras or {})[quant]) if quant in (loras or {})
               else None}
        with tempfile.TemporaryDirectory(prefix="care-verify-") as tmp:
            res = run_llama_worker(Path(path), job, Path(tmp), timeout)
            logits = [np.load(f) for f in res["seq_files"]]
            metrics = logit_metrics(ref["logprobs"], logits, ref["seqs"])
        if logits_out is not None:
            logits_out[quant] = logits
            logits_out["hf"], logits_out["seqs"] = ref["logprobs"], ref["seqs"]
        entry = _compare((quants or {}).get(quant, quant), meta, ref, res, metrics)
        if hf_dtype != "float32" and quant in ("f16", "bf16", "f32") and entry["failures"]:
            # A 16-bit reference rounds every activation; at billions of parameters that noise alone exceeds
            # the near-exact limits (Phi-3.5-shaped f16: KL 0.0026 vs a bf16 reference).
            entry["failures"] = [f"{f} (against a {hf_dtype} reference: recheck with --hf-dtype float32)"
                                 for f in entry["failures"]]
        report["files"][quant] = entry
        report["failures"].extend(f"{quant}: {f}" for f in entry["failures"])
    report["passed"] = not report["failures"]
    if fail and not report["passed"]:
        raise VerificationError("Verification failed: " + "; ".join(report["failures"][:3]),
                                path=next(iter(files.values())),
                                hint="See verify.json; re-export, or use --no-verify to keep unverified files")
    return report


def _compare(quant: str, meta: dict[str, Any], ref: dict[str, Any], res: dict[str, Any],
             metrics: dict[str, float]) -> dict[str, Any]:
    failures: list[str] = []
    warnings: list[str] = []
    # tokenizer parity
    mism = [t for t, ids in ref["corpus"].items() if res["corpus"].get(t) != ids]
    lead = [t for t in mism if _only_leading_space_differs(ref["corpus"][t], res["corpus"][t])]
    if mism:
        warnings.append(f"tokenizer differs on {len(mism)}/{len(ref['corpus'])} corpus texts"
                        + (f" ({len(lead)} only in a leading space, as SentencePiece models do)" if lead else ""))
    # chat template rendering + tokenization of real prompts
    chats_ok = True
    if ref["has_template"] and not meta["chat_template"]:
        failures.append("the GGUF has no chat template but the HF tokenizer has one")
        chats_ok = False
    for hf_c, g_c in zip([c for c in ref["chats"] if "text" in c], res["chats"], strict=False):
        if hf_c["text"] != g_c["text"]:
            failures.append(f"chat prompt rendered from the GGUF template differs from HF: {hf_c['text'][:60]!r}")
            chats_ok = False
        elif hf_c["ids"] != g_c["ids"]:
            failures.append("a rendered chat prompt tokenizes differently in llama.cpp and HF")
            chats_ok = False
    # stop token
    eot = ref["eot"]
    if eot and not res["is_eog"].get(str(eot[0]), False):
        failures.append(f"llama.cpp does not stop on the template's end-of-turn token {eot[1]!r} (id {eot[0]})")
    # LongRoPE factors
    rope = ref["rope"]
    if rope:
        for which in ("long", "short"):
            got = meta.get(f"rope_factors_{which}")
            want = rope.get(which) or []
            if not got or len(got) != len(want) or max(abs(a - b) for a, b in zip(got, want, strict=True)) > 1e-4:
                failures.append(f"LongRoPE {which} factors missing or different in the GGUF")
    # logits
    limit = kl_limit(quant, ref["n_params"])
    if metrics["kl_mean"] > limit:
        failures.append(f"mean KL {metrics['kl_mean']:.4g} exceeds the {quant} limit {limit:g}")
    if quant in ("f16", "f32", "bf16") and metrics["top1_agreement"] < F16_MIN_TOP1:
        failures.append(f"{quant} top-1 agreement {metrics['top1_agreement']:.3f} < {F16_MIN_TOP1}")
    if quant in ("f16", "f32") and metrics["kl_max"] > F16_MAX_POSITION_KL:
        failures.append(f"{quant} is not near-exact: KL {metrics['kl_max']:.3g} at one position"
                        f" > {F16_MAX_POSITION_KL:g}")
    if res.get("chats") is not None and "reply" in res and res.get("finish_reason") not in ("stop", "length"):
        failures.append(f"generation did not finish normally ({res.get('finish_reason')})")
    return {
        "file": meta.get("name"),
        "file_type": meta.get("file_type_name"),
        "tensor_types": meta["tensor_types"],
        "metadata": {k: meta[k] for k in ("name", "architecture", "context_length", "bos_token_id",
                                           "eos_token_id", "eot_token_id", "add_bos_token", "provenance")}
        | {"chat_template": bool(meta["chat_template"]), "rope_factors": bool(meta.get("rope_factors_long"))},
        "tokenizer": {"corpus_texts": len(ref["corpus"]), "mismatches": len(mism),
                      "leading_space_only": len(lead), "mismatched_texts": mism[:5]},
        "chat_template_match": chats_ok,
        "end_of_turn": {"token": eot[1] if eot else None, "id": eot[0] if eot else None,
                        "stops": res["is_eog"].get(str(eot[0])) if eot else None},
        "kl_limit": limit,
        **metrics,
        "reply": res.get("reply"),
        "stop_strings": res.get("stop_strings"),
        "warnings": warnings,
        "failures": failures,
        "passed": not failures,
    }


def _only_leading_space_differs(a: list[int], b: list[int]) -> bool:
    """Two different tokenizations that agree after their first one or two tokens (a leading-space piece)."""
    return any(a[i:] == b[j:] and len(a) > i for i in range(3) for j in range(3))


def verify_gguf(gguf_path: str | os.PathLike[str], hf_model_dir: str | os.PathLike[str], **kwargs: Any) -> dict:
    """Verify one GGUF against its HF source folder; returns the report (raises on failure unless fail=False).

    The quant type is read from the file, so the KL limit matches it."""
    path = Path(gguf_path).expanduser()
    check_gguf(path)
    meta = read_gguf_metadata(path)
    quant = (meta.get("file_type_name") or "unknown").lower()
    return verify_many({quant: path}, hf_model_dir, **kwargs)


def format_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows for the printed verification table (header first)."""
    rows = [["type", "top1", "KL", "limit", "ppl", "HF ppl", "tokens", "tmpl", "EOT", "ok"]]
    for quant, e in report["files"].items():
        tok = e["tokenizer"]
        rows.append([
            quant, f"{e['top1_agreement']:.3f}", f"{e['kl_mean']:.1e}", f"{e['kl_limit']:g}", f"{e['ppl']:.4g}",
            f"{e['ppl_hf']:.4g}",
            "same" if not tok["mismatches"] else f"{tok['mismatches']}/{tok['corpus_texts']} differ",
            "same" if e["chat_template_match"] else "DIFF",
            "-" if e["end_of_turn"]["stops"] is None else ("yes" if e["end_of_turn"]["stops"] else "NO"),
            "pass" if e["passed"] else "FAIL",
        ])
    return rows


if __name__ == "__main__":
    sys.exit(worker_main(llama_side))
