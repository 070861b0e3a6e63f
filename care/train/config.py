"""Training recipes: one YAML file says everything about a fine-tune, from data to export.

Recipe YAML schema (other modules read their own sections; unknown keys in `eval`/`export` pass through):

```yaml
name: care-smollm2-support          # used for output folder names
model:
  base: embedded                    # `embedded` (SmolLM2-135M-Instruct dequantized from the packaged GGUF),
                                    # a local HF folder, or a hub id (only when online)
  gguf_file: null                   # optional: load `base` (a folder) from this GGUF file, dequantized
  chat_template: null               # optional Jinja text/file overriding the tokenizer's template
data:
  sources:                          # each: `path` and/or `reader`
    - reader: pubmedqa              # pubmedqa | medquad | bitext | banking77 | medmcqa | jsonl | json | csv
      path: ../shared/data/pubmedqa/ori_pqal.json   #   | parquet | hf (a datasets folder); else by suffix
      domain: medical               # domain for rows that carry none
      columns: {query: question, response: answer}  # our field <- source column; also `messages`, `text`,
                                    #   `prompt`, `completion`, `instruction`, `input`, `output`, `system`
      limit: 500                    # first N good rows of this source
      stage: 1                      # two-stage training: which stage this source feeds (default 1)
      options: {placeholders: keep} # reader options (bitext: keep | strip; pubmedqa: split: train|test|all)
  balance: downsample               # downsample (CARE: every domain to the smallest, seeded) | none
  caps: {medical: 1000}             # optional per-domain maximum rows (after balance)
  weights: {banking: 2.0}           # optional per-domain sampling weights (relative to the smallest domain)
  dedupe: true                      # drop exact (query, response) duplicates (case/space-folded)
  val_fraction: 0.05                # validation split, stratified by domain
  seed: 42
  max_length: null                  # rows longer than this (tokens) are bad rows; default training.max_length
  stages:                           # optional two-stage "dual-stage mixed fine-tuning" (Med-Nirvana)
    mix_k: 0.2                      # stage 2 = stage-2 data + this fraction of stage-1 data
    stage1_steps: null              # optional max_steps for stage 1 (stage 2 uses training.max_steps)
lora: {r: 16, alpha: 32, dropout: 0.05, bias: none, use_rslora: false, target_modules: all-linear}
quant: {load_in_4bit: true, quant_type: nf4, double_quant: true, compute_dtype: auto}  # auto: fp32 on CPU
training:
  lr: 2.0e-4
  epochs: 1                         # or max_steps (> 0 wins)
  max_steps: -1
  batch: 4
  grad_accum: 4
  max_length: 512
  warmup: 0.03                      # ratio (< 1) or steps (>= 1)
  scheduler: cosine
  weight_decay: 0.0
  optim: adamw_torch
  logging_steps: 5
  eval_steps: 50
  save_steps: 50
  save_total_limit: 3
  seed: 42
  packing: false
  completion_only: true             # loss on assistant turns only (end-of-turn token kept)
  gradient_checkpointing: false
merge: {method: reload}             # reload | dequantize | both; tolerance (default 1e-3 fp32, 5e-2 bf16)
export: {...}                       # read by care.export
eval: {...}                         # read by care.eval
smoke: {training.max_steps: 2, data.sources.0.limit: 16}   # dotted overrides applied with --smoke
```

`load_recipe(path, smoke=False, overrides=["training.max_steps=2"])` returns a `Recipe`; overrides use dotted
keys (list indexes as numbers) and YAML values.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "name": "care-run",
    "model": {"base": "embedded", "gguf_file": None, "chat_template": None},
    "data": {
        "sources": [],
        "balance": "downsample",
        "caps": {},
        "weights": {},
        "dedupe": True,
        "val_fraction": 0.05,
        "seed": 42,
        "max_length": None,
        "stages": None,
    },
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "bias": "none",
        "use_rslora": False,
        "target_modules": "all-linear",
    },
    "quant": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
    "training": {
        "lr": 2.0e-4,
        "epochs": 1,
        "max_steps": -1,
        "batch": 4,
        "grad_accum": 1,
        "max_length": 512,
        "warmup": 0.03,
        "scheduler": "cosine",
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "logging_steps": 5,
        "eval_steps": 50,
        "save_steps": 50,
        "save_total_limit": 3,
        "seed": 42,
        "packing": False,
        "completion_only": True,
        "gradient_checkpointing": False,
        "max_grad_norm": 1.0,
    },
    "merge": {"method": "reload", "tolerance": None},  # None: per merge dtype (care.train.merge.TOLERANCE)
    "export": {},
    "eval": {},
    "smoke": {"training.max_steps": 2, "training.logging_steps": 1, "training.eval_steps": 2,
              "training.save_steps": 2},
}

SECTIONS = tuple(DEFAULTS)


@dataclass
class Recipe:
    """A resolved recipe: defaults filled in, smoke and --set overrides applied."""

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    lora: dict[str, Any]
    quant: dict[str, Any]
    training: dict[str, Any]
    merge: dict[str, Any]
    export: dict[str, Any]
    eval: dict[str, Any]
    smoke: dict[str, Any]
    path: Path | None = None  # the YAML it came from; relative data paths resolve against its folder
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {s: copy.deepcopy(getattr(self, s)) for s in SECTIONS} | copy.deepcopy(self.extra)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def hash(self) -> str:
        """Stable short hash of the resolved settings (provenance in adapters and merged models)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def resolve_path(self, value: str | Path) -> Path:
        """A path from the recipe: absolute, or relative to the recipe file's folder (else the cwd)."""
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        if self.path is not None and (self.path.parent / p).exists():
            return self.path.parent / p
        return p


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists, creating dicts on the way."""
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]  # noqa: B018 - bounds check
            except (ValueError, IndexError) as exc:
                raise ConfigError(f"Override '{key}': '{part}' is not an index of a {len(node)}-item list",
                                  hint="Use a number within the list, e.g. data.sources.0.limit=10") from exc
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{key}': '{part}' is inside a value that is not a section",
                              hint="Check the dotted key against the recipe")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def parse_override(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"Override '{text}' has no '='", hint="Write it as key=value, e.g. training.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (it needs a dot); training numbers are wanted as numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def recipe_from_dict(raw: dict[str, Any], smoke: bool = False, overrides: list[str] | None = None,
                     path: Path | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError("A recipe must be a YAML mapping of sections", path=path,
                          hint=f"Top-level keys: {', '.join(SECTIONS)}")
    for sec in ("model", "data", "lora", "quant", "training", "merge", "export", "eval", "smoke"):
        if raw.get(sec) is not None and not isinstance(raw[sec], dict):
            raise ConfigError(f"Recipe section '{sec}' must be a mapping", path=path,
                              hint="Indent its keys under it")
    merged = _deep_merge(DEFAULTS, {k: v for k, v in raw.items() if v is not None})
    if smoke:
        for key, value in (merged.get("smoke") or {}).items():
            set_dotted(merged, key, copy.deepcopy(value))
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(merged, key, value)
    # `resolved` is what training decided on its machine (sft.py appends it to resolved_config.yaml): a record,
    # not a setting, so a saved resolved config can be reused as a recipe with the same hash.
    extra = {k: v for k, v in merged.items() if k not in SECTIONS and k != "resolved"}
    recipe = Recipe(**{s: merged[s] for s in SECTIONS}, path=path, extra=extra)
    validate(recipe)
    return recipe


def load_recipe(path: str | Path, smoke: bool = False, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, fill defaults, apply the `smoke` section (if `smoke`) then `overrides`."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("Recipe file not found", path=path, hint="Pass a recipe YAML, e.g. recipes/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"Recipe is not valid YAML{where}", path=path, hint="Fix the YAML syntax") from exc
    return recipe_from_dict(raw, smoke=smoke, overrides=overrides, path=path.resolve())


def validate(r: Recipe) -> None:
    where = r.path
    t = r.training
    for key in ("lr", "batch", "max_length"):
        if not isinstance(t.get(key), (int, float)) or t[key] <= 0:
            raise ConfigError(f"training.{key} must be a positive number, got {t.get(key)!r}", path=where,
                              hint=f"Set training.{key} in the recipe or with --set training.{key}=...")
    if r.data.get("balance") not in ("downsample", "none", None):
        raise ConfigError(f"data.balance must be downsample or none, got {r.data.get('balance')!r}", path=where,
                          hint="Use balance: downsample (CARE) or balance: none")
    vf = r.data.get("val_fraction") or 0
    if not 0 <= float(vf) < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {vf}", path=where, hint="e.g. 0.05")
    if r.merge.get("method") not in ("reload", "dequantize", "both"):
        raise ConfigError(f"merge.method must be reload, dequantize or both, got {r.merge.get('method')!r}",
                          path=where, hint="reload is the usual choice")
    if r.lora.get("bias") not in ("none", "all", "lora_only"):
        raise ConfigError(f"lora.bias must be none, all or lora_only, got {r.lora.get('bias')!r}", path=where,
                          hint="Use none")
    if not isinstance(r.data.get("sources"), list):
        raise ConfigError("data.sources must be a list", path=where, hint="Write one '- path: ...' per source")
    for i, src in enumerate(r.data["sources"]):
        if not isinstance(src, dict) or not (src.get("path") or src.get("reader")):
            raise ConfigError(f"data.sources[{i}] needs a path or a reader", path=where,
                              hint="e.g. - {reader: pubmedqa, path: ../shared/data/pubmedqa/ori_pqal.json}")
