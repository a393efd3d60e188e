"""Weight-file digests remembered by stat (workbench/model/digests.py): used only while the file is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from workbench.model import digests


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache folder; every file is large enough to be remembered; no racy window."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "REMEMBERED_FROM", 1)
    monkeypatch.setattr(digests, "RACY_NS", 0)
    return tmp_path / "cache" / "workbench" / "sha256.json"


def _rewrite_same_size(path: Path) -> None:
    path.write_bytes(b"B" * path.stat().st_size)


def _replace_by_rename(path: Path) -> None:
    new = path.with_name("new")
    new.write_bytes(b"C" * path.stat().st_size)
    new.replace(path)


def _touch(path: Path) -> None:
    os.utime(path)  # same bytes, new mtime: hashed again (the stamp cannot tell)


def _chmod(path: Path) -> None:
    path.chmod(0o600)  # ctime moves: hashed again


CHANGES = [  # (change, the file's bytes afterwards differ)
    (_rewrite_same_size, True),
    (_replace_by_rename, True),
    (_touch, False),
    (_chmod, False),
]


@pytest.mark.parametrize(("change", "new_bytes"), CHANGES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_a_changed_file_is_hashed_again(cache, tmp_path, change, new_bytes):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"A" * 4096)
    first = digests.weight_sha256(weights)
    assert first == hashlib.sha256(b"A" * 4096).hexdigest()
    assert digests.remembered_sha256(weights) == first
    change(weights)
    assert digests.remembered_sha256(weights) is None
    assert digests.weight_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (digests.weight_sha256(weights) != first) == new_bytes


def test_a_remembered_digest_is_not_recomputed(cache, tmp_path, monkeypatch):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"A" * 4096)
    digest = digests.weight_sha256(weights)
    monkeypatch.setattr(digests, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    assert digests.weight_sha256(weights) == digest
    assert json.loads(cache.read_text())[str(weights.resolve())]["sha256"] == digest


def test_small_and_racy_files_are_not_remembered(cache, tmp_path, monkeypatch):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x")
    monkeypatch.setattr(digests, "REMEMBERED_FROM", 2)
    digests.weight_sha256(small)
    assert digests.remembered_sha256(small) is None
    # Written within the last second: a write in the same clock tick could leave the stamp unchanged.
    monkeypatch.setattr(digests, "REMEMBERED_FROM", 1)
    monkeypatch.setattr(digests, "RACY_NS", 10**9)
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"y" * 10)
    digests.weight_sha256(fresh)
    assert digests.remembered_sha256(fresh) is None


def test_entries_of_deleted_files_are_dropped_and_a_broken_cache_is_ignored(cache, tmp_path):
    gone, kept = tmp_path / "gone.bin", tmp_path / "kept.bin"
    gone.write_bytes(b"g")
    digests.weight_sha256(gone)
    gone.unlink()
    kept.write_bytes(b"k")
    digests.weight_sha256(kept)
    assert list(json.loads(cache.read_text())) == [str(kept.resolve())]
    cache.write_text("{not json")
    assert digests.remembered_sha256(kept) is None
    assert digests.weight_sha256(kept) == hashlib.sha256(b"k").hexdigest()


@pytest.mark.parametrize("size", [0, 1, 8192, 3 * 8192 + 17])
def test_sha256_file_equals_hashlib_over_whole_and_partial_chunks(tmp_path, monkeypatch, size):
    monkeypatch.setattr(digests, "CHUNK", 8192)  # page-aligned chunks, the last one partial
    path = tmp_path / "w.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert digests.sha256_file(path) == hashlib.sha256(data).hexdigest()
