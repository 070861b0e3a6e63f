"""The CLI edge: help, lazy imports, one-line errors with a fix, and an offline answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from care.cli import COMMANDS, main


def run_care(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 300):
    import os

    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "care.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_every_command_without_heavy_imports():
    code = (
        "import sys, io, contextlib\n"
        "from care.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'textual', 'peft', 'trl') if m in sys.modules)\n"
        "print(repr(heavy)); print(buf.getvalue())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, _, rest = out.partition("\n")
    assert first == "[]", f"care --help imported {first}"
    for name in COMMANDS:
        assert name in rest


@pytest.mark.parametrize("cmd", ["chat", "models"])
def test_light_commands_do_not_import_torch(cmd):
    code = (
        "import sys\n"
        "from care.cli import build_parser\n"
        f"build_parser({cmd!r})\n"
        "from care.models import list_models; list_models()\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_command_is_one_line_with_fix(capsys):
    assert main(["chta"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Unknown command 'chta'" in err and "chat" in err and "care --help" in err


def test_missing_model_file_names_file_and_fix(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    assert main(["chat", "--model", str(missing), "--once", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "nope.gguf" in err and "care models" in err


def test_truncated_or_fake_gguf_is_rejected_before_llama_cpp(tmp_path, capsys, embedded_gguf):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not a model" * 100)
    assert main(["chat", "--model", str(fake), "--once", "hi"]) == 2
    assert "Not a GGUF file" in capsys.readouterr().err
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(embedded_gguf.read_bytes()[:20])
    assert main(["chat", "--model", str(trunc), "--once", "hi"]) == 2
    assert "trunc.gguf" in capsys.readouterr().err


def test_unreadable_model_path(tmp_path, capsys, embedded_gguf):
    import os

    if os.geteuid() == 0:
        # root reads any file: use a directory with no GGUF in it instead.
        folder = tmp_path / "empty"
        folder.mkdir()
        assert main(["chat", "--model", str(folder), "--once", "hi"]) == 2
        assert "no .gguf file" in capsys.readouterr().err
        return
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(embedded_gguf.read_bytes()[:4096])
    locked.chmod(0)
    assert main(["chat", "--model", str(locked), "--once", "hi"]) == 2
    assert "not readable" in capsys.readouterr().err


def test_debug_env_shows_traceback(tmp_path):
    proc = run_care("chat", "--model", str(tmp_path / "x.gguf"), "--once", "hi", env_extra={"CARE_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr


def test_models_lists_embedded_default(capsys, embedded_gguf):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    default = next(r for r in rows if r["name"] == "smollm2-135m")
    assert Path(default["where"]) == embedded_gguf


def test_chat_once_answers_offline_with_the_embedded_model():
    proc = run_care("chat", "--once", "How do I block a lost card?", "--max-tokens", "40", "--seed", "1",
                    "--stats", env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.strip()
    assert len(answer.split()) >= 3, answer
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer
    assert "tok/s" in proc.stderr
