"""LoRA training on the Int4 export of the tiny model (CPU): learns, resumes exactly, merges onto the
16-bit model it came from within the quantisation error."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_REF
from tests.train.conftest import write_run_config
from tests.train.test_train import Hook, losses
from workbench.model.checkpoint import load_model
from workbench.train.config import load_run_config
from workbench.train.trainer import train

pytestmark = pytest.mark.slow
SETTINGS = dict(max_steps=6, save_steps=100, schedule="cosine", warmup_steps=1, batch_size=2,
                gradient_accumulation_steps=2, loss_chunk_size=64)


def test_lora_on_int4_learns_resumes_exactly_and_merges_onto_the_float_model(tmp_path, int4_model, calib, golden):
    from peft import PeftModel

    from workbench.gptq.modules import is_gptq_linear
    from workbench.merge.merge import merge_adapter

    straight = train(load_run_config(write_run_config(tmp_path / "a", int4_model, calib.parent, "lora",
                                                      eval_data=False, **SETTINGS)))
    assert straight.status == "completed"
    a = losses(straight.output_dir)
    assert a[6] < a[1]
    lora_base = straight.model.get_base_model().transformer.h[0].attn.c_attn.base_layer
    assert is_gptq_linear(lora_base)  # LoRA sits on GPTQModel's kernel, not on a dequantised copy
    record = json.loads((straight.output_dir / "workbench_run.json").read_text())
    assert record["base_model"]["quantized_from"]["config_sha256"]

    path = write_run_config(tmp_path / "b", int4_model, calib.parent, "lora", eval_data=False, **SETTINGS)
    stopped = train(load_run_config(path), callbacks=[Hook(3, lambda model: signal.raise_signal(signal.SIGINT))])
    assert stopped.status == "interrupted" and stopped.global_step == 3
    resumed = train(load_run_config(path), resume=True)
    b = losses(resumed.output_dir)
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    wa = load_file(straight.output_dir / "adapter_model.safetensors")
    wb = load_file(resumed.output_dir / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=0, msg=key)

    # Onto the 16-bit weights (the base check accepts the model the Int4 export came from), --verify.
    report = merge_adapter(TINY_REF, straight.output_dir, tmp_path / "merged", verify=True)
    assert report["base_fingerprint_check"] == "match"
    ids = torch.tensor([golden["case3"]["input_ids"]])
    float_base, merged = load_model(TINY_REF, dtype="float32"), load_model(tmp_path / "merged", dtype="float32")
    int4_tuned = PeftModel.from_pretrained(load_model(int4_model, dtype="float32"), straight.output_dir).eval()
    int4_base = load_model(int4_model, dtype="float32")
    for m in (float_base, merged, int4_tuned.get_base_model(), int4_base):
        m.image_root = TINY_REF
    with torch.no_grad():
        fb, mg, qt, qb = (m(ids).logits for m in (float_base, merged, int4_tuned, int4_base))
    quant_error = (fb - qb).norm() / fb.norm()  # what 4 bits cost the untuned model
    assert (mg - fb).abs().max() > 1e-3  # the adapter changed the model
    assert (mg - qt).norm() / mg.norm() < 1.5 * quant_error
