"""care.system: CPUs, threads, a file's sha256 and the local Hugging Face snapshot lookup."""

from __future__ import annotations

import hashlib
import os

import pytest

from care.system import default_threads, local_snapshot, physical_cores, sha256_file, usable_cpus


def test_cpu_counts_follow_the_affinity_mask(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() == len(os.sched_getaffinity(0))
    assert 1 <= physical_cores() <= usable_cpus()
    monkeypatch.setenv("CARE_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("CARE_THREADS")
    assert 1 <= default_threads() <= physical_cores()


def test_sha256_file_reads_in_blocks(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_file(path, chunk=7) == hashlib.sha256(data).hexdigest()


def test_local_snapshot_folder_cache_and_absent(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert local_snapshot(folder) == folder and local_snapshot(str(folder)) == folder
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert local_snapshot("org/tiny", cache_dir=cache) == snap
    assert local_snapshot("org/absent", cache_dir=cache) is None
    assert local_snapshot(tmp_path / "no-such-folder", cache_dir=cache) is None
