"""How a section reports: one JSON line per event, flushed at once, so that the rows measured before
a section is stopped (over its budget, killed, crashed) are still in the suite's JSON.

  {"row": {...}}                      one measured row
  {"skip": {"what": ..., "reason": ...}}  a part of the section not measured, and why
  {"data": {...}}                     facts about the whole section (e.g. the measured matmul rate)
  {"error": "..."}                    the exception that ended the section
  {"done": true}                      the section ran to its end
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


class Recorder:
    def __init__(self, path: Path, deadline: float):
        self.path = Path(path)
        self.deadline = deadline  # time.time() at which the parent stops this section
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def _write(self, event: dict) -> None:
        self._file.write(json.dumps(event, default=str) + "\n")
        self._file.flush()

    def row(self, **fields) -> None:
        self._write({"row": fields})

    def skip(self, what: str, reason: str) -> None:
        self._write({"skip": {"what": what, "reason": reason}})

    def data(self, **fields) -> None:
        self._write({"data": fields})

    def error(self, message: str) -> None:
        self._write({"error": message})

    def done(self) -> None:
        self._write({"done": True})
        self._file.close()

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def fits(self, needs_s: float) -> bool:
        """Whether a part expected to take `needs_s` fits in what is left: a section stops between
        its parts (recording them as skipped) rather than be killed in the middle of one."""
        return self.seconds_left() >= needs_s

    def over_budget(self, needs_s: float) -> str:
        return f"over the section's budget: {max(self.seconds_left(), 0):.0f} s left, about {needs_s:.0f} s needed"


@dataclass
class Events:
    """A section's JSON lines, read back by the parent."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    error: str | None = None
    done: bool = False


def read_events(path: Path) -> Events:
    events = Events()
    if not Path(path).exists():
        return events
    for line in Path(path).read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the last line of a process killed while writing
            continue
        if "row" in event:
            events.rows.append(event["row"])
        elif "skip" in event:
            events.skipped.append(event["skip"])
        elif "data" in event:
            events.data.update(event["data"])
        elif "error" in event:
            events.error = event["error"]
        elif event.get("done"):
            events.done = True
    return events
