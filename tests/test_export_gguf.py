"""`care export gguf` on tiny random models with the real SmolLM2 tokenizer: llama.cpp's converter and
quantizer, metadata, manifest, Modelfile, verification, and loading the result in llama-cpp-python."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from care.errors import CareError, ExportError, InvalidModelError, ModelNotFoundError, VerificationError
from care.export.gguf import export_gguf
from care.export.verify import read_gguf_metadata, verify_gguf

REPO = Path(__file__).resolve().parent.parent
MERGE_INFO = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter": "runs/banking-lora",
              "recipe_hash": "sha256:0123abcd"}


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, tiny_llama):
    """tiny Llama (+ care_merge.json provenance) -> f16, q8_0, q4_k_m, verified; made once for the module."""
    src = tmp_path_factory.mktemp("merged") / "tiny-llama-merged"
    shutil.copytree(tiny_llama, src)
    (src / "care_merge.json").write_text(json.dumps(MERGE_INFO))
    out = tmp_path_factory.mktemp("gguf-out")
    result = export_gguf(src, out, quants=("f16", "q8_0", "q4_k_m"), n_threads=1,
                         verify_kwargs={"max_tokens": 96})
    return src, out, result


def test_files_manifest_and_hashes(llama_export):
    src, out, result = llama_export
    assert set(result.files) == {"f16", "q8_0", "q4_k_m"}
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["verified"] is True and manifest["source"]["provenance"] == MERGE_INFO
    # Names and hashes, never this machine's paths: the folder is meant to be copied elsewhere.
    assert manifest["source"]["name"] == src.name
    for name in ("manifest.json", "export_config.json"):
        assert str(src.resolve()) not in (out / name).read_text() and str(out.resolve()) not in (out / name).read_text()
    for entry in manifest["files"]:
        path = out / entry["file"]
        assert path.stat().st_size == entry["size"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    sizes = {e["quant"]: e["size"] for e in manifest["files"]}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    # Nothing half-written is left behind: no temp parts, no intermediate f16, no staging folder.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((out / "export_config.json").read_text())["quants"] == ["f16", "q8_0", "q4_k_m"]


def test_gguf_metadata_name_template_tokens_provenance(llama_export):
    src, out, result = llama_export
    from care.export.hf_source import hf_tokenizer

    tok = hf_tokenizer(src)  # the same cached HF tokenizer the export used
    meta = read_gguf_metadata(result.files["q4_k_m"])
    assert meta["name"] == "tiny-llama-merged"
    assert meta["architecture"] == "llama" and meta["context_length"] == 2048
    assert meta["chat_template"] == tok.chat_template
    assert meta["eos_token_id"] == tok.eos_token_id
    assert meta["eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    prov = meta["provenance"]
    assert prov["care.source.base_model"] == MERGE_INFO["base_model"]
    assert prov["care.source.adapter"] == MERGE_INFO["adapter"]
    assert prov["care.source.recipe_hash"] == MERGE_INFO["recipe_hash"]
    assert meta["file_type_name"] == "Q4_K_M"
    assert prov["care.source.name"] == src.name and "care.source.path" not in prov
    for path in result.files.values():  # the whole file, metadata included, holds no local path
        assert str(src.resolve()).encode() not in path.read_bytes()


def test_k_quant_fallback_is_counted_and_said(llama_export):
    _, _, result = llama_export
    # 64-wide rows cannot hold a 256-wide k-quant block: llama.cpp falls back per tensor, and we say so.
    assert result.fallback_tensors["q4_k_m"] > 0
    assert result.fallback_tensors["q8_0"] == 0
    assert any("Q4_K_M" in n and "too narrow for k-quants" in n for n in result.notes)
    types = read_gguf_metadata(result.files["q4_k_m"])["tensor_types"]
    assert "Q5_0" in types  # the Q4_K fallback type is really in the file


def test_verification_report(llama_export):
    _, out, result = llama_export
    report = json.loads((out / "verify.json").read_text())
    assert report == json.loads(json.dumps(result.verify_report, default=str))
    assert report["passed"] and set(report["files"]) == {"f16", "q8_0", "q4_k_m"}
    f16 = report["files"]["f16"]
    assert f16["top1_agreement"] >= 0.98 and f16["kl_mean"] < 1e-4 and f16["kl_max"] < 1e-4
    for entry in report["files"].values():
        assert entry["tokenizer"]["mismatches"] == 0
        assert entry["chat_template_match"] and entry["end_of_turn"]["stops"]
        assert entry["kl_mean"] <= entry["kl_limit"]
        assert entry["tokens"] == report["eval_tokens"] > 90
    # Coarser quantization drifts further from the source, as it must.
    assert report["files"]["q4_k_m"]["kl_mean"] > report["files"]["q8_0"]["kl_mean"] > f16["kl_mean"]


def test_loads_and_generates_in_llama_cpp(llama_export):
    _, _, result = llama_export
    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.engine import ChatEngine

    engine = ChatEngine(result.files["q4_k_m"], EngineConfig(
        n_ctx=512, n_threads=1, sampling=SamplingConfig(temperature=0.0, max_tokens=8, seed=0)))
    try:
        reply = engine.chat([{"role": "user", "content": "Hello"}])
        assert reply.finish_reason in ("stop", "length") and reply.completion_tokens >= 1
        assert "<|im_end|>" in engine.stop_strings
        assert engine.model_name == "tiny-llama-merged"
    finally:
        engine.close()


def test_modelfile_points_at_the_primary_file(llama_export):
    _, out, result = llama_export
    text = result.modelfile_path.read_text()
    from_line = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert (out / from_line.split("./", 1)[1]).resolve() == result.files["q4_k_m"].resolve()
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>{{ .Role }}" in text
    assert "PARAMETER num_ctx 4096" in text
    # SmolLM2's template inserts a default system prompt; Ollama must get the same one.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert not [n for n in result.notes if n.startswith("Modelfile:")]  # nothing degraded here


def test_a_degraded_modelfile_is_a_note_in_the_manifest(tiny_llama, tmp_path):
    src = tmp_path / "no-template"
    shutil.copytree(tiny_llama, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "chat_template.jinja").unlink(missing_ok=True)
    result = export_gguf(src, tmp_path / "out", quants=("f16",), n_threads=1, verify=False)
    notes = [n for n in result.notes if n.startswith("Modelfile:")]
    assert notes and "no known chat template" in notes[0]
    assert json.loads(result.manifest_path.read_text())["notes"] == result.notes
    assert "Ollama uses the template stored in the GGUF" in result.modelfile_path.read_text()


@pytest.mark.slow
def test_verify_alone_catches_a_different_model(llama_export, tmp_path):
    """`verify_gguf` is usable alone, and a GGUF checked against the wrong source fails."""
    from tiny_models import build_tiny_llama

    _, _, result = llama_export
    other = build_tiny_llama(tmp_path / "other", seed=1)
    report = verify_gguf(result.files["f16"], other, n_threads=1, fail=False, max_tokens=48)
    assert not report["passed"]
    assert any("not near-exact" in f or "top-1" in f for f in report["files"]["f16"]["failures"])
    with pytest.raises(VerificationError):
        verify_gguf(result.files["f16"], other, n_threads=1, max_tokens=48)


def test_tiny_phi3_fused_layout_and_phi3_name_guard(tiny_phi3, tmp_path):
    """Phi-3's fused qkv/gate_up convert; a 'phi3' name on a non-Phi-3 vocab is renamed, since llama.cpp
    would otherwise look up Phi-3's special tokens and abort while loading (which would kill this test)."""
    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.engine import ChatEngine

    result = export_gguf(tiny_phi3, tmp_path / "out", quants=("f16",), verify=False)
    meta = read_gguf_metadata(result.files["f16"])
    assert meta["architecture"] == "phi3" and meta["n_tensors"] == 2 * 6 + 3
    assert "phi3" not in meta["name"].lower() and meta["name"].startswith("tiny-phi_3")
    engine = ChatEngine(result.files["f16"], EngineConfig(
        n_ctx=256, n_threads=1, sampling=SamplingConfig(temperature=0.0, max_tokens=4, seed=0)))
    try:
        assert engine.chat([{"role": "user", "content": "Hi"}]).completion_tokens >= 1
    finally:
        engine.close()


