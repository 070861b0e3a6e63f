"""`care export onnx`: onnxruntime-genai's model builder on a tiny model, verified against HF."""

from __future__ import annotations

import hashlib
import json

import pytest

from care.errors import InvalidModelError, UsageError

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def onnx_int4(tmp_path_factory, tiny_llama):
    from care.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny-int4"
    return export_onnx(tiny_llama, out, n_threads=1)


def test_int4_default_uses_k_quant_mixed_and_verifies(onnx_int4):
    r = onnx_int4
    assert r.precision == "int4" and r.int4_algo == "k_quant_mixed"
    report = json.loads((r.out_dir / "verify.json").read_text())
    assert report["passed"] and report["kl_mean"] <= report["kl_limit"]
    assert report["top1_agreement"] > 0.9 and report["tokens"] > 100
    assert report["tokenizer"]["mismatches"] == 0
    assert report["reply_tokens"] >= 1  # a reply was generated through onnxruntime-genai


def test_manifest_matches_files(onnx_int4):
    manifest = json.loads(onnx_int4.manifest_path.read_text())
    names = {f["file"] for f in manifest["files"]}
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= names
    for entry in manifest["files"]:
        data = (onnx_int4.out_dir / entry["file"]).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    # Built in a temp folder and renamed: nothing else left beside the output.
    assert not [p for p in onnx_int4.out_dir.parent.iterdir() if p.name.startswith(".")]


def test_runs_in_onnxruntime_genai(onnx_int4):
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(onnx_int4.out_dir))
    tok = og.Tokenizer(model)
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 4, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    assert steps >= 1 and len(gen.get_sequence(0)) == len(ids) + steps
    assert np.asarray(gen.get_sequence(0))[: len(ids)].tolist() == list(ids)


@pytest.mark.slow
def test_int8_is_closer_to_hf_than_int4(onnx_int4, tiny_llama, tmp_path):
    from care.export.onnx import export_onnx

    r8 = export_onnx(tiny_llama, tmp_path / "int8", precision="int8", n_threads=1)
    assert r8.int4_algo is None
    assert r8.verify_report["kl_mean"] < onnx_int4.verify_report["kl_mean"]


def test_bad_inputs(tmp_path, tiny_llama):
    from care.export.onnx import export_onnx

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidModelError) as err:
        export_onnx(adapter, tmp_path / "o1")
    assert "run `care merge` first" in err.value.one_line()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError):
        export_onnx(tiny_llama, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError):
        export_onnx(tiny_llama, tmp_path / "o2", precision="int3")
