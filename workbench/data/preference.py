"""Preference pairs: one prompt (with its images) and a `chosen` and a `rejected` answer, for DPO.

A preference record is an ordinary record of any format the workbench reads (records.py) whose
messages are the prompt (ending with a user turn), plus two fields:

    {"messages": [{"role": "user", "content": "<image>Where is <ref-object>?"}], "images": ["a.png"],
     "objects": [{"ref": "the red square"}],
     "chosen": "<ref>the red square</ref><box>(10,20),(300,400)</box>",
     "rejected": {"role": "assistant", "content": "<ref>the red square</ref><box>(500,500),(999,999)</box>"}}

Each answer is the assistant's text as the model writes it (a string, or one assistant message of
the record's format). Every check runs here, before training, and names file, line, record and
field: a missing answer, two equal answers, an answer that holds an image (the two answers share
the prompt's images), a prompt that leaves no room for an answer within data.max_length. An
answer longer than the room left is cut there (as TRL cuts the completion), and counted.

Tokens: the prompt is the conversation's ids up to the assistant turn's start tag (the ids an SFT
sample of the same record has there); an answer is the assistant turn's content and end tag,
the tokens SFT supervises.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from workbench.data.config import DataConfig
from workbench.data.records import PREFERENCE_FIELDS, Conversation, Turn, find_files, iter_lines, parse_record
from workbench.data.render import render
from workbench.errors import DataError, WorkbenchError
from workbench.model.image_processing import load_image, preprocess
from workbench.prompt import load_template, tokenize

IMAGE_TAG = re.compile(r"<img>(.*?)</img>|<image>", re.DOTALL)


@dataclass
class PreferenceSample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    images: list[Path]            # the prompt's image files, in span order
    file: str = ""
    record: int = -1
    line: int | None = None
    cut: int = 0                  # answers cut at data.max_length (0, 1 or 2)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceReport:
    rows: int = 0
    pairs: int = 0
    cut: int = 0                  # answers cut at data.max_length
    problems: list[DataError] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)  # "model + adapter" the pairs came from -> count

    def summary(self) -> str:
        lines = [f"{self.rows} preference records read, {len(self.problems)} bad"
                 + (" (skipped)" if self.problems else "") + f"; {self.pairs} pairs, {self.cut} answers cut at "
                 "data.max_length"]
        lines += [f"pairs from {source}: {n}" for source, n in self.sources.items()]
        return "\n".join(lines)


def is_preference_file(paths: tuple[str, ...] | list[str]) -> bool:
    """Whether the first record of the data holds a chosen or a rejected answer."""
    for path in find_files(paths):
        for _, _, row in iter_lines(path):
            return isinstance(row, dict) and any(k in row for k in PREFERENCE_FIELDS)
    return False


def answer_text(value: Any, where: str, error: Any) -> str:
    """An answer field as text: a string, or one assistant message ({role, content} / {from, value})."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        text = value.get("content", value.get("value"))
        if role != "assistant" or not isinstance(text, str):
            raise error("expected the answer's text or one {\"role\": \"assistant\", \"content\": ...} message", where)
        value = text
    if not isinstance(value, str):
        raise error(f"expected the answer's text, got {type(value).__name__}", where)
    if not value.strip():
        raise error("an empty answer", where)
    return value


