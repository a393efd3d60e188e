"""Run the original Qwen-VL finetune.py for the GPU suite, on random weights, in its own environment.

    python original_launcher.py --finetune DIR/finetune.py --device cuda --dtype bfloat16 -- ARGS...

Run as a file, never imported with the workbench: its PYTHONPATH puts the original's own packages
(transformers 4.32, ...) first, so it imports only the standard library, torch and that
transformers. finetune.py itself runs unchanged (runpy, as `__main__`, with ARGS as its command
line); these things around it are the suite's:

0. transformers' import-time dependency check is skipped: transformers 4.32 refuses to import next
   to tokenizers >= 0.14 (the GPU machine has 0.23, and no tokenizers 0.13 wheel exists for
   Python 3.12), although Qwen-VL's tokenizer is the slow tiktoken one and never imports it. The
   versions finetune.py needs are the ones prepare.py carries. For the same reason the Trainer is
   told that `datasets` is absent (finetune.py does not use it; a recent one needs a newer
   huggingface_hub than transformers 4.32 accepts).

1. `AutoModelForCausalLM.from_pretrained` builds the model from its config with random weights on
   the device (`from_config`, in the dtype the release's weights would load in): the original's
   folder holds the release's code and config, not 19 GB of weights.
2. A Trainer callback, added to `transformers.trainer.DEFAULT_CALLBACKS` (every Trainer starts
   from that list), prints one line per event after a device sync: the trainable parameters when
   training begins, each optimizer step's end time, and the peak memory when training ends. The
   allocator's cache is emptied and the peak reset when training begins, so the peaks are the
   training's (not the float32 construction's) and compare with `workbench bench`'s.
3. The process ends when training ends: finetune.py's adapter save afterwards is not measured.

Each line starts with MARK and holds one JSON object; everything else finetune.py and its Trainer
print (the loss dicts, `train_runtime`) is left as it is.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time

MARK = "GPU_SUITE "


class TrainingEnded(Exception):
    """Raised by the callback at the end of training to skip finetune.py's save."""


def emit(event: str, **fields) -> None:
    # A line of its own: tqdm's progress bar may have left the cursor in the middle of one.
    print("\n" + MARK + json.dumps({"event": event, "time": time.perf_counter(), **fields}), flush=True)


def skip_dependency_check() -> None:
    """transformers/__init__.py runs `from . import dependency_versions_check`; a module already in
    sys.modules under that name is taken as it is, so the import-time loop never runs. The module's
    `dep_version_check` (what the Trainer calls for DeepSpeed, FSDP, ...) keeps checking."""
    import types

    def dep_version_check(pkg: str, hint: str | None = None) -> None:
        from transformers.dependency_versions_table import deps
        from transformers.utils.versions import require_version

        require_version(deps[pkg], hint)

    module = types.ModuleType("transformers.dependency_versions_check")
    module.dep_version_check = dep_version_check
    sys.modules[module.__name__] = module


def hide_datasets(transformers) -> None:
    """transformers 4's Trainer imports `datasets` when it is installed; a datasets from 2024 on needs
    a newer huggingface_hub than transformers 4.32 accepts, and finetune.py does not use it."""
    import transformers.utils.import_utils as import_utils

    if transformers.__version__.startswith("4.") and hasattr(import_utils, "_datasets_available"):
        import_utils._datasets_available = False


def patch(device: str, dtype_name: str) -> None:
    skip_dependency_check()
    import torch
    import transformers
    from transformers import TrainerCallback

    hide_datasets(transformers)

    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # transformers 5 renamed from_config's `torch_dtype` to `dtype` (the dry run's stand-in runs on 5).
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

    def random_weights(name_or_path, *args, config=None, **kwargs):
        config = config or transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=True)
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True,
                                                                 **{dtype_key: dtype})

    class SuiteCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            sync()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            params = list(model.parameters()) if model is not None else []
            emit("begin", trainable_params=sum(p.numel() for p in params if p.requires_grad),
                 params=sum(p.numel() for p in params))

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            emit("step", step=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            sync()
            emit("end", peak_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                 peak_reserved=torch.cuda.max_memory_reserved() if cuda else None)
            raise TrainingEnded

    transformers.AutoModelForCausalLM.from_pretrained = staticmethod(random_weights)
    import transformers.trainer

    transformers.trainer.DEFAULT_CALLBACKS.append(SuiteCallback)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description="the original finetune.py on random weights, for the GPU suite")
    p.add_argument("--finetune", required=True, help="path of finetune.py")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv[:split])
    patch(args.device, args.dtype)
    sys.argv = [args.finetune, *argv[split + 1:]]
    try:
        runpy.run_path(args.finetune, run_name="__main__")
    except TrainingEnded:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
