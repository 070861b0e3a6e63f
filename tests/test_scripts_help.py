"""Every script in bench/ and scripts/ answers --help: exit 0, argparse's usage on stdout, and nothing written.

`python bench/phi35_shaped.py --help` once took --help as its output folder and wrote a 7.64 GB model into
./--help. Each script is found by glob, so a new one is covered; each runs in an empty temporary folder with
CARE_HOME pointing at another, and both must stay empty. The timeout is also the check that --help is parsed
before any heavy import (torch, transformers, llama_cpp) or any work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*REPO.glob("bench/*.py"), *REPO.glob("scripts/*.py")])


def test_scripts_found():
    assert len(SCRIPTS) >= 2, f"no scripts found under {REPO}/bench and {REPO}/scripts"


def test_every_script_is_a_script():
    """No helper modules live in these folders: each file runs as a script (so none is skipped below)."""
    helpers = [str(p.relative_to(REPO)) for p in SCRIPTS if 'if __name__ == "__main__"' not in p.read_text()]
    assert not helpers, f"not scripts (no __main__ block): {helpers}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SCRIPTS])
def test_help_exits_zero_and_writes_nothing(script: Path, tmp_path: Path):
    cwd, home = tmp_path / "cwd", tmp_path / "care_home"
    cwd.mkdir()
    home.mkdir()
    env = {**os.environ, "CARE_HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"{script.name} --help exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert "usage" in proc.stdout.lower(), f"{script.name} --help printed no usage:\n{proc.stdout[-2000:]}"
    assert not list(cwd.iterdir()), f"{script.name} --help wrote {sorted(p.name for p in cwd.iterdir())}"
    assert not list(home.iterdir()), f"{script.name} --help wrote into CARE_HOME: {list(home.iterdir())}"