def parse_pair(row: dict[str, Any], file: str, index: int, line: int | None, cfg: DataConfig,
               headers: dict) -> tuple[Conversation, str, str]:
    """The prompt as a Conversation and the two answers' texts, or a DataError naming the field."""
    def error(message: str, fld: str) -> DataError:
        return DataError(message, file=file, record=index, field=fld, line=line)

    for key in PREFERENCE_FIELDS:
        if key not in row:
            other = next(k for k in PREFERENCE_FIELDS if k != key)
            raise error(f"missing: a preference record needs a chosen and a rejected answer (it has {other})", key)
    chosen, rejected = (answer_text(row[k], k, error) for k in PREFERENCE_FIELDS)
    images = {k: [m.group(1) or "<image>" for m in IMAGE_TAG.finditer(t)] for k, t in zip(PREFERENCE_FIELDS, (chosen, rejected))}
    if any(images.values()):
        key = "rejected" if images["rejected"] else "chosen"
        raise error(f"the answers hold images (chosen {images['chosen']}, rejected {images['rejected']}): the two "
                    "answers of a pair share the prompt's images, so put every image in the prompt", key)
    if chosen.strip() == rejected.strip():
        raise error("equal to chosen: a pair of equal answers teaches nothing", "rejected")
    prompt = {k: v for k, v in row.items() if k not in PREFERENCE_FIELDS}
    try:
        conv = parse_record(prompt, file, index, cfg, headers, needs_answer=False)
    except DataError as err:
        raise DataError(err.message, file=file, record=index, field=err.field, line=line) from None
    if not conv.turns or conv.turns[-1].role != "user":
        fld = "conversations" if "conversations" in prompt else "messages"
        raise error("the prompt must end with a user turn (the chosen and rejected answers follow it)", fld)
    return conv, chosen, rejected


def tokenize_pair(conv: Conversation, chosen: str, rejected: str, tokenizer: Any, cfg: DataConfig,
                  line: int | None = None, prompt_field: str = "messages") -> PreferenceSample:
    """Prompt ids and the two answers' ids; an answer cut to fit data.max_length."""
    template = load_template(cfg.template)
    start = len(tokenizer.encode(template.start("assistant")))
    sep = len(tokenizer.encode(template.turn_sep))
    files = [im.file for im in conv.images]
    answers, prompt, images = [], None, []
    for text in (chosen, rejected):
        whole = replace(conv, turns=(*conv.turns, Turn("assistant", (text,))))
        try:
            s = tokenize(render(whole, template, cfg.system), tokenizer, template, cfg.label_mode,
                         bool(cfg.escape_special_text), files)
        except ValueError as err:  # the tokenizer's image-span errors are ValueErrors
            raise DataError(str(err), file=conv.file, record=conv.record, field=prompt_field, line=line) from None
        p = s.turn_ends[-2] + start
        prompt, images = s.input_ids[:p], s.images
        answers.append(s.input_ids[p:s.turn_ends[-1] - sep])
    room = cfg.max_length - len(prompt)
    if room < 1:
        raise DataError(f"the prompt is {len(prompt)} tokens and data.max_length is {cfg.max_length}: no room "
                        "for the answers (raise data.max_length or shorten the prompt)",
                        file=conv.file, record=conv.record, field=prompt_field, line=line)
    cut = sum(len(a) > room for a in answers)
    chosen_ids, rejected_ids = (a[:room] for a in answers)
    if chosen_ids == rejected_ids:
        raise DataError(f"equal to chosen within data.max_length ({room} answer tokens after the prompt)",
                        file=conv.file, record=conv.record, field="rejected", line=line)
    return PreferenceSample(prompt, chosen_ids, rejected_ids, list(images), conv.file, conv.record, line, cut)


def load_pairs(paths: tuple[str, ...], cfg: DataConfig, tokenizer: Any, report: PreferenceReport
               ) -> list[PreferenceSample]:
    headers: dict = {}
    samples = []
    for path in find_files(paths):
        for index, line, row in iter_lines(path):
            report.rows += 1
            try:
                if isinstance(row, DataError):
                    raise row
                conv, chosen, rejected = parse_pair(row, str(path), index, line, cfg, headers)
                sample = tokenize_pair(conv, chosen, rejected, tokenizer, cfg, line,
                                       "conversations" if "conversations" in row else "messages")
                sample.meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
            except DataError as err:
                report.problems.append(err)
                continue
            report.cut += sample.cut
            source = sample.meta.get("pairs")
            if isinstance(source, dict):
                name = f"model {source.get('model')}, adapter {source.get('adapter')}"
                report.sources[name] = report.sources.get(name, 0) + 1
            samples.append(sample)
    report.pairs += len(samples)
    return samples


