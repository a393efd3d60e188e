"""The built-in recipes, templates and example configs, found the same way everywhere.

They live at the top of the repository (`adapters/`, `data_templates/`, `configs/`: the folders users
copy from). `workbench/recipes`, `workbench/templates` and `workbench/configs` are symlinks to them,
so they are package data (pyproject.toml), and importlib.resources finds them inside the installed
package in a source checkout, an editable install and a wheel alike. A user's own file is always
given by path instead.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

Kind = Literal["recipes", "templates", "configs"]


def builtin_dir(kind: Kind) -> Path:
    """The folder that holds the built-in files of a kind."""
    # An installed package is a folder on disk: the workbench is never imported from a zip archive.
    return Path(str(files("workbench") / kind))
