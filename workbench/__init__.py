"""Qwen-VL-Chat fine-tuning workbench.

`import workbench` is cheap (no torch), so that the command line answers at once. The API names
(`load_model`, `load_tokenizer`, `ground`) are imported on first use. Importing `workbench.model`
(which every model-loading path does, `load_model` included) registers the workbench's Qwen-VL
classes with transformers' Auto classes, so that `AutoModelForCausalLM.from_pretrained(merged)`,
`AutoTokenizer.from_pretrained(run)` and PEFT's `AutoPeftModelForCausalLM.from_pretrained(run)` load
the workbench's model and tokenizer (no remote code).
"""

import logging

# torchao (which gptqmodel brings) registers Enum classes with torch's pytree when transformers
# imports it, and torch >= 2.14 logs a warning per class on every command: nothing a user can act on.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())


def __getattr__(name: str):
    if name in ("load_model", "load_tokenizer"):
        from workbench import api

        return getattr(api, name)
    if name == "ground":
        from workbench.eval.grounding import ground

        return ground
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