def shuffle_answers(samples: list[PreferenceSample], seed: int) -> list[PreferenceSample]:
    """The control experiment: every prompt gets another record's pair (a rotation of a seeded
    permutation, so none keeps its own), its images and prompt stay its own."""
    if len(samples) < 2:
        return samples
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    out = list(samples)
    for here, there in zip(order, order[1:] + order[:1]):
        out[here] = replace(samples[here], chosen_ids=samples[there].chosen_ids,
                            rejected_ids=samples[there].rejected_ids)
    return out


class PreferenceDataset(Dataset):
    """Item i: `prompt_ids`, `chosen_ids`, `rejected_ids` (int64) and `pixel_values` [K,3,S,S]
    (the prompt's K images, opened here: in the DataLoader's workers)."""

    def __init__(self, samples: list[PreferenceSample], image_size: int):
        self.samples, self.image_size = samples, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        pixels = []
        for path in s.images:
            try:
                pixels.append(preprocess(load_image(path), self.image_size))
            except WorkbenchError as err:  # e.g. the file changed after validation
                raise DataError(str(err), file=s.file, record=s.record, field="images", line=s.line) from None
        size = self.image_size
        return {"prompt_ids": torch.tensor(s.prompt_ids), "chosen_ids": torch.tensor(s.chosen_ids),
                "rejected_ids": torch.tensor(s.rejected_ids),
                "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size)}


@dataclass(frozen=True)
class PreferenceCollator:
    """A micro-batch of B pairs: prompts left-padded [B, P] (the answers continue right after
    them), answers [2B, T] right-padded, prompt b's chosen at row 2b and its rejected at 2b+1."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        prompts = [it["prompt_ids"] for it in items]
        answers = [a for it in items for a in (it["chosen_ids"], it["rejected_ids"])]
        width, length = max(map(len, prompts)), max(map(len, answers))
        batch = {
            "prompt_ids": torch.stack([_pad(p, width, self.pad_token_id, left=True) for p in prompts]),
            "prompt_mask": torch.stack([_pad(torch.ones_like(p), width, 0, left=True) for p in prompts]),
            "answers": torch.stack([_pad(a, length, self.pad_token_id) for a in answers]),
            "answer_mask": torch.stack([_pad(torch.ones_like(a), length, 0) for a in answers]),
        }
        pixels = [it["pixel_values"] for it in items if len(it["pixel_values"])]
        if pixels:  # image k of the batch belongs to the k-th <img> span in (row, position) order
            batch["pixel_values"] = torch.cat(pixels).float()
        return batch


def _pad(row: torch.Tensor, width: int, value: int, left: bool = False) -> torch.Tensor:
    pad = (width - len(row), 0) if left else (0, width - len(row))
    return torch.nn.functional.pad(row.long(), pad, value=value)


@dataclass
class PreferenceData:
    train: PreferenceDataset
    eval: PreferenceDataset | None
    report: PreferenceReport


def load_preference_data(cfg: DataConfig, tokenizer: Any, image_size: int, shuffle_seed: int | None = None
                         ) -> PreferenceData:
    """Train (and eval) pairs from the `data:` section; raises a DataError naming file, line, record and
    field before training when a record is bad and data.on_bad_record is `error`."""
    from workbench.data.dataset import bad_records_error

    report = PreferenceReport()
    train = load_pairs(cfg.train, cfg, tokenizer, report)
    held = load_pairs(cfg.eval, cfg, tokenizer, report) if cfg.eval else None
    if cfg.eval_fraction and not cfg.eval:  # a fixed seed: the same file always gives the same held-out pairs
        order = list(range(len(train)))
        random.Random(0).shuffle(order)
        out = set(order[:max(1, round(cfg.eval_fraction * len(order)))])
        train, held = [s for i, s in enumerate(train) if i not in out], [s for i, s in enumerate(train) if i in out]
    if report.problems and cfg.on_bad_record == "error":
        raise bad_records_error(report.problems)
    if not train:
        raise DataError("no preference pairs left to train on", file=", ".join(cfg.train))
    if shuffle_seed is not None:
        train = shuffle_answers(train, shuffle_seed)
    return PreferenceData(PreferenceDataset(train, image_size),
                          PreferenceDataset(held, image_size) if held else None, report)
