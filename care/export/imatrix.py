"""A domain-calibrated importance matrix for `care export gguf --imatrix`.

llama.cpp's quantizers pick each block's scales to minimise the error weighted by how much each input column
matters; the importance matrix is that weight (mean squared activation per column), collected by running
the model over calibration text. Calibrating on the recipe's own training conversations, rendered with the
model's chat template, weights the columns the served domains actually use.

- calibration text: the recipe's training rows (found from care_merge.json / the training and pipeline
  folders beside the merged model), or `--calibration FILE` (.txt as is; .jsonl/.json/.csv/... rows the
  training readers understand, rendered like the recipe's);
- the matrix: llama.cpp's own `llama-imatrix` on the f16 GGUF, built from the same source as the Python
  binding (care.toolchain.llamacpp), over a bounded number of chunks;
- quantization with it: llama.cpp's `llama-quantize --imatrix` (care.export.quantize.quantize_with_tool).

The matrix is saved as `<name>.imatrix` (llama.cpp's GGUF imatrix format; llama-quantize reads it by its
content): a `.gguf` suffix would make the export folder look like it holds two models to `--model DIR`
and the model pickers.
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from care import proc
from care.artifacts import MERGE_INFO, read_if_present, read_merge_info
from care.errors import CareError, ConfigError, DataError, ExportError, ToolError
from care.io import atomic_path

log = logging.getLogger(__name__)

TOOLS = ("llama-imatrix", "llama-quantize")
RUN_HINT = "CARE_DEBUG=1 shows the full log; check that the f16 GGUF loads (`care export verify`)"
SETUP_HINT = "Build them once with `care export setup --tools llama-imatrix llama-quantize` (needs cmake and a C++ compiler)"
# llama.cpp's own recommendation is ~100 chunks of 512 tokens; 32 keep a 3.8B model's pass on a 2-core CPU
# within tens of minutes while still covering every domain of a recipe (the rows are shuffled first).
DEFAULT_CHUNKS = 32
DEFAULT_CTX = 512
MIN_CTX = 64  # llama-imatrix needs >= 2 chunks of n_ctx tokens; below 128 tokens there is nothing to measure


@dataclass
class Calibration:
    text: str
    source: str  # "recipe <name>" or the file name
    rows: int  # conversations (0 for a .txt file)
    tokens: int  # by the HF tokenizer, special tokens parsed as llama-imatrix --parse-special does

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "tokens": self.tokens, "sha256": self.sha256}


@dataclass
class Imatrix:
    path: Path
    calibration: Calibration
    chunks: int
    n_ctx: int
    seconds: float

    def record(self) -> dict[str, Any]:
        from care.system import sha256_file

        return {"file": self.path.name, "size": self.path.stat().st_size, "sha256": sha256_file(self.path),
                "calibration": self.calibration.record(), "chunks": self.chunks, "n_ctx": self.n_ctx,
                "tool": "llama-imatrix", "seconds": round(self.seconds, 1)}


# verify.json label of a type quantized without the importance matrix, for the with/without comparison
PLAIN_SUFFIX = " (no imatrix)"
_COMPARED = ("top1_agreement", "kl_mean", "kl_p99", "ppl", "file_bytes")


def imatrix_comparison(report: dict[str, Any], quants: Sequence[str]) -> dict[str, Any]:
    """Mark each type's row in the verify report as with/without the imatrix and sum them up per type:
    {"q4_k_m": {"with": {...}, "without": {...}, "kl_ratio": with/without}}. The rows without it are
    comparisons, not outputs: their failures move to `comparison_failures` and do not fail the export."""
    summary: dict[str, Any] = {}
    plain_labels = {q + PLAIN_SUFFIX for q in quants}
    for label, entry in report["files"].items():
        entry["imatrix"] = label not in plain_labels
    for q in quants:
        with_, without = report["files"].get(q), report["files"].get(q + PLAIN_SUFFIX)
        if with_ is None or without is None:
            continue
        summary[q] = {"with": {k: with_.get(k) for k in _COMPARED}, "without": {k: without.get(k) for k in _COMPARED},
                      "kl_ratio": with_["kl_mean"] / without["kl_mean"] if without["kl_mean"] > 0 else None}
    report["comparison_failures"] = [f for f in report["failures"] if f.split(":", 1)[0] in plain_labels]
    report["failures"] = [f for f in report["failures"] if f.split(":", 1)[0] not in plain_labels]
    report["passed"] = not report["failures"]
    report["imatrix"] = summary
    return summary


# --------------------------------------------------------------------------------------------------------
# Calibration text


def find_recipe(model_dir: Path):
    """The recipe a merged model was trained with, or None.

    Looked for in the order that is most exact: the training run's resolved_config.yaml (next to the adapter
    named in care_merge.json, or `train/` beside the merged folder as `care demo` lays it out), the pipeline's
    recipe.yaml, then the original recipe file. Relative data paths resolve against the original recipe's
    folder when care_merge.json records it, as they did in training.
    """
    import yaml

    from care.train.config import recipe_from_dict

    # Only the recipe's whereabouts are needed here, so no key is required.
    prov = read_if_present(read_merge_info, model_dir, MERGE_INFO, required=(),
                           otherwise="looking for the recipe beside the model instead")
    original = Path(prov["recipe_path"]) if isinstance(prov.get("recipe_path"), str) else None
    candidates: list[Path] = []
    if isinstance(prov.get("adapter"), str):
        candidates.append(Path(prov["adapter"]).parent / "resolved_config.yaml")
    candidates += [model_dir.parent / "train" / "resolved_config.yaml", model_dir.parent / "recipe.yaml"]
    if original is not None:
        candidates.append(original)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            anchor = original if original is not None and original.parent.is_dir() else path.resolve()
            recipe = recipe_from_dict(raw, path=anchor)
        except (OSError, yaml.YAMLError, CareError) as exc:
            msg = exc.one_line() if isinstance(exc, CareError) else str(exc)
            raise ConfigError(f"The model's recipe cannot be read ({msg})", path=path,
                              hint="Fix it, or pass --calibration FILE (.txt or .jsonl of training rows)") from exc
        log.info("Calibration from the recipe %s (%s)", recipe.name, path)
        return recipe
    return None


def recipe_records(recipe) -> list:
    """The recipe's training rows (deduplicated, balanced and split exactly as training did; all stages)."""
    from care.train.data import build_data, dedupe

    bundle = build_data(recipe.data, resolve=recipe.resolve_path)
    return dedupe([r for stage in bundle.stages for r in stage.train])