@pytest.mark.slow
def test_longrope_factors_survive_a_transformers5_config(tmp_path, smollm_tokenizer):
    """LongRoPE factors end up in the GGUF even when the config keeps them only in legacy rope_scaling."""
    import torch
    from tiny_models import _save
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    long_f = [1.0 + i / 10 for i in range(8)]
    short_f = [1.0 + i / 100 for i in range(8)]
    cfg = Phi3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16384,
                     original_max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                     rope_parameters={"rope_type": "longrope", "long_factor": long_f, "short_factor": short_f,
                                      "rope_theta": 10000.0})
    src = _save(Phi3ForCausalLM(cfg).eval(), smollm_tokenizer, tmp_path / "longrope")
    config = json.loads((src / "config.json").read_text())
    params = config["rope_parameters"]
    config["rope_scaling"] = {"type": "longrope", "long_factor": params.pop("long_factor"),
                              "short_factor": params.pop("short_factor")}
    (src / "config.json").write_text(json.dumps(config))
    result = export_gguf(src, tmp_path / "out", quants=("f16",), verify=False, n_threads=1)
    meta = read_gguf_metadata(result.files["f16"])
    assert meta["rope_factors_long"] == pytest.approx(long_f)
    assert meta["rope_factors_short"] == pytest.approx(short_f)
    assert any("LongRoPE" in n for n in result.notes)


PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_sentencepiece_phi3(root: Path) -> tuple[Path, Path]:
    """A Phi-3.5-like pair: a base folder with tokenizer.model and a 'merged' folder saved by transformers 5,
    which (like a real merged Phi-3.5) has no tokenizer.model. SentencePiece BPE with byte fallback, Phi-3's
    special tokens (rstrip, as Phi-3's tokenizer_config has them), Phi-3's chat template."""
    import sentencepiece as spm
    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, GenerationConfig, Phi3Config, Phi3ForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text((REPO / "README.md").read_text() + "\nDer Patient klagt über Übelkeit. Café, naïve.\n" * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, remove_extra_whitespaces=False)
    spdir = root / "sp-tokenizer"
    spdir.mkdir()
    shutil.copy(root / "sp.model", spdir / "tokenizer.model")
    (spdir / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "add_bos_token": false}')
    tok = AutoTokenizer.from_pretrained(str(spdir))
    specials = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]
    tok.add_tokens([AddedToken(t, rstrip=t != "<|endoftext|>", lstrip=False, special=True, normalized=False)
                    for t in specials], special_tokens=True)
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.chat_template = PHI3_TEMPLATE
    torch.manual_seed(0)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                     original_max_position_embeddings=4096, bos_token_id=1, eos_token_id=eos, pad_token_id=eos,
                     tie_word_embeddings=False)
    model = Phi3ForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[tok.convert_tokens_to_ids("<|end|>"),
                                                                             eos])
    base, merged = root / "phi3-base", root / "phi3-merged"
    for folder in (base, merged):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    shutil.copy(root / "sp.model", base / "tokenizer.model")
    assert not (merged / "tokenizer.model").exists()  # the transformers-5 trap, reproduced
    return base, merged


def test_sentencepiece_phi3_traps(tmp_path):
    """Phi-3.5's traps on a tiny stand-in: tokenizer.model missing from the merged folder (taken from the
    base named in care_merge.json), a 'phi3' name kept for a real Phi-3 vocabulary, chat prompts tokenized
    exactly as HF does, <|end|> stops generation, and raw-text differences reported as leading-space only."""
    base, merged = build_sentencepiece_phi3(tmp_path / "sp")
    with pytest.raises(InvalidModelError) as err:
        export_gguf(merged, tmp_path / "out0", quants=("f16",))
    _assert_one_line(err.value, "tokenizer.model is missing", "Copy tokenizer.model from the base model")
    (merged / "care_merge.json").write_text(json.dumps({"base_model": str(base), "adapter": "a",
                                                        "recipe_hash": "h"}))
    result = export_gguf(merged, tmp_path / "out", quants=("f16",), n_threads=1, name="phi3-care-tiny",
                         verify_kwargs={"max_tokens": 64})
    meta = read_gguf_metadata(result.files["f16"])
    assert meta["name"] == "phi3-care-tiny"  # has </s>, <unk>, <s>, <|endoftext|>: Phi-3 rules are safe
    assert meta["add_bos_token"] is False
    entry = result.verify_report["files"]["f16"]
    assert entry["passed"] and entry["chat_template_match"]
    assert entry["end_of_turn"] == {"token": "<|end|>", "id": meta["eot_token_id"], "stops": True}
    tok = entry["tokenizer"]
    assert tok["mismatches"] == tok["leading_space_only"] > 0  # reported, not hidden
    assert any("leading space" in w for w in entry["warnings"])
    assert any("tokenizer.model taken from the base model" in n for n in result.notes)


# --- bad input: one-line errors, nothing left that looks complete -------------------------------------


