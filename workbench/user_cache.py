"""Where the workbench keeps what it computed once and reuses later: ~/.cache/workbench.

$XDG_CACHE_HOME moves it, as it moves every other tool's cache; read at each call, so a process
(or a test) that sets it later is followed.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path:
    """~/.cache/workbench/<parts> (or $XDG_CACHE_HOME/workbench/<parts>); not created here."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root.joinpath("workbench", *parts)
