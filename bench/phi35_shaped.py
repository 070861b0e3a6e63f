"""A Phi-3.5-mini-shaped Hugging Face folder: the real config and vocabulary, random bf16 weights.

Shared by the benchmarks (bench/full_scale.py runs every stage on it; bench/phone_profile.py writes the same
shape straight to a GGUF). The weights are written one tensor at a time into ~2 GB safetensors shards, so
building it needs ~1 GB of memory, not the model's 7.6 GB. The vocabulary is llama.cpp's
models/ggml-vocab-phi-3.gguf (the real 32,064-token Phi-3 SentencePiece vocabulary, which `care export
setup` extracts), read by transformers' GGUF tokenizer loader; the chat template is Phi-3.5-mini-instruct's.

    .venv/bin/python bench/phi35_shaped.py OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

# Phi-3.5-mini-instruct's config.json. LongRoPE factors are synthetic (short ~1, long growing), the same
# as bench/phone_profile.py writes into its GGUF: only their presence and shape matter for these benchmarks.
HIDDEN, FFN, LAYERS, HEADS, VOCAB = 3072, 8192, 32, 32, 32064
ROPE_DIMS = HIDDEN // HEADS
PHI35_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": FFN,
    "max_position_embeddings": 131072,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": HEADS,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "longrope",
                     "long_factor": [1.0 + i / 2 for i in range(ROPE_DIMS // 2)],
                     "short_factor": [1.0] * (ROPE_DIMS // 2)},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB,
}
# Phi-3.5-mini-instruct's chat template, as shipped in its tokenizer_config.json.
PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SHARD_BYTES = 2 * 10**9


def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (HIDDEN,)),
                   (p + "self_attn.qkv_proj.weight", (3 * HIDDEN, HIDDEN)),
                   (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                   (p + "post_attention_layernorm.weight", (HIDDEN,)),
                   (p + "mlp.gate_up_proj.weight", (2 * FFN, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, FFN))]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    from care.toolchain.llamacpp.converter_setup import phi3_vocab

    vocab = phi3_vocab()
    tok = AutoTokenizer.from_pretrained(str(vocab.parent), gguf_file=vocab.name)
    tok.chat_template = PHI35_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(out)
    match_phi35_tokenizer(out)


# What transformers' GGUF loader does not carry over from Phi-3.5-mini-instruct's own tokenizer files:
# - its chat tokens are rstrip=true (whitespace after <|user|>, <|end|> ... is swallowed), except <unk>, <s>
#   and <|endoftext|>; llama.cpp applies the same rule to any model named phi3;
# - no <s> is added: the chat template carries none, so HF's apply_chat_template sends none, and a GGUF saying
#   add_bos=true would make llama.cpp serve a token training never saw (export verification catches that).
# Without these the stand-in would tokenize chat prompts unlike both the real tokenizer and llama.cpp.
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


def match_phi35_tokenizer(out: Path) -> bool:
    """Set Phi-3.5's rstrip flags and add_bos_token=false in `out` (idempotent); True if a file changed."""
    out = Path(out)
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    for tok in data.get("added_tokens", []):
        want = tok["content"] not in PHI3_NO_RSTRIP and (tok.get("special") or tok["content"] == "</s>")
        if bool(tok.get("rstrip")) != want:
            tok["rstrip"], changed = want, True
    post = data.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing" and any("SpecialToken" in p for p in post.get("single", [])):
        post["single"] = [p for p in post["single"] if "SpecialToken" not in p]
        post["pair"] = [p for p in post.get("pair", []) if "SpecialToken" not in p]
        post["special_tokens"] = {}
        changed = True
    if changed:
        _write_json(path, data)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("add_bos_token") is not False or cfg.get("add_eos_token") is not False:
        cfg["add_bos_token"], cfg["add_eos_token"] = False, False
        _write_json(cfg_path, cfg)
        changed = True
    return changed


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_sentencepiece_model(out: Path) -> Path:
    """tokenizer.model (a SentencePiece ModelProto) from the same vocabulary GGUF: llama.cpp's converter reads
    Phi-3's vocabulary from tokenizer.model alone (the added tokens from tokenizer.json). Pieces, scores and
    types are the GGUF's first 32,000 tokens; the spec is Llama-2/Phi-3's (BPE, byte fallback, dummy prefix,
    no normalization)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from care.toolchain.llamacpp.converter_setup import phi3_vocab

    reader = gguf.GGUFReader(str(phi3_vocab()))
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    m = sp_pb2.ModelProto()
    m.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    m.trainer_spec.vocab_size = 32000
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    # GGUF token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) are SentencePiece's.
    kinds = {1: sp_pb2.ModelProto.SentencePiece.NORMAL, 2: sp_pb2.ModelProto.SentencePiece.UNKNOWN,
             3: sp_pb2.ModelProto.SentencePiece.CONTROL, 4: sp_pb2.ModelProto.SentencePiece.USER_DEFINED,
             5: sp_pb2.ModelProto.SentencePiece.UNUSED, 6: sp_pb2.ModelProto.SentencePiece.BYTE}
    for text, score, kind in list(zip(tokens, scores, types, strict=True))[:32000]:
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = text, float(score), kinds.get(int(kind), kinds[1])
    path = Path(out) / "tokenizer.model"
    path.write_bytes(m.SerializeToString())
    return path


def write_phi35_shaped_hf(out: Path, seed: int = 0) -> Path:
    """Build the folder (once: an existing complete folder is reused). Returns `out`."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if (out / ".complete").is_file():
        if not (out / "tokenizer.model").is_file():  # folders built before it was added
            write_sentencepiece_model(out)
        match_phi35_tokenizer(out)  # folders built before the flags were set
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    (tmp / "config.json").write_text(json.dumps(PHI35_CONFIG, indent=2) + "\n", encoding="utf-8")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000}) + "\n")
    _tokenizer(tmp)
    write_sentencepiece_model(tmp)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = n = 0

    def flush() -> None:
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in tensor_shapes():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    # Shards are named -0000N; rename to the HF -0000N-of-0000M convention now that M is known.
    final_map = {}
    for k, v in weight_map.items():
        i = int(v.split("-")[1].split(".")[0])
        final_map[k] = f"model-{i:05d}-of-{n:05d}.safetensors"
    for i in range(1, n + 1):
        (tmp / f"model-{i:05d}.safetensors").rename(tmp / f"model-{i:05d}-of-{n:05d}.safetensors")
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": final_map}, indent=2) + "\n")
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} ({total / 1e9:.2f} GB, {n} shards) in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    # Parsed before anything is imported or written: `--help` once became the output folder of a 7.64 GB model.
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, metavar="OUT_DIR", help="the folder to write (reused if already complete)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = ap.parse_args(argv)
    write_phi35_shaped_hf(args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
