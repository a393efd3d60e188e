"""Built-in chat and task templates (YAML). Installed as the package `workbench.templates`: see workbench/builtin.py."""
