"""`care export gguf`: merged HF folder -> verified GGUFs + manifest.json + Ollama Modelfile.

`export_gguf(...)` builds a `GgufPlan` from its options, checked before anything is written (quant names, an
imatrix without quantized types, the calibration text and llama.cpp tools), then runs the steps over a
`GgufRun`: stage the folder, convert, imatrix, quantize, verify, write the Modelfile and manifest.

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
from care.errors import UsageError, VerificationError
from care.export.converter import convert_to_gguf, gguf_name
from care.export.hf_source import ModelSource, inspect_model_dir
from care.export.imatrix import PLAIN_SUFFIX, imatrix_comparison
from care.export.quantize import (
    FLOAT_TYPES,
    K_QUANT_BLOCK,
    QuantResult,
    is_k_quant,
    normalize_quant,
    quantize_many,
    quantize_with_tool,
    uses_256_blocks,
)
from care.export.reference import hf_template_and_system
from care.gguf_file import read_header
from care.io import make_readable, write_json, write_text
from care.toolchain.llamacpp.converter_setup import llama_cpp_version

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


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _primary(quants: Sequence[str]) -> str:
    """The file the Modelfile points at: q4_k_m when made (the phone/laptop default), else the first."""
    return "q4_k_m" if "q4_k_m" in quants else quants[0]


@dataclass
class GgufPlan:
    """What one `care export gguf` will do, from its options, validated before the first file is written."""

    src: ModelSource
    out: Path
    wanted: list[str]  # every type, in the order asked (deduplicated)
    model_name: str  # general.name in the GGUFs
    verify: bool = True
    name: str | None = None  # the --name option as given
    n_threads: int | None = None
    progress: Progress | None = None
    verify_kwargs: dict[str, Any] = field(default_factory=dict)
    imatrix: bool = False
    calibration: str | os.PathLike[str] | None = None  # the --calibration option as given
    imatrix_chunks: int | None = None
    compare: bool = True  # with an imatrix: also make and verify each type without it
    calib: Any = None  # care.export.imatrix.Calibration when imatrix
    tools: dict[str, Path] = field(default_factory=dict)  # llama-imatrix, llama-quantize when imatrix

    @property
    def slug(self) -> str:
        return _slug(self.model_name)

    @property
    def floats(self) -> list[str]:
        return [q for q in self.wanted if q in FLOAT_TYPES]

    @property
    def quantized(self) -> list[str]:
        return [q for q in self.wanted if q not in FLOAT_TYPES]

    @property
    def plain_dir(self) -> Path:
        """Where the comparison files without the imatrix go (removed after verification)."""
        return self.out / f".{self.slug}-no-imatrix"

    def path(self, quant: str) -> Path:
        return self.out / f"{self.slug}-{quant}.gguf"

    def stage_progress(self, stage: str) -> Callable[[str], None] | None:
        """A converter-output callback turning tqdm's percentages into progress(stage, pct, 100)."""
        progress = self.progress
        if progress is None:
            return None

        def on_line(line: str) -> None:
            m = re.search(r"(\d+)%\|", line)  # tqdm's "Writing:  45%|####  | 3.70M/8.21M [...]"
            if m:
                progress(stage, int(m.group(1)), 100)

        return on_line


