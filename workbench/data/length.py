"""Length policy: a sample longer than max_length is cut at a turn boundary, or dropped.

The original slices `[:max_len]`, which can cut through an image span and then crash the
forward pass (golden case8_truncation_inside_image). Here a cut only falls after a whole turn,
so image spans stay whole, and it falls after the last assistant turn that fits, so a kept
sample always ends with something to learn. What was cut or dropped, and why, is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from workbench.model.modeling import IGNORE_INDEX
from workbench.prompt import Sample

NO_LABELS = "no supervised tokens"
FIRST_ANSWER_TOO_LONG = "longer than max_length before the end of the first answer"
TOO_LONG = "longer than max_length (overflow: drop)"


@dataclass
class LengthReport:
    kept: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{self.kept} kept", f"{self.truncated} cut at a turn boundary ({self.tokens_cut} tokens removed)"]
        parts += [f"{n} dropped: {why}" for why, n in sorted(self.dropped.items())]
        return ", ".join(parts)


def fit(sample: Sample, max_length: int, overflow: str) -> Sample | str:
    """The sample itself, a shorter copy ending after an assistant turn, or the reason it is dropped."""
    if len(sample) > max_length:
        if overflow == "drop":
            return TOO_LONG
        answers = [i for i, end in enumerate(sample.turn_ends)
                   if end <= max_length and sample.turn_roles[i] == "assistant"]
        if not answers:
            return FIRST_ANSWER_TOO_LONG
        keep = answers[-1] + 1
        end = sample.turn_ends[keep - 1]
        sample = replace(sample, input_ids=sample.input_ids[:end], labels=sample.labels[:end],
                         turn_ends=sample.turn_ends[:keep], turn_roles=sample.turn_roles[:keep],
                         turn_images=sample.turn_images[:keep],
                         images=sample.images[:sum(sample.turn_images[:keep])])
    # Label 0 is never predicted (the loss shifts by one), so it does not count.
    if all(v == IGNORE_INDEX for v in sample.labels[1:]):
        return NO_LABELS
    return sample


def apply_length_policy(samples: list[Sample], max_length: int, overflow: str) -> tuple[list[Sample], LengthReport]:
    report = LengthReport()
    kept = []
    for s in samples:
        out = fit(s, max_length, overflow)
        if isinstance(out, str):
            report.dropped[out] += 1
            continue
        if len(out) < len(s):
            report.truncated += 1
            report.tokens_cut += len(s) - len(out)
        report.kept += 1
        kept.append(out)
    return kept, report
