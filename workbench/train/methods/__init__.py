"""The training methods: `method: NAME` in a run config is the module `workbench.train.methods.NAME`.

Each module holds one `METHOD` (a `base.Method`): its config section, how its data is loaded and
batched, its Trainer subclass, the checks it needs before any file is written, and the lines it
adds to the start summary and the run record. The names a run config accepts are the `Method`
Literal of workbench/train/config.py, next to the sections; `workbench/train/trainer.py` knows no
method by name. A new method is one module here plus its name and section in config.py.
"""

from __future__ import annotations

import importlib
import typing

from workbench.train.methods.base import Method


def names() -> tuple[str, ...]:
    """Every method a run config may name (the config's `Method` Literal)."""
    from workbench.train.config import Method as MethodName

    return typing.get_args(MethodName)


def get(name: str) -> Method:
    """The method a run config names (validated by the config already)."""
    if name not in names():
        raise KeyError(f"no training method {name!r}; known: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").METHOD
