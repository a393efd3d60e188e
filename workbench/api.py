"""The public entry points: `from workbench import load_model, load_tokenizer`."""

from __future__ import annotations

import os

from workbench.model.checkpoint import load_model, resolve_model_dir

__all__ = ["load_model", "load_tokenizer"]


def load_tokenizer(path_or_repo: str | os.PathLike):
    """QWenTokenizer of a model folder (or hub id)."""
    from workbench.model.tokenizer import QWenTokenizer

    return QWenTokenizer.from_pretrained(resolve_model_dir(path_or_repo))
