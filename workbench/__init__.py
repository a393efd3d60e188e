"""Qwen-VL-Chat fine-tuning workbench.

`import workbench` is cheap (no torch), so that the command line answers at once. The API names
(`load_model`, `load_tokenizer`, `ground`) are imported on first use. Importing `workbench.model`
(which every model-loading path does, `load_model` included) registers the workbench's Qwen-VL
classes with transformers' Auto classes, so that `AutoModelForCausalLM.from_pretrained(merged)`,
`AutoTokenizer.from_pretrained(run)` and PEFT's `AutoPeftModelForCausalLM.from_pretrained(run)` load
the workbench's model and tokenizer (no remote code).
"""


def __getattr__(name: str):
    if name in ("load_model", "load_tokenizer"):
        from workbench import api

        return getattr(api, name)
    if name == "ground":
        from workbench.eval.grounding import ground

        return ground
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
