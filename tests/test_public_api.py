"""The public API: `from care import ...` is lazy (no torch, no llama.cpp on import), and the README example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- readme-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its library example"
    return match.group(1)


def test_import_care_stays_light():
    code = ("import sys, care; from care import ChatSession, load_engine, ChatEngine; "
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_public_names_resolve(monkeypatch):
    import care

    for name in ("ChatEngine", "ChatSession", "load_engine", "export_gguf", "verify_gguf", "merge_adapter", "train"):
        assert name in care.__all__ and callable(getattr(care, name)), name
    import care.train.readers  # noqa: F401 - importing a training module must not hide the function
    import care.train.sft
    from care import train

    seen = []
    monkeypatch.setattr(care.train.sft, "train", lambda *a, **kw: seen.append((a, kw)) or "result")
    assert train("recipe", "out", resume=True) == "result"  # `care.train(...)` is care.train.sft.train(...)
    assert seen == [(("recipe", "out"), {"resume": True})]


def test_readme_example_runs(embedded_gguf, capsys):
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 14
    exec(compile(code, "README example", "exec"), {})  # noqa: S102 - our own README's code
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "backend='llama.cpp'" in lines[0] and "n_ctx=2048" in lines[0]
    assert re.search(r"\[\d+ tokens, \d+ tok/s\]", out)
    # The chest-pain message gets the emergency notice, then the vetted first-aid card (no model text).
    notice = next(i for i, line in enumerate(lines) if line.startswith("[") and "emergency" in line)
    assert notice > 1 and "While help comes:" in "\n".join(lines[notice + 1:])
