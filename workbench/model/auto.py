"""The workbench's Qwen-VL classes in transformers' Auto registries (model_type `qwen`)."""

from __future__ import annotations


def register_auto_classes() -> None:
    """AutoConfig, AutoModelForCausalLM and AutoTokenizer resolve `qwen` to the workbench's classes.

    Registering beats the release's `auto_map` (remote code): transformers uses a registered local
    class without asking for trust_remote_code. Safe to call twice.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workbench.model.config import QWenConfig
    from workbench.model.modeling import QWenLMHeadModel
    from workbench.model.tokenizer import QWenTokenizer

    AutoConfig.register("qwen", QWenConfig, exist_ok=True)
    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
    AutoTokenizer.register(QWenConfig, slow_tokenizer_class=QWenTokenizer, exist_ok=True)
