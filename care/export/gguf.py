"""`care export gguf`: merged HF folder -> verified GGUFs + manifest.json + Ollama Modelfile.

Steps: llama.cpp's converter writes an f16 GGUF (lazily, so peak memory stays near one tensor at a time plus
the output buffer), llama.cpp's quantizer makes every requested type from it in one worker, then each file is
verified against the HF model (care.export.verify). Every file is written to a temp name and renamed when
complete; manifest.json is written last, so a folder without it is an unfinished export.

With `imatrix=True` an importance matrix is computed on the recipe's training text (care.export.imatrix) and
every quantized type is made with it by llama.cpp's llama-quantize; the same types are also made without it
(in a temp folder, deleted after verification) so verify.json reports KL and top-1 with and without.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import MANIFEST, file_records, gguf_manifest, public_name, source_record
from care.export.converter import convert_to_gguf, inspect_model_dir, llama_cpp_version
from care.export.quantize import (
    FLOAT_TYPES,
    K_QUANT_BLOCK,
    is_k_quant,
    normalize_quant,
    quantize_many,
    quantize_with_tool,
    uses_256_blocks,
)
from care.io import make_readable, write_json, write_text

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
    imatrix: dict[str, Any] | None = None  # the manifest's imatrix record (file, calibration hash, chunks)


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
    imatrix: bool = False,
    calibration: str | os.PathLike[str] | None = None,
    imatrix_chunks: int | None = None,
    compare: bool = True,
) -> ExportResult:
    """Convert `model_dir` (a merged HF folder) to GGUF files in `out_dir`, one per quant type, verified.

    `imatrix`: quantize with an importance matrix computed on `calibration` (a file; default: the recipe's
    training rows) over at most `imatrix_chunks` chunks; `compare` also verifies each type made without it.

    Raises ExportError/InvalidModelError on bad input, VerificationError (after writing verify.json and the
    manifest, marked unverified) when a file does not match the source within tolerance.
    """
    t_start = time.perf_counter()
    src = inspect_model_dir(model_dir)
    wanted = list(dict.fromkeys(normalize_quant(q) for q in quants)) or ["q4_k_m"]
    if (imatrix or calibration is not None) and all(q in FLOAT_TYPES for q in wanted):
        from care.errors import UsageError

        raise UsageError("--imatrix only changes quantized types, and only float types were asked for",
                         hint="Add a quantized type, e.g. --q4_k_m or --iq4_xs")
    imatrix = imatrix or calibration is not None
    tools: dict[str, Path] = {}
    calib = None
    if imatrix:  # before any conversion: a missing recipe or compiler fails in seconds, not after minutes
        from care.export.imatrix import DEFAULT_CHUNKS, DEFAULT_CTX, calibration_text, imatrix_tools

        imatrix_chunks = imatrix_chunks or DEFAULT_CHUNKS
        calib = calibration_text(src.path, calibration, max_tokens=int(imatrix_chunks * DEFAULT_CTX * 1.1))
        tools = imatrix_tools(progress=progress)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is not a finished export until rewritten
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
    plain_dir = out / f".{slug}-no-imatrix"  # comparison files, removed after verification
    plain: dict[str, Path] = {}
    imx_record: dict[str, Any] | None = None
    try:
        for q in floats:
            t0 = time.perf_counter()
            files[q] = out / f"{slug}-{q}.gguf"
            info = convert_to_gguf(src, files[q], outtype=q, name=model_name, progress=stage_progress(f"convert {q}"))
            make_readable(files[q])
            seconds[f"convert_{q}"] = time.perf_counter() - t0
        qres: dict[str, Any] = {}
        n_matrices = 0
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
            on_quant = (lambda q, i, n: progress(f"quantize {q}", i, n)) if progress else None
            if imatrix:
                from care.export.imatrix import compute_imatrix

                assert calib is not None
                imx = compute_imatrix(base, calib, out / f"{slug}.imatrix", tool=tools["llama-imatrix"],
                                      n_threads=n_threads, chunks=imatrix_chunks or 0, progress=progress)
                make_readable(imx.path)
                imx_record = imx.record()
                seconds["imatrix"] = imx.seconds
                t0 = time.perf_counter()
                qres = quantize_with_tool(base, targets, tools["llama-quantize"], imx.path, n_threads=n_threads,
                                          progress=on_quant)
                if verify and compare:
                    shutil.rmtree(plain_dir, ignore_errors=True)
                    plain_dir.mkdir()
                    plain = {q: plain_dir / f"{slug}-{q}.gguf" for q in quantized}
                    quantize_many(base, plain, n_threads=n_threads,
                                  progress=(lambda q, i, n: progress(f"quantize {q} (plain)", i, n)) if progress
                                  else None)
            else:
                qres = quantize_many(base, targets, n_threads=n_threads, progress=on_quant)
            seconds["quantize"] = time.perf_counter() - t0
            files.update({q: targets[q] for q in quantized})
            n_matrices = _count_matrices(base)
    except BaseException:
        shutil.rmtree(plain_dir, ignore_errors=True)
        raise
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
            family = "k-quants" if is_k_quant(q) else q.upper()
            note = (f"{q.upper()}: {r.fallback_tensors} of {n_matrices} weight matrices have rows not divisible "
                    f"by the {K_QUANT_BLOCK}-wide {family} block and use {kinds} instead")
            if uses_256_blocks(q) and r.fallback_tensors * 2 >= n_matrices:
                note += f" - this model is too narrow for {family}, so the file is mostly the fallback type"
            notes.append(note)
    eot = info.get("eot")

    report: dict[str, Any] | None = None
    verify_error: Exception | None = None
    if verify:
        from care.errors import VerificationError
        from care.export.verify import verify_many

        t0 = time.perf_counter()
        labels = {**files, **{q + PLAIN_SUFFIX: p for q, p in plain.items()}}
        try:
            report = verify_many(labels, src.path, n_threads=n_threads, fail=False,
                                 quants={label: label.removesuffix(PLAIN_SUFFIX) for label in labels},
                                 **(verify_kwargs or {}))
            for label, path in labels.items():  # the with/without rows compare size too
                report["files"][label]["file_bytes"] = path.stat().st_size
        finally:
            seconds["verify"] = time.perf_counter() - t0
            shutil.rmtree(plain_dir, ignore_errors=True)
        if imatrix:
            imatrix_comparison(report, quantized)
        write_json(out / "verify.json", report)
        if not report["passed"]:
            verify_error = VerificationError(
                "Verification failed: " + "; ".join(report["failures"][:3]), path=out / "verify.json",
                hint="The files are kept but marked unverified in manifest.json; see verify.json")

    # Modelfile
    from care.export.modelfile import default_system_prompt, detect_format, render_modelfile

    template, system = _hf_template_and_system(src.path)
    # A degraded Modelfile still works, but the user must hear of it: a note in the manifest, printed by the CLI.
    if detect_format(template) is None:
        notes.append("Modelfile: no known chat template in the HF model, so Ollama uses the one stored in the "
                     "GGUF (check `ollama run` answers in turns)")
    if not eot:
        notes.append("Modelfile: no end-of-turn token found, so it sets no stop for it (Ollama may run past the "
                     "end of a reply; add `PARAMETER stop` by hand)")
    primary = _primary(wanted)
    modelfile = out / "Modelfile"
    write_text(modelfile, render_modelfile(
        files[primary].name, template, extra_stops=[eot[1]] if eot else None,
        system=default_system_prompt(system, detect_format(template)),
        others=[files[q].name for q in wanted if q != primary]))

    seconds["total"] = time.perf_counter() - t_start
    manifest = gguf_manifest(
        source=source_record(src.path, src.architecture, src.provenance),
        files=file_records([files[q] for q in wanted], **{files[q].name: {
            "quant": q, "fallback_tensors": fallback.get(q, 0), "total_tensors": totals.get(q),
            "imatrix": bool(imx_record) and q in quantized} for q in wanted}),
        name=model_name,
        converter={"llama_cpp_python": llama_cpp_version(), "script": "convert_hf_to_gguf.py"},
        primary=files[primary].name,
        end_of_turn={"id": eot[0], "token": eot[1]} if eot else None,
        notes=notes,
        verified=None if report is None else report["passed"],
        verify_report="verify.json" if report is not None else None,
        imatrix=imx_record,
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    write_json(out / "export_config.json", {
        "model_dir": public_name(str(src.path.resolve())), "out_dir": public_name(str(out.resolve())), "quants": wanted, "verify": verify,
        "name": name, "n_threads": n_threads, "verify_kwargs": verify_kwargs or {}, "imatrix": imatrix,
        "calibration": public_name(str(calibration)) if calibration is not None else None,
        "imatrix_chunks": imatrix_chunks})
    manifest_path = write_json(out / MANIFEST, manifest)
    for path in (out / "export_config.json", out / "verify.json", modelfile, manifest_path):
        make_readable(path)
    result = ExportResult(files=files, manifest_path=manifest_path, verify_report=report,
                          fallback_tensors=fallback, total_tensors=totals, modelfile_path=modelfile,
                          name=model_name, notes=notes, seconds=seconds, imatrix=imx_record)
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
