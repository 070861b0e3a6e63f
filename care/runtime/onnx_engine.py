"""The ONNX backend: an onnxruntime-genai model folder (from `care export onnx`) behind ChatEngine's interface.

Same public surface the CLI, ChatSession and the server use: render / tokenize / fit / stream / chat /
cancel / close, n_ctx, model_name, quant_type, config.sampling, streaming `GenerationResponse` chunks.
The chat template is the folder's own (tokenizer_config.json, applied by onnxruntime-genai); a folder
without one needs a named template, as with GGUF.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from care.artifacts import is_onnx_folder
from care.errors import GenerationError, InvalidModelError, ModelNotFoundError, require
from care.runtime.backend import ContextBudget, EngineConfig, GenerationResponse, Message, SamplingConfig
from care.runtime.engine import NAMED_TEMPLATES

log = logging.getLogger(__name__)


class OnnxChatEngine(ContextBudget):
    """An onnxruntime-genai model folder (genai_config.json + model.onnx + tokenizer files)."""

    backend_name = "onnx"

    def __init__(self, folder: str | os.PathLike[str], config: EngineConfig | None = None, *,
                 loaded: tuple[Any, Any] | None = None) -> None:
        """`loaded`: an (og.Model, og.Tokenizer) of this folder already in memory (eval scores with the same
        model it generates with; loading it twice would double the RAM)."""
        require("onnxruntime_genai", "export")
        import onnxruntime_genai as og

        self.path = Path(folder)
        if not self.path.is_dir():
            raise ModelNotFoundError("ONNX model folder not found", path=self.path,
                                     hint="Export one with `care export onnx`")
        if not is_onnx_folder(self.path):
            raise InvalidModelError("Not an onnxruntime-genai model folder (no genai_config.json)", path=self.path,
                                    hint="Export it with `care export onnx`")
        self.config = config or EngineConfig()
        if self.config.lora_path or self.config.adapters:
            raise InvalidModelError("LoRA adapters (--lora, --adapters) need a GGUF model (the llama.cpp engine)",
                                    path=self.path,
                                    hint="Merge the adapter before `care export onnx`, or use the GGUF export")
        t0 = time.perf_counter()
        try:
            self.model, self.tokenizer = loaded or (None, None)
            if self.model is None:
                self.model = og.Model(str(self.path))
                self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:  # onnxruntime-genai raises plain RuntimeError/OrtException
            raise InvalidModelError(f"onnxruntime-genai could not load the model: {exc}", path=self.path,
                                    hint="Re-export it with `care export onnx`") from exc
        self.load_s = time.perf_counter() - t0
        self._og = og
        genai = json.loads((self.path / "genai_config.json").read_text(encoding="utf-8"))
        self._max_length = int(genai.get("model", {}).get("context_length") or self.config.n_ctx)
        self.template = self._pick_template()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self.n_threads = self.config.n_threads

    @property
    def n_ctx(self) -> int:
        return min(self.config.n_ctx, self._max_length)

    @property
    def model_name(self) -> str:
        return self.path.name

    @property
    def quant_type(self) -> str:
        return "onnx"

    def _pick_template(self) -> str:
        chosen = self.config.chat_template
        if chosen:
            return NAMED_TEMPLATES.get(chosen, chosen)
        jinja = self.path / "chat_template.jinja"  # where transformers 5 saves it
        if jinja.is_file() and jinja.read_text(encoding="utf-8").strip():
            return jinja.read_text(encoding="utf-8")
        cfg = self.path / "tokenizer_config.json"
        if cfg.is_file():
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str) and template.strip():
                return template
        names = ", ".join(NAMED_TEMPLATES)
        raise InvalidModelError("The ONNX model folder has no chat template", path=self.path,
                                hint=f"Choose one with --chat-template NAME ({names}) or re-export with it")

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        try:
            return self.tokenizer.apply_chat_template(json.dumps(list(messages)), template_str=self.template,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:
            raise GenerationError(f"The chat template could not render the conversation: {exc}") from exc

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    def cancel(self) -> None:
        self._cancel.set()

    def stream(self, messages: Sequence[Message], sampling: SamplingConfig | None = None
               ) -> Iterator[GenerationResponse]:
        s = sampling or self.config.sampling
        if s.json_schema is not None:
            raise GenerationError("JSON output (response_format) needs the llama.cpp engine",
                                  hint="Serve the GGUF export of the model instead of the ONNX folder")
        og = self._og
        with self._lock:
            self._cancel.clear()
            kept, prompt, dropped = self.fit(messages, s.max_tokens)
            params = og.GeneratorParams(self.model)
            search = {"max_length": len(prompt) + s.max_tokens, "do_sample": s.temperature > 0,
                      "repetition_penalty": s.repeat_penalty}
            if s.temperature > 0:
                search.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
            if s.seed is not None:
                search["random_seed"] = s.seed
            params.set_search_options(**search)
            gen = og.Generator(self.model, params)
            t0 = time.perf_counter()
            gen.append_tokens(prompt)
            decoder = self.tokenizer.create_stream()
            ttft = None
            n_out = 0
            text_so_far = ""
            finish = "length"
            while not gen.is_done():
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
                n_out += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
                piece = decoder.decode(token)
                text_so_far += piece
                hit = next((st for st in s.stop if st in text_so_far), None)
                if hit:  # the user's extra stop strings (EOS is handled by onnxruntime-genai)
                    finish = "stop"
                    cut = text_so_far.index(hit) - (len(text_so_far) - len(piece))
                    piece = piece[: max(0, cut)]
                    if piece:
                        yield GenerationResponse(piece, prompt_tokens=len(prompt), completion_tokens=n_out,
                                                 ttft_s=ttft, dropped_turns=dropped)
                    break
                if piece:
                    yield GenerationResponse(piece, prompt_tokens=len(prompt), completion_tokens=n_out, ttft_s=ttft,
                                             dropped_turns=dropped)
            else:
                finish = "length" if n_out >= s.max_tokens else "stop"
            del gen
            elapsed = time.perf_counter() - t0
            decode_s = max(elapsed - (ttft or 0.0), 1e-9)
            yield GenerationResponse("", finish_reason=finish, prompt_tokens=len(prompt), completion_tokens=n_out,
                                     ttft_s=ttft, tokens_per_s=(n_out - 1) / decode_s if n_out > 1 else 0.0,
                                     elapsed_s=elapsed, dropped_turns=dropped)

    def close(self) -> None:
        self.model = None  # onnxruntime-genai frees on collection
