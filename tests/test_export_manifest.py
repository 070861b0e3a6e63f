"""The public-provenance helpers of care.artifacts: file hashes, and provenance without local paths."""

from __future__ import annotations

import hashlib
import json

from care.artifacts import file_records, public_provenance, source_record


def test_public_provenance_keeps_names_and_hashes_not_paths(tmp_path):
    adapter = tmp_path / "runs" / "banking-lora"
    adapter.mkdir(parents=True)
    merge = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter": str(adapter),
             "recipe_hash": "sha256:0123abcd", "recipe_path": "/home/nurse/care/recipes/banking.yaml",
             "merge": {"out_dir": str(tmp_path / "merged"), "method": "reload"}, "eos_token_id": 2}
    public = public_provenance(merge)
    assert public["adapter"] == "banking-lora" and public["recipe_path"] == "banking.yaml"
    assert public["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id is a name, kept
    assert public["recipe_hash"] == "sha256:0123abcd" and public["eos_token_id"] == 2
    assert public["merge"] == {"out_dir": "merged", "method": "reload"}
    assert str(tmp_path) not in json.dumps(public) and "/home/nurse" not in json.dumps(public)
    source = source_record(tmp_path / "merged", "LlamaForCausalLM", merge)
    assert source["name"] == "merged" and str(tmp_path) not in json.dumps(source)


def test_file_records_hash_and_size(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    (rec,) = file_records([f], **{"model.gguf": {"quant": "q4_k_m"}})
    assert rec == {"file": "model.gguf", "size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                   "quant": "q4_k_m"}
