"""`care export gguf-lora`: a PEFT LoRA adapter -> a GGUF LoRA adapter for an unchanged quantized base.

A clinic on a slow link downloads the small adapter (~1% of the model) instead of a whole new GGUF. Steps:
- check the adapter is one llama.cpp can apply (plain LoRA on linear layers: no DoRA, no trained embeddings);
- find the base config from care's own records (care_adapter.json, the recipe next to the adapter,
  care_merge.json), not `base_model_name_or_path`, which often names the training machine's path or a 4-bit
  hub repo; `--base` overrides;
- run llama.cpp's own convert_lora_to_gguf.py (same version-matched source as `care export gguf`), f16;
- verify on a quantized base GGUF: base + adapter vs the peft-merged HF model (KL, top-1, the limits of
  `care export verify`), beside the same figures for a merged export of the fine-tune at the same quant, and
  check that the adapter changes the base's output at all;
- write an Ollama Modelfile (FROM base + ADAPTER) and manifest.json (last, temp name + rename).

rsLoRA: llama.cpp scales an adapter by alpha / rank and the converter stores only `alpha`, so an rsLoRA
adapter (scale alpha / sqrt(rank)) would be applied sqrt(rank) times too weakly. We store
alpha * sqrt(rank) instead, which makes llama.cpp's alpha / rank equal peft's alpha / sqrt(rank).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import (
    ADAPTER_INFO,
    MANIFEST,
    MERGE_INFO,
    lora_manifest,
    public_name,
    read_adapter_info,
    read_merge_info,
)
from care.errors import CareError, ExportError, InvalidModelError, ModelNotFoundError
from care.io import atomic_path, sha256_file, write_json, write_text

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("_convert_lora_driver.py")
LORA_OUTTYPES = ("f16", "q8_0")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Modules llama.cpp cannot take from an adapter: a full copy (modules_to_save) or a LoRA on the embedding /
# output matrices (the converter drops lm_head on tied-embedding models, and new tokens would need a new vocab).
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
# The adapter must move the base's output by at least this much (mean KL(base+adapter || base), nats/token):
# an adapter that was lost in conversion, or B matrices still at their zero init, give ~0.
ADAPTER_MIN_KL = 1e-4


@dataclass
class AdapterSource:
    """A PEFT LoRA adapter folder, checked."""

    path: Path
    config: dict[str, Any]  # adapter_config.json
    info: dict[str, Any]  # care_adapter.json (care train), when present
    weights: Path
    rank: int
    alpha: float
    rslora: bool
    target_modules: list[str]

    @property
    def scale(self) -> float:
        """peft's scale for the LoRA product B @ A."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def stored_alpha(self) -> float:
        """The alpha to store so llama.cpp's alpha / rank equals `scale`."""
        return self.scale * self.rank


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (no torch needed)."""
    from care.export.converter import _check_safetensors

    _check_safetensors(path)
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return [k for k in header if k != "__metadata__"]


def _mentions_embeddings(modules: Any) -> list[str]:
    if isinstance(modules, str):
        modules = [] if modules == "all-linear" else re.findall(r"[A-Za-z_][\w.]*", modules)
    return [m for m in (modules or []) if any(e in str(m) for e in EMBEDDING_MODULES)]


def inspect_adapter(adapter_dir: str | os.PathLike[str]) -> AdapterSource:
    """Check `adapter_dir` is a LoRA adapter llama.cpp can apply; one-line errors naming the option otherwise."""
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError("Adapter folder not found", path=path,
                                 hint="Pass the adapter/ folder that `care train` wrote")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        hint = ("This looks like a merged model: export it with `care export gguf`" if (path / "config.json").is_file()
                else "Pass the adapter/ folder that `care train` wrote (adapter_config.json + adapter_model.*)")
        raise InvalidModelError("Not a LoRA adapter folder (no adapter_config.json)", path=path, hint=hint)
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"adapter_config.json is unreadable: {exc}", path=cfg_path,
                                hint="Re-save the adapter (`care train` writes it)") from exc
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ExportError(f"Only LoRA adapters convert to GGUF, this is {config.get('peft_type')}", path=cfg_path,
                          hint="Train with a LoRA adapter (the recipe's lora: section)")
    if config.get("use_dora"):
        raise ExportError("DoRA adapters cannot be applied by llama.cpp", path=cfg_path,
                          hint="Retrain with lora.use_dora: false, or `care merge` it and use `care export gguf`")
    saved = _mentions_embeddings(config.get("modules_to_save"))
    if saved:
        raise ExportError(f"The adapter trains {', '.join(saved)} in full (modules_to_save); llama.cpp adapters "
                          "hold only LoRA pairs", path=cfg_path,
                          hint="Retrain without them in lora.modules_to_save, or `care merge` and `care export gguf`")
    targeted = _mentions_embeddings(config.get("target_modules"))
    if targeted:
        raise ExportError(f"The adapter puts LoRA on {', '.join(targeted)}, which llama.cpp cannot apply from an "
                          "adapter", path=cfg_path,
                          hint="Retrain with lora.target_modules: all-linear (or a list without embed_tokens/lm_head)")
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise InvalidModelError("The adapter folder has no weights (adapter_model.safetensors)", path=path,
                                hint="Pass a complete adapter folder (`care train` writes one)")
    if weights.suffix == ".safetensors":
        names = _safetensors_names(weights)
        stray = [n for n in names if any(f".{e}." in n for e in EMBEDDING_MODULES)]
        if stray:
            raise ExportError(f"The adapter holds {stray[0]}; llama.cpp adapters cannot change the embeddings or "
                              "the output matrix", path=weights,
                              hint="Retrain with lora.target_modules: all-linear and no lora.modules_to_save")
        if not any(".lora_A." in n for n in names):
            raise InvalidModelError("The adapter weights hold no LoRA A/B matrices", path=weights,
                                    hint="Pass the adapter/ folder that `care train` wrote")
    rank, alpha = int(config.get("r") or 0), float(config.get("lora_alpha") or 0)
    if rank <= 0 or alpha <= 0:
        raise InvalidModelError(f"adapter_config.json has r={rank}, lora_alpha={alpha}", path=cfg_path,
                                hint="Both must be positive; re-save the adapter")
    rslora = bool(config.get("use_rslora"))
    if config.get("alpha_pattern") or (rslora and config.get("rank_pattern")):
        # GGUF adapters carry one alpha; llama.cpp divides by each tensor's own rank.
        raise ExportError("Per-module alpha (alpha_pattern, or rank_pattern with rsLoRA) cannot be stored in a "
                          "GGUF adapter", path=cfg_path,
                          hint="Retrain with one lora.r / lora.alpha for all modules")
    targets = config.get("target_modules") or []
    info: dict[str, Any] = {}
    if (path / ADAPTER_INFO).is_file():
        try:
            info = read_adapter_info(path)
        except CareError as exc:
            log.warning("%s; ignoring it", exc.one_line())
    return AdapterSource(path=path, config=config, info=info, weights=weights, rank=rank, alpha=alpha,
                         rslora=rslora, target_modules=sorted(targets) if isinstance(targets, list) else [targets])


# --------------------------------------------------------------------------------------------------------
# The base model


@dataclass
class BaseModel:
    path: Path  # a local HF folder with config.json (weights needed only for verification)
    name: str  # public name for metadata and the manifest: a hub id or a folder name, never a local path
    gguf: Path | None = None  # a ready GGUF of this base (the embedded model), used to verify when none is given
    source: str = ""  # where we found it


def _hub_cache_dir(repo_id: str) -> Path | None:
    """A hub id already in the local HF cache (never downloads: HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a repo id
        return None


def _embedded_gguf_for(base: str) -> Path | None:
    """The embedded GGUF when `base` names it (recipes say `embedded`): the base to verify on, as shipped."""
    from care.train.modeling import EMBEDDED

    if base in (EMBEDDED, "default", "smollm2-135m"):
        from care.models import embedded_gguf

        return embedded_gguf()
    return None


def _from_model_cfg(model_cfg: dict[str, Any], where: Path) -> BaseModel | None:
    from care.train.modeling import EMBEDDED, resolve_base

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or not (where / q).exists() else where / q

    base = str(model_cfg.get("base") or EMBEDDED)
    try:
        resolved = resolve_base(model_cfg, resolve=resolve)
    except ModelNotFoundError:
        return None
    gguf = _embedded_gguf_for(base)
    if gguf is None and base.endswith(".gguf"):
        gguf = resolve(base)
    path = Path(resolved) if Path(resolved).is_dir() else _hub_cache_dir(resolved)
    if path is None:
        return None
    return BaseModel(path=path, name=public_name(base), gguf=gguf)


def resolve_base(src: AdapterSource, base: str | os.PathLike[str] | None = None) -> BaseModel:
    """The base model's HF folder: --base, else care_adapter.json / the recipe next to the adapter /
    care_merge.json, else base_model_name_or_path only when it is a local folder or in the HF cache."""
    if base is not None:
        path = Path(base).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError("--base is not a Hugging Face model folder (no config.json)", path=path,
                                     hint="Pass the base model's folder (config.json; weights needed to verify)")
        return BaseModel(path=path, name=public_name(str(base)), source="--base")
    tried: list[str] = []
    info = src.info
    for key in ("base_model", "recipe_base"):
        value = info.get(key)
        if isinstance(value, str) and value:
            found = _from_model_cfg({"base": value}, src.path)
            tried.append(f"care_adapter.json {key}={public_name(value)}")
            if found:
                found.source = f"care_adapter.json ({key})"
                recipe_base = info.get("recipe_base")
                if key == "base_model" and isinstance(recipe_base, str) and recipe_base:
                    found.name = public_name(recipe_base)  # the resolved base_model may be a local cache path
                    found.gguf = found.gguf or _embedded_gguf_for(recipe_base)
                return found
    for recipe in (src.path.parent / "resolved_config.yaml", src.path / "resolved_config.yaml"):
        if recipe.is_file():
            import yaml

            try:
                model_cfg = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}
            except (OSError, yaml.YAMLError):
                model_cfg = {}
            found = _from_model_cfg(model_cfg, recipe.parent) if model_cfg else None
            tried.append(f"{recipe.name} model.base")
            if found:
                found.source = recipe.name
                return found
    for merged in sorted(src.path.parent.glob(f"*/{MERGE_INFO}")):
        try:
            prov = read_merge_info(merged)
        except CareError:
            continue
        if prov.get("adapter") and Path(prov["adapter"]).resolve() != src.path.resolve():
            continue
        found = _from_model_cfg({"base": prov.get("base_model")}, merged.parent) if prov.get("base_model") else None
        tried.append(f"{merged.parent.name}/{MERGE_INFO}")
        if found:
            found.source = MERGE_INFO
            return found
    hub = src.config.get("base_model_name_or_path")
    if isinstance(hub, str) and hub:
        found = _from_model_cfg({"base": hub}, src.path)
        tried.append(f"adapter_config.json base_model_name_or_path={public_name(hub)}")
        if found:
            found.source = "adapter_config.json"
            return found
    raise ModelNotFoundError("Could not find the adapter's base model here" + (f" (tried {'; '.join(tried)})"
                                                                                if tried else ""),
                             path=src.path, hint="Pass --base BASE_HF_FOLDER (config.json, plus weights to verify)")


