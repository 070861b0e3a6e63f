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


# GGUF value types: fixed sizes by type id (8 string, 9 array).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_layout(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...]]]]:
    """Scalar metadata and {tensor: (bytes, shape)} from a GGUF header.

    Written here because gguf-py's GGUFReader turns every vocabulary string into numpy views: 6-60 s for a
    49k-token vocabulary on this machine, for a table this walk reads in well under a second."""
    import struct

    with open(path, "rb") as f:
        data_end = os.fstat(f.fileno()).st_size

        def read(fmt: str) -> Any:
            n = struct.calcsize(fmt)
            return struct.unpack(fmt, f.read(n))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = read("<I")
        n_tensors, n_kv = read("<Q"), read("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            vtype = read("<I")
            if vtype == 8:
                meta[key] = string()
            elif vtype == 9:
                etype, count = read("<I"), read("<Q")
                if etype == 8:
                    for _ in range(count):
                        f.seek(read("<Q"), 1)
                else:
                    f.seek(_GGUF_SIZES[etype] * count, 1)
            else:
                meta[key] = read(_GGUF_SCALARS[vtype])
        infos = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(read("<Q") for _ in range(read("<I")))
            read("<I")  # ggml type
            infos.append((name, shape, read("<Q")))
        alignment = int(meta.get("general.alignment", 32))
        start = f.tell()
        start += (-start) % alignment
        del version
    # A tensor's bytes: up to the next tensor's offset (padding to the alignment included, < 32 bytes).
    offsets = sorted({off for _, _, off in infos} | {data_end - start})
    nxt = {off: offsets[i + 1] for i, off in enumerate(offsets[:-1])}
    return meta, {name: (nxt[off] - off, shape) for name, shape, off in infos}
