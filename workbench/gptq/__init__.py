"""GPTQ Int4: the Int4 release's layout, loading it on GPTQModel's kernels, and writing it (docs/int4.md).

GPTQModel (gptqmodel on PyPI) does the GPTQ algorithm, the packing and the kernels; this package
only says which modules of Qwen-VL-Chat are quantised, how calibration inputs reach them, and what
the release's files look like. gptqmodel is imported inside the functions that need it: importing
it sets environment variables and takes seconds.
"""


def quiet_library() -> None:
    """Keep GPTQModel's errors only, not its banner, per-layer INFO lines or advice on Python builds:
    it logs through LogBar, a logging.Logger. Call before gptqmodel is imported, by us or by PEFT
    (whose LoRA dispatcher imports it whenever it is installed)."""
    import logging

    from logbar import LogBar

    LogBar.shared().setLevel(logging.ERROR)