def _base_config(base: BaseModel) -> dict[str, Any]:
    from care.export.converter import SUPPORTED_ARCHITECTURES

    try:
        config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"The base config.json is unreadable: {exc}", path=base.path / "config.json") from exc
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ExportError(f"Unsupported base architecture {', '.join(archs) or '?'}", path=base.path,
                          hint=f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


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
    from care.export.converter import _run_streaming, find_converter, setup_converter

    if outtype not in LORA_OUTTYPES:
        raise ExportError(f"Unknown adapter type {outtype!r}", hint=f"Use one of {', '.join(LORA_OUTTYPES)}")
    _base_config(base)
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
            proc = _run_streaming(cmd, env, progress)
            if proc.returncode != 0:
                raise ExportError(f"llama.cpp's LoRA converter failed: {proc.last_error()}", path=src.path,
                                  hint="Check --base is the model the adapter was trained on (CARE_DEBUG=1 for "
                                  "the full log)")
    from care.io import make_readable

    make_readable(out_path)
    return {"converter": conv.name}


def read_lora_gguf(path: Path) -> dict[str, Any]:
    """The adapter GGUF's alpha, type and tensors (name -> numpy array), read with the PyPI gguf reader."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    tensors = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type.name in ("F16", "F32", "BF16"):
            tensors[t.name] = data.astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        else:
            from gguf import dequantize

            tensors[t.name] = dequantize(data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
    return {"alpha": value("adapter.lora.alpha"), "type": value("general.type"),
            "adapter_type": value("adapter.type"), "name": value("general.name"), "tensors": tensors,
            "kv": {k: value(k) for k in reader.fields if not k.startswith("GGUF.")}}


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


def _kl_between(p_logits: list[Any], q_logits: list[Any], seqs: list[list[int]]) -> float:
    """Mean KL(P || Q) per token between two llama.cpp runs over the same tokens."""
    import numpy as np

    from care.export.verify import logit_metrics

    def log_softmax(x: Any) -> Any:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    return logit_metrics([log_softmax(p) for p in p_logits], q_logits, seqs)["kl_mean"]


def verify_adapter(adapter_gguf: Path, base_gguf: Path, merged_hf: Path, merged_gguf: Path | None,
                   n_threads: int | None = None, **verify_kwargs: Any) -> dict[str, Any]:
    """base GGUF + adapter vs the merged HF model, beside a merged GGUF of the same quant; adapter effect."""
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
    effect = _kl_between(logits["base+adapter"], logits["base"], logits["seqs"])
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
    from care.export.converter import end_of_turn_token, llama_cpp_version
    from care.export.gguf import _hf_template_and_system, export_gguf
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
    template, system = _hf_template_and_system(template_dir)
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
        base={"model": base_model.name, "architecture": (_base_config(base_model).get("architectures") or ["?"])[0],
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

