"""What every export is verified against: the HF model's reference outputs, the fixed texts they are computed on,
the logit metrics, and the KL limits. One module for GGUF (care.export.verify), ONNX (care.export.onnx) and
LoRA-as-GGUF (care.export.lora) verification, so the three judge by the same rules.

Also the HF chat template and the system prompt it inserts, which the Ollama Modelfiles reproduce.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from care.export.hf_source import end_of_turn_token, expected_rope_factors, hf_tokenizer

log = logging.getLogger(__name__)

# Tokenizer parity corpus: scripts, code, whitespace runs, digits, emoji, and chat markup of the formats we
# export (special tokens must be parsed as single tokens on both sides).
TOKENIZER_CORPUS: tuple[str, ...] = (
    "Hello world! How do I block a lost card?",
    " leading space, double  spaces and trailing space ",
    "Der Patient klagt über Übelkeit und Schwindel seit drei Tagen.",
    "Le médecin a prescrit 500 mg de paracétamol, à prendre deux fois par jour.",
    "¿Dónde está la farmacia más cercana? Necesito ibuprofeno.",
    "Пациент жалуется на головную боль и температуру 38,5 °C.",
    "患者主诉胸痛三天，伴有呼吸困难。",
    "今日は病院に行きました。薬を飲んでください。",
    "المريض يعاني من ارتفاع ضغط الدم",
    "मरीज को बुखार और खांसी है।",
    "Emoji 🙂🚑💊 and symbols ±×÷≤≥ → ✓",
    "def dose(weight_kg: float) -> float:\n    return round(weight_kg * 0.15, 2)  # mg\n\tpass\n",
    "if (x != 0 && y >= 10) { printf(\"%d\\n\", x); }",
    "Numbers: 3.14159, 1,000,000, 2024-06-01, +1 (555) 010-9999",
    "line one\n\nline two\n\n\n   indented line\r\nwindows line",
    "<|im_start|>user\nMy SIM card stopped working.<|im_end|>\n<|im_start|>assistant\n",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
)

CHAT_CASES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "How do I reset my router?"}],
    [{"role": "system", "content": "You are a careful clinic assistant."},
     {"role": "user", "content": "Is 38.5 °C a fever for a child?"}],
    [{"role": "user", "content": "Bonjour, ma carte est bloquée."},
     {"role": "assistant", "content": "Je peux vous aider. Quelle banque ?"},
     {"role": "user", "content": "La Banque Postale 🙂"}],
)

# Held-out text for KL/perplexity: a rendered support dialog, a clinical note, and code.
EVAL_TEXTS: tuple[str, ...] = (
    "Customer: My card was swallowed by the ATM this morning and I need cash today. What can I do?\n"
    "Agent: I am sorry to hear that. For your security the card has been blocked automatically. You can "
    "withdraw cash at any branch with your ID, and a replacement card will arrive within five working days. "
    "Would you like me to order the replacement now?",
    "The patient is a 54-year-old woman with type 2 diabetes and hypertension who presents with three days of "
    "productive cough, fever up to 38.7 degrees and mild shortness of breath. Oxygen saturation is 95 percent "
    "on room air. Chest examination reveals crackles at the right base. The most likely diagnosis is "
    "community-acquired pneumonia, and oral antibiotics with follow-up in 48 hours are appropriate.",
    "def moving_average(values, window):\n    \"\"\"Return the moving average of a list.\"\"\"\n"
    "    if window <= 0:\n        raise ValueError('window must be positive')\n    out = []\n"
    "    for i in range(len(values) - window + 1):\n        out.append(sum(values[i:i + window]) / window)\n"
    "    return out\n",
)

# KL(HF fp32 || GGUF) limits, nats per token, by quant and model size (< 1B, >= 1B parameters).
# Reference points: llama.cpp's perplexity tool reports mean KL ~0.001 for Q8_0 and ~0.03 for Q4_K_M on 7B+
# models; the "large" column gives ~3-5x headroom over those. Small models lose more per bit, and SmolLM2's
# 576-wide rows push 180 of 211 matrices of a K-quant onto 32-block fallbacks. Measured on SmolLM2-135M
# (bench/export.py, 241 tokens of held-out text): Q8_0 0.004, Q6_K 0.013, Q5_K_M 0.077, Q4_K_M 0.056,
# Q4_0 0.30; the "small" column gives ~3-4x headroom over those, so a real defect (a dropped or mis-mapped
# tensor, wrong RoPE: KL of whole nats) fails while run-to-run text choice does not. Tiny random test models
# have near-uniform outputs and far smaller KL at any quant; for them the f16 checks below carry the weight.
KL_LIMITS: dict[str, tuple[float, float]] = {
    "f32": (1e-4, 1e-4),
    "bf16": (5e-3, 2e-3),
    "f16": (1e-3, 1e-3),
    "q8_0": (0.015, 0.005),
    "q6_k": (0.05, 0.015),
    "q5_k_m": (0.3, 0.03),
    "q5_k_s": (0.3, 0.035),
    "q5_0": (0.3, 0.04),
    "q5_1": (0.3, 0.035),
    "q4_k_m": (0.3, 0.1),
    "q4_k_s": (0.35, 0.12),
    "q4_0": (1.0, 0.2),
    "q4_1": (0.8, 0.15),
    "q3_k_m": (1.5, 0.35),
    "iq4_xs": (1.0, 0.15),  # SmolLM2 (bench/phone_quant.py): 0.24 without an imatrix, 0.11 with one
}

SMALL_MODEL_PARAMS = 1_000_000_000


def by_size(limits: tuple[float, float], n_params: int) -> float:
    """The (< 1B, >= 1B parameters) limit that applies to a model of `n_params`."""
    small, large = limits
    return small if n_params < SMALL_MODEL_PARAMS else large


def kl_limit(quant: str, n_params: int) -> float:
    return by_size(KL_LIMITS.get(quant, (1.5, 0.5)), n_params)


# --------------------------------------------------------------------------------------------------------
# The HF side


def hf_reference(hf_dir: Path, max_tokens: int, texts: tuple[str, ...], dtype: str = "float32") -> dict[str, Any]:
    """Everything needed from the HF side, computed once for all the files being verified."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" bar would break the printed table
    torch.set_num_threads(int(os.environ.get("CARE_THREADS", "0")) or torch.get_num_threads())
    tok = hf_tokenizer(hf_dir)
    corpus = {t: tok(t, add_special_tokens=False)["input_ids"] for t in TOKENIZER_CORPUS}
    chats = []
    has_template = bool(getattr(tok, "chat_template", None))
    if has_template:
        for msgs in CHAT_CASES:
            try:
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # e.g. a template that rejects system messages
                chats.append({"messages": msgs, "error": f"{type(exc).__name__}: {exc}"})
                continue
            chats.append({"messages": msgs, "text": text,
                          "ids": tok(text, add_special_tokens=False)["input_ids"]})
    seqs = [tok(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype)).eval()
    logprobs = []
    with torch.inference_mode():
        for ids in seqs:
            out = model(torch.tensor([ids])).logits[0].float()
            logprobs.append(torch.log_softmax(out, dim=-1).numpy().astype(np.float32))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return {"corpus": corpus, "chats": chats, "seqs": seqs, "logprobs": logprobs, "n_params": n_params,
            "eot": end_of_turn_token(hf_dir), "rope": expected_rope_factors(hf_dir),
            "has_template": has_template}


