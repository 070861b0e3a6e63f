"""Formatting, LoRA targets, a 2-step QLoRA run, signal-stop + resume parity, and recipes."""

from __future__ import annotations

import json
import os
import signal

import pytest

from care.errors import ConfigError

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2 with\nnewline"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "only a question"}],
]


def _rows(n: int = 40):
    domains = ["banking", "medical"]
    return [{"query": f"How do I fix problem {i}?", "response": f"Step {i}: open the app and tap Help.",
             "domain": domains[i % 2]} for i in range(n)]


def _recipe(tmp_path, base, **training):
    from care.train.config import recipe_from_dict

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    t = {"max_steps": 2, "batch": 2, "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "max_length": 96,
         "lr": 1e-3, "warmup": 0} | training
    return recipe_from_dict({"name": "t", "model": {"base": str(base)},
                             "data": {"sources": [{"path": str(data)}], "val_fraction": 0.1},
                             "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "training": t})


def test_smollm2_training_template_renders_identically(smollm_tokenizer):
    from transformers import AutoTokenizer

    from care.train.chat_templates import SMOLLM2_TEMPLATE, SMOLLM2_TRAINING_TEMPLATE, training_template

    tok = AutoTokenizer.from_pretrained(str(smollm_tokenizer))
    assert tok.chat_template == SMOLLM2_TEMPLATE  # the GGUF's template is the stock one we patch
    assert training_template(tok) == SMOLLM2_TRAINING_TEMPLATE
    for conv in CONVERSATIONS:
        for gen in (False, True):
            a = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            b = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                        chat_template=SMOLLM2_TRAINING_TEMPLATE)
            assert a == b


def test_assistant_mask_covers_reply_and_end_of_turn(smollm_tokenizer):
    from transformers import AutoTokenizer

    from care.train.chat_templates import SMOLLM2_TRAINING_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(smollm_tokenizer))
    out = tok.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, chat_template=SMOLLM2_TRAINING_TEMPLATE)
    ids = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(ids) == "A1<|im_end|>A2 with\nnewline<|im_end|>"


def test_all_linear_per_architecture(tiny_llama, tiny_phi3):
    from transformers import AutoModelForCausalLM

    from care.train.modeling import resolve_target_modules

    llama = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    phi3 = AutoModelForCausalLM.from_pretrained(str(tiny_phi3))
    assert resolve_target_modules(llama, "all-linear") == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                           "q_proj", "up_proj", "v_proj"]
    assert resolve_target_modules(phi3, "all-linear") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert resolve_target_modules(phi3, ["qkv_proj"]) == ["qkv_proj"]
    with pytest.raises(ConfigError) as err:
        resolve_target_modules(phi3, ["q_proj"])
    assert "qkv_proj" in err.value.one_line()


