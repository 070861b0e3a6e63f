"""f16 GGUF -> quantized GGUFs with llama.cpp's own quantizer (`llama_model_quantize` via llama-cpp-python).

All requested types are made in one worker subprocess (one import, one read of the f16 file per type); a
subprocess because llama.cpp aborts the whole process on some bad inputs. Its log is parsed for progress
and for the per-tensor fallbacks: k-quants work on 256-wide blocks, so a tensor whose rows are not a
multiple of 256 (SmolLM2's 576-wide ones, every tensor of a tiny test model) is stored in a 32-block type
instead (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). The count is reported, never hidden.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from care.errors import ExportError, UsageError, WorkerError
from care.io import atomic_path, check_free_space, make_readable
from care.proc import how_it_ended, report_progress, run_worker, worker_main
from care.runtime import llama_compat
from care.system import default_threads

log = logging.getLogger(__name__)

# quant name -> (llama_ftype name in llama_cpp, approx bits per weight for the disk-space check)
QUANT_TYPES: dict[str, tuple[str, float]] = {
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4.5),
    "q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", 5.0),
    "q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", 5.5),
    "q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", 6.0),
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8.5),
    "q3_k_m": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.9),
    "q4_k_s": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.6),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9),
    "q5_k_s": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", 5.5),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7),
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", 6.6),
    # A 256-block non-linear 4-bit type (falls back to IQ4_NL on narrow rows); llama.cpp makes it without an
    # importance matrix too (only IQ1/IQ2/IQ3_XXS require one), better with one.
    "iq4_xs": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", 4.3),
}
# Made by the converter directly, not by the quantizer.
FLOAT_TYPES = ("f16", "bf16", "f32")
K_QUANT_BLOCK = 256


def normalize_quant(name: str) -> str:
    q = name.strip().lower().replace("-", "_")
    if q not in QUANT_TYPES and q not in FLOAT_TYPES:
        known = ", ".join([*FLOAT_TYPES, *QUANT_TYPES])
        raise UsageError(f"Unknown quantization type '{name}'", hint=f"Choose from: {known}")
    return q


def is_k_quant(quant: str) -> bool:
    return "_k" in quant


def uses_256_blocks(quant: str) -> bool:
    """Types whose blocks span 256 columns (k-quants, IQ4_XS): narrow rows fall back to a 32-block type."""
    return is_k_quant(quant) or quant == "iq4_xs"


@dataclass
class QuantResult:
    quant: str
    path: Path
    fallback_tensors: int
    total_tensors: int
    fallback_types: dict[str, int]  # fallback type -> count, e.g. {"q5_0": 14}
    seconds: float


class QuantLog:
    """Reads llama.cpp's quantizer log (the same lines from the binding's callback and from llama-quantize):
    progress "[  12/ 272]", each "falling back to q5_0", and the final "N of M tensor(s) required fallback"."""

    def __init__(self, quant: str, progress: Callable[[str, int, int], None] | None = None) -> None:
        self.quant, self.progress = quant, progress
        self.fallback = self.total = 0
        self.fallback_types: dict[str, int] = {}

    def feed(self, line: str) -> None:
        m = re.search(r"\[\s*(\d+)/\s*(\d+)\]", line)
        if m:
            self.total = int(m.group(2))
            if self.progress:
                self.progress(self.quant, int(m.group(1)), self.total)
        fb = re.search(r"falling back to\s+(\w+)", line)
        if fb:
            t = fb.group(1).lower()
            self.fallback_types[t] = self.fallback_types.get(t, 0) + 1
        m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", line)
        if m:
            self.fallback, self.total = int(m.group(1)), int(m.group(2))


def quantize_many(
    f16_path: Path,
    targets: dict[str, Path],
    n_threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, QuantResult]:
    """Quantize `f16_path` into each `targets[quant]` (temp file + rename each). One subprocess for all."""
    if not targets:
        return {}
    for q in targets:
        if q not in QUANT_TYPES:
            raise UsageError(f"'{q}' is not a quantizer type", hint=f"Choose from: {', '.join(QUANT_TYPES)}")
    size = f16_path.stat().st_size
    need = sum(int(size * QUANT_TYPES[q][1] / 16) for q in targets)
    check_free_space(next(iter(targets.values())).parent, need, "quantized GGUFs")
    results: dict[str, QuantResult] = {}
    logs = {q: QuantLog(q, progress) for q in targets}
    current: list[QuantLog] = []  # the type being made; llama.cpp's log lines belong to it

    def on_progress(record: dict) -> None:
        if record.get("event") == "start":
            current[:] = [logs[record["quant"]]]
        elif record.get("event") == "done":
            q = record["quant"]
            results[q] = QuantResult(q, targets[q], record["fallback"], record["total"], logs[q].fallback_types,
                                     record["seconds"])
            current.clear()

    def on_line(line: str) -> None:
        if current:
            current[0].feed(line)

    with ExitStack() as stack:
        parts = {q: stack.enter_context(atomic_path(p)) for q, p in targets.items()}
        jobs = [{"quant": q, "ftype": QUANT_TYPES[q][0], "out": str(parts[q])} for q in targets]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="care-quantize-")))
        try:
            run_worker("care.export.quantize", {"f16": str(f16_path), "jobs": jobs,
                                                "n_threads": n_threads or default_threads()},
                       workdir=workdir, what="llama.cpp's quantizer", on_progress=on_progress, on_line=on_line)
        except WorkerError as exc:
            detail = exc.detail or "no output"
            how = how_it_ended(exc.returncode) if exc.returncode is not None else "did not start"
            raise ExportError(f"llama.cpp's quantizer failed ({how}): {detail}", path=f16_path,
                              hint="Check that the f16 GGUF loads (`care export verify`)") from exc
        if len(results) != len(targets):
            raise ExportError(f"llama.cpp's quantizer made {len(results)} of {len(targets)} types", path=f16_path,
                              hint="Check that the f16 GGUF loads (`care export verify`)")
    _log_fallbacks(results)
    return results


def _log_fallbacks(results: dict[str, QuantResult]) -> None:
    for r in results.values():
        if r.fallback_tensors:
            log.info("%s: %d of %d tensors fell back from the %d-wide k-quant block to %s",
                     r.quant.upper(), r.fallback_tensors, r.total_tensors, K_QUANT_BLOCK,
                     ", ".join(f"{t} x{n}" for t, n in r.fallback_types.items()) or "another type")
        make_readable(r.path)


def quantize_with_tool(
    f16_path: Path,
    targets: dict[str, Path],
    tool: Path,
    imatrix: Path | None = None,
    n_threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, QuantResult]:
    """Quantize with llama.cpp's `llama-quantize` (same source as the binding), `--imatrix` when given.

    The binding's `llama_model_quantize` takes the matrix only as an in-memory array of per-tensor vectors,
    so the imatrix path uses the tool, which reads llama-imatrix's file itself."""
    import time

    from care.export.imatrix import run_tool

    for q in targets:
        if q not in QUANT_TYPES:
            raise UsageError(f"'{q}' is not a quantizer type", hint=f"Choose from: {', '.join(QUANT_TYPES)}")
    size = f16_path.stat().st_size
    check_free_space(next(iter(targets.values())).parent,
                     sum(int(size * QUANT_TYPES[q][1] / 16) for q in targets), "quantized GGUFs")
    threads = str(n_threads or default_threads())
    results: dict[str, QuantResult] = {}
    for q, target in targets.items():
        qlog = QuantLog(q, progress)
        t0 = time.perf_counter()
        with atomic_path(target) as tmp:
            # llama-quantize names its types in capitals: Q4_K_M, IQ4_XS
            cmd = [tool, *(["--imatrix", imatrix] if imatrix else []), f16_path, tmp, q.upper(), threads]
            run_tool(cmd, f"llama-quantize {q.upper()}", f16_path, qlog.feed)
        results[q] = QuantResult(q, target, qlog.fallback, qlog.total, qlog.fallback_types,
                                 round(time.perf_counter() - t0, 3))
    _log_fallbacks(results)
    return results


