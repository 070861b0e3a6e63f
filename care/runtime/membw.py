"""Memory read bandwidth of this device, and the decode speed it allows a GGUF.

Decoding one token reads (almost) every weight once, plus the KV cache of the tokens so far, so on a CPU the
bound is bandwidth / bytes-read-per-token. `care bench` measures both in the same run and reports decode as a
fraction of that bound.

How the bandwidth is measured: N worker processes (N = the bench's threads), each streaming over its own
256 MB float32 buffer (far past any last-level cache) with numpy's dot product -- one BLAS sdot, a SIMD loop
doing 2 flops per 8 bytes read, so the memory is the limit -- in lock step (a barrier), best of several
passes, BLAS pinned to one thread per process. No compiler needed; a hand-written C/asm streaming kernel
may read a little faster, so the bound is a simple reader's, and a fraction slightly over 1 is possible.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from care.gguf_file import read_header

BUFFER_BYTES = 256 * 2**20
_ONE_THREAD = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _worker(barrier: Any, passes: int, out: Any, index: int) -> None:
    import numpy as np

    buf = np.ones(BUFFER_BYTES // 4, dtype=np.float32)
    np.dot(buf, buf)  # touch every page before timing
    best = float("inf")
    for _ in range(passes):
        barrier.wait()
        t0 = time.perf_counter()
        np.dot(buf, buf)
        best = min(best, time.perf_counter() - t0)
    out[index] = best


def read_bandwidth(processes: int = 1, passes: int = 8) -> float:
    """Bytes per second that `processes` processes read together (sum over them of buffer / best pass)."""
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)  # spawned workers inherit it before numpy loads BLAS
    try:
        barrier = ctx.Barrier(processes)
        out = ctx.Array("d", processes)
        workers = [ctx.Process(target=_worker, args=(barrier, passes, out, i), daemon=True)
                   for i in range(processes)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    times = list(out)
    if any(t <= 0 or t == float("inf") for t in times):
        raise RuntimeError("a bandwidth worker did not finish")
    return sum(BUFFER_BYTES / t for t in times)


# Bytes per element of llama.cpp's KV-cache types (block size 32: q8_0 34 bytes, q4_0 18 bytes).
_KV_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
             "q4_1": 20 / 32}


def bytes_per_token(model: Path, n_past: int, type_k: str | None = None, type_v: str | None = None) -> dict[str, float]:
    """What decoding one token at position n_past reads: every weight tensor except the token embedding (one
    row of it, unless it doubles as the output layer), and the K and V cache of n_past tokens. Read from the
    GGUF's tensor table and metadata."""
    meta, tensors = gguf_layout(model)
    tied = "output.weight" not in tensors  # the embedding is the output layer too
    weights = 0.0
    for name, (size, shape) in tensors.items():
        if name == "token_embd.weight" and not tied:
            size = size / max(shape[-1] if len(shape) > 1 else 1, 1)
        weights += size
    arch = str(meta["general.architecture"])

    def get(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise KeyError(f"{arch}.{key}")
        return int(value)

    n_layer, n_embd = get("block_count"), get("embedding_length")
    n_head = get("attention.head_count")
    n_head_kv = get("attention.head_count_kv", n_head)
    head_k = get("attention.key_length", n_embd // n_head)
    head_v = get("attention.value_length", n_embd // n_head)
    kv_per_token = n_layer * n_head_kv * (head_k * _KV_BYTES[type_k or "f16"] + head_v * _KV_BYTES[type_v or "f16"])
    kv = kv_per_token * n_past
    return {"weights": weights, "kv": kv, "total": weights + kv, "kv_per_token": kv_per_token}


def gguf_layout(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...]]]]:
    """Metadata and {tensor: (bytes it spans in the file, shape)} from a GGUF header (care.gguf_file)."""
    header = read_header(path)
    spans = header.tensor_bytes()
    return header.metadata, {t.name: (spans[t.name], t.shape) for t in header.tensors}
