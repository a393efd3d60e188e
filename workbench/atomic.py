"""Writing files so that nobody ever sees half of one: a sibling temporary file, then a rename.

Every file the workbench writes goes through here: `write_text`/`write_json` for text, and
`atomic_path` for writers that want a path of their own (PIL, matplotlib, a streamed JSONL).
Folders (a merged model, an imported ViT) are written to a temporary sibling folder and renamed
by their writers; ShardWriter renames its shards when the index is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`, on error it goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid: ranks of one run may write side by side; the suffix keeps writers that infer a format happy
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file next to `path` and rename it over `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the mode the umask gives new files: safetensors writes its files 0600 by itself."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
