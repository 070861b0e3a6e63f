"""`care export ...` from the command line, and fetching llama.cpp's converter (`care export setup`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from care.cli import main
from care.errors import ExportError


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in ("gguf", "onnx", "verify", "setup"):
        assert sub in out
    with pytest.raises(SystemExit):
        main(["export", "gguf", "--help"])
    out = capsys.readouterr().out
    for flag in ("--q4_k_m", "--q4_0", "--q5_k_m", "--q6_k", "--q8_0", "--f16", "--no-verify", "--name"):
        assert flag in out


@pytest.mark.slow  # ~30-40 s on 2 cores: the end-to-end run goes to the slow pass (CI runs it)
def test_cli_gguf_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["export", "gguf", str(tiny_llama), "--out", str(out), "--f16", "--q4_0", "--threads", "1",
               "--json", "--no-verify"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["files"]) == {"f16", "q4_0"} and printed["verified"] is None
    assert not (out / "verify.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["quant"] for f in manifest["files"]] == ["f16", "q4_0"]
    # `care export verify FILE --source DIR` on its own, table on stdout, report saved.
    rc = main(["export", "verify", printed["files"]["q4_0"], "--source", str(tiny_llama), "--threads", "1",
               "--report", str(tmp_path / "r.json")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "q4_0" in table and "pass" in table
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    # --hf-dtype reaches the reference; a float file judged against a 16-bit reference says so when it fails.
    main(["export", "verify", printed["files"]["f16"], "--source", str(tiny_llama), "--threads", "1",
          "--hf-dtype", "bfloat16", "--report", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["hf_dtype"] == "bfloat16"
    assert all("--hf-dtype float32" in f for f in report["files"]["f16"]["failures"])


def test_cli_adapter_folder_one_line_error(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rc = main(["export", "gguf", str(adapter), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "run `care merge` first" in err
    rc = main(["export", "verify", str(adapter / "adapter_config.json"), "--source", str(adapter)])
    assert rc == 2


def _fake_sdist(path: Path, version: str) -> Path:
    """A stand-in llama-cpp-python sdist: the converter files plus things that must not be extracted."""
    root = f"llama_cpp_python-{version}"
    files = {
        f"{root}/vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
        f"{root}/vendor/llama.cpp/convert_lora_to_gguf.py": "print('lora converter')\n",
        f"{root}/vendor/llama.cpp/conversion/__init__.py": "",
        f"{root}/vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        f"{root}/vendor/llama.cpp/src/llama.cpp": "// C++ source, not needed\n",
        f"{root}/llama_cpp/__init__.py": "",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_setup_extracts_only_the_converter(tmp_path, monkeypatch):
    from care.toolchain.llamacpp import converter_setup as converter

    version = converter.llama_cpp_version()
    target = tmp_path / "conv"
    monkeypatch.setenv("CARE_CONVERTER_DIR", str(target))
    sdist = _fake_sdist(tmp_path / f"llama_cpp_python-{version}.tar.gz", version)
    assert converter.find_converter() is None
    path = converter.setup_converter(sdist=sdist)
    assert path == target and converter.find_converter() == target
    assert (target / "convert_hf_to_gguf.py").is_file() and (target / "gguf-py" / "gguf").is_dir()
    assert (target / "convert_lora_to_gguf.py").is_file()  # `care export gguf-lora` needs it too
    assert not (target / "src").exists() and not (target / "llama_cpp").exists()
    # A converter from another llama-cpp-python version is not used (version-matched to libllama).
    marker = json.loads((target / ".care-complete").read_text())
    (target / ".care-complete").write_text(json.dumps(dict(marker, version="0.0.1")))
    assert converter.find_converter() is None
    with pytest.raises(ExportError):
        converter.setup_converter(sdist=_fake_sdist(tmp_path / "llama_cpp_python-0.0.1.tar.gz", "0.0.1"))


def test_setup_offline_is_one_clear_line(tmp_path):
    """No PyPI: `care export setup` fails in one line that says how to fix it."""
    # An empty build cache too: the converter now takes the sdist the llama.cpp builds cached, when there is one.
    env = dict(os.environ, CARE_CONVERTER_DIR=str(tmp_path / "conv"), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_NO_CACHE_DIR="1", PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_FIND_LINKS="",
               CARE_LLAMA_CPP_CACHE=str(tmp_path / "cache"))
    env.pop("CARE_LLAMA_CPP_SDIST", None)
    proc = subprocess.run([sys.executable, "-m", "care.cli", "export", "setup"], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(err) == 1 and "care export setup" in err[0] and "CARE_LLAMA_CPP_SDIST" in err[0]
    assert not (tmp_path / "conv").exists()


def _fake_export_with_notes(tmp_path: Path, notes: list[str]):
    """A finished `care export gguf` folder whose manifest carries `notes`, and the ExportResult that names it
    (its own notes left empty: the CLI must print what the manifest says)."""
    from care.artifacts import file_records, gguf_manifest
    from care.export.gguf import ExportResult
    from care.io import write_json

    out = tmp_path / "out"
    out.mkdir()
    gguf = out / "m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    (out / "Modelfile").write_text("FROM ./m-q4_k_m.gguf\n")
    manifest = gguf_manifest(source={"name": "m", "architecture": "LlamaForCausalLM", "provenance": None},
                             files=file_records([gguf], **{gguf.name: {"quant": "q4_k_m"}}), name="m",
                             converter={}, primary=gguf.name, end_of_turn=None, notes=notes, verified=None,
                             verify_report=None, imatrix=None, seconds={})
    path = write_json(out / "manifest.json", manifest)
    return ExportResult(files={"q4_k_m": gguf}, manifest_path=path, verify_report=None, modelfile_path=out / "Modelfile",
                        name="m", notes=[])


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_prints_every_manifest_note(tmp_path, monkeypatch, capsys, as_json):
    """Degraded exports (a fallback type, a Modelfile without a template or stop) say so in the manifest's notes,
    and `care export gguf` shows every one of them."""
    import care.export.gguf

    notes = ["Q4_K_M: 3 of 7 weight matrices have rows not divisible by the 256-wide k-quants block",
             "Modelfile: no known chat template in the HF model, so Ollama uses the one stored in the GGUF",
             "Modelfile: no end-of-turn token found, so it sets no stop for it"]
    result = _fake_export_with_notes(tmp_path, notes)
    monkeypatch.setattr(care.export.gguf, "export_gguf", lambda *a, **kw: result)
    rc = main(["export", "gguf", str(tmp_path), "--out", str(tmp_path / "out"), "--no-verify",
               *(["--json"] if as_json else [])])
    captured = capsys.readouterr()
    assert rc == 0
    if as_json:
        assert json.loads(captured.out)["notes"] == notes
    else:
        shown = " ".join(captured.err.split())  # rich wraps long lines
        for note in notes:
            assert f"note: {note}" in shown
