"""care.train: everything between raw data and a merged Hugging Face model.

- config.py: the recipe YAML schema and `load_recipe`;
- readers.py / data.py: `Record`, file readers (generic + the ../shared/data formats), bad-row reports,
  dedupe, CARE balance, caps/weights, stratified split, two-stage mixing, `build_data`;
- chat_templates.py / formatting.py: conversations in the model's own template, assistant-only loss;
- modeling.py: base model resolution (`embedded` SmolLM2 GGUF), 4-bit loading, `all-linear` targets;
- sft.py: `train(recipe, out_dir, resume=False) -> TrainResult` on trl's SFTTrainer;
- metrics.py: metrics JSONL and the loss/learning-rate PNG;
- merge.py: `merge_adapter(adapter_dir, out_dir, method="reload", verify=True) -> MergeReport`.

Heavy libraries (torch, transformers, trl, peft) are imported inside functions only.
"""
