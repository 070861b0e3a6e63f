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


# -- no private names across modules, modules of a readable size --------------------------------------------

CARE = sorted((REPO / "care").rglob("*.py"))
MAX_LINES = 400
OVER_REASON = "over 400 lines"  # in a module's docstring, with the reason it stays one module


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_imports(path: Path, module: str) -> list[str]:
    """`from care.x import _name` anywhere in `path` (module level or inside a function) where the importing
    module is not care.x itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != module \
                and (node.module == "care" or node.module.startswith("care.")):
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this module's own": another module that needs it should get a public name
    from its one home."""
    offenders = []
    for path in CARE:
        rel = path.relative_to(REPO).as_posix()
        offenders += [f"{rel}:{hit}" for hit in _private_imports(path, _module_name(path))]
    assert offenders == []


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from care.io import _helper, write_json\n\n"
                   "def f():\n    from care.artifacts import _file\n")
    assert _private_imports(bad, "care.other") == ["1: from care.io import _helper",
                                                   "4: from care.artifacts import _file"]
    assert _private_imports(bad, "care.io") == ["4: from care.artifacts import _file"]


def _too_long(path: Path) -> tuple[int, bool]:
    """(lines, whether the module docstring says why it is over 400 lines)."""
    text = path.read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text, str(path))) or ""
    return len(text.splitlines()), OVER_REASON in " ".join(doc.split())


def test_modules_stay_under_400_lines_unless_they_say_why():
    """A module over 400 lines is split by concern; one that is truly cohesive says "over 400 lines" and why
    in its docstring (those are listed here, so a new one is a visible change)."""
    over, explained = [], []
    for path in CARE:
        lines, reason = _too_long(path)
        if lines > MAX_LINES:
            (explained if reason else over).append(path.relative_to(REPO).as_posix())
    assert over == []
    assert explained == EXPLAINED_LONG_MODULES


def test_the_length_check_can_fail(tmp_path):
    long = tmp_path / "long.py"
    long.write_text('"""A module."""\n' + "x = 1\n" * MAX_LINES)
    assert _too_long(long) == (MAX_LINES + 1, False)
    long.write_text('"""A module over 400\n lines: one state machine."""\n' + "x = 1\n" * MAX_LINES)
    assert _too_long(long) == (MAX_LINES + 2, True)


# Modules over 400 lines whose docstring gives the reason (see the test above).
EXPLAINED_LONG_MODULES: list[str] = []
