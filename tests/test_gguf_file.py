"""care.gguf_file: the one GGUF header reader, on a real GGUF written by gguf-py, truncated copies of it and a
file that is no GGUF."""

from __future__ import annotations

import struct

import pytest

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from care.errors import InvalidModelError, ModelNotFoundError  # noqa: E402
from care.gguf_file import read_header  # noqa: E402

VOCAB = [f"tok{i}" for i in range(300)]


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_file_type(15)  # MOSTLY_Q4_K_M
    w.add_token_list(VOCAB)
    w.add_token_scores([0.5] * len(VOCAB))
    w.add_array("care.list", [1, 2, 3])
    w.add_tensor("token_embd.weight", np.ones((16, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float16))
    w.add_tensor("output.weight", np.arange(32 * 8, dtype=np.float32).reshape(8, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_what_gguf_py_reads(model):
    h = read_header(model)
    assert h.version == 3 and h.file_type == "Q4_K_M"
    assert h.metadata["general.name"] == "tiny" and h.metadata["llama.block_count"] == 2
    assert h.metadata["tokenizer.ggml.tokens"] == len(VOCAB)  # a long array: its length only
    assert "tokenizer.ggml.tokens" in h.arrays_skipped
    assert [(t.name, t.shape, t.ggml_type) for t in h.tensors] == [
        ("token_embd.weight", (32, 16), 0), ("blk.0.attn_norm.weight", (32,), 1), ("output.weight", (32, 8), 0)]
    assert [t.nbytes for t in h.tensors] == [16 * 32 * 4, 32 * 2, 8 * 32 * 4]
    reader = gguf.GGUFReader(str(model))
    assert set(h.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert [t.name for t in reader.tensors] == [t.name for t in h.tensors]
    assert [int(t.data_offset) for t in reader.tensors] == [h.data_offset + t.offset for t in h.tensors]
    spans = h.tensor_bytes()
    assert spans["output.weight"] == 8 * 32 * 4 and spans["blk.0.attn_norm.weight"] >= 64


def test_arrays_on_request(model):
    h = read_header(model, arrays=True)
    assert h.metadata["tokenizer.ggml.tokens"] == VOCAB
    assert h.metadata["care.list"] == [1, 2, 3] and h.metadata["tokenizer.ggml.scores"][0] == 0.5
    assert h.arrays_skipped == []


def test_no_file_type_is_none(tmp_path):
    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    h = read_header(path)
    assert h.file_type is None and h.tensors == [] and h.metadata["general.architecture"] == "llama"


@pytest.mark.parametrize("cut", [3, 10, 30, 60, 2000, -1])
def test_truncated_copies_fail_naming_the_file(model, tmp_path, cut):
    data = model.read_bytes()
    kv_start = 24
    cut = len(data) - 1 if cut == -1 else cut
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(InvalidModelError) as err:
        read_header(bad)
    msg = err.value.one_line()
    assert str(bad) in msg and "\n" not in msg
    assert ("Not a GGUF" in msg) if cut < 4 else ("Truncated" in msg or "Corrupt" in msg)
    if kv_start < cut < 2000:
        assert "(reading key '" in msg or "(reading the name of metadata key" in msg  # where it broke
    if cut == 2000:
        assert "(reading the tensor table)" in msg or "(reading key '" in msg
    if cut == len(data) - 1:
        assert "tensor 'output.weight'" in msg


def test_not_a_gguf_missing_and_wrong_version(model, tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is not a model\n" * 10)
    with pytest.raises(InvalidModelError, match="Not a GGUF file"):
        read_header(text)
    with pytest.raises(ModelNotFoundError):
        read_header(tmp_path / "absent.gguf")
    v9 = tmp_path / "v9.gguf"
    data = bytearray(model.read_bytes())
    data[4:8] = struct.pack("<I", 9)
    v9.write_bytes(bytes(data))
    with pytest.raises(InvalidModelError, match="Unsupported GGUF version 9"):
        read_header(v9)


def test_check_data_off_reads_a_file_cut_in_its_tensor_data(model, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model.read_bytes()[:-100])
    h = read_header(cut, check_data=False)
    assert [t.name for t in h.tensors][-1] == "output.weight"
    with pytest.raises(InvalidModelError, match="Truncated GGUF: tensor 'output.weight'"):
        read_header(cut)
