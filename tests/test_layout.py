"""The house rules that keep each concern in one place, checked on the source tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _count(pattern: str) -> dict[str, int]:
    hits = {}
    for path in SOURCES:
        n = len(re.findall(pattern, path.read_text(encoding="utf-8")))
        if n:
            hits[str(path.relative_to(PACKAGE))] = n
    return hits


def test_one_ignore_index():
    assert _count(r"-100\b") == {"model/modeling.py": 1}


def test_the_system_prompt_is_written_only_in_the_chat_template():
    assert _count(r"You are a helpful assistant") == {}
    template = (PACKAGE.parent / "data_templates" / "chatml.yaml").read_text()
    assert template.count("You are a helpful assistant.") == 1


def test_one_dtype_map():
    assert _count(r"(?m)^\s*TORCH_DTYPES = ") == {"dtypes.py": 1}  # defined once, from the Dtype Literal
    assert _count(r"[\"'](bfloat16|float16|bf16|fp16)[\"']\s*:\s*torch\.") == {}  # and no second map


def test_comments_cite_only_files_in_the_repository():
    assert _count(r"QWEN_VL_SPEC|\bspec §|\.\./shared") == {}
    for cited in set(re.findall(r"docs/[\w.-]+\.md", "".join(p.read_text() for p in SOURCES))):
        assert (PACKAGE.parent / cited).is_file(), cited


def test_merge_does_not_import_train():
    for path in (PACKAGE / "merge").glob("*.py"):
        assert not any(m.startswith("workbench.train") for m in _imports(path)), path


def test_model_holds_no_demo_or_conversion_code():
    names = {p.stem for p in (PACKAGE / "model").glob("*.py")}
    assert names == {"__init__", "auto", "config", "tokenizer", "checkpoint", "digests", "shard_writer", "image_processing",
                     "vision", "resampler", "qwen", "modeling"}
    for path in (PACKAGE / "model").glob("*.py"):
        assert not any(m.startswith(("workbench.demo", "workbench.convert", "open_clip")) for m in _imports(path))


def test_nothing_reaches_outside_the_repository():
    """A clone tests itself: no code, test or doc names a folder beside the repository."""
    repo = PACKAGE.parent
    texts = [*SOURCES, *repo.glob("tests/**/*.py"), *repo.glob("*.md"), *repo.glob("docs/*.md"), repo / "Makefile"]
    offenders = [str(p.relative_to(repo)) for p in texts
                 if p != Path(__file__).resolve() and re.search(r"\.\./shared|WORKBENCH_" + "SHARED", p.read_text())]
    assert offenders == []


def _module_graph() -> dict[str, set[str]]:
    """workbench module -> the workbench modules it imports (any import statement, inside functions too)."""
    modules = {}
    for path in SOURCES:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for imported in _imports(path):
            # `from workbench.train import methods` names a module too: take the longest known prefix
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                found.add(imported)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        graph[name] = found - {name}
    return graph


def test_no_import_cycle():
    """No module of workbench/ imports (directly or through others) one that imports it back."""
    graph = _module_graph()
    assert "workbench.train.trainer" in graph and "workbench.model.modeling" in graph
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [name, nxt])
                                     if nxt in path else f"import cycle through {name} -> {nxt}")
            if nxt not in state:
                visit(nxt, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_method_names_appear_only_in_the_registry_and_the_config():
    """The training method is never a string tested outside workbench/train/methods/ and the config
    declarations (workbench/train/config.py). The demo names its folders and benchmark arms after
    the methods it runs, which is not dispatch, so it is not counted."""
    from typing import get_args

    from workbench.train.config import Method

    names = set(get_args(Method))
    allowed = ("train/config.py", "train/methods/", "demo/")
    hits = []
    for path in SOURCES:
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith(allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                hits.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert hits == []
    # and every name has its module in the registry, every module its name
    modules = {p.stem for p in (PACKAGE / "train" / "methods").glob("*.py")} - {"__init__", "base"}
    assert modules == names
