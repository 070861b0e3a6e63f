"""Bytes read per decoded token from a GGUF's tensor table, and the bandwidth reader."""

from __future__ import annotations

import math

from care.runtime.membw import bytes_per_token, gguf_layout, read_bandwidth


def test_bytes_per_token_counts_weights_and_kv(embedded_gguf):
    meta, tensors = gguf_layout(embedded_gguf)
    assert meta["llama.block_count"] == 30
    assert tensors["blk.0.attn_norm.weight"] == (576 * 4, (576,))  # f32
    # Q4_1 blocks: 32 weights in 20 bytes.
    assert tensors["blk.0.attn_q.weight"] == (576 * 576 // 32 * 20, (576, 576))
    at_0 = bytes_per_token(embedded_gguf, 0)
    # SmolLM2 ties its output layer to the embedding: every weight is read for each token, i.e. the whole
    # file but its header (vocabulary and metadata, a few MB).
    assert "output.weight" not in tensors
    size = embedded_gguf.stat().st_size
    assert 0.9 * size < at_0["weights"] < size
    assert at_0["kv"] == 0
    f16 = bytes_per_token(embedded_gguf, 1000)
    q8 = bytes_per_token(embedded_gguf, 1000, "q8_0", "q4_0")
    # 30 layers x 3 KV heads x 64 dims, K and V, 2 bytes each in f16.
    assert f16["kv_per_token"] == 30 * 3 * 64 * 2 * 2
    assert f16["kv"] == 1000 * f16["kv_per_token"]
    assert math.isclose(q8["kv_per_token"], 30 * 3 * 64 * (34 / 32 + 18 / 32))
    assert f16["total"] > q8["total"] > at_0["total"]


def test_read_bandwidth_is_a_plausible_rate():
    bw = read_bandwidth(1, passes=2)
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s