def _assert_one_line(exc: CareError, *words: str) -> None:
    line = exc.one_line()
    assert "\n" not in line
    for w in words:
        assert w in line


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModelError) as err:
        export_gguf(tmp_path / "empty", tmp_path / "out", quants=("f16",))
    _assert_one_line(err.value, "config.json")
    with pytest.raises(ModelNotFoundError):
        export_gguf(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_adapter_folder_says_run_merge_first(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(InvalidModelError) as err:
        export_gguf(adapter, tmp_path / "out")
    _assert_one_line(err.value, "run `care merge` first")


def test_unsupported_architecture(tmp_path, tiny_llama):
    src = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as err:
        export_gguf(src, tmp_path / "out", quants=("f16",))
    _assert_one_line(err.value, "Unsupported architecture GPT2LMHeadModel", "Supported:")


def test_verify_rejects_non_gguf_and_truncated_files(tmp_path, tiny_llama, llama_export):
    text = tmp_path / "notes.gguf"
    text.write_text("hello " * 500)
    with pytest.raises(InvalidModelError) as err:
        verify_gguf(text, tiny_llama)
    _assert_one_line(err.value, "Not a GGUF file")
    _, _, result = llama_export
    data = result.files["q8_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError) as err:
        verify_gguf(cut, tiny_llama)
    _assert_one_line(err.value, "Truncated")


def test_corrupt_or_truncated_weights(tmp_path, tiny_llama):
    src = tmp_path / "broken"
    shutil.copytree(tiny_llama, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InvalidModelError) as err:
        export_gguf(src, tmp_path / "out", quants=("f16",))
    _assert_one_line(err.value, "truncated", "care merge")
    weights.write_bytes(b"not really safetensors")
    with pytest.raises(InvalidModelError) as err:
        export_gguf(src, tmp_path / "out", quants=("f16",))
    _assert_one_line(err.value, "not valid safetensors")


@pytest.mark.slow
def test_converter_failure_leaves_no_output(tmp_path, tiny_llama):
    """A tensor llama.cpp's converter cannot map fails in one line and leaves no GGUF or temp file."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "odd"
    shutil.copytree(tiny_llama, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mystery_proj.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ExportError) as err:
        export_gguf(src, out, quants=("f16", "q4_0"), verify=False)
    _assert_one_line(err.value, "converter failed")
    assert not list(out.glob("*.gguf")) and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_no_disk_space_fails_before_writing(tmp_path, tiny_llama, monkeypatch):
    import collections

    from care.errors import DiskFullError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("care.io.shutil.disk_usage", lambda _p: usage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as err:
        export_gguf(tiny_llama, out, quants=("f16",))
    _assert_one_line(err.value, "Not enough disk space")
    assert not list(out.iterdir())


def test_unknown_quant_type(tmp_path, tiny_llama):
    with pytest.raises(CareError) as err:
        export_gguf(tiny_llama, tmp_path / "out", quants=("q9_z",))
    _assert_one_line(err.value, "q9_z", "q4_k_m")


# --- the embedded SmolLM2 as a real model ------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_hf(embedded_gguf) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (dequantized from the embedded Q4_1 GGUF by
    transformers), cached under .cache/tests like the tokenizer."""
    from tiny_models import CACHE, _key

    out = CACHE / f"smollm2-hf-{_key(embedded_gguf)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name,
                                                  dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@pytest.mark.slow
def test_smollm2_q4_k_m_verified_and_answers(smollm_hf, tmp_path):
    """The real 135M model: K-quant fallbacks counted (576-wide rows), quality within limits, and the
    exported file answers a question sensibly through the runtime engine."""
    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.engine import ChatEngine

    result = export_gguf(smollm_hf, tmp_path / "out", quants=("q4_k_m", "q8_0"), n_threads=1,
                         name="SmolLM2-135M-Instruct")
    assert 150 <= result.fallback_tensors["q4_k_m"] < result.total_tensors["q4_k_m"]
    report = result.verify_report
    assert report["passed"]
    q4, q8 = report["files"]["q4_k_m"], report["files"]["q8_0"]
    assert q8["kl_mean"] < q4["kl_mean"] <= q4["kl_limit"]
    assert q4["top1_agreement"] > 0.8 and abs(q4["ppl"] / q4["ppl_hf"] - 1) < 0.2
    assert q4["tokenizer"]["mismatches"] == 0 and q4["chat_template_match"]
    # The exported Q8_0 starts its greedy reply as the HF model does (compared over the first words: small
    # models diverge a few tokens in even at KL 0.004).
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    question = [{"role": "user", "content": "What is the capital of France?"}]
    tok = AutoTokenizer.from_pretrained(str(smollm_hf))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm_hf), dtype=torch.float32).eval()
    ids = tok(tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        gen = hf.generate(ids, max_new_tokens=8, do_sample=False)
    hf_reply = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    engine = ChatEngine(result.files["q8_0"], EngineConfig(
        n_ctx=1024, n_threads=1, sampling=SamplingConfig(temperature=0.0, max_tokens=8, seed=0, repeat_penalty=1.0)))
    try:
        reply = engine.chat(question)
    finally:
        engine.close()
    assert reply.text.split()[:3] == hf_reply.split()[:3]
