"""The GPU suite's run: the planned budget, each section in its own process, one JSON and the rows.

A section runs as `python -m workbench.bench.suite.child NAME` with a deadline: it stops between
its parts when the next one would not fit (recorded as skipped), and the parent ends it (SIGTERM,
then SIGKILL) when it is still running at the deadline. Its own process also means one section's
crash, CUDA error or leaked GPU memory cannot reach the next one, and each starts from a clean
allocator, so peak-memory figures are its own.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import workbench
from workbench.atomic import write_json, write_text
from workbench.bench.suite.child import events_path
from workbench.bench.suite.plan import SECTIONS, Plan, Section, budget_table, share_spare
from workbench.bench.suite.recorder import read_events

REPO_ROOT = Path(workbench.__file__).resolve().parents[1]
JSON_NAME, ROWS_NAME = "gpu_suite.json", "rows.md"


def run_suite(plan: Plan, only: Sequence[str] | None = None, setup: dict | None = None) -> dict:
    """Run every section of `plan` (or those in `only`) and write OUT/gpu_suite.json and OUT/rows.md."""
    from workbench.bench.suite.compare import side_by_side
    from workbench.bench.suite.report import markdown

    out = Path(plan.out)
    (out / "sections").mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    skipped = {spec.name: "not named in --only" for spec in SECTIONS if only and spec.name not in only}
    unavailable = {name: reason for name, reason in ((s.name, _unavailable(s, plan)) for s in SECTIONS)
                   if reason and name not in skipped}
    budgets = share_spare(plan, unavailable, skipped)
    print(budget_table(plan, budgets, {**skipped, **unavailable}), flush=True)
    started, date = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    sections = {}
    for spec in SECTIONS:
        base = {"what": spec.what, "budget_s": budgets[spec.name]}
        if spec.name in skipped or spec.name in unavailable:
            status = "not run" if spec.name in skipped else "not available"
            sections[spec.name] = {**base, "status": status, "reason": {**skipped, **unavailable}[spec.name]}
            continue
        budget = min(budgets[spec.name], plan.total_budget_s - (time.monotonic() - started))
        if budget < 1:
            sections[spec.name] = {**base, "status": "not run",
                                   "reason": "earlier sections spent the suite's total budget"}
            continue
        sections[spec.name] = {**base, **run_section(spec.name, plan, budget)}
    report = {"suite": {"command": plan.command, "date": date, "dry_run": plan.dry_run, "device": plan.device,
                        "budget_s": plan.total_budget_s, "seconds": time.monotonic() - started,
                        "setup": setup or {}, "plan": asdict(plan)},
              "sections": sections}
    report["comparison"] = side_by_side(report)
    write_json(out / JSON_NAME, report)
    write_text(out / ROWS_NAME, markdown(report))
    print(f"GPU suite: {report['suite']['seconds']:.0f} s; wrote {out / JSON_NAME} and {out / ROWS_NAME}")
    return report


def _unavailable(spec: Section, plan: Plan) -> str | None:
    """Why a section cannot run here (a cheap check in this process), or None."""
    return importlib.import_module(f"workbench.bench.suite.{spec.name}").available(plan)


def section_env(plan: Plan) -> dict[str, str]:
    """The sections' environment: the carried site (installed wheels) and this tree first on the path."""
    paths = [p for p in (plan.site, str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    if plan.dry_run:  # the tiny model gains nothing from a second thread; on busy cores two threads spin on each other
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_section(name: str, plan: Plan, budget_s: float) -> dict:
    """One section in its own process with `budget_s` seconds; returns its status, rows and reasons."""
    events = events_path(plan, name)
    events.unlink(missing_ok=True)
    log = events.with_suffix(".log")
    cmd = [sys.executable, "-m", "workbench.bench.suite.child", name, str(Path(plan.out) / "plan.json"),
           f"{time.time() + budget_s:.3f}"]
    print(f"[{name}] start, budget {budget_s:.0f} s", flush=True)
    start = time.monotonic()
    with log.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=section_env(plan),
                                start_new_session=True)
        tee = threading.Thread(target=_tee, args=(proc.stdout, log_file), daemon=True)
        tee.start()
        try:
            code: int | None = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        tee.join(timeout=30)
    seconds = time.monotonic() - start
    ev = read_events(events)
    if code is None:
        status, reason = "over budget", f"stopped at its {budget_s:.0f} s budget"
    elif code != 0 or ev.error or not ev.done:
        status, reason = "failed", ev.error or _last_line(log) or f"exit status {code}"
    elif not ev.rows:  # every part skipped: their reasons say why
        status, reason = "failed", "nothing measured: " + "; ".join(s["reason"] for s in ev.skipped[:1])
    else:
        status, reason = "ok", None
    print(f"[{name}] {status} in {seconds:.1f} s of {budget_s:.0f} s: {len(ev.rows)} rows, "
          f"{len(ev.skipped)} parts skipped{f' ({reason})' if reason else ''}", flush=True)
    return {"status": status, "reason": reason, "budget_s": budget_s, "seconds": seconds, "rows": ev.rows,
            "skipped": ev.skipped, "data": ev.data, "log": str(log.relative_to(plan.out))}


def _tee(stream, log_file) -> None:
    """The section's output to this console (progress bars included) and to its log file."""
    while chunk := os.read(stream.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        log_file.write(chunk)
        log_file.flush()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the section's process group (its handler runs cleanups), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(log: Path) -> str | None:
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def install_wheels(wheels: Path, site: Path) -> dict:
    """Install the carried wheels (prepare.py) into `site` for the sections, once; nothing is fetched."""
    names = sorted(p.name for p in Path(wheels).glob("*.whl"))
    if not names:
        return {"wheels": [], "site": None, "note": f"no wheels in {wheels}"}
    start = time.monotonic()
    if not (site / ".installed").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(site), *[str(wheels / n) for n in names]],
                       check=True)
        (site / ".installed").write_text("\n".join(names) + "\n")
    return {"wheels": names, "site": str(site), "seconds": time.monotonic() - start}