def hf_template_and_system(model_dir: Path) -> tuple[str | None, str | None]:
    """The HF chat template and a rendering of a system-less conversation (to find a default system prompt)."""
    try:
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


# --------------------------------------------------------------------------------------------------------
# Comparison


def logit_metrics(ref_logprobs: list[Any], gguf_logits: list[Any], seqs: list[list[int]]) -> dict[str, float]:
    """Top-1 agreement, KL(reference || other) per position, perplexities: `ref_logprobs` are log-probs,
    `gguf_logits` raw logits of the other side, both over the same token ids `seqs`."""
    import numpy as np

    agree = total = 0
    kls: list[float] = []
    nll_q: list[float] = []
    nll_hf: list[float] = []
    max_dlogp = 0.0
    for lp_hf, logits, ids in zip(ref_logprobs, gguf_logits, seqs, strict=True):
        logits = logits.astype(np.float64)
        lp_q = logits - logits.max(axis=-1, keepdims=True)
        lp_q = lp_q - np.log(np.exp(lp_q).sum(axis=-1, keepdims=True))
        lp_hf = lp_hf.astype(np.float64)
        p_hf = np.exp(lp_hf)
        kl = (p_hf * (lp_hf - lp_q)).sum(axis=-1)  # per position
        kls.extend(kl.tolist())
        agree += int((lp_hf.argmax(-1) == lp_q.argmax(-1)).sum())
        total += len(ids)
        nxt = np.asarray(ids[1:])
        pos = np.arange(len(ids) - 1)
        nll_q.extend((-lp_q[pos, nxt]).tolist())
        nll_hf.extend((-lp_hf[pos, nxt]).tolist())
        max_dlogp = max(max_dlogp, float(np.abs(lp_hf - lp_q).max()))
    kl_arr = np.asarray(kls)
    return {
        "tokens": total,
        "top1_agreement": agree / max(total, 1),
        "kl_mean": max(0.0, float(kl_arr.mean())),  # tiny negatives are float rounding
        "kl_p99": float(np.quantile(kl_arr, 0.99)),
        "kl_max": float(kl_arr.max()),
        "ppl": float(math.exp(sum(nll_q) / max(len(nll_q), 1))),
        "ppl_hf": float(math.exp(sum(nll_hf) / max(len(nll_hf), 1))),
        "max_abs_dlogprob": max_dlogp,
    }


def log_softmax(x: Any) -> Any:
    """Log-probabilities of raw logits (last axis), in float64."""
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_between(p_logits: list[Any], q_logits: list[Any], seqs: list[list[int]]) -> float:
    """Mean KL(P || Q) per token between two runs' raw logits over the same tokens (e.g. two llama.cpp runs)."""
    return logit_metrics([log_softmax(p) for p in p_logits], q_logits, seqs)["kl_mean"]
