"""User-facing errors.

Anything a person can fix (a config key, a data record, a checkpoint folder) raises a
`WorkbenchError` whose message names the file, record, field or YAML key. The CLI prints
the message and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
import errno
import pickle
from collections.abc import Iterable


class WorkbenchError(Exception):
    """An error in the user's input, with a message that says where and what."""


class ConfigError(WorkbenchError, ValueError):
    """A YAML config or recipe is wrong (names the file and the key)."""


class DataError(WorkbenchError, ValueError):
    """A data record is wrong (names the file, the line of a JSONL file, the record index and the field)."""

    def __init__(self, message: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None, line: int | None = None):
        where = ", ".join(
            part for part in (
                file and f"file {file}",
                line is not None and f"line {line}",
                record is not None and f"record {record}",
                field and f"field '{field}'",
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message  # without the location, for a caller that adds one
        self.file, self.record, self.field, self.line = file, record, field, line


class CheckpointError(WorkbenchError, ValueError):
    """A model folder or weight file is missing, corrupt or not Qwen-VL."""


def nearest(name: object, valid: Iterable[object]) -> str:
    """'did you mean X?' for the closest valid name, else the list of valid names."""
    valid = [str(v) for v in valid]
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (weights-only unpickling errors run to 20 lines)."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(err: BaseException) -> tuple[str, bool]:
    """(one line for a person, whether it is the input's fault) for an error a dependency raised."""
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        if err.errno == errno.ENOSPC:
            return f"{where}no space left on the device; free some space or write somewhere else", True
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{where}{err.strerror} (check the folder's permissions)", True
        return f"{where}{err.strerror or first_line(err)}", True
    if "No space left on device" in str(err) or "os error 28" in str(err):  # safetensors' own I/O errors
        return "no space left on the device; free some space or write somewhere else", True
    if isinstance(err, pickle.UnpicklingError):
        return (f"refused to unpickle a file that holds Python objects, not only tensors ({first_line(err)}); "
                "convert it to safetensors where it came from"), True
    return f"{type(err).__name__}: {first_line(err)}", False
