"""Source rules that keep the layers honest, checked on the code itself (ast, no imports)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("care", "bench", "scripts", "tests") for p in sorted((REPO / d).rglob("*.py"))]
# The two modules allowed to import llama_cpp itself: the door, and the CPU guard's child (the proof).
LLAMA_DOORS = {"care/runtime/llama_compat.py", "care/runtime/cpu_probe.py"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_only_llama_compat_imports_llama_cpp():
    """Every process loads llama.cpp through llama_compat.load(), after the CPU guard chose a module that runs
    on this CPU (issue 22): a bare `import llama_cpp` anywhere else could load one that dies with SIGILL."""
    offenders = []
    for path in SOURCES:
        rel = path.relative_to(REPO).as_posix()
        if rel in LLAMA_DOORS:
            continue
        offenders += [f"{rel}:{line} imports {name}" for line, name in _imports(path)
                      if name == "llama_cpp" or name.startswith("llama_cpp.")]
    assert offenders == []


def test_the_check_above_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from llama_cpp.llama_grammar import LlamaGrammar\n    import llama_cpp\n")
    assert [name for _, name in _imports(bad)] == ["llama_cpp.llama_grammar", "llama_cpp"]
