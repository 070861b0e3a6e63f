"""The files between stages (care.artifacts): each reader refuses a missing file, bad JSON, a missing key and a
key of the wrong type in one line naming the file and the key; what a builder writes its reader reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from care import artifacts as A
from care.errors import InvalidModelError, ModelNotFoundError
from care.io import write_json


def _source() -> dict:
    return {"name": "merged", "architecture": "LlamaForCausalLM", "provenance": {"base_model": "org/base"}}


def _files() -> list[dict]:
    return [{"file": "m-q4_k_m.gguf", "size": 123, "sha256": "ab" * 32, "quant": "q4_k_m"}]


def _adapter_info() -> dict:
    return A.adapter_info(base_model="/models/base", recipe_base="embedded", recipe_name="banking",
                          recipe_hash="sha256:00", recipe_path=None, quantized=True, quant={"load_in_4bit": True},
                          stage=1, chat_template="{{ x }}", saved_at="2026-01-01T00:00:00Z")


def _merge_info() -> dict:
    return A.merge_info(base_model="org/base", adapter="/runs/a/adapter", recipe_hash="sha256:00",
                        recipe_name="banking", recipe_path="/recipes/banking.yaml", trained_quantized=True,
                        eos_token_id=[2, 7], merge={"method": "reload", "out_dir": "/runs/merged"})


def _gguf() -> dict:
    return A.gguf_manifest(source=_source(), files=_files(), name="m", converter={"script": "c.py"},
                           primary="m-q4_k_m.gguf", end_of_turn={"id": 2, "token": "<|im_end|>"},
                           notes=["Q4_K_M: 3 of 7 weight matrices ..."], verified=True, verify_report="verify.json",
                           imatrix=None, seconds={"total": 1.5})


def _onnx() -> dict:
    return A.onnx_manifest(source=_source(), files=[{"file": "model.onnx", "size": 9, "sha256": "cd" * 32}],
                           precision="int4", int4_algo="k_quant_mixed", builder={"onnxruntime_genai": "0.9"},
                           verified=None, seconds={})


def _lora() -> dict:
    return A.lora_manifest(name="banking", adapter={"file": "banking-lora-f16.gguf", "type": "f16", "size": 5,
                                                    "sha256": "ef" * 32},
                           lora={"rank": 8, "alpha": 16.0, "rslora": False, "scale": 2.0, "stored_alpha": 16.0},
                           base={"model": "org/base", "architecture": "LlamaForCausalLM", "verified_on": None},
                           recipe=None, converter={"script": "convert_lora_to_gguf.py"}, notes=[], verified=False,
                           verify_report="verify.json", figures=None, seconds={"total": 2.0})


# (build, file name, reader, a required key (dotted), a key and a value of the wrong type for it)
CASES = {
    "adapter info": (_adapter_info, A.ADAPTER_INFO, A.read_adapter_info, "base_model", ("quantized", "yes")),
    "merge info": (_merge_info, A.MERGE_INFO, A.read_merge_info, "base_model", ("eos_token_id", "2")),
    "gguf manifest": (_gguf, A.MANIFEST, A.read_gguf_manifest, "primary", ("verified", "true")),
    "onnx manifest": (_onnx, A.ONNX_MANIFEST, A.read_onnx_manifest, "source.architecture", ("precision", 4)),
    "lora manifest": (_lora, A.MANIFEST, A.read_lora_manifest, "adapter.file", ("lora.rank", 8.5)),
}


def _delete(data: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        data = data[p]
    del data[last]


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        data = data[p]
    data[last] = value


@pytest.mark.parametrize("case", CASES)
def test_builder_then_reader_round_trips(tmp_path, case):
    build, name, read, _, _ = CASES[case]
    data = build()
    write_json(tmp_path / name, data)
    assert read(tmp_path) == data
    assert read(tmp_path / name) == data  # the folder or the file itself


@pytest.mark.parametrize("case", CASES)
def test_reader_refuses_a_missing_file(tmp_path, case):
    _, name, read, _, _ = CASES[case]
    with pytest.raises(ModelNotFoundError) as err:
        read(tmp_path)
    line = err.value.one_line()
    assert name in line and str(tmp_path) in line and "\n" not in line


@pytest.mark.parametrize("case", CASES)
def test_reader_refuses_bad_json(tmp_path, case):
    _, name, read, _, _ = CASES[case]
    (tmp_path / name).write_text('{"format": ', encoding="utf-8")
    with pytest.raises(InvalidModelError) as err:
        read(tmp_path)
    assert f"{name} is not valid JSON" in err.value.one_line()


@pytest.mark.parametrize("case", CASES)
def test_reader_refuses_a_missing_key_naming_it(tmp_path, case):
    build, name, read, key, _ = CASES[case]
    data = build()
    _delete(data, key)
    write_json(tmp_path / name, data)
    with pytest.raises(InvalidModelError) as err:
        read(tmp_path)
    line = err.value.one_line()
    assert f"{name} has no key '{key}'" in line and str(tmp_path / name) in line and "\n" not in line


@pytest.mark.parametrize("case", CASES)
def test_reader_refuses_a_wrong_type_naming_the_key(tmp_path, case):
    build, name, read, _, (key, bad) = CASES[case]
    data = build()
    _set(data, key, bad)
    write_json(tmp_path / name, data)
    with pytest.raises(InvalidModelError) as err:
        read(tmp_path)
    assert f"{name}: key '{key}' must be" in err.value.one_line()


@pytest.mark.parametrize("case", ["adapter info", "merge info"])
def test_a_builder_refuses_what_its_reader_would(case):
    build, _, _, _, (key, bad) = CASES[case]
    builder = {"adapter info": A.adapter_info, "merge info": A.merge_info}[case]
    data = build()
    _set(data, key, bad)
    with pytest.raises(InvalidModelError, match=f"key '{key}' must be"):
        builder(**data)


def test_a_key_of_a_list_item_is_named_with_its_index(tmp_path):
    data = _gguf()
    data["files"].append({"file": "m-f16.gguf", "size": "12", "sha256": "00", "quant": "f16"})
    write_json(tmp_path / A.MANIFEST, data)
    with pytest.raises(InvalidModelError, match=r"key 'files\[1\]\.size' must be an integer"):
        A.read_gguf_manifest(tmp_path)


def test_a_count_is_not_true(tmp_path):
    data = _lora()
    data["adapter"]["size"] = True
    write_json(tmp_path / A.MANIFEST, data)
    with pytest.raises(InvalidModelError, match="adapter.size"):
        A.read_lora_manifest(tmp_path)


def test_a_manifest_of_another_export_is_refused_by_format(tmp_path):
    write_json(tmp_path / A.MANIFEST, _gguf())
    with pytest.raises(InvalidModelError) as err:
        A.read_lora_manifest(tmp_path)
    line = err.value.one_line()
    assert "key 'format'" in line and A.GGUF_FORMAT in line and "care export gguf-lora" in line
    assert A.read_gguf_manifest(tmp_path)["format"] == A.GGUF_FORMAT


def test_a_file_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / A.MERGE_INFO).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InvalidModelError, match="care_merge.json holds a list, not an object"):
        A.read_merge_info(tmp_path)


def test_merge_info_required_keys_can_be_narrowed_types_still_checked(tmp_path):
    write_json(tmp_path / A.MERGE_INFO, {"recipe_path": "/r.yaml"})
    with pytest.raises(InvalidModelError, match="no key 'base_model'"):
        A.read_merge_info(tmp_path)
    assert A.read_merge_info(tmp_path, required=()) == {"recipe_path": "/r.yaml"}
    write_json(tmp_path / A.MERGE_INFO, {"recipe_path": 3})
    with pytest.raises(InvalidModelError, match="key 'recipe_path' must be a string or null"):
        A.read_merge_info(tmp_path, required=())


def test_extra_keys_are_kept(tmp_path):
    data = dict(_merge_info(), written_by="a newer care")
    write_json(tmp_path / A.MERGE_INFO, data)
    assert A.read_merge_info(tmp_path)["written_by"] == "a newer care"


def test_is_onnx_folder(tmp_path):
    assert not A.is_onnx_folder(None) and not A.is_onnx_folder(tmp_path)
    (tmp_path / "genai_config.json").write_text("{}")
    assert A.is_onnx_folder(tmp_path) and A.is_onnx_folder(str(tmp_path))
    assert not A.is_onnx_folder(tmp_path / "genai_config.json")


def test_artifacts_import_nothing_heavy():
    code = ("import sys, care.artifacts; "
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'gguf') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr


def test_merge_info_keeps_local_paths_and_the_public_view_drops_them():
    info = _merge_info()
    assert info["adapter"] == "/runs/a/adapter"  # care_merge.json stays beside the model
    public = A.public_provenance(info)
    assert public["adapter"] == "adapter" and public["merge"]["out_dir"] == "merged"
    assert "/runs" not in json.dumps(public)
