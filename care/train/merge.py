"""Merge a LoRA adapter into its base model, never into 4-bit weights, and verify the result.

`merge_and_unload()` on an NF4 model re-quantizes the merged weights, and the 4-bit grid is coarser than the
LoRA update: measured here, it erased a SmolLM2 fine-tune. Two sound ways instead:
- reload: load the base in 16/32-bit and merge (the usual way);
- dequantize: dequantize the NF4 base that was trained against and merge (reproduces the trained function).
Both are checked against the adapter model (merged vs unmerged logits on held-out prompts: max abs diff and
top-1 agreement; above tolerance is an error) and, for a QLoRA adapter, against the trained function itself
(NF4 base + adapter), so the report says which method is closer.

Precision and the check: in fp32 the logits of merged and unmerged models agree to ~1e-6, so the logit check
decides. In 16 bits they cannot: every activation is rounded (bf16 keeps 8 bits), and across a 3.8B model's 32
layers merged vs unmerged logits drift by ~0.3 (measured on the Phi-3.5-shaped model, logit spread ~1.1),
with argmax flips wherever two tokens nearly tie. So a 16-bit `reload` merge is judged on its weights: every
LoRA-targeted matrix must equal base + scale * B @ A, computed in fp32 from the base checkpoint and the
adapter, to within the dtype's rounding (`check_merged_weights`). That catches a wrong base, scale, module or a
4-bit requantization, with no forward pass; the logit figures are still measured and reported.

`reload` merges in the base checkpoint's own dtype when that is 16-bit (Phi-3.5-mini ships bf16)
and saves the merged model in it, so a 3.8B merge needs ~1x the 16-bit size in memory (fp32 would double it
and the saved folder); fp32 checkpoints (the embedded SmolLM2, test models) stay fp32. The NF4 reference
(trained function) is computed first and freed before the 16-bit base loads, so both never share memory.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import ADAPTER_INFO, MERGE_INFO, merge_info, read_adapter_info
from care.errors import InvalidModelError, VerificationError
from care.io import write_json

log = logging.getLogger(__name__)

# Default max |Δlogit| merged vs unmerged per merge dtype: fp32 sums differ by ~1e-6; 16-bit rounds the merged
# weights and every activation (bf16 keeps 8 bits of mantissa), so the same merge differs by ~1e-2 there.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}
# Held-out prompts for the logit check (not from any training set).
VERIFY_PROMPTS = [
    "How do I reset my online banking password?",
    "My phone shows no signal after the update. What should I do?",
    "What are common symptoms of dehydration in children?",
    "Can you explain what a credit limit is?",
]
END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class MergeReport:
    method: str
    out_dir: Path
    max_abs_diff: float  # merged vs the same base + adapter, unmerged
    top1_agreement: float
    trained_max_abs_diff: float | None = None  # merged vs the trained function (NF4 base + adapter)
    trained_top1_agreement: float | None = None
    tolerance: float = 1e-3
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def _read_info(adapter_dir: Path) -> dict[str, Any]:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InvalidModelError("Not a LoRA adapter folder (no adapter_config.json)", path=adapter_dir,
                                hint="Pass the adapter/ folder that `care train` wrote")
    # care_adapter.json (care.artifacts) when `care train` wrote one: a bad one is refused naming the key; without
    # it, or without its base_model, the base is the one adapter_config.json names.
    info = read_adapter_info(adapter_dir, required=()) if (adapter_dir / ADAPTER_INFO).is_file() else {}
    if "base_model" not in info:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        info["base_model"] = cfg.get("base_model_name_or_path")
    if not info.get("base_model"):
        raise InvalidModelError("The adapter does not name its base model", path=adapter_dir,
                                hint="Re-train with `care train` or fix base_model_name_or_path")
    return info


def _batch(tokenizer, prompts: list[str]):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _logits(model, enc):
    import torch

    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    return out


def compare(a, b, mask) -> tuple[float, float]:
    """(max |a-b| over real tokens, share of real tokens whose argmax agrees)."""
    m = mask.bool()
    diff = (a - b).abs().amax(-1)[m].max().item()
    agree = (a.argmax(-1) == b.argmax(-1))[m].float().mean().item()
    return float(diff), float(agree)


def lora_factors(peft_model, adapter_name: str = "default") -> dict[str, tuple[Any, Any, float]]:
    """{module name as in the base checkpoint: (A fp32, B fp32, scaling)} of every LoRA layer, read before
    merging (a few MB at r=8)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key = name.removeprefix("base_model.model.")
            out[key] = (module.lora_A[adapter_name].weight.detach().float().clone(),
                        module.lora_B[adapter_name].weight.detach().float().clone(),
                        float(module.scaling[adapter_name]))
    return out


