"""Built-in adapter recipes (YAML). Installed as the package `workbench.recipes`: see workbench/builtin.py."""