def plan_export(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                quants: Sequence[str] = ("q4_k_m",), verify: bool = True, name: str | None = None,
                n_threads: int | None = None, progress: Progress | None = None,
                verify_kwargs: dict[str, Any] | None = None, imatrix: bool = False,
                calibration: str | os.PathLike[str] | None = None, imatrix_chunks: int | None = None,
                compare: bool = True) -> GgufPlan:
    """The plan for export_gguf's options; raises on bad input before anything is converted."""
    src = inspect_model_dir(model_dir)
    wanted = list(dict.fromkeys(normalize_quant(q) for q in quants)) or ["q4_k_m"]
    if (imatrix or calibration is not None) and all(q in FLOAT_TYPES for q in wanted):
        raise UsageError("--imatrix only changes quantized types, and only float types were asked for",
                         hint="Add a quantized type, e.g. --q4_k_m or --iq4_xs")
    plan = GgufPlan(src=src, out=Path(out_dir).expanduser(), wanted=wanted, model_name=gguf_name(src, name),
                    verify=verify, name=name, n_threads=n_threads, progress=progress,
                    verify_kwargs=dict(verify_kwargs or {}), imatrix=imatrix or calibration is not None,
                    calibration=calibration, imatrix_chunks=imatrix_chunks, compare=compare)
    if plan.imatrix:  # before any conversion: a missing recipe or compiler fails in seconds, not after minutes
        from care.export.imatrix import DEFAULT_CHUNKS, DEFAULT_CTX, calibration_text, imatrix_tools

        plan.imatrix_chunks = imatrix_chunks or DEFAULT_CHUNKS
        plan.calib = calibration_text(src.path, calibration, max_tokens=int(plan.imatrix_chunks * DEFAULT_CTX * 1.1))
        plan.tools = imatrix_tools(progress=progress)
    return plan


@dataclass
class GgufRun:
    """What the steps have made so far."""

    files: dict[str, Path] = field(default_factory=dict)  # quant -> GGUF
    info: dict[str, Any] = field(default_factory=dict)  # the last conversion's info (notes, eot)
    seconds: dict[str, float] = field(default_factory=dict)
    base: Path | None = None  # the float GGUF the quantizer reads
    intermediate: Path | None = None  # a temporary f16 when no float type was asked for
    quant_results: dict[str, QuantResult] = field(default_factory=dict)
    n_matrices: int = 0
    imatrix_path: Path | None = None
    imatrix_record: dict[str, Any] | None = None
    plain: dict[str, Path] = field(default_factory=dict)  # quant -> comparison file without the imatrix
    notes: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None
    verify_error: VerificationError | None = None
    modelfile: Path | None = None


def stage_output(plan: GgufPlan) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / MANIFEST).unlink(missing_ok=True)  # the folder is not a finished export until rewritten


def convert(plan: GgufPlan, run: GgufRun) -> None:
    """Each float type straight from the converter; then the f16 base the quantizer reads (a temporary one
    when no float type was asked for)."""
    for q in plan.floats:
        t0 = time.perf_counter()
        run.files[q] = plan.path(q)
        run.info = convert_to_gguf(plan.src, run.files[q], outtype=q, name=plan.model_name,
                                   progress=plan.stage_progress(f"convert {q}"))
        make_readable(run.files[q])
        run.seconds[f"convert_{q}"] = time.perf_counter() - t0
    if not plan.quantized:
        return
    run.base = run.files.get("f16") or run.files.get("bf16") or run.files.get("f32")
    if run.base is None:
        run.intermediate = plan.out / f".{plan.slug}-f16.intermediate.gguf"
        t0 = time.perf_counter()
        run.info = convert_to_gguf(plan.src, run.intermediate, outtype="f16", name=plan.model_name,
                                   progress=plan.stage_progress("convert f16"))
        run.seconds["convert_f16"] = time.perf_counter() - t0
        run.base = run.intermediate


def make_imatrix(plan: GgufPlan, run: GgufRun) -> None:
    from care.export.imatrix import compute_imatrix

    assert run.base is not None and plan.calib is not None
    imx = compute_imatrix(run.base, plan.calib, plan.out / f"{plan.slug}.imatrix", tool=plan.tools["llama-imatrix"],
                          n_threads=plan.n_threads, chunks=plan.imatrix_chunks or 0, progress=plan.progress)
    make_readable(imx.path)
    run.imatrix_path, run.imatrix_record = imx.path, imx.record()
    run.seconds["imatrix"] = imx.seconds