def test_qlora_two_steps_writes_outputs(tmp_path, tiny_phi3, capsys):
    from care.train.metrics import read_metrics
    from care.train.sft import train

    res = train(_recipe(tmp_path, tiny_phi3), tmp_path / "run")
    # Metrics go to metrics.jsonl; transformers must not dump its log dicts on stdout.
    assert "'loss'" not in capsys.readouterr().out
    out = res.output_dir
    assert res.metrics["global_step"] == 2 and res.metrics["quantized"] is True
    assert res.metrics["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("learning_rate", "mean_token_accuracy", "grad_norm", "samples_per_s"):
        assert key in steps[-1]
    assert steps[-1]["tokens_per_s"] > 0 and any("eval_loss" in r for r in rows)
    for name in ("loss.png", "resolved_config.yaml", "data_report.json", "train_result.json"):
        assert (out / name).stat().st_size > 0
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    info = json.loads((res.adapter_dir / "care_adapter.json").read_text())
    assert info["quantized"] and info["chat_template"] == (tiny_phi3 / "chat_template.jinja").read_text()
    # The adapter keeps the model's real template, never the training variant.
    assert "{% generation %}" not in (res.adapter_dir / "chat_template.jinja").read_text()
    with pytest.raises(Exception, match="already has checkpoints"):
        train(_recipe(tmp_path, tiny_phi3), tmp_path / "run")


def test_signal_stops_with_checkpoint_and_resume_matches(tmp_path, tiny_llama):
    from transformers import TrainerCallback

    from care.train.metrics import read_metrics
    from care.train.sft import train

    class KillAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    recipe = _recipe(tmp_path, tiny_llama, max_steps=4, eval_steps=100, save_steps=100)
    recipe.data["val_fraction"] = 0.0
    full = train(recipe, tmp_path / "full", no_quant=True)
    assert full.metrics["global_step"] == 4
    stopped = train(recipe, tmp_path / "resumed", no_quant=True, callbacks=[KillAt2()])
    assert stopped.interrupted and stopped.adapter_dir is None
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
    resumed = train(recipe, tmp_path / "resumed", resume=True, no_quant=True)
    assert resumed.metrics["global_step"] == 4 and resumed.adapter_dir is not None

    def losses(p):
        return {r["step"]: r["loss"] for r in read_metrics(p / "metrics.jsonl") if "loss" in r}

    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(b) == [1, 2, 3, 4]
    assert a[1] != a[4]  # training moved
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    # Same batches after resuming: the tokens each step saw match (trl's counter restarts at the resume).
    tok = {p: {r["step"]: r["num_tokens"] for r in read_metrics(p / "metrics.jsonl") if "loss" in r}
           for p in (tmp_path / "full", tmp_path / "resumed")}
    full_tok, res_tok = tok[tmp_path / "full"], tok[tmp_path / "resumed"]
    assert res_tok[3] == full_tok[3] - full_tok[2] and res_tok[4] == full_tok[4] - full_tok[2]


def test_recipe_smoke_and_overrides(tmp_path):
    from care.train.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndata:\n  sources:\n    - {path: a.jsonl, limit: 100}\n"
                    "smoke: {training.max_steps: 3, data.sources.0.limit: 8}\n", encoding="utf-8")
    r = load_recipe(path, smoke=True, overrides=["training.lr=1e-4", "lora.target_modules=[q_proj]"])
    assert r.training["max_steps"] == 3 and r.data["sources"][0]["limit"] == 8
    assert r.training["lr"] == 1e-4 and r.lora["target_modules"] == ["q_proj"]
    assert r.quant["quant_type"] == "nf4" and r.hash() != load_recipe(path).hash()
    path.write_text("training: {batch: 0}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="training.batch"):
        load_recipe(path)
    path.write_text("model: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_two_stage_training_starts_stage2_from_stage1(tmp_path, tiny_llama):
    from care.train.config import recipe_from_dict
    from care.train.sft import train

    p1, p2 = tmp_path / "s1.jsonl", tmp_path / "s2.jsonl"
    p1.write_text("".join(json.dumps({"query": f"g{i}?", "response": f"general {i}.", "domain": "general"}) + "\n"
                          for i in range(12)), encoding="utf-8")
    p2.write_text("".join(json.dumps({"query": f"m{i}?", "response": f"medical {i}.", "domain": "medical"}) + "\n"
                          for i in range(12)), encoding="utf-8")
    recipe = recipe_from_dict({
        "model": {"base": str(tiny_llama)},
        "data": {"sources": [{"path": str(p1)}, {"path": str(p2), "stage": 2}], "val_fraction": 0.0,
                 "balance": "none", "stages": {"mix_k": 0.5, "stage1_steps": 1}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 2, "batch": 2, "logging_steps": 1, "save_steps": 100, "max_length": 128}})
    res = train(recipe, tmp_path / "run", no_quant=True)
    assert (tmp_path / "run" / "stage1" / "adapter" / "adapter_model.safetensors").is_file()
    assert res.adapter_dir == tmp_path / "run" / "adapter" and res.metrics["global_step"] == 2
    assert res.stages[0]["metrics"]["global_step"] == 1
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["stages"][1]["train"] == {"general": 6, "medical": 12}


def test_template_without_training_variant_still_trains(tmp_path, tiny_llama):
    """A chat template neither we nor trl know: training falls back to prompt/completion pairs, and the
    adapter keeps that template."""
    from care.train.sft import train

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    recipe = _recipe(tmp_path, tiny_llama)
    recipe.model["chat_template"] = template
    res = train(recipe, tmp_path / "run", no_quant=True)
    assert res.metrics["global_step"] == 2
    assert (res.adapter_dir / "chat_template.jinja").read_text() == template
