"""Rendered turns -> token ids and labels, in two modes.

Each turn is encoded piece by piece, as finetune.py `preprocess` and `make_context` both do:
`turn_start` ("<|im_start|>user\\n"), the content, `turn_end` ("<|im_end|>"), `turn_sep` ("\\n").
The ids are the same in both modes (unless the content holds typed special text); only the
labels differ:

- `official` reproduces finetune.py exactly: `<|im_start|>`, `<|im_end|>` and the `\\n` after it
  are labels in EVERY turn (system and user included), plus the assistant content; a first turn
  not from the user is dropped. Content is encoded with allowed_special="all", so a typed
  `<|im_start|>` becomes the special id, as in the original.
- `assistant` (default) supervises only an assistant turn's content and its `<|im_end|>`. The
  `\\n` after `<|im_end|>` is NOT supervised: at chat time generation stops at `<|im_end|>`, so
  the model never produces it; it stays in the ids because `make_context` puts it between turns.
  Typed special text is escaped (content encoded with allowed_special = the nine VL tags, as
  `make_context` does), unless data.escape_special_text is false.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.data.render import ChatTemplate, RenderedTurn, load_template

IGNORE = -100
FINETUNE_SYSTEM = "You are a helpful assistant."  # preprocess(..., system_message=...) default


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]        # token offset just after each turn (the system turn first)
    turn_roles: list[str]
    turn_images: list[int]      # how many images each turn holds
    images: list[Path] = field(default_factory=list)   # image files, in span order
    file: str = ""
    record: int = -1

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(turns: Sequence[RenderedTurn], tokenizer: Any, template: ChatTemplate, mode: str = "assistant",
             escape_special_text: bool = True, image_files: Sequence[Path] = ()) -> Sample:
    """Ids and labels for one conversation (`turns[0]` is the system turn)."""
    if mode == "official" and len(turns) > 1 and turns[1].role != "user":
        turns = [turns[0], *turns[2:]]  # finetune.py drops a first message that is not the user's
    content_special: Any = set(tokenizer.IMAGE_ST) if escape_special_text else "all"
    end = tokenizer.encode(template.turn_end)
    sep = tokenizer.encode(template.turn_sep)
    sample = Sample([], [], [], [], [])
    for turn in turns:
        start = tokenizer.encode(template.turn_start.format(role=template.roles[turn.role]))
        content = tokenizer.encode(turn.text, allowed_special=content_special)
        answer = turn.role == "assistant"
        if mode == "official":
            labels = ([start[0]] + [IGNORE] * (len(start) - 1) + (content if answer else [IGNORE] * len(content))
                      + end + sep)
        else:
            labels = [IGNORE] * len(start) + (content + end if answer else [IGNORE] * (len(content) + len(end))) \
                + [IGNORE] * len(sep)
        sample.input_ids += start + content + end + sep
        sample.labels += labels
        sample.turn_ends.append(len(sample.input_ids))
        sample.turn_roles.append(turn.role)
        sample.turn_images.append(len(turn.images))
        sample.images += [image_files[i] for i in turn.images]
    return sample


def official_preprocess(sources: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_len: int,
                        system_message: str = FINETUNE_SYSTEM) -> dict[str, torch.Tensor]:
    """finetune.py `preprocess` in its own batch form: right-pad with the pad id, then a plain
    `[:max_len]` slice (which can cut through an image span; the training pipeline never does,
    see length.py), int32 ids/labels and a bool mask `input_ids != pad`."""
    template = load_template("chatml")
    pad = tokenizer.pad_token_id
    ids, labels = [], []
    for conversation in sources:
        turns = [RenderedTurn("system", system_message, ())]
        turns += [RenderedTurn(m["from"], m["value"], ()) for m in conversation]
        s = tokenize(turns, tokenizer, template, mode="official", escape_special_text=False)
        ids.append((s.input_ids + [pad] * (max_len - len(s)))[:max_len])
        labels.append((s.labels + [IGNORE] * (max_len - len(s)))[:max_len])
    input_ids = torch.tensor(ids, dtype=torch.int32)
    return {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.int32),
            "attention_mask": input_ids.ne(pad)}