def quantize(plan: GgufPlan, run: GgufRun) -> None:
    """Every quantized type from the base (with the imatrix through llama-quantize, and then without it for the
    comparison when verifying)."""
    assert run.base is not None
    progress = plan.progress
    t0 = time.perf_counter()
    targets = {q: plan.path(q) for q in plan.quantized}
    on_quant = (lambda q, i, n: progress(f"quantize {q}", i, n)) if progress else None
    if plan.imatrix:
        run.quant_results = quantize_with_tool(run.base, targets, plan.tools["llama-quantize"], run.imatrix_path,
                                               n_threads=plan.n_threads, progress=on_quant)
        if plan.verify and plan.compare:
            shutil.rmtree(plan.plain_dir, ignore_errors=True)
            plan.plain_dir.mkdir()
            run.plain = {q: plan.plain_dir / f"{plan.slug}-{q}.gguf" for q in plan.quantized}
            quantize_many(run.base, run.plain, n_threads=plan.n_threads,
                          progress=(lambda q, i, n: progress(f"quantize {q} (plain)", i, n)) if progress else None)
    else:
        run.quant_results = quantize_many(run.base, targets, n_threads=plan.n_threads, progress=on_quant)
    run.seconds["quantize"] = time.perf_counter() - t0
    run.files.update(targets)
    run.n_matrices = count_matrices(run.base)


def fallback_notes(plan: GgufPlan, run: GgufRun) -> list[str]:
    """One note per type whose narrow rows fell back from its 256-wide blocks to a 32-block type."""
    notes = []
    for q, r in run.quant_results.items():
        if r.fallback_tensors:
            kinds = ", ".join(f"{n}x {t.upper()}" for t, n in r.fallback_types.items()) or "a 32-block type"
            family = "k-quants" if is_k_quant(q) else q.upper()
            note = (f"{q.upper()}: {r.fallback_tensors} of {run.n_matrices} weight matrices have rows not divisible "
                    f"by the {K_QUANT_BLOCK}-wide {family} block and use {kinds} instead")
            if uses_256_blocks(q) and r.fallback_tensors * 2 >= run.n_matrices:
                note += f" - this model is too narrow for {family}, so the file is mostly the fallback type"
            notes.append(note)
    return notes


def verify_files(plan: GgufPlan, run: GgufRun) -> None:
    """Every file (and the comparison files without the imatrix) against the HF model; verify.json."""
    from care.export.verify import verify_many

    t0 = time.perf_counter()
    labels = {**run.files, **{q + PLAIN_SUFFIX: p for q, p in run.plain.items()}}
    try:
        report = verify_many(labels, plan.src.path, n_threads=plan.n_threads, fail=False,
                             quants={label: label.removesuffix(PLAIN_SUFFIX) for label in labels},
                             **plan.verify_kwargs)
        for label, path in labels.items():  # the with/without rows compare size too
            report["files"][label]["file_bytes"] = path.stat().st_size
    finally:
        run.seconds["verify"] = time.perf_counter() - t0
        shutil.rmtree(plan.plain_dir, ignore_errors=True)
    if plan.imatrix:
        imatrix_comparison(report, plan.quantized)
    write_json(plan.out / "verify.json", report)
    run.report = report
    if not report["passed"]:
        run.verify_error = VerificationError(
            "Verification failed: " + "; ".join(report["failures"][:3]), path=plan.out / "verify.json",
            hint="The files are kept but marked unverified in manifest.json; see verify.json")


def write_modelfile(plan: GgufPlan, run: GgufRun) -> None:
    from care.export.modelfile import default_system_prompt, detect_format, render_modelfile

    eot = run.info.get("eot")
    template, system = hf_template_and_system(plan.src.path)
    # A degraded Modelfile still works, but the user must hear of it: a note in the manifest, printed by the CLI.
    if detect_format(template) is None:
        run.notes.append("Modelfile: no known chat template in the HF model, so Ollama uses the one stored in the "
                         "GGUF (check `ollama run` answers in turns)")
    if not eot:
        run.notes.append("Modelfile: no end-of-turn token found, so it sets no stop for it (Ollama may run past the "
                         "end of a reply; add `PARAMETER stop` by hand)")
    primary = _primary(plan.wanted)
    run.modelfile = plan.out / "Modelfile"
    write_text(run.modelfile, render_modelfile(
        run.files[primary].name, template, extra_stops=[eot[1]] if eot else None,
        system=default_system_prompt(system, detect_format(template)),
        others=[run.files[q].name for q in plan.wanted if q != primary]))


