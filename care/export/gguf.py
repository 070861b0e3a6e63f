"""`care export gguf`: merged HF folder -> verified GGUFs + manifest.json + Ollama Modelfile.

Steps: llama.cpp's converter writes an f16 GGUF (lazily, so peak memory stays near one tensor at a time plus
the output buffer), llama.cpp's quantizer makes every requested type from it in one worker, then each file is
verified against the HF model (care.export.verify). Every file is written to a temp name and renamed when
complete; manifest.json is written last, so a folder without it is an unfinished export.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.export.converter import convert_to_gguf, inspect_model_dir, llama_cpp_version
from care.export.manifest import file_records, public_name, source_record
from care.export.manifest import manifest as make_manifest
from care.export.quantize import (
    FLOAT_TYPES,
    K_QUANT_BLOCK,
    is_k_quant,
    make_readable,
    normalize_quant,
    quantize_many,
)
from care.io import write_json, write_text

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ExportResult:
    files: dict[str, Path]  # quant -> GGUF path
    manifest_path: Path
    verify_report: dict[str, Any] | None
    fallback_tensors: dict[str, int] = field(default_factory=dict)  # quant -> tensors not in the k-quant type
    total_tensors: dict[str, int] = field(default_factory=dict)
    modelfile_path: Path | None = None
    name: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _primary(quants: Sequence[str]) -> str:
    """The file the Modelfile points at: q4_k_m when made (the phone/laptop default), else the first."""
    return "q4_k_m" if "q4_k_m" in quants else quants[0]


def export_gguf(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quants: Sequence[str] = ("q4_k_m",),
    verify: bool = True,
    name: str | None = None,
    n_threads: int | None = None,
    progress: Progress | None = None,
    verify_kwargs: dict[str, Any] | None = None,
) -> ExportResult:
    """Convert `model_dir` (a merged HF folder) to GGUF files in `out_dir`, one per quant type, verified.

    Raises ExportError/InvalidModelError on bad input, VerificationError (after writing verify.json and the
    manifest, marked unverified) when a file does not match the source within tolerance.
    """
    t_start = time.perf_counter()
    src = inspect_model_dir(model_dir)
    wanted = list(dict.fromkeys(normalize_quant(q) for q in quants)) or ["q4_k_m"]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the folder is not a finished export until rewritten
    seconds: dict[str, float] = {}

    def stage_progress(stage: str) -> Callable[[str], None] | None:
        if progress is None:
            return None

        def on_line(line: str) -> None:
            m = re.search(r"(\d+)%\|", line)  # tqdm's "Writing:  45%|####  | 3.70M/8.21M [...]"
            if m:
                progress(stage, int(m.group(1)), 100)

        return on_line

    from care.export.converter import gguf_name

    model_name = gguf_name(src, name)
    slug = _slug(model_name)
    files: dict[str, Path] = {}
    floats = [q for q in wanted if q in FLOAT_TYPES]
    quantized = [q for q in wanted if q not in FLOAT_TYPES]
    info: dict[str, Any] = {}
    intermediate: Path | None = None
    try:
        for q in floats:
            t0 = time.perf_counter()
            files[q] = out / f"{slug}-{q}.gguf"
            info = convert_to_gguf(src, files[q], outtype=q, name=model_name, progress=stage_progress(f"convert {q}"))
            make_readable(files[q])
            seconds[f"convert_{q}"] = time.perf_counter() - t0
        if quantized:
            base = files.get("f16") or files.get("bf16") or files.get("f32")
            if base is None:
                intermediate = out / f".{slug}-f16.intermediate.gguf"
                t0 = time.perf_counter()
                info = convert_to_gguf(src, intermediate, outtype="f16", name=model_name,
                                       progress=stage_progress("convert f16"))
                seconds["convert_f16"] = time.perf_counter() - t0
                base = intermediate
            t0 = time.perf_counter()
            targets = {q: out / f"{slug}-{q}.gguf" for q in quantized}
            qres = quantize_many(base, targets, n_threads=n_threads,
                                 progress=(lambda q, i, n: progress(f"quantize {q}", i, n)) if progress else None)
            seconds["quantize"] = time.perf_counter() - t0
            files.update({q: targets[q] for q in quantized})
            n_matrices = _count_matrices(base)
        else:
            qres, n_matrices = {}, 0
    finally:
        if intermediate is not None:
            intermediate.unlink(missing_ok=True)
    files = {q: files[q] for q in wanted}
    fallback = {q: r.fallback_tensors for q, r in qres.items()}
    totals = {q: r.total_tensors for q, r in qres.items()}
    notes = list(info.get("notes", []))
    for q, r in qres.items():
        if r.fallback_tensors:
            kinds = ", ".join(f"{n}x {t.upper()}" for t, n in r.fallback_types.items()) or "a 32-block type"
            note = (f"{q.upper()}: {r.fallback_tensors} of {n_matrices} weight matrices have rows not divisible "
                    f"by the {K_QUANT_BLOCK}-wide k-quant block and use {kinds} instead")
            if is_k_quant(q) and r.fallback_tensors * 2 >= n_matrices:
                note += " - this model is too narrow for k-quants, so the file is mostly the fallback type"
            notes.append(note)
    eot = info.get("eot")

    report: dict[str, Any] | None = None
    verify_error: Exception | None = None
    if verify:
        from care.errors import VerificationError
        from care.export.verify import verify_many

        t0 = time.perf_counter()
        try:
            report = verify_many(files, src.path, n_threads=n_threads, fail=False, **(verify_kwargs or {}))
        finally:
            seconds["verify"] = time.perf_counter() - t0
        write_json(out / "verify.json", report)
        if not report["passed"]:
            verify_error = VerificationError(
                "Verification failed: " + "; ".join(report["failures"][:3]), path=out / "verify.json",
                hint="The files are kept but marked unverified in manifest.json; see verify.json")

    # Modelfile
    from care.export.modelfile import default_system_prompt, detect_format, render_modelfile

    template, system = _hf_template_and_system(src.path)
    primary = _primary(wanted)
    modelfile = out / "Modelfile"
    write_text(modelfile, render_modelfile(
        files[primary].name, template, extra_stops=[eot[1]] if eot else None,
        system=default_system_prompt(system, detect_format(template)),
        others=[files[q].name for q in wanted if q != primary]))

    seconds["total"] = time.perf_counter() - t_start
    manifest = make_manifest(
        "care-export-gguf/1",
        source_record(src.path, src.architecture, src.provenance),
        file_records([files[q] for q in wanted], **{files[q].name: {
            "quant": q, "fallback_tensors": fallback.get(q, 0), "total_tensors": totals.get(q)} for q in wanted}),
        name=model_name,
        converter={"llama_cpp_python": llama_cpp_version(), "script": "convert_hf_to_gguf.py"},
        primary=files[primary].name,
        end_of_turn={"id": eot[0], "token": eot[1]} if eot else None,
        notes=notes,
        verified=None if report is None else report["passed"],
        verify_report="verify.json" if report is not None else None,
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    write_json(out / "export_config.json", {
        "model_dir": public_name(str(src.path.resolve())), "out_dir": public_name(str(out.resolve())), "quants": wanted, "verify": verify,
        "name": name, "n_threads": n_threads, "verify_kwargs": verify_kwargs or {}})
    manifest_path = write_json(out / "manifest.json", manifest)
    for path in (out / "export_config.json", out / "verify.json", modelfile, manifest_path):
        make_readable(path)
    result = ExportResult(files=files, manifest_path=manifest_path, verify_report=report,
                          fallback_tensors=fallback, total_tensors=totals, modelfile_path=modelfile,
                          name=model_name, notes=notes, seconds=seconds)
    if verify_error is not None:
        verify_error.result = result  # type: ignore[attr-defined] - the CLI prints the table before failing
        raise verify_error
    return result


def _count_matrices(path: Path) -> int:
    """Number of 2-D weight tensors (the ones the quantizer may quantize)."""
    import gguf

    return sum(1 for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) >= 2 and t.shape[1] > 1)


def _hf_template_and_system(model_dir: Path) -> tuple[str | None, str | None]:
    """The HF chat template and a rendering of a system-less conversation (to find a default system prompt)."""
    try:
        from care.export.converter import hf_tokenizer

        tok = hf_tokenizer(model_dir)
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        if not template:
            return None, None
        rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
        return template, rendered
    except Exception as exc:  # a model without a usable template still exports; Ollama uses the GGUF's
        log.info("No HF chat template for the Modelfile (%s)", exc)
        return None, None


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "manifest.json").read_text(encoding="utf-8"))