def file_records(path: Path) -> list:
    from care.train.readers import BadRows, read_source

    bad = BadRows()
    records = read_source(path, None, bad)
    if not records:
        reason = f" ({bad.rows[0]})" if bad.rows else ""
        raise DataError(f"No usable rows in the calibration file{reason}", path=path,
                        hint="Rows need query/response (or messages) fields, or pass a plain .txt file")
    if bad.rows:
        log.warning("Calibration file %s: %d bad rows skipped (first: %s)", path, len(bad.rows), bad.rows[0])
    return records


def render_records(records: Sequence, tokenizer, seed: int = 0) -> list[str]:
    """Each record as the conversation the model will serve: its domain's system prompt and the model's own
    chat template (plain "query\\nresponse" when the model has none). Shuffled with a fixed seed so the
    first chunks cover every domain, not just the first file's."""
    from care.train.formatting import to_messages

    has_template = bool(getattr(tokenizer, "chat_template", None))
    texts = []
    for rec in records:
        msgs = to_messages(rec)
        if not has_template:
            texts.append("\n".join(m["content"] for m in msgs) + "\n\n")
            continue
        try:
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
        except Exception:  # a template that rejects a system turn (Gemma-style): serve it without one
            texts.append(tokenizer.apply_chat_template([m for m in msgs if m["role"] != "system"], tokenize=False))
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order]