def write_manifest(plan: GgufPlan, run: GgufRun) -> Path:
    """export_config.json, then manifest.json (last: it marks the export finished)."""
    out, src, files, eot = plan.out, plan.src, run.files, run.info.get("eot")
    results = run.quant_results
    manifest = gguf_manifest(
        source=source_record(src.path, src.architecture, src.provenance),
        files=file_records([files[q] for q in plan.wanted], **{files[q].name: {
            "quant": q, "fallback_tensors": results[q].fallback_tensors if q in results else 0,
            "total_tensors": results[q].total_tensors if q in results else None,
            "imatrix": bool(run.imatrix_record) and q in plan.quantized} for q in plan.wanted}),
        name=plan.model_name,
        converter={"llama_cpp_python": llama_cpp_version(), "script": "convert_hf_to_gguf.py"},
        primary=files[_primary(plan.wanted)].name,
        end_of_turn={"id": eot[0], "token": eot[1]} if eot else None,
        notes=run.notes,
        verified=None if run.report is None else run.report["passed"],
        verify_report="verify.json" if run.report is not None else None,
        imatrix=run.imatrix_record,
        seconds={k: round(v, 2) for k, v in run.seconds.items()},
    )
    write_json(out / "export_config.json", {
        "model_dir": public_name(str(src.path.resolve())), "out_dir": public_name(str(out.resolve())),
        "quants": plan.wanted, "verify": plan.verify, "name": plan.name, "n_threads": plan.n_threads,
        "verify_kwargs": plan.verify_kwargs, "imatrix": plan.imatrix,
        "calibration": public_name(str(plan.calibration)) if plan.calibration is not None else None,
        "imatrix_chunks": plan.imatrix_chunks})
    manifest_path = write_json(out / MANIFEST, manifest)
    for path in (out / "export_config.json", out / "verify.json", run.modelfile, manifest_path):
        make_readable(path)
    return manifest_path


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
    plan = plan_export(model_dir, out_dir, quants, verify=verify, name=name, n_threads=n_threads,
                       progress=progress, verify_kwargs=verify_kwargs, imatrix=imatrix, calibration=calibration,
                       imatrix_chunks=imatrix_chunks, compare=compare)
    run = GgufRun()
    stage_output(plan)
    try:
        convert(plan, run)
        if plan.quantized:
            if plan.imatrix:
                make_imatrix(plan, run)
            quantize(plan, run)
    except BaseException:
        shutil.rmtree(plan.plain_dir, ignore_errors=True)
        raise
    finally:
        if run.intermediate is not None:
            run.intermediate.unlink(missing_ok=True)
    run.files = {q: run.files[q] for q in plan.wanted}
    run.notes = list(run.info.get("notes", [])) + fallback_notes(plan, run)
    if plan.verify:
        verify_files(plan, run)
    write_modelfile(plan, run)
    run.seconds["total"] = time.perf_counter() - t_start
    manifest_path = write_manifest(plan, run)
    result = ExportResult(files=run.files, manifest_path=manifest_path, verify_report=run.report,
                          fallback_tensors={q: r.fallback_tensors for q, r in run.quant_results.items()},
                          total_tensors={q: r.total_tensors for q, r in run.quant_results.items()},
                          modelfile_path=run.modelfile, name=plan.model_name, notes=run.notes, seconds=run.seconds,
                          imatrix=run.imatrix_record)
    if run.verify_error is not None:
        run.verify_error.result = result  # type: ignore[attr-defined] - the CLI prints the table before failing
        raise run.verify_error
    return result


def count_matrices(path: Path) -> int:
    """Number of 2-D weight tensors (the ones the quantizer may quantize)."""
    return sum(1 for t in read_header(path).tensors if len(t.shape) >= 2 and t.shape[1] > 1)
