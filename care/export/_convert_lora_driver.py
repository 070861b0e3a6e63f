"""Subprocess entry: run llama.cpp's convert_lora_to_gguf.py with our name, care.* keys, and no local paths.

usage: python _convert_lora_driver.py CONVERTER_DIR EXTRA_JSON <convert_lora_to_gguf.py arguments...>

Like _convert_driver.py it runs outside the care package, so `gguf` is llama.cpp's own gguf-py.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path


def _is_local_path(value: str) -> bool:
    """An absolute path of the machine that converted (metadata heuristics copy config `_name_or_path`)."""
    return value.startswith(("/", "~", "\\\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", value))


def main() -> None:
    conv_dir, extra_path = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path[:0] = [str(conv_dir / "gguf-py"), str(conv_dir)]
    extra = json.loads(extra_path.read_text(encoding="utf-8"))
    script = conv_dir / "convert_lora_to_gguf.py"
    sys.argv = [str(script), *sys.argv[3:]]

    from conversion.base import ModelBase

    original = ModelBase.prepare_metadata

    def prepare_metadata(self, vocab_only: bool) -> None:
        original(self, vocab_only)
        for kv in self.gguf_writer.kv_data:
            for key in [k for k, v in kv.items() if isinstance(v.value, str) and _is_local_path(v.value)]:
                del kv[key]
        if extra.get("name"):
            self.gguf_writer.remove_key("general.name")
            self.gguf_writer.add_name(str(extra["name"]))
        for key, value in (extra.get("kv") or {}).items():
            self.gguf_writer.add_string(key, str(value))

    ModelBase.prepare_metadata = prepare_metadata
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
