"""The input of `care export gguf-lora`: a PEFT LoRA adapter folder, checked to be one llama.cpp can apply, and
the base model it was trained on.

- the adapter must be plain LoRA on linear layers: no DoRA, no trained embeddings, one alpha;
- the base config comes from care's own records (care_adapter.json, the recipe next to the adapter,
  care_merge.json), not `base_model_name_or_path`, which often names the training machine's path or a 4-bit
  hub repo; `--base` overrides.

rsLoRA: llama.cpp scales an adapter by alpha / rank and the converter stores only `alpha`, so an rsLoRA
adapter (scale alpha / sqrt(rank)) would be applied sqrt(rank) times too weakly. We store
alpha * sqrt(rank) instead (`AdapterSource.stored_alpha`), which makes llama.cpp's alpha / rank equal peft's
alpha / sqrt(rank).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from care.artifacts import (
    ADAPTER_INFO,
    MERGE_INFO,
    public_name,
    read_adapter_info,
    read_if_present,
    read_merge_info,
)
from care.errors import CareError, ExportError, InvalidModelError, ModelNotFoundError
from care.export.hf_source import SUPPORTED_ARCHITECTURES, check_safetensors
from care.system import local_snapshot

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Modules llama.cpp cannot take from an adapter: a full copy (modules_to_save) or a LoRA on the embedding /
# output matrices (the converter drops lm_head on tied-embedding models, and new tokens would need a new vocab).
EMBEDDING_MODULES = ("embed_tokens", "lm_head")


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


def safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (no torch needed)."""
    check_safetensors(path)
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return [k for k in header if k != "__metadata__"]


def mentions_embeddings(modules: Any) -> list[str]:
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
    saved = mentions_embeddings(config.get("modules_to_save"))
    if saved:
        raise ExportError(f"The adapter trains {', '.join(saved)} in full (modules_to_save); llama.cpp adapters "
                          "hold only LoRA pairs", path=cfg_path,
                          hint="Retrain without them in lora.modules_to_save, or `care merge` and `care export gguf`")
    targeted = mentions_embeddings(config.get("target_modules"))
    if targeted:
        raise ExportError(f"The adapter puts LoRA on {', '.join(targeted)}, which llama.cpp cannot apply from an "
                          "adapter", path=cfg_path,
                          hint="Retrain with lora.target_modules: all-linear (or a list without embed_tokens/lm_head)")
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise InvalidModelError("The adapter folder has no weights (adapter_model.safetensors)", path=path,
                                hint="Pass a complete adapter folder (`care train` writes one)")
    if weights.suffix == ".safetensors":
        names = safetensors_names(weights)
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
    info = read_if_present(read_adapter_info, path, ADAPTER_INFO, otherwise="ignoring it")
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


def embedded_gguf_for(base: str) -> Path | None:
    """The embedded GGUF when `base` names it (recipes say `embedded`): the base to verify on, as shipped."""
    from care.train.modeling import EMBEDDED

    if base in (EMBEDDED, "default", "smollm2-135m"):
        from care.models import embedded_gguf

        return embedded_gguf()
    return None


def from_model_cfg(model_cfg: dict[str, Any], where: Path) -> BaseModel | None:
    from care.train.modeling import EMBEDDED, resolve_base

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or not (where / q).exists() else where / q

    base = str(model_cfg.get("base") or EMBEDDED)
    try:
        resolved = resolve_base(model_cfg, resolve=resolve)
    except ModelNotFoundError:
        return None
    gguf = embedded_gguf_for(base)
    if gguf is None and base.endswith(".gguf"):
        gguf = resolve(base)
    path = local_snapshot(resolved)  # a local folder, or a hub id already in the HF cache (never downloads)
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
            found = from_model_cfg({"base": value}, src.path)
            tried.append(f"care_adapter.json {key}={public_name(value)}")
            if found:
                found.source = f"care_adapter.json ({key})"
                recipe_base = info.get("recipe_base")
                if key == "base_model" and isinstance(recipe_base, str) and recipe_base:
                    found.name = public_name(recipe_base)  # the resolved base_model may be a local cache path
                    found.gguf = found.gguf or embedded_gguf_for(recipe_base)
                return found
    for recipe in (src.path.parent / "resolved_config.yaml", src.path / "resolved_config.yaml"):
        if recipe.is_file():
            import yaml

            try:
                model_cfg = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}
            except (OSError, yaml.YAMLError):
                model_cfg = {}
            found = from_model_cfg(model_cfg, recipe.parent) if model_cfg else None
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
        found = from_model_cfg({"base": prov.get("base_model")}, merged.parent) if prov.get("base_model") else None
        tried.append(f"{merged.parent.name}/{MERGE_INFO}")
        if found:
            found.source = MERGE_INFO
            return found
    hub = src.config.get("base_model_name_or_path")
    if isinstance(hub, str) and hub:
        found = from_model_cfg({"base": hub}, src.path)
        tried.append(f"adapter_config.json base_model_name_or_path={public_name(hub)}")
        if found:
            found.source = "adapter_config.json"
            return found
    raise ModelNotFoundError("Could not find the adapter's base model here" + (f" (tried {'; '.join(tried)})"
                                                                                if tried else ""),
                             path=src.path, hint="Pass --base BASE_HF_FOLDER (config.json, plus weights to verify)")


def base_config(base: BaseModel) -> dict[str, Any]:
    """The base's config.json, checked to be an architecture we export."""
    try:
        config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"The base config.json is unreadable: {exc}", path=base.path / "config.json") from exc
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ExportError(f"Unsupported base architecture {', '.join(archs) or '?'}", path=base.path,
                          hint=f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config

