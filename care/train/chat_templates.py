"""Training variants of chat templates: same text, plus `{% generation %}` markers for assistant-only loss.

trl patches Phi-3/3.5, Llama 3, Qwen and others itself; SmolLM2's stock template is not in its list, so
ours is here. A training variant must render byte-identically to the stock template (tests check it), and
the assistant's end-of-turn token `<|im_end|>` sits inside the markers so the model learns to stop.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# SmolLM2-Instruct's template, exactly as shipped (HF tokenizer_config.json and the GGUF's metadata).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

OURS: dict[str, str] = {SMOLLM2_TEMPLATE: SMOLLM2_TRAINING_TEMPLATE}


def has_generation_markers(template: str) -> bool:
    from trl.chat_template_utils import has_generation_markers as trl_has

    return trl_has(template)


def training_template(tokenizer) -> str | None:
    """The training variant of the tokenizer's chat template, the template itself if it already has markers,
    or None when neither we nor trl know one (the caller then falls back to prompt/completion masking)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return None
    if has_generation_markers(template):
        return template
    if template in OURS:
        return OURS[template]
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer) or template
    except (ValueError, TypeError) as exc:
        log.info("no training variant of this chat template (%s)", exc)
        return None
