"""`care export gguf --imatrix`: the calibration text (the recipe's training rows in the model's chat template,
or --calibration FILE), its one-line errors, the with/without comparison in verify.json, and (slow) the whole
path through llama.cpp's llama-imatrix and llama-quantize."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_export_gguf import smollm_hf  # noqa: F401 - the session fixture (SmolLM2 as an HF folder), reused

from care.errors import DataError, ExportError
from care.export.imatrix import MIN_CTX, calibration_text, chunk_ctx

ROWS = [
    {"id": f"b{i}", "query": f"How do I block card number {i}?", "response": f"Open the app and freeze card {i}.",
     "domain": "banking"} for i in range(8)
] + [
    {"id": f"t{i}", "query": f"My router {i} keeps dropping.", "response": f"Restart router {i} and check the cable.",
     "domain": "telecom"} for i in range(8)
]


def _model_dir(path: Path, tokenizer_dir: Path) -> Path:
    """A merged-model folder as far as calibration needs it: the tokenizer and its chat template."""
    path.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def trained_layout(tmp_path, smollm_tokenizer):
    """What `care train` + `care merge` leave behind: the recipe (relative data path) in its own folder, the
    training run's resolved_config.yaml beside the adapter, care_merge.json in the merged model naming both."""
    import yaml

    recipes = tmp_path / "recipes"
    _write_rows(recipes / "data" / "rows.jsonl", ROWS)
    recipe = {"name": "calib-test", "model": {"base": "embedded"},
              "data": {"sources": [{"path": "data/rows.jsonl"}], "val_fraction": 0.25, "seed": 3}}
    (recipes / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = tmp_path / "runs" / "train"
    (run / "adapter").mkdir(parents=True)
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    merged = _model_dir(tmp_path / "elsewhere" / "merged", smollm_tokenizer)
    (merged / "care_merge.json").write_text(json.dumps({
        "adapter": str(run / "adapter"), "recipe_path": str(recipes / "r.yaml"), "recipe_name": "calib-test"}))
    return merged, recipe


def test_calibration_is_the_recipes_training_rows_in_the_chat_template(trained_layout):
    from care.domains import system_prompt
    from care.train.data import build_data
    from care.train.formatting import to_messages
    from care.train.readers import BadRows, read_source

    merged, recipe = trained_layout
    cal = calibration_text(merged)
    # The same split training made: validation rows are held out of the calibration text too.
    records = read_source(merged.parents[1] / "recipes" / "data" / "rows.jsonl", None, BadRows())
    bundle = build_data(recipe["data"], records=records)
    assert bundle.val and cal.rows == len(bundle.train) < len(ROWS)
    for r in bundle.train:
        assert f"<|im_start|>user\n{r.query}<|im_end|>\n<|im_start|>assistant\n{r.response}<|im_end|>" in cal.text
    for r in bundle.val:
        assert r.query not in cal.text
    assert cal.text.count(system_prompt("banking")) + cal.text.count(system_prompt("telecom")) == cal.rows
    assert cal.source == "recipe calib-test"
    assert cal.sha256 == hashlib.sha256(cal.text.encode()).hexdigest()
    # Shuffled (both domains in the first chunk), and deterministic (the manifest's hash must be reproducible).
    first = cal.text[: len(cal.text) // 3]
    assert system_prompt("banking") in first and system_prompt("telecom") in first
    assert calibration_text(merged).sha256 == cal.sha256
    from care.export.hf_source import hf_tokenizer

    tok = hf_tokenizer(merged)
    assert cal.tokens == sum(len(tok(tok.apply_chat_template(to_messages(r), tokenize=False),
                                     add_special_tokens=False)["input_ids"]) for r in bundle.train)


def test_max_tokens_keeps_whole_conversations(trained_layout):
    merged, _ = trained_layout
    full = calibration_text(merged)
    cut = calibration_text(merged, max_tokens=full.tokens // 2)
    assert 0 < cut.rows < full.rows and cut.tokens <= full.tokens // 2
    assert full.text.startswith(cut.text) and cut.text.endswith("<|im_end|>\n")


def test_calibration_file_jsonl_and_txt(tmp_path, smollm_tokenizer):
    model = _model_dir(tmp_path / "m", smollm_tokenizer)
    jl = calibration_text(model, _write_rows(tmp_path / "c.jsonl", ROWS))
    assert jl.rows == len(ROWS) and jl.source == "c.jsonl"
    assert "<|im_start|>user\nMy router 3 keeps dropping.<|im_end|>" in jl.text
    txt_path = tmp_path / "notes.txt"
    txt_path.write_text("Plain clinic notes. " * 100, encoding="utf-8")
    txt = calibration_text(model, txt_path)
    assert txt.text == txt_path.read_text(encoding="utf-8") and txt.rows == 0 and txt.tokens > 2 * MIN_CTX


@pytest.mark.parametrize("content, words", [
    (b'{"query": "no response field"\n{not json\n', ("No usable rows", "c.jsonl", "query/response")),
    (None, ("Calibration file not found", "c.jsonl")),
])
def test_bad_calibration_file_is_one_line(tmp_path, smollm_tokenizer, content, words):
    model = _model_dir(tmp_path / "m", smollm_tokenizer)
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        calibration_text(model, path)
    line = err.value.one_line()
    assert "\n" not in line and all(w in line for w in words), line


def test_bad_text_and_short_text_are_one_line(tmp_path, smollm_tokenizer):
    model = _model_dir(tmp_path / "m", smollm_tokenizer)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Patient klagt über Übelkeit".encode("latin-1") * 50)
    with pytest.raises(DataError, match="not UTF-8"):
        calibration_text(model, bad)
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.", encoding="utf-8")
    with pytest.raises(DataError) as err:
        calibration_text(model, short)
    assert "too short" in err.value.one_line() and "--calibration" in err.value.one_line()


def test_no_recipe_and_no_file_names_calibration(tmp_path, smollm_tokenizer):
    model = _model_dir(tmp_path / "m", smollm_tokenizer)
    with pytest.raises(DataError) as err:
        calibration_text(model)
    line = err.value.one_line()
    assert "\n" not in line and "No recipe" in line and "--calibration" in line


def test_chunk_ctx_leaves_llama_imatrix_two_chunks():
    assert chunk_ctx(100_000) == 512
    for tokens in (130, 300, 1000, 1077):
        ctx = chunk_ctx(tokens)
        assert ctx % 32 == 0 and MIN_CTX <= ctx <= 512 and 2 * ctx <= tokens, (tokens, ctx)
    assert chunk_ctx(1077) == 480  # 5% margin for llama.cpp tokenizing a few more tokens than HF


def test_imatrix_comparison_rows_in_verify_report():
    """Each type is verified twice; the rows without the imatrix are a comparison: marked, summed up, and
    their failures do not fail the export."""
    from care.export.imatrix import PLAIN_SUFFIX, imatrix_comparison

    def entry(kl: float, top1: float, size: int) -> dict:
        return {"kl_mean": kl, "kl_p99": 4 * kl, "top1_agreement": top1, "ppl": 10 + kl, "file_bytes": size}

    report = {"files": {"f16": entry(1e-5, 1.0, 100), "q3_k_m": entry(0.2, 0.8, 30),
                        "q3_k_m" + PLAIN_SUFFIX: entry(0.5, 0.7, 31)},
              "failures": ["q3_k_m (no imatrix): mean KL 0.5 exceeds the q3_k_m limit 0.35"], "passed": False}
    summary = imatrix_comparison(report, ["q3_k_m"])
    assert report["passed"] and not report["failures"]
    assert report["comparison_failures"] == ["q3_k_m (no imatrix): mean KL 0.5 exceeds the q3_k_m limit 0.35"]
    assert report["files"]["q3_k_m"]["imatrix"] and not report["files"]["q3_k_m" + PLAIN_SUFFIX]["imatrix"]
    assert summary["q3_k_m"]["with"]["kl_mean"] == 0.2 and summary["q3_k_m"]["without"]["top1_agreement"] == 0.7
    assert summary["q3_k_m"]["kl_ratio"] == pytest.approx(0.4)
    # A shipped type's own failure still fails the export.
    report2 = {"files": {"q3_k_m": entry(0.9, 0.5, 30), "q3_k_m" + PLAIN_SUFFIX: entry(0.5, 0.7, 31)},
               "failures": ["q3_k_m: mean KL 0.9 exceeds the q3_k_m limit 0.35"], "passed": False}
    imatrix_comparison(report2, ["q3_k_m"])
    assert not report2["passed"] and report2["failures"]


def test_imatrix_with_only_float_types_is_a_usage_error(tiny_llama, tmp_path, capsys):
    from care.cli import main

    rc = main(["export", "gguf", str(tiny_llama), "--f16", "--imatrix", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "--imatrix" in err and "--q4_k_m" in err
    assert not (tmp_path / "o").exists()


def test_missing_recipe_fails_before_any_conversion(tiny_llama, tmp_path, capsys):
    from care.cli import main

    out = tmp_path / "o"
    rc = main(["export", "gguf", str(tiny_llama), "--phone", "--imatrix", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "No recipe" in err and "--calibration" in err
    assert not out.exists() or not list(out.iterdir())


def test_tool_failure_is_one_line_with_the_tools_own_error(tmp_path):
    from care.export.imatrix import run_tool

    script = ("echo 'llama_model_loader: loaded meta data'; "
              "echo '0.00.400.707 E compute_imatrix: you need at least 1024 tokens for a context of 512 tokens'; "
              "echo '0.00.400.708 I done'; exit 1")
    with pytest.raises(ExportError) as err:
        run_tool(["sh", "-c", script], "llama-imatrix", tmp_path / "m.gguf")
    line = err.value.one_line()
    assert "\n" not in line and "llama-imatrix failed (exit 1)" in line
    assert "compute_imatrix: you need at least 1024 tokens" in line and "0.00.400" not in line


def test_tools_that_cannot_be_built_name_the_setup_command(tmp_path, monkeypatch):
    """No cached tools and no cmake/compiler on PATH: one line naming `care export setup --tools ...`."""
    from care.export.imatrix import imatrix_tools

    monkeypatch.setenv("CARE_LLAMA_CPP_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(ExportError) as err:
        imatrix_tools()
    line = err.value.one_line()
    assert "\n" not in line and "care export setup --tools llama-imatrix llama-quantize" in line


# --- the whole path through llama.cpp's tools -------------------------------------------------------------


def _tools_or_skip() -> None:
    # Not built here: a first native llama.cpp build is ~10 min on 2 cores, too much for a fresh `make test`.
    # `make tools` (or the command below) builds them once per llama.cpp version; then this test runs.
    from care.export.imatrix import TOOLS
    from care.toolchain.llamacpp import find_tools

    if find_tools(TOOLS) is None:
        pytest.skip("llama-imatrix/llama-quantize are not built: `make tools` or "
                    "`care export setup --tools llama-imatrix llama-quantize` (cached once per llama.cpp version)")


@pytest.mark.slow
def test_smollm2_imatrix_export_beats_plain_and_records_both(smollm_hf, tmp_path):  # noqa: F811 - the fixture
    """SmolLM2-135M with an importance matrix from the medical samples: Q4_K_M with it is closer to the HF
    model than without (on held-out text), verify.json has both rows, the manifest names the matrix and the
    hash of the exact calibration text, and the matrix file carries no local path."""
    _tools_or_skip()
    from care.export.gguf import export_gguf
    from care.export.imatrix import PLAIN_SUFFIX
    from care.pipeline import sample_file
    from care.system import sha256_file

    hf = smollm_hf
    out = tmp_path / "out"
    result = export_gguf(hf, out, quants=("q4_k_m",), n_threads=1, name="SmolLM2-135M-Instruct", imatrix=True,
                         calibration=sample_file("medical"), imatrix_chunks=4)
    report = json.loads((out / "verify.json").read_text())
    with_, without = report["files"]["q4_k_m"], report["files"]["q4_k_m" + PLAIN_SUFFIX]
    assert with_["imatrix"] is True and without["imatrix"] is False
    assert with_["kl_mean"] < without["kl_mean"]
    assert report["imatrix"]["q4_k_m"]["kl_ratio"] < 1 and report["passed"]
    manifest = json.loads((out / "manifest.json").read_text())
    imx = manifest["imatrix"]
    assert (out / imx["file"]).is_file() and imx["sha256"] == sha256_file(out / imx["file"])
    expected = calibration_text(hf, sample_file("medical"), max_tokens=int(4 * 512 * 1.1))
    assert imx["calibration"]["sha256"] == expected.sha256 and imx["chunks"] == 4
    assert manifest["files"][0]["imatrix"] is True and result.fallback_tensors["q4_k_m"] > 0
    # Only the shipped file and the matrix are left: no comparison files, no calibration text.
    assert sorted(p.name for p in out.glob("*.gguf")) == [manifest["files"][0]["file"]]
    assert not list(out.glob(".*no-imatrix*")) and not list(out.glob("*calibration*"))
    assert str(tmp_path).encode() not in (out / imx["file"]).read_bytes()
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(out / imx["file"])).tensors}
    assert "blk.0.ffn_down.weight.in_sum2" in names and "blk.29.attn_q.weight.counts" in names
