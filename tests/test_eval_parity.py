"""HF (transformers) and GGUF (llama.cpp) scores of the same f16 model agree on the same items."""

from __future__ import annotations

import pytest

from care.eval import benchmarks as B
from care.eval.scoring import score_benchmark


@pytest.fixture(scope="module")
def tiny_f16_gguf(tiny_llama, tmp_path_factory):
    from care.export.gguf import export_gguf

    result = export_gguf(tiny_llama, tmp_path_factory.mktemp("tiny-gguf"), quants=("f16",), verify=False)
    return result.files["f16"]


def test_hf_and_gguf_f16_scores_agree(tiny_llama, tiny_f16_gguf, shared_data):
    from care.eval.backends import GGUFBackend, HFBackend

    items = (B.load_benchmark("pubmedqa", shared_data, limit=6, seed=1)
             + B.load_benchmark("mmlu_medical", shared_data, limit=6, seed=1, shots=2)
             + B.load_benchmark("medmcqa", shared_data, limit=6, seed=1))
    hf = HFBackend(tiny_llama, "hf", threads=1)
    gg = GGUFBackend(tiny_f16_gguf, "gguf", n_ctx=4096, threads=1)
    try:
        assert hf.encode(B.build_prompt(items[0])) == gg.encode(B.build_prompt(items[0]))
        a, b = score_benchmark(hf, items), score_benchmark(gg, items)
        # A multi-token continuation goes through the other code path of each backend.
        ctx = B.build_prompt(items[1])
        multi_hf, multi_gg = hf.loglikelihoods(ctx, [" yes it is"]), gg.loglikelihoods(ctx, [" yes it is"])
    finally:
        gg.close()
    assert [r["id"] for r in a["items"]] == [r["id"] for r in b["items"]]
    diffs = [abs(x - y) for ra, rb in zip(a["items"], b["items"], strict=True)
             for x, y in zip(ra["loglik"], rb["loglik"], strict=True)]
    assert max(diffs) < 2e-3, f"max |loglik diff| {max(diffs):.2e}"
    for ra, rb in zip(a["items"], b["items"], strict=True):
        top = sorted(ra["loglik"], reverse=True)
        if top[0] - top[1] > 4e-3:  # a clear winner must be the same winner
            assert ra["pred"] == rb["pred"], ra["id"]
    assert multi_hf == pytest.approx(multi_gg, abs=2e-3)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tmp_path_factory):
    """tiny_llama as an onnxruntime-genai folder, built with onnxruntime-genai's own model builder."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny-onnx")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_llama), "-o",
                    str(out / "model"), "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")],
                   check=True, capture_output=True, timeout=600)
    return out / "model"


@pytest.mark.slow  # the ONNX model builder takes about a minute here
def test_hf_and_onnx_scores_agree(tiny_llama, tiny_onnx, shared_data):
    from care.eval.backends import HFBackend, ONNXBackend, open_backend

    items = B.load_benchmark("pubmedqa", shared_data, limit=3, seed=2) + B.load_benchmark(
        "mmlu_medical", shared_data, limit=3, seed=2)
    onnx = open_backend(str(tiny_onnx))
    assert isinstance(onnx, ONNXBackend)
    hf = HFBackend(tiny_llama, "hf", threads=1)
    a, b = score_benchmark(hf, items), score_benchmark(onnx, items)
    diffs = [abs(x - y) for ra, rb in zip(a["items"], b["items"], strict=True)
             for x, y in zip(ra["loglik"], rb["loglik"], strict=True)]
    assert max(diffs) < 1e-3
    ctx = B.build_prompt(items[0])
    assert hf.loglikelihoods(ctx, [" yes it is"]) == pytest.approx(onnx.loglikelihoods(ctx, [" yes it is"]), abs=1e-3)
