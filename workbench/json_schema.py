"""JSON Schema of run configs and adapter recipes, from the same dataclass declarations that
workbench/schema.py validates with (`workbench schema run|recipe`).

pydantic's `TypeAdapter(dataclass).json_schema()` reads stdlib dataclasses: the type hints, the
Literal choices, the defaults and `option(ge=, gt=, le=, lt=)` bounds (it reads a field's
metadata). What it cannot know is added here from the same declarations: unknown keys are errors
(`additionalProperties: false`, as `schema.build` refuses them), a `tuple[str, ...]` also takes a
single name, `option(doc=...)` is the description, and a recipe's `vit` / `resampler` / `llm`
sections are `Component`s. An editor with a YAML language server then checks a file as it is
typed (`# yaml-language-server: $schema=...` as the file's first line; README.md).

Validation itself stays with `schema.build`: its errors name the file and the dotted key, say
"did you mean", and run each section's `check()` (rules across fields a JSON Schema does not hold).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"


def _dataclasses(cls: type) -> dict[str, type]:
    """Every dataclass reachable from `cls` through its type hints, by name."""
    found: dict[str, type] = {}

    def walk(hint: Any) -> None:
        if dataclasses.is_dataclass(hint) and hint.__name__ not in found:
            found[hint.__name__] = hint
            for h in typing.get_type_hints(hint).values():
                walk(h)
        for arg in typing.get_args(hint):
            walk(arg)

    walk(cls)
    return found


def _tighten(schema: dict[str, Any], cls: type) -> None:
    """Add to one dataclass's object schema what pydantic leaves out (see the module docstring)."""
    schema["additionalProperties"] = False
    hints = typing.get_type_hints(cls)
    props = schema.get("properties", {})
    for f in dataclasses.fields(cls):
        prop = props.get(f.name)
        if prop is None:
            continue
        if f.metadata.get("doc"):
            prop["description"] = f.metadata["doc"]
        hint = hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
        for opt in options:
            if typing.get_origin(opt) is tuple:  # one name or a list of names
                items = prop.get("items") or next((a["items"] for a in prop.get("anyOf", []) if "items" in a), None)
                if items is not None:
                    extra = {k: prop.pop(k) for k in ("items", "type") if k in prop}
                    alts = [a for a in prop.pop("anyOf", []) if "items" not in a] + ([extra] if extra else [])
                    alts = [a for a in alts if a.get("type") != "array"] + [{"type": "array", "items": items}]
                    prop["anyOf"] = [items, *alts]


def json_schema(cls: type, title: str, fields: dict[str, type] | None = None) -> dict[str, Any]:
    """The JSON Schema of YAML files validated by `schema.build(cls, ...)`. `fields` replaces the
    schema of top-level keys that the code builds in a second step (a recipe's components)."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(cls).json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    for name, sub in {**_dataclasses(cls), **{c.__name__: c for c in (fields or {}).values()}}.items():
        if name not in defs:
            defs[name] = TypeAdapter(sub).json_schema(ref_template="#/$defs/{model}")
            defs.update(defs[name].pop("$defs", {}))
        _tighten(defs[name], sub)
    _tighten(schema, cls)
    for key, sub in (fields or {}).items():
        schema["properties"][key] = {"anyOf": [{"$ref": f"#/$defs/{sub.__name__}"}, {"type": "null"}],
                                     "default": None}
    return {"$schema": SCHEMA_URI, "title": title, **schema}


def run_schema() -> dict[str, Any]:
    from workbench.train.config import RunFile

    return json_schema(RunFile, "workbench run config")


def recipe_schema() -> dict[str, Any]:
    from workbench.adapters.recipe import COMPONENTS, Component, RecipeFile

    schema = json_schema(RecipeFile, "workbench adapter recipe", {name: Component for name in COMPONENTS})
    component = schema["$defs"]["Component"]
    component["properties"].pop("name", None)  # set by the recipe loader from the section's key
    component["required"] = [k for k in component.get("required", []) if k != "name"]
    if not component["required"]:
        component.pop("required")
    return schema
