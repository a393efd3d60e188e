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
    assert names == {"__init__", "auto", "config", "tokenizer", "checkpoint", "shard_writer", "image_processing",
                     "vision", "resampler", "qwen", "modeling"}
    for path in (PACKAGE / "model").glob("*.py"):
        assert not any(m.startswith(("workbench.demo", "workbench.convert", "open_clip")) for m in _imports(path))


def test_nothing_reaches_outside_the_repository():
    """A clone tests itself: no code, test or doc names a folder beside the repository."""
    repo = PACKAGE.parent
    texts = [*SOURCES, *repo.glob("tests/**/*.py"), *repo.glob("*.md"), *repo.glob("docs/*.md"), repo / "Makefile"]
    offenders = [str(p.relative_to(repo)) for p in texts
                 if p != Path(__file__).resolve() and re.search(r"\.\./shared|WORKBENCH_SHARED", p.read_text())]
    assert offenders == []
