"""Conversation -> per-turn text, with a chat template and task prompts read from data_templates/.

The chat template says how a turn is wrapped (`turn_start`, `turn_end`, `turn_sep`) and how an
`<image>` and a `<ref-object>` are written; `<bbox>` becomes `<box>(x1,y1),(x2,y2)</box>` through
workbench/data/boxes.py. Task templates (grounding, referring, ...) are prompt lists in the
structured format, used by the converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workbench.data.boxes import format_box, normalize_box
from workbench.data.records import BoxSlot, Conversation, ImageSlot, RefSlot
from workbench.errors import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "data_templates"
CHAT_KEYS = ("name", "default_system", "roles", "turn_start", "turn_end", "turn_sep", "image", "ref")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    default_system: str
    roles: dict[str, str]
    turn_start: str     # "{role}" is replaced by roles[role]
    turn_end: str
    turn_sep: str
    image: str          # "{n}" (1-based) and "{path}"
    ref: str            # "{ref}"


@dataclass(frozen=True)
class RenderedTurn:
    role: str
    text: str                   # the content, between turn_start and turn_end
    images: tuple[int, ...]     # indices into Conversation.images, in span order


@dataclass(frozen=True)
class TaskTemplate:
    task: str
    user: tuple[str, ...]
    assistant: str

    def messages(self, index: int, **fields: str) -> list[dict[str, str]]:
        """Structured-format messages for sample `index` (prompts rotate by index, reproducibly)."""
        user = self.user[index % len(self.user)]
        return [{"role": "user", "content": user.format_map(fields)},
                {"role": "assistant", "content": self.assistant.format_map(fields)}]


def _read_yaml(name_or_path: str, kind: str) -> tuple[dict[str, Any], Path]:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))
        raise ConfigError(f"{kind} template '{name_or_path}' not found (known: {', '.join(known)})")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a template must be a YAML mapping")
    return data, path


def load_template(name_or_path: str) -> ChatTemplate:
    """A chat template by name (data_templates/NAME.yaml) or path."""
    data, path = _read_yaml(name_or_path, "chat")
    missing = [k for k in CHAT_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing keys {', '.join(missing)}")
    extra = sorted(set(data) - set(CHAT_KEYS))
    if extra:
        raise ConfigError(f"{path}: {extra[0]}: unknown key (valid: {', '.join(CHAT_KEYS)})")
    if set(data["roles"]) != {"system", "user", "assistant"}:
        raise ConfigError(f"{path}: roles: must map exactly system, user and assistant")
    return ChatTemplate(**{k: data[k] for k in CHAT_KEYS})


def load_task_template(name_or_path: str) -> TaskTemplate:
    """A task prompt template (grounding, referring, caption-grounding, vqa) by name or path."""
    data, path = _read_yaml(name_or_path, "task")
    user = data.get("user")
    if isinstance(user, str):
        user = [user]
    if not isinstance(user, list) or not user or not isinstance(data.get("assistant"), str):
        raise ConfigError(f"{path}: needs 'user' (a prompt or a list of prompts) and 'assistant'")
    return TaskTemplate(str(data.get("task", path.stem)), tuple(user), data["assistant"])


def render(conv: Conversation, template: ChatTemplate, system: str | None = None) -> list[RenderedTurn]:
    """The system turn, then one RenderedTurn per conversation turn.

    System text: the record's own, else `system` (data.system), else the template's default.
    """
    text = conv.system if conv.system is not None else system if system is not None else template.default_system
    out = [RenderedTurn("system", text, ())]
    for turn in conv.turns:
        pieces: list[str] = []
        images: list[int] = []
        for part in turn.parts:
            if isinstance(part, ImageSlot):
                path = conv.images[part.index].path
                span = f"<img>{path}</img>"
                pieces.append(template.image.format(n=part.index + 1, path=path) if part.numbered else span)
                images.append(part.index)
            elif isinstance(part, RefSlot):
                pieces.append(template.ref.format(ref=part.text))
            elif isinstance(part, BoxSlot):
                pieces += [format_box(normalize_box(b, *part.size) if part.size else b) for b in part.boxes]
            else:
                pieces.append(part)
        out.append(RenderedTurn(turn.role, "".join(pieces), tuple(images)))
    return out
