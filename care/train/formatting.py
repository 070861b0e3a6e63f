"""Records -> chat conversations in the base model's own template, with the domain's system prompt.

The loss covers the assistant turns only (prompt tokens masked) and keeps the end-of-turn token in the
labels. With a training template (`{% generation %}` markers) trl's `assistant_only_loss` does the masking;
for templates without one we hand trl prompt/completion pairs and its `completion_only_loss` does it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from care.domains import system_prompt
from care.train.records import BadRows, Record

log = logging.getLogger(__name__)


def to_messages(record: Record) -> list[dict[str, str]]:
    """The conversation for one record; the domain's system prompt unless the row brings its own."""
    system = record.system or system_prompt(record.domain)
    if record.messages:
        msgs = [dict(m) for m in record.messages]
        if msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return msgs
    return [{"role": "system", "content": system}, {"role": "user", "content": record.query},
            {"role": "assistant", "content": record.response}]


def token_lengths(tokenizer, records: Sequence[Record]) -> list[int]:
    texts = [tokenizer.apply_chat_template(to_messages(r), tokenize=False) for r in records]
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(x) for x in enc]


def filter_by_length(tokenizer, records: Sequence[Record], max_length: int, bad: BadRows
                     ) -> tuple[list[Record], list[int]]:
    """Rows longer than max_length tokens are bad rows (truncating would cut off the end-of-turn token and
    teach the model never to stop). Returns the kept rows and their token lengths."""
    keep, lengths = [], []
    for r, n in zip(records, token_lengths(tokenizer, records), strict=True):
        if n > max_length:
            file, _, line = r.origin.rpartition(":")
            bad.add(file or r.source, int(line) if line.isdigit() else 0,
                    f"over max length ({n} > {max_length} tokens)")
            continue
        keep.append(r)
        lengths.append(n)
    return keep, lengths


def percentiles(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pct(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return float(s[lo] + (s[hi] - s[lo]) * (k - lo))

    return {"min": float(s[0]), "p50": pct(0.5), "p90": pct(0.9), "p95": pct(0.95), "p99": pct(0.99),
            "max": float(s[-1]), "mean": sum(s) / len(s), "total": float(sum(s))}


def to_dataset(records: Sequence[Record], prompt_completion: bool = False):
    """A `datasets.Dataset` in trl's conversational format: `messages`, or `prompt`/`completion`."""
    from datasets import Dataset

    rows: list[dict[str, Any]] = []
    for r in records:
        msgs = to_messages(r)
        if prompt_completion:
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:], "domain": r.domain, "id": r.id})
        else:
            rows.append({"messages": msgs, "domain": r.domain, "id": r.id})
    return Dataset.from_list(rows)
