"""Device profiles: llama.cpp settings for a laptop and for a phone-class device (2 cores, <= 4 GB).

Used by `care bench --profile`, `care chat --profile` and `care serve --profile`. The phone settings come
from the trade-off table of bench/phone_profile.py (figures in docs/bundle-and-phones.md).
"""

from __future__ import annotations

from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    # llama-cpp-python's own defaults, with the phone-sensible n_ctx and all idle physical cores.
    "laptop": {"threads": None, "n_ctx": 4096, "ceiling_gb": None, "type_k": None, "type_v": None,
               "flash_attn": None, "repack": None, "use_mmap": True, "quant": "q4_k_m"},
    # Measured on a Phi-3.5-mini-shaped Q4_K_M (2.40 GB) at n_ctx 4096, 2 threads (bench/phone_profile.py):
    # raw llama-cpp-python defaults peak at 5.62 GB RSS (f16 KV 1.6 GB + repacked weights beside the mapping).
    # K q8_0 / V q4_0 (needs flash attention) and the GGUF read into memory instead of mapped, so the repacked
    # weights are the only copy: 3.15 GB, decode 1.00x the raw default's (median of 5 alternated rounds).
    # Mapped without the repacked copy is as small (3.13 GB) and loads 10x faster but decodes ~9% slower;
    # q8_0 for both stays over 3.2 GB (3.34); q4_0 for both fits (2.93) but costs next-token agreement.
    # `quant`: the export type for a phone (`care export gguf --phone --imatrix`), chosen by bench/phone_quant.py:
    # of the two types smaller than Q4_K_M, Q3_K_M with a domain importance matrix had the lower KL on SmolLM2
    # (0.101 vs IQ4_XS 0.111; Q4_K_M 0.038; without the matrix 0.160 / 0.241 / 0.061), and on the
    # Phi-3.5-shaped model it is the smaller file (1.96 GB vs ~2.1 GB for IQ4_XS; figures in docs/bundle-and-phones.md).
    "phone": {"threads": 2, "n_ctx": 4096, "ceiling_gb": 4.0, "type_k": "q8_0", "type_v": "q4_0",
              "flash_attn": True, "repack": True, "use_mmap": False, "quant": "q3_k_m"},
}


def profile(name: str) -> dict[str, Any]:
    from care.errors import UsageError

    try:
        return dict(PROFILES[name])
    except KeyError:
        raise UsageError(f"Unknown profile '{name}'", hint=f"Choose one of: {', '.join(PROFILES)}") from None


KV_TYPES = ("f16", "q8_0", "q4_0")


def kv_label(type_k: str | None, type_v: str | None) -> str:
    """'q8_0' when K and V match, else 'q8_0/q4_0'; None is llama.cpp's f16."""
    k, v = type_k or "f16", type_v or "f16"
    return k if k == v else f"{k}/{v}"


def resolve(name: str, kv_type: str | None = None, repack: bool | None = None,
            use_mmap: bool | None = None) -> dict[str, Any]:
    """A profile's llama.cpp settings with the command line's overrides, for `care bench` and `care chat`."""
    prof = profile(name)
    if kv_type:
        prof["type_k"], prof["type_v"] = parse_kv_type(kv_type)
    if prof["type_v"]:
        prof["flash_attn"] = True  # llama.cpp needs flash attention for a quantized V cache
    if repack is not None:
        prof["repack"] = repack
    if use_mmap is not None:
        prof["use_mmap"] = use_mmap
    return prof


def parse_kv_type(value: str) -> tuple[str | None, str | None]:
    """'q8_0' -> both; 'q8_0/q4_0' -> K q8_0, V q4_0; f16 -> None (llama.cpp's default)."""
    from care.errors import UsageError

    k, _, v = value.lower().partition("/")
    v = v or k
    for t in (k, v):
        if t not in KV_TYPES:
            raise UsageError(f"Unknown KV-cache type '{t}'", hint=f"Use {', '.join(KV_TYPES)} or K/V, e.g. q8_0/q4_0")
    return (None if k == "f16" else k), (None if v == "f16" else v)
