"""Example run configs and accelerate configs (YAML). Installed as the package `workbench.configs`: see workbench/builtin.py."""
