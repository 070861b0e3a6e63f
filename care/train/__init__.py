"""care.train: everything between raw data and a merged Hugging Face model.

- config.py: the recipe YAML schema and `load_recipe`;
- records.py: `Record` and the bad-row report `BadRows`;
- readers.py (`read_source`) over formats.py (the generic file formats) and shared_readers.py (the
  ../shared/data formats);
- data.py: dedupe, CARE balance, caps/weights, stratified split, two-stage mixing, `build_data`;
- chat_templates.py / formatting.py: conversations in the model's own template, assistant-only loss;
- modeling.py: base model resolution (`embedded` SmolLM2 GGUF), 4-bit loading, `all-linear` targets;
- sft.py: `train(recipe, out_dir, resume=False) -> TrainResult` on trl's SFTTrainer, one stage.py run per
  stage (its callbacks and signal handling: callbacks.py);
- metrics.py: metrics JSONL and the loss/learning-rate PNG;
- merge.py: `merge_adapter(adapter_dir, out_dir, method="reload", verify=True) -> MergeReport`.

Heavy libraries (torch, transformers, trl, peft) are imported inside functions only.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """`care.train` is both this package and the function `train` of the public API (`from care import train`):
    Python binds the subpackage to the name `care.train` as soon as it is imported, so the name cannot be
    a plain function without breaking `import care.train.readers`. Calling the package calls sft.train."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from care.train.sft import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
