"""Model backends for eval: an HF folder (transformers), a GGUF file (llama.cpp), an ONNX folder (onnxruntime-genai).

Each backend tokenizes with the model's own tokenizer and returns the log-probability of continuation tokens
after a context; `care.eval.scoring` builds identical prompts for all of them. Generation (for the generation
metrics) is greedy: transformers `generate` for HF, the runtime ChatEngine for GGUF.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from care.errors import EvalError, InvalidModelError, ModelNotFoundError, require
from care.runtime import llama_compat
from care.system import default_threads, sha256_file

log = logging.getLogger(__name__)

Message = dict[str, str]


def _log_softmax(row) -> Any:
    import numpy as np

    row = np.asarray(row, dtype=np.float64)
    m = row.max()
    return row - (m + math.log(np.exp(row - m).sum()))


class Backend:
    """Common scoring logic; subclasses provide encode(), token_logprobs() and generate()."""

    kind = "base"
    max_length = 4096

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or self.path.name
        self.truncated = 0

    # -- subclass API ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_logprobs(self, context: list[int], continuations: Sequence[list[int]]) -> list[float]:
        """Sum of log P(continuation tokens | context) for each continuation."""
        raise NotImplementedError

    def generate(self, messages: Sequence[Message], max_tokens: int) -> str:
        raise NotImplementedError

    def model_files(self) -> list[Path]:
        return [self.path]

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "path": str(self.path),
                "files": {str(p.name): sha256_file(p) for p in self.model_files()}}

    def close(self) -> None:
        pass

    # -- shared --------------------------------------------------------------------------------------
    def loglikelihoods(self, context: str, continuations: Sequence[str]) -> list[float]:
        """lm-evaluation-harness style: context_enc = enc(context), continuation = enc(context+cont)[len(ctx):].

        Contexts longer than the model allows are cut from the left, as the harness does."""
        ctx = self.encode(context)
        conts = []
        for cont in continuations:
            whole = self.encode(context + cont)
            tail = whole[len(ctx):]
            conts.append(tail if tail else self.encode(cont))
        longest = max(len(c) for c in conts)
        room = self.max_length - longest
        if len(ctx) > room:
            self.truncated += 1
            ctx = ctx[len(ctx) - room:]
        return self.token_logprobs(ctx, conts)


class HFBackend(Backend):
    """A transformers causal-LM folder (or, with gguf_file=, a GGUF that transformers dequantizes)."""

    kind = "hf"

    def __init__(self, path: Path, label: str | None = None, *, gguf_file: str | None = None,
                 threads: int | None = None) -> None:
        super().__init__(path, label)
        require("torch", "eval")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads or default_threads())
        self.gguf_file = gguf_file
        folder = self.path
        if gguf_file is None:
            if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
                raise InvalidModelError("This folder is a LoRA adapter, which cannot produce logits on its own",
                                        path=folder, hint="Merge it first with `care merge`, then evaluate the merged folder")
            if not (folder / "config.json").is_file():
                raise ModelNotFoundError("No config.json in the model folder", path=folder,
                                         hint="Pass a transformers model folder, a .gguf file or an ONNX folder")
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        hint = "Pass a causal LM folder (config.json with *ForCausalLM), a .gguf or an ONNX folder"
        if gguf_file is None:
            # transformers would happily put a random LM head on an encoder (e.g. BertModel -> BertLMHeadModel).
            archs = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
            if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
                raise EvalError(f"This model cannot produce logits: it is a {archs[0]} (no language-model head)",
                                path=folder, hint=hint)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
            self.model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                    output_loading_info=True, **kwargs)
        except (ValueError, KeyError) as exc:
            raise EvalError(f"This model cannot produce logits (not a causal language model): {exc}".splitlines()[0],
                            path=folder, hint=hint) from exc
        self.model.eval()
        head = self.model.get_output_embeddings()
        head_name = next((n for n, m in self.model.named_modules() if m is head), None)
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        if head_name and not tied and any(k.startswith(head_name + ".") for k in info.get("missing_keys", [])):
            raise EvalError("This model cannot produce logits: its output layer weights are missing", path=folder,
                            hint=hint)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_length = min(int(limit), 4096)
        self._torch = torch

    def model_files(self) -> list[Path]:
        if self.gguf_file:
            return [self.path / self.gguf_file]
        names = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")
        # Weights first: the report shows the first file's hash.
        return sorted({p for pat in names for p in self.path.glob(pat)}, key=lambda p: (p.suffix == ".json", p.name))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def token_logprobs(self, context: list[int], continuations: Sequence[list[int]]) -> list[float]:
        torch = self._torch
        with torch.inference_mode():
            if all(len(c) == 1 for c in continuations):
                # One forward pass: every option is a single next token (" A", " B", ...).
                ids = torch.tensor([context])
                logits = self.model(input_ids=ids).logits[0, -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                return [float(lp[c[0]]) for c in continuations]
            out = []
            for cont in continuations:
                seq = (context + cont)[-(self.max_length + 1):]
                ids = torch.tensor([seq[:-1]])
                lp = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
                n = len(cont)
                targets = torch.tensor(seq[-n:])
                out.append(float(lp[-n:].gather(1, targets[:, None]).sum()))
            return out

    def generate(self, messages: Sequence[Message], max_tokens: int) -> str:
        torch = self._torch
        if not getattr(self.tokenizer, "chat_template", None):
            raise EvalError("The HF tokenizer has no chat template", path=self.path,
                            hint="Evaluate a model whose tokenizer_config.json carries a chat_template")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class GGUFBackend(Backend):
    """A GGUF through llama-cpp-python. Logits are read for the last evaluated token only (no logits_all:
    that would keep an n_ctx x vocab float matrix), feeding multi-token continuations one token at a time."""

    kind = "gguf"

    def __init__(self, path: Path, label: str | None = None, *, n_ctx: int = 4096, threads: int | None = None
                 ) -> None:
        from care.models import check_gguf

        super().__init__(check_gguf(Path(path)), label or Path(path).stem)
        require("llama_cpp", "runtime")
        llama_cpp = llama_compat.load()

        self.threads = threads or default_threads()
        self.n_ctx = n_ctx
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=self.threads,
                                       n_threads_batch=self.threads, n_batch=512, logits_all=False,
                                       verbose=bool(os.environ.get("CARE_DEBUG")))
        except (ValueError, RuntimeError) as exc:
            raise InvalidModelError(f"llama.cpp could not load the model: {exc}", path=self.path,
                                    hint="Check that the file is a complete GGUF (re-export it with `care export gguf`)"
                                    ) from exc
        # Cut contexts at the trained length like HFBackend does (max_position_embeddings), not past it.
        n_train = llama_compat.n_ctx_train(self.llm)
        self.max_length = min(self.llm.n_ctx(), n_train or self.llm.n_ctx(), 4096)
        self.n_vocab = self.llm.n_vocab()
        self._engine = None

    @property
    def quant_type(self) -> str:
        from care.gguf_file import file_type_name

        return file_type_name((self.llm.metadata or {}).get("general.file_type")) or "unknown"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "quant": self.quant_type}

    def encode(self, text: str) -> list[int]:
        # add_bos=True adds BOS only when the model's vocabulary asks for it, like the HF tokenizer does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _last_logprobs(self):
        return _log_softmax(llama_compat.logits_ith(self.llm, -1))

    def token_logprobs(self, context: list[int], continuations: Sequence[list[int]]) -> list[float]:
        self.llm.reset()
        self.llm.eval(context)
        first = self._last_logprobs()
        out = []
        for cont in continuations:
            total = float(first[cont[0]])
            if len(cont) > 1:
                self.llm.n_tokens = len(context)  # eval() drops the KV cache past n_tokens
                for prev, tok in zip(cont[:-1], cont[1:], strict=True):
                    self.llm.eval([prev])
                    total += float(self._last_logprobs()[tok])
            out.append(total)
        return out

    def generate(self, messages: Sequence[Message], max_tokens: int) -> str:
        from care.runtime.backend import EngineConfig, SamplingConfig
        from care.runtime.loader import load_engine

        if self._engine is None:
            self._engine = load_engine(self.path, EngineConfig(
                n_ctx=self.n_ctx, n_threads=self.threads,
                sampling=SamplingConfig.greedy(max_tokens)))
        sampling = SamplingConfig.greedy(max_tokens)
        return self._engine.generate(messages, sampling).text.strip()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self.llm.close()


class ONNXBackend(Backend):
    """An onnxruntime-genai folder (genai_config.json). Scoring feeds the context and reads the logits output."""

    kind = "onnx"

    def __init__(self, path: Path, label: str | None = None) -> None:
        super().__init__(path, label)
        require("onnxruntime_genai", "export")
        import onnxruntime_genai as og

        try:
            self.model = og.Model(str(self.path))
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:  # onnxruntime-genai raises plain RuntimeError/OrtException
            raise InvalidModelError(f"onnxruntime-genai could not load the model: {exc}".splitlines()[0],
                                    path=self.path, hint="Re-export it with `care export onnx`") from exc
        self._og = og
        self._engine: Any = None

    def model_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix in (".onnx", ".data", ".json") and p.is_file())

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _logprobs_after(self, tokens: list[int]):
        import numpy as np

        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(tokens) + 1)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(tokens, dtype=np.int32))
        try:
            logits = gen.get_output("logits")
        except Exception as exc:  # noqa: BLE001 - a model without a logits output
            raise EvalError("This ONNX model cannot produce logits", path=self.path,
                            hint="Export it with a `logits` output (care export onnx)") from exc
        return _log_softmax(np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[-1])

    def token_logprobs(self, context: list[int], continuations: Sequence[list[int]]) -> list[float]:
        first = self._logprobs_after(context)
        out = []
        for cont in continuations:
            total = float(first[cont[0]])
            for i in range(1, len(cont)):
                total += float(self._logprobs_after(context + cont[:i])[cont[i]])
            out.append(total)
        return out

    def generate(self, messages: Sequence[Message], max_tokens: int) -> str:
        """Greedy, through the runtime's ONNX engine (care chat's code) on the model already loaded here."""
        from care.runtime.backend import EngineConfig, SamplingConfig
        from care.runtime.onnx_engine import OnnxChatEngine

        sampling = SamplingConfig.greedy(max_tokens)
        if self._engine is None:
            self._engine = OnnxChatEngine(self.path, EngineConfig(n_ctx=self.max_length, sampling=sampling),
                                          loaded=(self.model, self.tokenizer))
        return self._engine.generate(messages, sampling).text.strip()


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """'LABEL=PATH' or just 'PATH' (a label containing a path separator is taken as part of the path)."""
    label, sep, rest = spec.partition("=")
    if sep and label and "/" not in label and os.sep not in label:
        return label, rest
    return None, spec


def open_backend(spec: str, *, threads: int | None = None, n_ctx: int = 4096) -> Backend:
    """A backend for `--model`: a .gguf file or known GGUF name, an HF folder, an ONNX folder; LABEL=PATH names it.

    `hf:FILE.gguf` (or `hf:smollm2`) loads a GGUF through transformers instead of llama.cpp."""
    from care.models import lookup, resolve_gguf

    label, text = parse_model_spec(spec)
    force_hf = text.startswith("hf:")
    text = text.removeprefix("hf:")
    path = Path(text).expanduser()
    if force_hf and path.is_file():
        # A GGUF read by transformers (dequantized to float32): the reference side of HF-vs-llama.cpp checks.
        return HFBackend(path.parent, label or f"hf-{path.stem}", gguf_file=path.name, threads=threads)
    if force_hf and lookup(text) is not None:
        gguf_path = resolve_gguf(text)
        return HFBackend(gguf_path.parent, label or f"hf-{gguf_path.stem}", gguf_file=gguf_path.name, threads=threads)
    if path.is_dir():
        if (path / "genai_config.json").is_file():
            return ONNXBackend(path, label)
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return HFBackend(path, label, threads=threads)
        if any(path.glob("*.gguf")):
            return GGUFBackend(resolve_gguf(path), label, n_ctx=n_ctx, threads=threads)
        raise EvalError("This folder holds no model that can produce logits", path=path,
                        hint="Pass a transformers folder (config.json), an ONNX folder (genai_config.json) or a .gguf")
    if path.is_file() and path.suffix.lower() != ".gguf":
        from care.gguf_file import has_magic

        if not has_magic(path):
            raise EvalError(f"Cannot produce logits from a '{path.suffix or path.name}' file", path=path,
                            hint="Pass a .gguf file, a transformers model folder or an ONNX folder")
    if path.exists() or lookup(text) is not None:
        return GGUFBackend(resolve_gguf(text), label, n_ctx=n_ctx, threads=threads)
    raise ModelNotFoundError(f"Model '{text}' not found",
                             hint="Pass a .gguf file, a transformers folder, an ONNX folder or a known name (care models)")
