"""The child side of the CPU guard (care/runtime/cpu_guard.py): what runs in a process that may die.

A care.proc worker (`python -m care.runtime.cpu_probe job.json`, started by care.proc.run_worker); the job:

    {"what": "scores", "lib": DIR}       -> {"scores": {module: ggml_backend_score()}}
    {"what": "models", "out": DIR}       -> {"models": {type: path}}: the tiny probe models, one per quant type
    {"what": "run", "models": DIR}       -> {"ok": ..., "gaps": ...}: prefill + decode each, with the module ggml
                                            picks ("types", "threads" optional)

A CPU module that cannot run here kills the process (SIGILL, SIGSEGV) or returns {"ok": false, ...}; the
progress records {"loaded": module} and {"probe": type} tell the parent where it died. Only numpy, gguf,
llama_cpp and care.proc / care.io (standard library): no care import that would load anything else.

The probe model: a Llama with 1 layer, 256 wide (the K-quant block), 512 tokens, random weights (fixed seed),
so every matrix product has a shape ggml's repacked and AMX paths take (rows and columns multiples of 32 and
256). `run` feeds 48 tokens as one batch (the prefill path: M > 1, AMX tiles where there are any) and then
the same tokens one at a time (the decode path: M = 1, VNNI/AVX kernels); the last token's logits of the two
must agree (both quantise activations the same way), which catches a kernel that computes garbage as well
as one that crashes.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from care.io import atomic_path
from care.proc import report_progress, worker_main

# Every quant type the project ships (export profiles, the embedded model's q4_1), as llama.cpp's ftype names.
TYPES = ("f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q3_k_m", "iq4_xs")
PROMPT = 48
N_EMBD, N_FF, N_VOCAB, N_HEAD = 256, 512, 512, 4
# Relative gap allowed between the batch and the one-token logits. Measured on this machine's good modules
# (sapphirerapids with AMX, zen4, icelake, haswell, sse42, x64): 0.0 for every quantised type (integer dot
# products, the same activation quantisation on both paths) and at most 0.00032 for f16; garbage is off by ~1.
TOLERANCE = 0.05


def scores(lib: Path, names: list[str] | None = None) -> dict[str, int]:
    """ggml's own score of each CPU module for this CPU (0: cannot run here), the way ggml picks one: each
    module's ggml_backend_score() reads CPUID, so it sees the CPU this process really runs on (also under
    qemu-user, where /proc/cpuinfo shows the host's). Safe in any process, as ggml does it in each one; the
    modules are closed again."""
    import _ctypes

    out: dict[str, int] = {}
    base = lib / "libggml-base.so"
    if base.exists():  # the modules link against it without a search path: ggml loads them after it
        ctypes.CDLL(str(base), mode=ctypes.RTLD_GLOBAL)
    paths = sorted(lib.glob("libggml-cpu-*.so")) if names is None else [lib / n for n in names]
    for path in paths:
        try:
            handle = ctypes.CDLL(str(path))
        except OSError:
            out[path.name] = 0
            continue
        try:
            fn = handle.ggml_backend_score
            fn.restype = ctypes.c_int
            out[path.name] = int(fn())
        except AttributeError:
            out[path.name] = 0
        finally:
            _ctypes.dlclose(handle._handle)
    return out


def _write_f32_model(path: Path) -> None:
    import gguf
    import numpy as np

    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("care-cpu-probe")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all f32
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"tok{i}" for i in range(N_VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (N_VOCAB - 259)  # unknown, control, byte, normal
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name: str, *shape: int, scale: float = 0.05) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", N_VOCAB, N_EMBD, scale=0.5)
    t("output.weight", N_VOCAB, N_EMBD)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t(f"blk.0.{name}.weight", N_EMBD, N_EMBD)
    t("blk.0.ffn_gate.weight", N_FF, N_EMBD)
    t("blk.0.ffn_up.weight", N_FF, N_EMBD)
    t("blk.0.ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_models(out: Path) -> dict[str, str]:
    """The f32 probe model, quantised by libllama into every type of TYPES (no ggml compute runs here)."""
    import llama_cpp

    out.mkdir(parents=True, exist_ok=True)
    base = out / "probe-f32.gguf"
    if not base.is_file():
        with atomic_path(base) as part:
            _write_f32_model(part)
    made = {}
    for name in TYPES:
        target = out / f"probe-{name}.gguf"
        if not target.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
            params.nthread = 1
            with atomic_path(target) as part:
                rc = llama_cpp.llama_model_quantize(str(base).encode(), str(part).encode(), ctypes.byref(params))
                if rc != 0:
                    raise RuntimeError(f"llama_model_quantize {name} failed ({rc})")
        made[name] = str(target)
    return made


def run(models: Path, types: tuple[str, ...] = TYPES, threads: int = 2) -> dict[str, object]:
    """Prefill and decode each probe model with the CPU module this process loaded."""
    import llama_cpp
    import numpy as np

    prompt = [1] + [int(x) for x in np.random.default_rng(7).integers(3, N_VOCAB, PROMPT - 1)]
    loaded = loaded_module()
    report_progress({"loaded": loaded})
    gaps: dict[str, float] = {}
    t0 = time.perf_counter()
    for name in types:
        report_progress({"probe": name})  # the parent names the type a crash happened in
        # logits_all: llama-cpp-python keeps the logits in `scores` only then (else the rows stay uninitialised)
        llm = llama_cpp.Llama(model_path=str(models / f"probe-{name}.gguf"), n_ctx=128, n_batch=64, n_ubatch=64,
                              n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
        llm.eval(prompt)  # one batch: the prefill kernels
        batch = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        llm.reset()
        for tok in prompt:  # one token at a time: the decode kernels
            llm.eval([tok])
        single = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        llm.close()
        if not (np.isfinite(batch).all() and np.isfinite(single).all()):
            return {"ok": False, "type": name, "why": "non-finite logits", "module": loaded}
        if not np.abs(single).max() > 0:
            return {"ok": False, "type": name, "why": "all-zero logits", "module": loaded}
        gap = float(np.abs(batch - single).max() / max(np.abs(single).max(), 1e-6))
        gaps[name] = round(gap, 5)
        if gap > TOLERANCE:
            return {"ok": False, "type": name, "why": f"prefill and decode disagree (relative gap {gap:.3f})",
                    "gaps": gaps, "module": loaded}
    return {"ok": True, "gaps": gaps, "module": loaded, "seconds": round(time.perf_counter() - t0, 3)}


def loaded_module() -> str | None:
    """The ggml CPU module mapped into this process (Linux), e.g. "libggml-cpu-icelake.so"."""
    import re

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = sorted(set(re.findall(r"libggml-cpu-[\w.-]+?\.so", maps)))
    return found[0] if len(found) == 1 else None


def handle(job: dict[str, object]) -> dict[str, object]:
    """One job of the guard (see the module docstring)."""
    what = job.get("what")
    if what == "scores":
        return {"scores": scores(Path(str(job["lib"])))}
    if what == "models":
        return {"models": build_models(Path(str(job["out"])))}
    if what == "run":
        types = tuple(job.get("types") or TYPES)  # type: ignore[arg-type]
        return run(Path(str(job["models"])), types, int(job.get("threads") or 2))  # type: ignore[arg-type]
    raise ValueError(f"unknown cpu_probe job {what!r} (scores, models or run)")


if __name__ == "__main__":
    raise SystemExit(worker_main(handle))
