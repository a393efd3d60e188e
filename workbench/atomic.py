"""Writing files so that nobody ever sees half of one: a sibling temporary file, then a rename.

Every JSON, YAML and text output of the workbench goes through here; folders (a merged model, an
imported ViT) are written to a temporary sibling folder and renamed by their writers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file next to `path` and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # pid: ranks of one run may write side by side
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
