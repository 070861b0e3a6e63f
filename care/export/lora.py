"""`care export gguf-lora`: a PEFT LoRA adapter -> a GGUF LoRA adapter for an unchanged quantized base.

A clinic on a slow link downloads the small adapter (~1% of the model) instead of a whole new GGUF. Steps:
- check the adapter and find its base (care.export.lora_source);
- run llama.cpp's own convert_lora_to_gguf.py (same version-matched source as `care export gguf`), f16, with
  alpha stored so llama.cpp applies peft's scale (rsLoRA included: see lora_source);
- verify on a quantized base GGUF: base + adapter vs the peft-merged HF model (KL, top-1, the limits of
  `care export verify`), beside the same figures for a merged export of the fine-tune at the same quant, and
  check that the adapter changes the base's output at all;
- write an Ollama Modelfile (FROM base + ADAPTER) and manifest.json (last, temp name + rename).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import MANIFEST, lora_manifest
from care.errors import ExportError
from care.export.converter import run_converter_script
from care.export.lora_source import AdapterSource, BaseModel, base_config, inspect_adapter, resolve_base
from care.export.reference import hf_template_and_system
from care.gguf_file import read_header
from care.io import atomic_path, make_readable, write_json, write_text
from care.system import sha256_file
from care.toolchain.llamacpp.converter_setup import find_converter, llama_cpp_version, setup_converter

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("_convert_lora_driver.py")
LORA_OUTTYPES = ("f16", "q8_0")
# The adapter must move the base's output by at least this much (mean KL(base+adapter || base), nats/token):
# an adapter that was lost in conversion, or B matrices still at their zero init, give ~0.
ADAPTER_MIN_KL = 1e-4

# --------------------------------------------------------------------------------------------------------
# Conversion


def stage_adapter(src: AdapterSource, stage: Path) -> Path:
    """A copy of the adapter folder as llama.cpp's converter should read it: the weights (linked) and an
    adapter_config.json whose lora_alpha gives llama.cpp's alpha / rank the scale peft uses."""
    stage.mkdir(parents=True, exist_ok=True)
    (stage / src.weights.name).symlink_to(src.weights.resolve())
    config = dict(src.config, lora_alpha=src.stored_alpha, use_rslora=False)
    (stage / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return stage


def convert_lora(src: AdapterSource, base: BaseModel, out_path: Path, outtype: str = "f16",
                 name: str | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run llama.cpp's convert_lora_to_gguf.py on `src` into `out_path` (temp file + rename)."""
    if outtype not in LORA_OUTTYPES:
        raise ExportError(f"Unknown adapter type {outtype!r}", hint=f"Use one of {', '.join(LORA_OUTTYPES)}")
    base_config(base)
    conv = find_converter()
    if conv is None:
        log.warning("llama.cpp's converter is not set up yet (or lacks convert_lora_to_gguf.py); fetching it once")
        conv = setup_converter(force=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".care-lora-stage-") as tmp:
        stage = stage_adapter(src, Path(tmp) / "adapter")
        extra = {"name": name or src.path.resolve().name, "kv": {
            "care.lora.rank": src.rank, "care.lora.alpha": src.alpha, "care.lora.rslora": src.rslora,
            "care.lora.scale": src.scale, "care.source.base_model": base.name}}
        extra_path = Path(tmp) / "extra.json"
        extra_path.write_text(json.dumps(extra), encoding="utf-8")
        with atomic_path(out_path) as part:
            cmd = [sys.executable, str(DRIVER), str(conv), str(extra_path), "--base", str(base.path),
                   "--outfile", str(part), "--outtype", outtype, str(stage)]
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            env.pop("NO_LOCAL_GGUF", None)
            run_converter_script(cmd, env, progress, what="llama.cpp's LoRA converter", path=src.path,
                                 hint="Check --base is the model the adapter was trained on (CARE_DEBUG=1 for "
                                 "the full log)")
    make_readable(out_path)
    return {"converter": conv.name}


def read_lora_gguf(path: Path) -> dict[str, Any]:
    """The adapter GGUF's alpha, type and tensors (name -> float32 numpy array, in numpy's dimension order), read
    from its header (care.gguf_file) and the tensor data after it."""
    import gguf
    import numpy as np

    header = read_header(path, arrays=True)
    kv = header.metadata
    tensors = {}
    for t in header.tensors:
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        nbytes = t.nbytes if t.nbytes is not None else header.tensor_bytes()[t.name]
        raw = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=header.data_offset + t.offset)
        if qtype == gguf.GGMLQuantizationType.F32:
            data = raw.view(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            data = raw.view(np.float16).astype(np.float32)
        else:
            data = gguf.dequantize(raw, qtype).astype(np.float32)
        tensors[t.name] = data.reshape([int(x) for x in reversed(t.shape)])
    return {"alpha": kv.get("adapter.lora.alpha"), "type": kv.get("general.type"),
            "adapter_type": kv.get("adapter.type"), "name": kv.get("general.name"), "tensors": tensors, "kv": kv}


# --------------------------------------------------------------------------------------------------------
# Verification


def merge_for_verify(src: AdapterSource, base: BaseModel, out: Path) -> Path:
    """base (fp32) + adapter merged with peft's merge_and_unload: the HF reference the GGUFs are checked against."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("CARE_THREADS", "0")) or torch.get_num_threads())
    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(src.path)).merge_and_unload().eval()
    merged.save_pretrained(str(out))
    tok_dir = src.path if (src.path / "tokenizer_config.json").is_file() else base.path
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if src.info.get("chat_template"):  # the model's real template, never the training variant (as care merge)
        tok.chat_template = src.info["chat_template"]
    tok.save_pretrained(str(out))
    return out


def verify_adapter(adapter_gguf: Path, base_gguf: Path, merged_hf: Path, merged_gguf: Path | None,
                   n_threads: int | None = None, **verify_kwargs: Any) -> dict[str, Any]:
    """base GGUF + adapter vs the merged HF model, beside a merged GGUF of the same quant; adapter effect."""
    from care.export.reference import kl_between
    from care.export.verify import read_gguf_metadata, verify_many

    quant = (read_gguf_metadata(base_gguf).get("file_type_name") or "unknown").lower()
    files = {"base+adapter": base_gguf, "base": base_gguf}
    if merged_gguf is not None:
        files["merged"] = merged_gguf
    logits: dict[str, Any] = {}
    report = verify_many(files, merged_hf, loras={"base+adapter": adapter_gguf}, quants=dict.fromkeys(files, quant),
                         logits_out=logits, n_threads=n_threads, fail=False, **verify_kwargs)
    for entry in report["files"].values():  # base exports record the local folder they came from
        entry.get("metadata", {}).pop("provenance", None)
    base_only = report["files"].pop("base")
    report["failures"] = [f for f in report["failures"] if not f.startswith("base:")]
    merged_entry = report["files"].get("merged")
    if merged_entry is not None:  # the merged file is the yardstick, not the thing verified here
        report["failures"] = [f for f in report["failures"] if not f.startswith("merged:")]
    effect = kl_between(logits["base+adapter"], logits["base"], logits["seqs"])
    report["quant"] = quant
    report["adapter_effect_kl"] = effect
    report["base_alone_kl"] = base_only["kl_mean"]
    report["adapter_min_kl"] = ADAPTER_MIN_KL
    if effect < ADAPTER_MIN_KL:
        report["failures"].append(f"base+adapter: the adapter barely changes the base's output (KL {effect:.3g} < "
                                  f"{ADAPTER_MIN_KL:g}); is it trained, and for this base?")
    report["passed"] = not report["failures"]
    return report


# --------------------------------------------------------------------------------------------------------
# The export


@dataclass
class LoraExportResult:
    adapter: Path
    manifest_path: Path
    base_gguf: Path | None
    verify_report: dict[str, Any] | None
    modelfile_path: Path | None
    source: AdapterSource
    base: BaseModel
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "adapter"


def export_gguf_lora(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    outtype: str = "f16",
    verify_base: str | os.PathLike[str] | None = None,
    verify: bool = True,
    base_quant: str = "q4_k_m",
    name: str | None = None,
    n_threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    verify_kwargs: dict[str, Any] | None = None,
) -> LoraExportResult:
    """Convert the adapter in `adapter_dir` to `out_dir/<name>-lora-<outtype>.gguf`, verified on a quantized base.

    The base GGUF to verify on: `verify_base`, else the embedded GGUF when the adapter was trained on it, else
    a `base_quant` export of the base made into out_dir/base/ (which the Modelfile then uses).
    Raises VerificationError (after writing verify.json and the manifest, marked unverified) on a mismatch.
    """
    from care.errors import VerificationError
    from care.export.gguf import export_gguf
    from care.export.hf_source import end_of_turn_token
    from care.export.modelfile import default_system_prompt, detect_format, render_modelfile

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    src = inspect_adapter(adapter_dir)
    base_model = resolve_base(src, base)
    log.info("base model %s (from %s)", base_model.name, base_model.source)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # not a finished export until rewritten
    model_name = name or (src.info.get("recipe_name") or src.path.resolve().name)
    adapter_path = out / f"{_slug(model_name)}-lora-{outtype}.gguf"
    t0 = time.perf_counter()
    info = convert_lora(src, base_model, adapter_path, outtype=outtype, name=model_name)
    seconds["convert"] = time.perf_counter() - t0
    notes: list[str] = []
    if src.rslora:
        notes.append(f"rsLoRA: stored alpha {src.stored_alpha:.6g} (= {src.alpha:g} x sqrt({src.rank})) so "
                     f"llama.cpp's alpha/rank equals peft's scale {src.scale:.6g}")

    base_gguf = Path(verify_base).expanduser() if verify_base else base_model.gguf
    report: dict[str, Any] | None = None
    verify_error: Exception | None = None
    if base_gguf is None and verify:
        t0 = time.perf_counter()
        base_export = export_gguf(base_model.path, out / "base", quants=(base_quant,), verify=False,
                                  name=base_model.name, n_threads=n_threads)
        base_gguf = base_export.files[base_quant]
        seconds["base_export"] = time.perf_counter() - t0
        notes.append(f"made the base GGUF {base_gguf.relative_to(out)} from {base_model.name}")
    if verify:
        from care.models import check_gguf

        assert base_gguf is not None
        check_gguf(base_gguf)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".care-lora-verify-", dir=out) as tmp:
            merged = merge_for_verify(src, base_model, Path(tmp) / model_name)
            from care.export.verify import read_gguf_metadata

            quant = (read_gguf_metadata(base_gguf).get("file_type_name") or "").lower()
            merged_gguf = None
            if quant:
                merged_export = export_gguf(merged, Path(tmp) / "merged-gguf", quants=(quant,), verify=False,
                                            name=model_name, n_threads=n_threads)
                merged_gguf = merged_export.files[quant]
            seconds["merge"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = verify_adapter(adapter_path, base_gguf, merged, merged_gguf, n_threads=n_threads,
                                    **(verify_kwargs or {}))
            seconds["verify"] = time.perf_counter() - t0
            report["source"] = model_name  # no local paths in what we ship
            report["merged_gguf_size"] = merged_gguf.stat().st_size if merged_gguf else None
        write_json(out / "verify.json", report)
        if not report["passed"]:
            verify_error = VerificationError("Adapter verification failed: " + "; ".join(report["failures"][:3]),
                                             path=out / "verify.json",
                                             hint="The adapter is kept but marked unverified in manifest.json")

    # Modelfile: FROM the base GGUF, ADAPTER ours.
    template_dir = src.path if (src.path / "tokenizer_config.json").is_file() else base_model.path
    template, system = hf_template_and_system(template_dir)
    if src.info.get("chat_template"):
        template = src.info["chat_template"]
    eot = end_of_turn_token(template_dir)
    modelfile = None
    if base_gguf is not None:
        try:
            from_name = base_gguf.resolve().relative_to(out.resolve()).as_posix()
        except ValueError:
            from_name = base_gguf.name
            notes.append(f"copy {base_gguf.name} next to the Modelfile (Ollama reads FROM relative to it)")
        modelfile = write_text(out / "Modelfile", render_modelfile(
            from_name, template, extra_stops=[eot[1]] if eot else None,
            system=default_system_prompt(system, detect_format(template)), adapter=adapter_path.name))

    seconds["total"] = time.perf_counter() - t_start
    manifest = lora_manifest(
        name=model_name,
        adapter={"file": adapter_path.name, "type": outtype, "size": adapter_path.stat().st_size,
                 "sha256": sha256_file(adapter_path)},
        lora={"rank": src.rank, "alpha": src.alpha, "rslora": src.rslora, "scale": src.scale,
              "stored_alpha": src.stored_alpha, "target_modules": src.target_modules},
        base={"model": base_model.name, "architecture": (base_config(base_model).get("architectures") or ["?"])[0],
              "verified_on": None if base_gguf is None or report is None else {
                  "file": base_gguf.name, "size": base_gguf.stat().st_size, "sha256": sha256_file(base_gguf),
                  "quant": report.get("quant")}},
        recipe={k: src.info.get(k) for k in ("recipe_name", "recipe_hash") if src.info.get(k)} or None,
        converter={"llama_cpp_python": llama_cpp_version(), "script": "convert_lora_to_gguf.py",
                   "folder": info["converter"]},
        notes=notes,
        verified=None if report is None else report["passed"],
        verify_report="verify.json" if report is not None else None,
        figures=None if report is None else _figures(report),
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    manifest_path = write_json(out / MANIFEST, manifest)
    result = LoraExportResult(adapter=adapter_path, manifest_path=manifest_path, base_gguf=base_gguf,
                              verify_report=report, modelfile_path=modelfile, source=src, base=base_model,
                              notes=notes, seconds=seconds)
    if verify_error is not None:
        verify_error.result = result  # type: ignore[attr-defined] - the CLI prints the figures before failing
        raise verify_error
    return result


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: base+adapter and merged (same quant) vs the merged HF model, and the effect."""
    out: dict[str, Any] = {"quant": report.get("quant"), "adapter_effect_kl": report.get("adapter_effect_kl"),
                           "base_alone_kl": report.get("base_alone_kl")}
    for label, entry in report["files"].items():
        out[label] = {k: entry.get(k) for k in ("top1_agreement", "kl_mean", "kl_max", "kl_limit", "ppl", "passed")}
    return out