def _checkpoint_tensors(base: str):
    """key -> lazily read tensor of a local safetensors checkpoint (one tensor in memory at a time)."""
    from safetensors import safe_open

    folder = Path(base)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, local_files_only=True))
        except Exception:  # not cached locally: the caller falls back to the logit check
            return None
    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as h:
            where.update(dict.fromkeys(h.keys(), f))  # noqa: SIM118 - a safe_open handle is not a dict
    if not where:
        return None

    def get(key: str):
        with safe_open(str(where[key]), framework="pt", device="cpu") as h:
            return h.get_tensor(key)

    return where, get


def check_merged_weights(merged, base: str, factors: dict[str, tuple[Any, Any, float]], dtype: str) -> dict[str, Any]:
    """Each merged LoRA-targeted weight vs base + scaling * B @ A computed in fp32 from the checkpoint.

    Allowed error per element: the dtype's eps (bf16 2^-7, fp16 2^-10, fp32 2^-23) times (|expected| +
    |delta|): the merge rounds the delta and the sum once each. Returns {"checked", "max_ratio" (worst
    error / allowed; <= 1 passes), "worst", "delta_to_rounding" (the largest ||update|| / (eps * ||merged
    weight||) over the matrices: below 1 the update is within rounding, too small for any check to see), "skipped" (reason) }."""
    import torch

    found = _checkpoint_tensors(base)
    if found is None:
        return {"checked": 0, "skipped": f"no local safetensors checkpoint for {base}"}
    where, get = found
    eps = torch.finfo(getattr(torch, dtype)).eps
    worst_ratio, worst, delta_ratio, checked = 0.0, None, 0.0, 0
    params = dict(merged.named_parameters())
    for name, (a, b, scaling) in factors.items():
        key = f"{name}.weight"
        if key not in where or key not in params:
            return {"checked": checked, "skipped": f"{key} not found in the base checkpoint or merged model"}
        got_all = params[key].detach()
        base_all = get(key)
        if got_all.shape != base_all.shape or b.shape[0] != got_all.shape[0]:
            return {"checked": checked, "max_ratio": float("inf"), "worst": key,
                    "error": f"shape {tuple(got_all.shape)} != {tuple(base_all.shape)}"}
        ratio = delta_sq = weight_sq = 0.0
        for r0 in range(0, got_all.shape[0], 1024):  # row blocks: a few MB at a time, not 1 GB for gate_up
            delta = scaling * (b[r0:r0 + 1024] @ a)
            expected = base_all[r0:r0 + 1024].float() + delta
            err = (got_all[r0:r0 + 1024].float() - expected).abs()
            allowed = eps * (expected.abs() + delta.abs()) + 1e-12
            ratio = max(ratio, (err / allowed).max().item())
            delta_sq += float(delta.pow(2).sum())
            weight_sq += float(expected.pow(2).sum())
        delta_ratio = max(delta_ratio, delta_sq ** 0.5 / (eps * weight_sq ** 0.5 + 1e-12))
        if ratio > worst_ratio:
            worst_ratio, worst = ratio, key
        checked += 1
        del base_all
    return {"checked": checked, "max_ratio": worst_ratio, "worst": worst, "delta_to_rounding": delta_ratio}


def merge_dtype(base: str, requested: str = "auto") -> str:
    """The dtype to merge and save in: `requested`, or for auto the base checkpoint's dtype if 16-bit."""
    from care.models import stored_dtype

    if requested == "auto":
        return stored_dtype(base)
    if requested not in TOLERANCE:
        raise InvalidModelError(f"Unknown merge dtype {requested!r}", hint="Use auto, float32, bfloat16 or float16")
    return requested


