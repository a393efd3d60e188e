"""The Qwen-VL-Chat architecture and its I/O. Importing it registers the Auto classes (model_type `qwen`)."""

from workbench.model.auto import register_auto_classes

register_auto_classes()
