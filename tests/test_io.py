"""care.io: the one atomic-write helper and its one file-mode rule."""

from __future__ import annotations

import os
import stat

import pytest

from care.io import atomic_path, write_json, write_text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_open_would_give_not_mkstemps_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        text = write_text(tmp_path / "Modelfile", "FROM x\n")
        manifest = write_json(tmp_path / "care_manifest.json", {"a": 1})
        plain = tmp_path / "plain"
        plain.write_text("x")  # what open() gives, the reference
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE(text.stat().st_mode) == want and stat.S_IMODE(manifest.stat().st_mode) == want


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = write_text(tmp_path / "keep.txt", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("stopped")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_process_umask_is_read_without_changing_it():
    from care.io import process_umask, umask_mode

    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027 and umask_mode() == 0o640 and umask_mode(0o777) == 0o750
        assert os.umask(0o027) == 0o027  # still what it was set to
    finally:
        os.umask(old)


def test_an_executable_gets_the_exec_bits_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "llama-simple", mode=0o777) as tmp:
            tmp.write_bytes(b"#!/bin/sh\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "llama-simple").stat().st_mode) == 0o755