def _dequantized_base(base: str, quant: dict[str, Any]):
    """The fp32 base whose Linear weights are exactly the dequantized NF4 weights trained against."""
    import torch

    from care.train.modeling import load_model

    q = load_model(base, quant, quantize=True)
    fp = load_model(base, quant, quantize=False, dtype=torch.float32)
    modules = dict(fp.named_modules())
    from peft.utils.integrations import dequantize_bnb_weight

    n = 0
    for name, mod in q.named_modules():
        if type(mod).__name__ == "Linear4bit":
            w = dequantize_bnb_weight(mod.weight, state=mod.weight.quant_state).to(torch.float32)
            target = modules[name]
            with torch.no_grad():
                target.weight.copy_(w.to(target.weight.device).reshape(target.weight.shape))
            n += 1
    log.info("dequantized %d NF4 linear layers", n)
    return fp, q


def _generation_config(model, tokenizer, base: str):
    """Base generation config with every end-of-turn id the tokenizer knows added to eos_token_id."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:
        gen = model.generation_config
    eos = gen.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    vocab = tokenizer.get_vocab()
    for tok in [tokenizer.eos_token, *END_OF_TURN]:
        wanted = tok and tok in vocab and (tok == tokenizer.eos_token or tok in (tokenizer.chat_template or ""))
        if wanted and vocab[tok] not in ids:
            ids.append(vocab[tok])
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, method: str = "reload", verify: bool = True,
                  tolerance: float | None = None, prompts: list[str] | None = None,
                  dtype: str = "auto") -> MergeReport:
    """Merge `adapter_dir` into its base and save a standalone model in `out_dir`.

    method: reload | dequantize | both (both: build and verify both, save the one closer to the trained
    function). dtype: what `reload` merges and saves in (auto: the base checkpoint's 16-bit dtype, else
    fp32; dequantize always works in fp32). Raises VerificationError when the merged logits differ from the
    unmerged adapter model's by more than `tolerance` (max abs; default per dtype, TOLERANCE) or top-1
    agreement is below 99%."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from care.train.lowmem import large_allocations_via_mmap
    from care.train.modeling import load_model

    large_allocations_via_mmap()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if method not in ("reload", "dequantize", "both"):
        raise InvalidModelError(f"Unknown merge method {method!r}", hint="Use reload, dequantize or both")
    info = _read_info(adapter_dir)
    base = info["base_model"]
    quantized = bool(info.get("quantized"))
    quant = info.get("quant") or {}
    reload_dtype = merge_dtype(base, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = _batch(tokenizer, prompts or VERIFY_PROMPTS)
    mask = enc["attention_mask"]

    trained_logits = None
    methods = ["reload", "dequantize"] if method == "both" else [method]
    if method == "dequantize" and not quantized:
        log.info("adapter was trained without quantization: dequantize is the same as reload")
        methods = ["reload"]
    if quantized and methods == ["reload"]:
        # The trained function first, then free it: the NF4 model and the 16-bit base never coexist.
        q = load_model(base, quant, quantize=True)
        trained = PeftModel.from_pretrained(q, str(adapter_dir)).eval()
        trained_logits = _logits(trained, enc)
        del trained, q
        from care.train.lowmem import release_memory

        release_memory()
    candidates = []
    for m in methods:
        if m == "dequantize":
            fp, q = _dequantized_base(base, quant)
            if trained_logits is None:
                trained = PeftModel.from_pretrained(q, str(adapter_dir)).eval()
                trained_logits = _logits(trained, enc)
                del trained
            del q
        else:
            fp = load_model(base, quant, quantize=False, dtype=getattr(torch, reload_dtype))
        peft_model = PeftModel.from_pretrained(fp, str(adapter_dir)).eval()
        factors = lora_factors(peft_model) if m == "reload" else {}
        unmerged = _logits(peft_model, enc)
        merged = peft_model.merge_and_unload().eval()
        merged_logits = _logits(merged, enc)
        diff, agree = compare(merged_logits, unmerged, mask)
        cand = {"method": m, "max_abs_diff": diff, "top1_agreement": agree, "model": merged,
                "dtype": reload_dtype if m == "reload" else "float32", "logits": merged_logits}
        if factors:  # the base checkpoint's own weights: only `reload` merges into those
            cand["weights"] = check_merged_weights(merged, base, factors, cand["dtype"])
            del factors
        candidates.append(cand)
    if quantized and trained_logits is None:
        q = load_model(base, quant, quantize=True)
        trained = PeftModel.from_pretrained(q, str(adapter_dir)).eval()
        trained_logits = _logits(trained, enc)
        del trained, q
    for cand in candidates:
        if trained_logits is not None:
            cand["trained_max_abs_diff"], cand["trained_top1_agreement"] = compare(
                cand["logits"], trained_logits, mask)
    chosen = min(candidates, key=lambda c: c.get("trained_max_abs_diff", c["max_abs_diff"]))
    public = [{k: v for k, v in c.items() if k not in ("model", "logits")} for c in candidates]
    report = MergeReport(method=chosen["method"], out_dir=out_dir, max_abs_diff=chosen["max_abs_diff"],
                         top1_agreement=chosen["top1_agreement"],
                         trained_max_abs_diff=chosen.get("trained_max_abs_diff"),
                         trained_top1_agreement=chosen.get("trained_top1_agreement"),
                         tolerance=tolerance if tolerance is not None else TOLERANCE[chosen["dtype"]],
                         candidates=public)
    for c in public:
        log.info("merge %s: max|Δlogit| %.3g vs unmerged, top-1 %.3f; vs trained %s", c["method"],
                 c["max_abs_diff"], c["top1_agreement"], c.get("trained_max_abs_diff"))
    if verify:
        for c in public:
            _judge(c, tolerance, adapter_dir)
    _save(chosen["model"], tokenizer, base, adapter_dir, out_dir, info, report, chosen["dtype"])
    return report


def _judge(c: dict[str, Any], tolerance: float | None, adapter_dir: Path) -> None:
    """Raise VerificationError if candidate `c` is not a faithful merge (see the module docstring)."""
    hint = "Check that the adapter matches its base model; nothing was saved"
    weights = c.get("weights") or {}
    if weights.get("max_ratio", 0.0) > 1.0:
        raise VerificationError(
            f"Merged weight {weights.get('worst')} differs from base + LoRA update by {weights['max_ratio']:.3g}x "
            f"the {c['dtype']} rounding" + (f" ({weights['error']})" if weights.get("error") else ""),
            path=adapter_dir, hint=hint)
    tol = tolerance if tolerance is not None else TOLERANCE[c["dtype"]]
    logits_ok = c["max_abs_diff"] <= tol and c["top1_agreement"] >= 0.99
    if logits_ok:
        return
    if c["dtype"] != "float32" and tolerance is None and weights.get("checked"):
        # 16-bit: the weights were checked exactly; the logit drift is rounding (module docstring).
        log.info("merge %s: %s logits drift by %.3g (top-1 %.3f) through rounding; the merged weights match "
                 "base + LoRA update within %s rounding (%d matrices)", c["method"], c["dtype"],
                 c["max_abs_diff"], c["top1_agreement"], c["dtype"], weights["checked"])
        return
    raise VerificationError(
        f"Merged model ({c['method']}, {c['dtype']}) differs from the adapter model: max |Δlogit| "
        f"{c['max_abs_diff']:.3g} > {tol:g} or top-1 agreement {c['top1_agreement']:.3f} < 0.99",
        path=adapter_dir, hint=hint)


def _save(model, tokenizer, base: str, adapter_dir: Path, out_dir: Path, info: dict[str, Any],
          report: MergeReport, dtype: str = "float32") -> None:
    import torch

    from care.io import check_free_space

    wanted = getattr(torch, dtype)
    n_bytes = sum(p.numel() * wanted.itemsize for p in model.parameters())
    check_free_space(out_dir.parent if not out_dir.exists() else out_dir, n_bytes, "merged model")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = model.to(wanted)
    model.generation_config = _generation_config(model, tokenizer, base)
    model.save_pretrained(str(tmp))
    if info.get("chat_template"):  # the model's real template, never the training variant
        tokenizer.chat_template = info["chat_template"]
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(tmp))
    write_json(tmp / MERGE_INFO, merge_info(
        base_model=base,
        adapter=str(adapter_dir.resolve()),
        recipe_hash=info.get("recipe_hash"),
        recipe_name=info.get("recipe_name"),
        recipe_path=info.get("recipe_path"),
        trained_quantized=info.get("quantized"),
        eos_token_id=model.generation_config.eos_token_id,
        merge=report.to_dict() | {"out_dir": str(out_dir)},
    ))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
