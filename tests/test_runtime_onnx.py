"""The ONNX backend on a real onnxruntime-genai folder built from the tiny Llama (same weights as transformers)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from care.errors import GenerationError, InvalidModelError, ModelNotFoundError
from care.runtime.backend import EngineConfig, SamplingConfig

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("onnx-genai")
    # onnxruntime-genai's own builder: the same tool `care export onnx` wraps.
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_llama), "-o",
                           str(out), "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        pytest.fail(f"onnxruntime-genai builder failed: {proc.stderr[-1500:]}")
    return out


@pytest.mark.slow
def test_onnx_engine_matches_transformers_greedy(onnx_folder, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from care.runtime.onnx_engine import OnnxChatEngine

    greedy = SamplingConfig(temperature=0.0, max_tokens=8, repeat_penalty=1.0)
    engine = OnnxChatEngine(onnx_folder, EngineConfig(n_ctx=256, sampling=greedy))
    messages = [{"role": "user", "content": "How do I reset my router?"}]
    chunks = list(engine.stream(messages))
    last = chunks[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 8
    got = "".join(c.text for c in chunks)

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    prompt = engine.render(messages)
    assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([engine.tokenize(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert got == tok.decode(out[0, ids.shape[1]:])
    # Context trimming and a too-long message behave as with llama.cpp.
    with pytest.raises(GenerationError, match="too long"):
        engine.fit([{"role": "user", "content": "word " * 400}], 8)
    engine.close()


def test_onnx_folder_errors(tmp_path):
    from care.runtime.onnx_engine import OnnxChatEngine

    with pytest.raises(ModelNotFoundError):
        OnnxChatEngine(tmp_path / "missing")
    with pytest.raises(InvalidModelError, match="genai_config"):
        OnnxChatEngine(tmp_path)


@pytest.mark.slow
def test_onnx_folder_in_the_tui_loader_the_model_list_and_bench(onnx_folder, tmp_path):
    """The one loader: `care chat --model FOLDER` (the TUI's loader) and `care bench` take an ONNX folder."""
    import argparse
    import json

    from care.cli import main
    from care.commands.chat import add_arguments, loader_from_args
    from care.tui.screens import local_gguf_files

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(onnx_folder), "--n-ctx", "256", "--max-tokens", "4", "--temperature", "0"])
    engine = loader_from_args(args)(str(onnx_folder))
    try:
        assert engine.info().backend == "onnx" and engine.n_ctx == 256
        reply = engine.generate([{"role": "user", "content": "How do I reset my router?"}])
        assert reply.finish_reason in ("stop", "length") and reply.completion_tokens >= 1
        # eval's ONNX generation is the same engine, on the model eval already loaded for scoring
        from care.eval.backends import ONNXBackend, open_backend

        backend = open_backend(str(onnx_folder))
        assert isinstance(backend, ONNXBackend)
        assert backend.generate([{"role": "user", "content": "How do I reset my router?"}], 4) == reply.text.strip()
    finally:
        engine.close()
    assert onnx_folder.resolve() in local_gguf_files([onnx_folder.parent])
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(onnx_folder), "--n-ctx", "256", "--prompt-tokens", "16", "--gen-tokens", "4",
               "--threads", "1", "--ceiling-gb", "0", "--json", str(out)])
    result = json.loads(out.read_text())["results"][0]
    assert rc == 0, result
    assert result["backend"] == "onnx" and result["decode_tok_s"] > 0 and result["file_gb"] > 0
