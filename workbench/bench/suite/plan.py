"""What the GPU suite runs: its sections in order, their time budgets, and the sizes of each.

The budgets add up to the issue's 8 minutes on the GPU; each section's process start counts in
its own budget. The budgets of sections that are not available (no vLLM environment carried, no
Int4 export yet) are shared out among the others in proportion to theirs, and when earlier
sections ran long the later ones get only what is left of the total. The CPU dry run runs the same sections
on the built-in tiny model with smaller sizes, so that every code path runs in a test.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOTAL_BUDGET_S = 480.0
DRY_RUN_BUDGET_S = 150.0  # per section on 2 CPU cores; the dry run checks paths, not speed


@dataclass(frozen=True)
class Section:
    name: str  # also the module workbench.bench.suite.<name>
    budget_s: float  # on the GPU, its process's start included
    what: str


SECTIONS = (
    Section("environment", 10, "card, driver, CUDA, Python and package versions"),
    Section("training", 140, "workbench training steps: official-lora, qlora, all-components x 384/512/1024/2048 "
                             "tokens; s/it, tokens/s, MFU, peaks; `inspect --seq-len` estimate per row"),
    Section("original", 110, "the original finetune.py (official LoRA) at the same lengths, same card, same run"),
    Section("packing", 30, "packed vs padded batches of grounding-length samples (tokens/s)"),
    Section("vit_cache", 30, "second-epoch step with the ViT cache vs without"),
    Section("merge", 90, "the full-size official-lora adapter merged on the GPU machine vs copying the files"),
    Section("serving", 30, "vLLM plugin on CUDA: greedy equality (tp 1, 2), 1/8/32 clients vs workbench serve"),
    Section("int4", 40, "Int4 export loaded with CUDA kernels: tokens/s and memory vs bf16"),
)
SECTION_NAMES = tuple(s.name for s in SECTIONS)


@dataclass(frozen=True)
class Plan:
    """Everything a section needs, written to OUT/plan.json for the sections' processes."""

    out: str
    device: str  # cuda | cpu
    dry_run: bool
    command: str
    original: str | None = None  # the prepared folder of the original finetune.py (prepare.py), or None
    site: str | None = None  # carried wheels installed here, on the sections' PYTHONPATH
    recipes: tuple[str, ...] = ("official-lora", "qlora", "all-components")
    seq_lens: tuple[int, ...] = (384, 512, 1024, 2048)
    steps: int = 2  # measured optimizer steps per length, after one warm-up step (GPU steps vary by ~1 %)
    grad_accum: int = 8
    grounding_samples: int = 48
    grounding_lengths: tuple[int, int] = (290, 380)  # one image (258 tokens), a question and a box answer
    padded_batch: int = 8
    packing_length: int = 2048
    vit_cache_batch: int = 8
    serve_engines: tuple[str, ...] = ("workbench", "vllm")
    serve_requests: int = 64
    serve_concurrency: tuple[int, ...] = (1, 8, 32)
    serve_max_tokens: int = 32
    budgets: dict[str, float] = field(default_factory=lambda: {s.name: s.budget_s for s in SECTIONS})
    fixed_budgets: tuple[str, ...] = ()  # set by --budget: kept as given, no share of the spare
    total_budget_s: float = TOTAL_BUDGET_S

    @property
    def tiny(self) -> bool:
        return self.dry_run

    @property
    def work(self) -> Path:
        """Scratch space of the sections (the random release, data, images)."""
        return Path(self.out) / "work"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = json.loads(Path(path).read_text())
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples})


def gpu_plan(out: str, command: str, original: str | None, site: str | None,
             budgets: dict[str, float] | None = None) -> Plan:
    plan = Plan(out=out, device="cuda", dry_run=False, command=command, original=original, site=site)
    return _with_budgets(plan, budgets)


def dry_run_plan(out: str, command: str, original: str | None, site: str | None,
                 budgets: dict[str, float] | None = None) -> Plan:
    """The tiny model on the CPU: every section's code runs, on sizes a 2-core machine does in minutes."""
    plan = Plan(out=out, device="cpu", dry_run=True, command=command, original=original, site=site,
                seq_lens=(384, 512), steps=1, grad_accum=2, grounding_samples=6, padded_batch=3,
                packing_length=768, vit_cache_batch=3, serve_engines=("workbench",), serve_requests=4,
                serve_concurrency=(1, 2), serve_max_tokens=8,
                budgets={s.name: DRY_RUN_BUDGET_S for s in SECTIONS},
                total_budget_s=DRY_RUN_BUDGET_S * len(SECTIONS))
    return _with_budgets(plan, budgets)


def _with_budgets(plan: Plan, budgets: dict[str, float] | None) -> Plan:
    if not budgets:
        return plan
    unknown = sorted(set(budgets) - set(SECTION_NAMES))
    if unknown:
        raise ValueError(f"--budget: unknown section {unknown[0]!r}; sections: {', '.join(SECTION_NAMES)}")
    return Plan(**{**asdict(plan), "budgets": {**plan.budgets, **budgets}, "fixed_budgets": tuple(sorted(budgets))})


def share_spare(plan: Plan, unavailable: dict[str, str], skipped: dict[str, str]) -> dict[str, float]:
    """Each section's budget: the budgets of the sections not available here are shared out among
    the ones that run, pro rata, except those set by --budget (and those left out by --only, which
    run not at all and share nothing)."""
    budgets = plan.budgets
    spare = sum(budgets[name] for name in unavailable)
    sharing = {name: b for name, b in budgets.items()
               if name not in unavailable and name not in skipped and name not in plan.fixed_budgets}
    total = sum(sharing.values())
    return {name: (0.0 if name in unavailable or name in skipped
                   else b + spare * b / total if name in sharing else b)
            for name, b in budgets.items()}


def budget_table(plan: Plan, budgets: dict[str, float], unavailable: dict[str, str]) -> str:
    """The planned budget, printed before anything runs."""
    lines = [f"GPU suite plan ({'CPU dry run, tiny model' if plan.dry_run else plan.device}): "
             f"{plan.total_budget_s:.0f} s in all"]
    for s in SECTIONS:
        note = f"not available: {unavailable[s.name]}" if s.name in unavailable else s.what
        lines.append(f"  {s.name:<12} {budgets[s.name]:>5.0f} s  {note}")
    return "\n".join(lines)
