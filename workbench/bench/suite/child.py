"""The process of one GPU-suite section: `python -m workbench.bench.suite.child NAME PLAN DEADLINE`.

Runs `workbench.bench.suite.<NAME>.run(plan, recorder)`; the recorder's JSON lines are what the
parent reads. An exception is recorded with its message and ends the process with status 1.
"""

from __future__ import annotations

import importlib
import signal
import sys
import traceback
from pathlib import Path

from workbench.bench.suite.plan import SECTION_NAMES, Plan
from workbench.bench.suite.recorder import Recorder


def events_path(plan: Plan, name: str) -> Path:
    return Path(plan.out) / "sections" / f"{name}.jsonl"


def main(argv: list[str] | None = None) -> int:
    name, plan_file, deadline = (argv if argv is not None else sys.argv[1:])
    if name not in SECTION_NAMES:
        raise SystemExit(f"unknown section {name!r}; sections: {', '.join(SECTION_NAMES)}")
    # The parent's stop: SystemExit runs the `finally` blocks, which end what a section started
    # in a session of its own (a server), and the recorder notes why the section ended.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by the suite (SIGTERM)"))
    plan = Plan.load(Path(plan_file))
    rec = Recorder(events_path(plan, name), float(deadline))
    section = importlib.import_module(f"workbench.bench.suite.{name}")
    try:
        section.run(plan, rec)
    except BaseException as err:
        rec.error(f"{type(err).__name__}: {err}".strip().splitlines()[0][:500])
        traceback.print_exc()
        return 1
    rec.done()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
