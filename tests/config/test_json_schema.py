"""`workbench schema run|recipe` (issue 32): the JSON Schema editors check YAML files with agrees with
the workbench's own validation on the shipped files and on typical mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from workbench.errors import ConfigError
from workbench.json_schema import recipe_schema, run_schema

REPO = Path(__file__).resolve().parents[2]
TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict, "array": list,
         "null": type(None)}


def problems(value, schema: dict, root: dict, where: str = "") -> list[str]:
    """A small JSON Schema checker for the keywords these schemas use (no jsonschema package here)."""
    if "$ref" in schema:
        found = problems(value, root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root, where)
        if found:
            return found
    if "anyOf" in schema:
        found = [problems(value, s, root, where) for s in schema["anyOf"]]
        if all(found):  # report the branch of the value's own type (not "null" for a mapping)
            return min(found, key=lambda f: (f[0] == f"{where}: not {f[0].rsplit(' ', 1)[-1]}", len(f)))
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, TYPES[kind]) and not (kind in ("number", "integer") and isinstance(value, bool))
        if not ok:
            return [f"{where}: not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in enum"]
    out = []
    for key, test in (("minimum", lambda v, b: v >= b), ("exclusiveMinimum", lambda v, b: v > b),
                      ("maximum", lambda v, b: v <= b), ("exclusiveMaximum", lambda v, b: v < b)):
        if key in schema and isinstance(value, (int, float)) and not test(value, schema[key]):
            out.append(f"{where}: {value} breaks {key} {schema[key]}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}.{k}: required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if "propertyNames" in schema:
                out += problems(k, schema["propertyNames"], root, f"{where}.{k} (name)")
            if k in props:
                out += problems(v, props[k], root, f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{where}.{k}: unknown key")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += problems(v, schema["additionalProperties"], root, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += problems(v, schema["items"], root, f"{where}[{i}]")
    return out


def check(value, schema):
    return problems(value, schema, schema)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_fits_the_schema(path):
    assert check(yaml.safe_load(path.read_text()), run_schema()) == []


@pytest.mark.parametrize("path", sorted((REPO / "adapters").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_fits_the_schema(path):
    assert check(yaml.safe_load(path.read_text()), recipe_schema()) == []


@pytest.mark.parametrize("change,key", [
    ({"lerning_rate": 1}, "lerning_rate"),                         # an unknown key at the top
    ({"train": {"output_dir": "x", "lrr": 1e-4}}, "train.lrr"),     # ... in a section
    ({"dtype": "float64"}, "dtype"),                                # not a choice
    ({"train": {"output_dir": "x", "batch_size": 0}}, "train.batch_size"),  # a bound
    ({"data": {"train": "x.jsonl", "max_length": "long"}}, "data.max_length"),  # a type
    ({"method": "ppo"}, "method"),
    ({"method": "dpo", "dpo": {"loss": {"sigmoud": 1.0}}}, "dpo.loss.sigmoud"),
    ({"method": "dpo", "dpo": {"beta": 0}}, "dpo.beta"),
    ({"method": "grpo", "grpo": {"num_generations": 1}}, "grpo.num_generations"),
])
def test_the_schema_refuses_what_the_workbench_refuses(tmp_path, change, key):
    config = {"model": "m", "adapter": "demo", "data": {"train": "x.jsonl"}, "train": {"output_dir": "out"}}
    config.update(change)
    assert any(p.startswith(f".{key}") for p in check(config, run_schema())), check(config, run_schema())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    from workbench.train.config import load_run_config

    with pytest.raises(ConfigError, match=f"{path}: {key}"):
        load_run_config(path)


@pytest.mark.parametrize("kind,make", [("run", run_schema), ("recipe", recipe_schema)])
def test_the_committed_schemas_are_current(kind, make, capsys):
    """docs/schema/*.schema.json (what the shipped YAML files point at) is what `workbench schema` prints."""
    from workbench.cli import schema

    assert schema.run(type("Args", (), {"kind": kind, "out": None})()) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == make() == json.loads((REPO / "docs" / "schema" / f"{kind}.schema.json").read_text())
