"""The built-in demo recipe (`care demo`): the embedded SmolLM2-135M on the shipped sample exchanges."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from care.errors import DataError
from care.train.config import Recipe, recipe_from_dict

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
SAMPLE_DOMAINS = ("banking", "telecom", "medical")

# Questions for the before/after comparison, one per domain. None of them is in the sample training data
# (tests/test_demo.py checks that), so the answers show what the model learned, not what it memorised.
QUESTIONS: dict[str, str] = {
    "banking": "My bank card was stolen from my bag an hour ago. What should I do now?",
    "telecom": "My broadband keeps dropping out several times a day. What can I try?",
    "medical": "I have had a sore throat and a mild fever since yesterday. What should I do?",
    "general": "I ordered a blue jacket but received a red one. What should I do?",
}

# ~0.9 epoch of the 87 balanced training rows at batch 4. Measured on 2 CPU cores: ~8 s per QLoRA step
# (bitsandbytes NF4 on CPU), the whole demo 3.4 min, leaving room in the 15-minute budget for slower machines.
DEFAULT_STEPS = 20

def sample_file(domain: str) -> Path:
    """Path of a shipped sample file (banking, telecom, medical, customer_service_train/test)."""
    name = f"{domain}.jsonl" if domain in SAMPLE_DOMAINS else f"{domain}.json"
    path = SAMPLES_DIR / name
    if not path.is_file():
        raise DataError("Sample data file missing from the installed package", path=path,
                        hint="Reinstall care (pip install -e .) or check care/data/samples")
    return path


def demo_recipe_dict(max_steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """The built-in demo recipe: CARE's method (balanced domains, NF4 QLoRA r=8 alpha=32 dropout 0.05) on the
    embedded SmolLM2-135M with the shipped samples, sized to finish well inside 15 minutes on 2 CPU cores."""
    return {
        "name": "care-demo-smollm2",
        "model": {"base": "embedded"},
        "data": {
            "sources": [{"path": str(sample_file(d))} for d in SAMPLE_DOMAINS],
            "balance": "downsample",
            "dedupe": True,
            "val_fraction": 0.1,
            "seed": 42,
        },
        "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "bias": "none", "use_rslora": False,
                 "target_modules": "all-linear"},
        "quant": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "training": {
            "lr": 8.0e-4, "max_steps": max_steps, "batch": 4, "grad_accum": 1, "max_length": 256,
            "warmup": 2, "scheduler": "cosine", "optim": "adamw_torch", "logging_steps": 2,
            "eval_steps": max(2, max_steps // 2), "save_steps": max(2, max_steps // 2), "save_total_limit": 1,
            "seed": 42, "completion_only": True,
        },
        # SmolLM2's base is itself dequantized from Q4_1, and NF4 of that differs from it enough that merging
        # into a reloaded base lost the fine-tune (measured: top-1 agreement with the trained model 0.61);
        # merging into the dequantized NF4 base reproduces the trained function.
        "merge": {"method": "dequantize"},
        "export": {"quants": ["q4_k_m"], "verify": True},
        "eval": {},
        "smoke": {"training.max_steps": 4},
    }


def demo_recipe(max_steps: int = DEFAULT_STEPS, overrides: Sequence[str] | None = None) -> Recipe:
    return recipe_from_dict(demo_recipe_dict(max_steps), overrides=list(overrides or []))