def calibration_text(model_dir: str | Path, calibration: str | Path | None = None,
                     max_tokens: int | None = None) -> Calibration:
    """The calibration text for `model_dir`: `calibration` when given, else the recipe's training rows.

    `max_tokens` keeps whole conversations up to about that many tokens (what the bounded chunks can use),
    so the recorded hash names the text that was actually measured."""
    from care.export.hf_source import hf_tokenizer

    model_dir = Path(model_dir).expanduser()
    tokenizer = hf_tokenizer(model_dir)
    if calibration is not None:
        path = Path(calibration).expanduser()
        if not path.is_file():
            raise DataError("Calibration file not found", path=path,
                            hint="Pass a .txt file, or a .jsonl of rows with query/response (or messages)")
        if path.suffix.lower() == ".txt":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"The calibration text is not UTF-8 (byte {exc.start})", path=path,
                                hint="Re-save it as UTF-8") from exc
            parts, source, rows = [text], path.name, 0
        else:
            parts = render_records(file_records(path), tokenizer)
            source, rows = path.name, len(parts)
    else:
        recipe = find_recipe(model_dir)
        if recipe is None:
            raise DataError("No recipe found for this model to calibrate on", path=model_dir,
                            hint="Pass --calibration FILE (.txt, or .jsonl rows like the training data)")
        parts = render_records(recipe_records(recipe), tokenizer)
        source, rows = f"recipe {recipe.name}", len(parts)
    kept: list[str] = []
    total = 0
    for part in parts:
        n = len(tokenizer(part, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and kept and total + n > max_tokens:
            break
        kept.append(part)
        total += n
    if rows:
        rows = len(kept)
    if total < 2 * MIN_CTX:
        raise DataError(f"The calibration text is too short ({total} tokens; at least {2 * MIN_CTX})",
                        path=calibration or model_dir, hint="Pass --calibration FILE with more text")
    return Calibration(text="".join(kept), source=source, rows=rows, tokens=total)


def chunk_ctx(tokens: int, n_ctx: int = DEFAULT_CTX) -> int:
    """The largest chunk size <= n_ctx (a multiple of 32) that leaves llama-imatrix its two chunks, with a
    margin for small tokenizer differences."""
    fit = int(tokens * 0.95) // 2 // 32 * 32
    return max(MIN_CTX, min(n_ctx, fit))


# --------------------------------------------------------------------------------------------------------
# The tools


def imatrix_tools(progress: Callable[[str, int, int], None] | None = None) -> dict[str, Path]:
    """llama-imatrix and llama-quantize, built once (minutes) from the binding's llama.cpp source."""
    from care.toolchain.llamacpp import build_tools, find_tools

    found = find_tools(TOOLS)
    if found:
        return found
    log.info("Building llama-imatrix and llama-quantize from llama.cpp's source (once; a few minutes)")
    if progress:
        progress("build llama.cpp tools", 0, 1)
    try:
        tools = build_tools(TOOLS)
    except CareError as exc:
        raise ExportError(f"Cannot build llama-imatrix / llama-quantize ({exc.one_line()})", hint=SETUP_HINT) from exc
    if progress:
        progress("build llama.cpp tools", 1, 1)
    return tools


def run_tool(cmd: Sequence[str | Path], what: str, path: Path,
             on_line: Callable[[str], None] | None = None, cwd: Path | None = None) -> list[str]:
    """Run a llama.cpp tool (care.proc.run_tool), streaming its log to `on_line`; a failure is one ExportError
    line carrying the tool's own error message. Returns the tail of its output."""
    try:
        return proc.run_tool(cmd, what=what, on_line=on_line, cwd=cwd, path=path, hint=RUN_HINT).lines
    except ToolError as exc:
        if exc.returncode is None:  # it never ran: not built, or not executable
            raise ExportError(exc.message, path=exc.path, hint=SETUP_HINT) from exc
        raise ExportError(exc.message, path=path, hint=RUN_HINT) from exc


def compute_imatrix(f16_path: Path, calibration: Calibration, out_path: Path, *, tool: Path,
                    n_threads: int | None = None, chunks: int = DEFAULT_CHUNKS, n_ctx: int = DEFAULT_CTX,
                    progress: Callable[[str, int, int], None] | None = None) -> Imatrix:
    """Run llama-imatrix on `f16_path` over `calibration` (at most `chunks` chunks of `n_ctx` tokens) and save
    the matrix to `out_path` (temp file + rename)."""
    if n_threads is None:
        from care.system import default_threads

        n_threads = default_threads()
    ctx = chunk_ctx(calibration.tokens, n_ctx)
    n_chunks = max(1, min(chunks, calibration.tokens // ctx))
    t0 = time.perf_counter()
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix=".calibration-", dir=out_path.parent) as td:
        # The text is not kept beside the export (it is the user's training data; the manifest has its hash),
        # and llama-imatrix stores the -f name in the matrix: a bare name, never this machine's path.
        (Path(td) / "calibration.txt").write_text(calibration.text, encoding="utf-8")
        if progress:
            progress("imatrix", 0, n_chunks)

        def on_line(line: str) -> None:
            if progress and "seconds per pass" in line:
                progress("imatrix", 1, n_chunks)  # llama-imatrix logs only the first pass's ETA without --ppl

        # -b n_ctx: one sequence per batch, so the KV cache is one chunk (n_batch 2048 would hold 4).
        run_tool([tool, "-m", f16_path.resolve(), "-f", "calibration.txt", "-o", tmp.resolve(), "-c", str(ctx),
                  "-b", str(ctx), "--chunks", str(n_chunks), "-t", str(n_threads), "-tb", str(n_threads),
                  "--parse-special", "--no-ppl", "--output-frequency", str(n_chunks)], "llama-imatrix", f16_path,
                 on_line, cwd=Path(td))
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ExportError("llama-imatrix wrote no importance matrix", path=f16_path,
                              hint="CARE_DEBUG=1 shows its log")
    if progress:
        progress("imatrix", n_chunks, n_chunks)
    return Imatrix(path=out_path, calibration=calibration, chunks=n_chunks, n_ctx=ctx,
                   seconds=time.perf_counter() - t0)
