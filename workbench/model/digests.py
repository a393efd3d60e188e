"""sha256 of weight files, remembered by their stat: a base is hashed once on a machine, not per command.

Train, merge and quantize all fingerprint their base (run records and merge reports hold the
sha256 of each weight file, and a merge checks the adapter's recorded base against them). For the
9.6B release that is 19.3 GB through sha256, 10-20 s of a core each time. Like git's index, the
digest of a large file is remembered with the file's size, mtime, ctime, inode and device, and
used only while all five are unchanged: writing the file changes its mtime and ctime, replacing
it (a rename over it, a new download) its inode, and ctime cannot be set back by a user. A file
whose mtime or ctime is within a second of when it was hashed is not remembered (git's "racy"
rule: a write in the same clock tick could go unnoticed).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from pathlib import Path

from workbench.atomic import write_json
from workbench.user_cache import user_cache

REMEMBERED_FROM = 64 << 20  # smaller files hash in a fraction of a second: not worth an entry
RACY_NS = 1_000_000_000
CHUNK = 1 << 24  # hashed, then unmapped, 16 MiB at a time


def cache_file() -> Path:
    return user_cache("sha256.json")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (always computed), hashed from a read-only mapping: the page cache's
    pages are hashed where they are, not copied into this process first (a merge hashes 19 GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # an empty file cannot be mapped
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for start in range(0, len(view), CHUNK):
                    digest.update(view[start:start + CHUNK])
                    # unmap what was hashed: the pages stay in the page cache for the merge's own
                    # mapping, but no longer count in this process's RSS (two mapped files would)
                    mapped.madvise(mmap.MADV_DONTNEED, start, min(CHUNK, len(view) - start))
            finally:
                view.release()  # a live export would keep the mapping from closing
    return digest.hexdigest()


def weight_sha256(path: Path) -> str:
    """sha256 of a weight file: the remembered digest while the file is unchanged, else computed
    (and remembered if the file is large)."""
    remembered = remembered_sha256(path)
    return remembered if remembered is not None else hash_and_remember(path)


def hash_and_remember(path: Path) -> str:
    """sha256 of a weight file, computed, and remembered if the file is large and was not written
    within the racy window."""
    path = Path(path).resolve()
    started = time.time_ns()
    before = _stamp(path)
    digest = sha256_file(path)
    if before[0] >= REMEMBERED_FROM and _stamp(path) == before and max(before[1], before[2]) < started - RACY_NS:
        _remember(path, before, digest)
    return digest


def remembered_sha256(path: Path) -> str | None:
    """The remembered digest of `path` if the file has not changed since it was hashed, else None."""
    path = Path(path).resolve()
    entry = _read().get(str(path))
    if entry is None or tuple(entry["stat"]) != _stamp(path):
        return None
    return entry["sha256"]


def _stamp(path: Path) -> tuple[int, int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def _read() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: everything is hashed again
        return {}


def _remember(path: Path, stamp: tuple, digest: str) -> None:
    # Another process may write the file at the same time; the later rename wins and the other
    # entry is hashed again next time, which is only slower.
    entries = {p: e for p, e in _read().items() if os.path.exists(p)}
    entries[str(path)] = {"stat": list(stamp), "sha256": digest}
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file(), entries)
    except OSError:  # a read-only home: the digest is still right, only not remembered
        pass
