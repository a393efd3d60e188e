"""A run folder stands on its own: PEFT's and transformers' Auto classes load it after `import workbench.model`."""

from __future__ import annotations

import json
import os
import stat

import torch


def test_auto_classes_load_the_run_folder(tmp_path, run_config, tiny_model):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import workbench.model  # noqa: F401  (registers the Auto classes)
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    config = load_run_config(run_config(folder=tmp_path / "cfg", max_steps=4, save_steps=100))
    result = train(config)
    out = result.output_dir
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)

    tok = AutoTokenizer.from_pretrained(out)  # saved beside the adapter
    ids = torch.tensor([tok.encode("The answer is always the same.")])
    trained = result.model.eval()
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)  # a plain (or merged) folder loads too
    assert type(base).__name__ == "QWenLMHeadModel"

    # Files follow the umask like everything else (safetensors writes 0600 by itself).
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_model.safetensors", "adapter_config.json", "qwen.tiktoken", "workbench_run.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
