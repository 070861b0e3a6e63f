"""An Ollama Modelfile that works without edits: FROM the GGUF beside it, the chat format as an Ollama
(Go) template, the stop strings, and a 4k context (Phi-3.5 switches to its long RoPE factors above 4096)."""

from __future__ import annotations

import re

GO_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    "phi3": (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n"
        "{{ end }}<|assistant|>\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
STOPS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


def detect_format(jinja_template: str | None) -> str | None:
    """Which known chat format a Jinja template implements, from its markers."""
    t = jinja_template or ""
    if "<|im_start|>" in t:
        return "chatml"
    if "<|start_header_id|>" in t:
        return "llama3"
    if "<|assistant|>" in t and "<|end|>" in t:
        return "phi3"
    return None


def default_system_prompt(rendered_without_system: str | None, fmt: str | None) -> str | None:
    """The system prompt a template inserts when the conversation has none (SmolLM2 does), so Ollama's
    rendering matches the HF one."""
    if not rendered_without_system or fmt is None:
        return None
    pattern = {"chatml": r"<\|im_start\|>system\n(.*?)<\|im_end\|>", "phi3": r"<\|system\|>\n(.*?)<\|end\|>",
               "llama3": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"}[fmt]
    m = re.search(pattern, rendered_without_system, re.S)
    return m.group(1) if m else None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def render_modelfile(gguf_name: str, jinja_template: str | None, extra_stops: list[str] | None = None,
                     system: str | None = None, num_ctx: int = 4096, others: list[str] | None = None,
                     adapter: str | None = None) -> str:
    """`adapter`: a GGUF LoRA adapter applied on top of the FROM model (Ollama takes one per Modelfile)."""
    fmt = detect_format(jinja_template)
    command = "care export gguf-lora" if adapter else "care export gguf"
    lines = [f"# Ollama Modelfile written by `{command}`.",
             "#   ollama create NAME -f Modelfile && ollama run NAME"]
    if others:
        lines.append("# Other quantizations in this folder: " + ", ".join(others) + " (change FROM to use one)")
    lines.append(f"FROM ./{gguf_name}")
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if fmt:
        lines.append(f"TEMPLATE {_quote(GO_TEMPLATES[fmt])}")
    else:
        lines.append("# Unknown chat format: Ollama uses the template stored in the GGUF.")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    stops = list(dict.fromkeys([*(STOPS.get(fmt or "", ())), *(extra_stops or [])]))
    lines += [f'PARAMETER stop "{s}"' for s in stops if s and '"' not in s]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"
