"""Qwen-VL-Chat fine-tuning workbench."""


def __getattr__(name: str):
    # Lazy: `import workbench` (the CLI) must not pay for importing torch and transformers.
    if name in ("load_model", "load_tokenizer"):
        from workbench import api

        return getattr(api, name)
    if name == "ground":
        from workbench.eval.grounding import ground

        return ground
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
