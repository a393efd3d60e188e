"""Templates as data (data_templates/*.yaml): the ChatML turn layout and the task prompt lists.

`chatml.yaml` is the only place where the system prompt and the turn layout are written; training
labels (`chatml.tokenize`), inference prompts (`chatml.make_context`: chat, evaluation, the server)
and the list format all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from workbench.builtin import builtin_dir
from workbench.errors import ConfigError
from workbench.schema import Invalid, build, locator, option, read_yaml

TEMPLATE_DIR = builtin_dir("templates")


@dataclass(frozen=True)
class ChatTemplate:
    name: str = option(doc="the template's name")
    default_system: str = option(doc="the system message when a record has none")
    roles: dict[str, str] = option(doc="system, user and assistant -> the role names written in turns")
    turn_start: str = option(doc='"{role}" is replaced by roles[role]')
    turn_end: str = option(doc="closes a turn")
    turn_sep: str = option(doc="between turns")
    image: str = option(doc='an <image> placeholder: "{n}" (1-based) and "{path}"')
    ref: str = option(doc='a <ref-object> placeholder: "{ref}"')

    def check(self) -> None:
        if set(self.roles) != {"system", "user", "assistant"}:
            raise Invalid("roles", "must map exactly system, user and assistant")

    def start(self, role: str) -> str:
        return self.turn_start.format(role=self.roles[role])


@dataclass(frozen=True)
class TaskTemplate:
    task: str
    user: tuple[str, ...] = option(doc="a prompt or a list of prompts")
    assistant: str = option(doc="the answer, with placeholders")

    def messages(self, index: int, **fields: str) -> list[dict[str, str]]:
        """Structured-format messages for sample `index` (prompts rotate by index, reproducibly)."""
        user = self.user[index % len(self.user)]
        return [{"role": "user", "content": user.format_map(fields)},
                {"role": "assistant", "content": self.assistant.format_map(fields)}]


def _path(name_or_path: str, kind: str) -> Path:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))
        raise ConfigError(f"{kind} template '{name_or_path}' not found (known: {', '.join(known)})")
    return path


@cache
def load_template(name_or_path: str = "chatml") -> ChatTemplate:
    """A chat template by name (data_templates/NAME.yaml) or path."""
    path = _path(name_or_path, "chat")
    return build(ChatTemplate, read_yaml(path, "template"), locator(str(path)))


@cache
def load_task_template(name_or_path: str) -> TaskTemplate:
    """A task prompt template (grounding, referring, caption-grounding, vqa, ...) by name or path."""
    path = _path(name_or_path, "task")
    data = read_yaml(path, "template")
    if isinstance(data, dict):
        data = {"task": path.stem, **data}
    return build(TaskTemplate, data, locator(str(path)))


def default_system() -> str:
    """The system message Qwen-VL-Chat was trained and is prompted with (chatml.yaml)."""
    return load_template("chatml").default_system