def quantize_jobs(job: dict) -> dict:
    """The worker: quantize each type of the job in turn, reporting its start and end to the parent (llama.cpp's
    log lines, which carry the progress and the fallbacks, go to stdout in between)."""
    import time

    llama_cpp = llama_compat.load()
    done = []
    for item in job["jobs"]:
        report_progress({"event": "start", "quant": item["quant"]})
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, item["ftype"])
        params.nthread = int(job["n_threads"])
        t0 = time.perf_counter()
        qlog = QuantLog("")  # llama.cpp's per-tensor log: the fallback count here, the progress in the parent

        def on_text(text: str, qlog: QuantLog = qlog) -> None:
            qlog.feed(text)
            sys.stdout.write(text)
            sys.stdout.flush()

        with llama_compat.log_callback(on_text):
            rc = llama_cpp.llama_model_quantize(job["f16"].encode(), item["out"].encode(), params)
        if rc != 0:
            raise ExportError(f"llama_model_quantize returned {rc} for {item['quant']}")
        info = {"quant": item["quant"], "fallback": qlog.fallback, "total": qlog.total,
                "seconds": round(time.perf_counter() - t0, 3)}
        report_progress({"event": "done", **info})
        done.append(info)
    return {"done": done}


if __name__ == "__main__":
    sys.exit(worker_main(quantize_jobs))
