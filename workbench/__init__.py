"""Qwen-VL-Chat fine-tuning workbench.

Importing the package registers the workbench's Qwen-VL classes with transformers' Auto classes, so
that `AutoModelForCausalLM.from_pretrained(merged)`, `AutoTokenizer.from_pretrained(run)` and PEFT's
`AutoPeftModelForCausalLM.from_pretrained(run)` load the workbench's model and tokenizer (no remote
code). The API names (`load_model`, `load_tokenizer`, `ground`) are imported on first use.
"""

from workbench.model.auto import register_auto_classes

register_auto_classes()


def __getattr__(name: str):
    if name in ("load_model", "load_tokenizer"):
        from workbench import api

        return getattr(api, name)
    if name == "ground":
        from workbench.eval.grounding import ground

        return ground
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
