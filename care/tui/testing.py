"""A scripted stand-in for ChatEngine, for the TUI's tests and snapshots (the thing under test is the UI).

It is a ChatBackend (model_name, quant_type, n_ctx, path, load_s, stream, cancel, close) whose context
budget is the real one (care.runtime.backend.ContextBudget.fit) over a word-per-token render/tokenize, and
streams the reply word by word as GenerationResponse chunks. `gate` lets a test hold the stream after
`hold_after` chunks, to press Esc or "crash" mid-reply.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from care.runtime.backend import ContextBudget, EngineConfig, GenerationResponse, SamplingConfig


class FakeEngine(ContextBudget):
    backend_name = "fake"
    COUNT_SLACK = 0.0  # a bare text's words are exactly what it adds (plus the role marker)

    def __init__(self, replies: Sequence[str] = ("Block the card in the app under **Cards → Block**.",),
                 model_name: str = "FakeModel-1M", quant_type: str = "Q4_1", n_ctx: int = 2048,
                 hold_after: int | None = None) -> None:
        self.replies = list(replies)
        self.model_name = model_name
        self.quant_type = quant_type
        self.n_ctx = n_ctx
        self.path = Path("/models/fake.gguf")
        self.load_s = 0.0
        self.hold_after = hold_after
        self.gate = threading.Event()  # set it to let a held stream go on
        self.holding = threading.Event()  # set while the stream waits on the gate
        self.calls: list[list[dict[str, str]]] = []
        self._cancel = threading.Event()
        self.closed = False
        self.config = EngineConfig(n_ctx=n_ctx, sampling=SamplingConfig(temperature=0.0, max_tokens=64))

    # A word is a token here: enough for the session's context budget and the status bar.
    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return "\n".join(f"<{m['role']}> {m['content']}" for m in messages) + ("\n<assistant>" if
                                                                                 add_generation_prompt else "")

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    def stream(self, messages: Sequence[dict[str, str]], sampling: Any = None) -> Iterator[GenerationResponse]:
        self._cancel.clear()
        self.calls.append([dict(m) for m in messages])
        reply = self.replies[min(len(self.calls) - 1, len(self.replies) - 1)]
        words = reply.split(" ")
        prompt = sum(len(m["content"].split()) for m in messages)
        finish = "stop"
        n = 0
        for i, word in enumerate(words):
            if self.hold_after is not None and i == self.hold_after:
                self.holding.set()
                self.gate.wait(timeout=30)
            if self._cancel.is_set():
                finish = "cancelled"
                break
            n += 1
            yield GenerationResponse(text=word if i == 0 else " " + word, prompt_tokens=prompt,
                                     completion_tokens=n, ttft_s=0.01)
        yield GenerationResponse(text="", finish_reason=finish, prompt_tokens=prompt, completion_tokens=n,
                                 ttft_s=0.01, tokens_per_s=42.0, elapsed_s=0.1)

    def cancel(self) -> None:
        self._cancel.set()
        self.gate.set()

    def close(self) -> None:
        self.closed = True
