"""The SFT pipeline end to end, and the torch Dataset the DataLoader workers read from.

`load_sft_data` runs everything that can fail on the user's data BEFORE training: reading,
validation, rendering, tokenisation, the length policy and packing. Images are only opened and
preprocessed later, in `SFTDataset.__getitem__`, i.e. in the DataLoader workers, never in the
model, so decoding overlaps the GPU step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from workbench.data.config import DataConfig
from workbench.data.length import LengthReport, apply_length_policy
from workbench.data.packing import concat, pack
from workbench.data.records import Conversation, load_conversations
from workbench.data.render import render
from workbench.data.vit_cache import read_features
from workbench.errors import DataError, WorkbenchError
from workbench.model.image_processing import load_image, preprocess
from workbench.prompt import Sample, load_template, tokenize

MAX_LISTED_PROBLEMS = 10


class SFTDataset(Dataset):
    """Item i: `input_ids`, `labels` (int64 [S]), `pixel_values` (float32 [K,3,H,W], K images in
    span order) and, when packed, `segment_ids` (int64 [S], 1..n).

    With `vit_cache` set (data/vit_cache.py, filled before training) an item holds the cached
    `image_features` [K, 256, D] of its images instead of `pixel_values` (none when it has no image).
    """

    def __init__(self, samples: list[Sample], image_size: int, packing_length: int | None = None):
        self.samples = samples
        self.image_size = image_size
        self.rows = pack([len(s) for s in samples], packing_length) if packing_length else None
        self.vit_cache: dict[str, tuple[str, dict[str, str]]] | None = None  # image path -> (file, metadata)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.rows is None:
            group = [self.samples[i]]
            item = {"input_ids": torch.tensor(group[0].input_ids), "labels": torch.tensor(group[0].labels)}
        else:
            group = [self.samples[j] for j in self.rows[i]]
            ids, labels, segments, _ = concat(group)
            item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                    "segment_ids": torch.tensor(segments)}
        if self.vit_cache is None:
            item["pixel_values"] = self._pixels(group)
        elif any(s.images for s in group):
            item["image_features"] = self._features(group)
        return item

    def _features(self, samples: list[Sample]) -> torch.Tensor:
        out = []
        for path in (p for s in samples for p in s.images):
            file, meta = self.vit_cache[str(path)]
            out.append(read_features(Path(file), meta))
        return torch.stack(out)

    def image_paths(self) -> list[Path]:
        return [Path(p) for s in self.samples for p in s.images]

    def _pixels(self, samples: list[Sample]) -> torch.Tensor:
        out = []
        for s in samples:
            for path in s.images:
                try:
                    out.append(preprocess(load_image(path), self.image_size))
                except WorkbenchError as err:  # e.g. the file changed after validation
                    raise DataError(str(err), file=s.file, record=s.record, field="images") from None
        size = self.image_size
        return torch.stack(out) if out else torch.zeros(0, 3, size, size)


@dataclass
class DataReport:
    rows: int = 0
    problems: list[DataError] = field(default_factory=list)
    length: dict[str, LengthReport] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{self.rows} records read, {len(self.problems)} bad"
                 + (" (skipped)" if self.problems else "")]
        lines += [f"{split}: {rep.summary()}" for split, rep in self.length.items()]
        return "\n".join(lines)


@dataclass
class SFTData:
    train: SFTDataset
    eval: SFTDataset | None
    report: DataReport


def build_samples(conversations: list[Conversation], tokenizer: Any, cfg: DataConfig,
                  problems: list[DataError]) -> list[Sample]:
    """Render + tokenize; a conversation the tokenizer refuses becomes a problem, not a crash."""
    template = load_template(cfg.template)
    samples = []
    for conv in conversations:
        try:
            s = tokenize(render(conv, template, cfg.system), tokenizer, template, cfg.label_mode,
                         bool(cfg.escape_special_text), [im.file for im in conv.images])
        except ValueError as err:  # the tokenizer's image-span errors are ValueErrors
            problems.append(DataError(str(err), file=conv.file, record=conv.record, field="content"))
            continue
        s.file, s.record = conv.file, conv.record
        samples.append(s)
    return samples


def load_sft_data(cfg: DataConfig, tokenizer: Any, image_size: int) -> SFTData:
    """Train (and eval) datasets from the `data:` config; raises DataError before training if a
    record is bad and on_bad_record is `error`."""
    report = DataReport()
    splits = {"train": _load(cfg.train, cfg, tokenizer, report)}
    if cfg.eval:
        splits["eval"] = _load(cfg.eval, cfg, tokenizer, report)
    elif cfg.eval_fraction:
        # A fixed seed: the same file always gives the same held-out records.
        order = list(range(len(splits["train"])))
        random.Random(0).shuffle(order)
        held = set(order[:max(1, round(cfg.eval_fraction * len(order)))])
        all_train = splits["train"]
        splits["train"] = [s for i, s in enumerate(all_train) if i not in held]
        splits["eval"] = [s for i, s in enumerate(all_train) if i in held]
    if report.problems and cfg.on_bad_record == "error":
        raise bad_records_error(report.problems)
    datasets = {}
    for split, samples in splits.items():
        kept, report.length[split] = apply_length_policy(samples, cfg.max_length, cfg.overflow)
        if not kept:
            raise DataError(f"no {split} samples left ({report.length[split].summary()})",
                            file=", ".join(getattr(cfg, split) or cfg.train))
        datasets[split] = SFTDataset(kept, image_size, cfg.max_length if cfg.packing else None)
    return SFTData(datasets["train"], datasets.get("eval"), report)


def _load(paths: tuple[str, ...], cfg: DataConfig, tokenizer: Any, report: DataReport) -> list[Sample]:
    loaded = load_conversations(paths, cfg)
    report.rows += loaded.n_rows
    report.problems += loaded.problems
    return build_samples(loaded.conversations, tokenizer, cfg, report.problems)


def bad_records_error(problems: list[DataError]) -> DataError:
    if len(problems) == 1:
        return DataError(f"{problems[0]} (set data.on_bad_record: skip to train without it)")
    listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    return DataError(f"{len(problems)} bad records (set data.on_bad_record: skip to train without them):\n  "
                     f"{listed}{more}")
