"""User-facing errors.

Anything a person can fix (a config key, a data record, a checkpoint folder) raises a
`WorkbenchError` whose message names the file, record, field or YAML key. The CLI prints
the message and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WorkbenchError(Exception):
    """An error in the user's input, with a message that says where and what."""


class ConfigError(WorkbenchError, ValueError):
    """A YAML config or recipe is wrong (names the file and the key)."""


class DataError(WorkbenchError, ValueError):
    """A data record is wrong (names the file, the record index and the field)."""

    def __init__(self, message: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None):
        where = ", ".join(
            part for part in (
                file and f"file {file}",
                record is not None and f"record {record}",
                field and f"field '{field}'",
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.record, self.field = file, record, field


class CheckpointError(WorkbenchError, ValueError):
    """A model folder or weight file is missing, corrupt or not Qwen-VL."""


def nearest(name: object, valid: Iterable[object]) -> str:
    """'did you mean X?' for the closest valid name, else the list of valid names."""
    valid = [str(v) for v in valid]
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"
