"""Qwen-VL-Chat fine-tuning workbench."""
