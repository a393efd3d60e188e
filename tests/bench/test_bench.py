"""`workbench bench --tiny` runs on the CPU; the FLOP count matches a hand computation."""

from __future__ import annotations

import json

from workbench.bench.flops import step_flops
from workbench.bench.workload import bench_config, synthetic_batch
from workbench.cli.main import main


def test_release_step_flops_by_hand():
    # Per LLM block at T = 2048: matmuls 2*T*(4*4096^2 + 3*4096*11008), causal attention 2*T^2*4096.
    t, h, f = 2048, 4096, 11008
    block = 2 * t * (4 * h * h + 3 * h * f) + 2 * t * t * h
    head = 2 * t * h * 151936
    llm = 3 * 32 * block + 2 * head
    flops = step_flops(bench_config(tiny=False), t, images_per_sample=1, grad_accum=8)
    vision = flops / 8 - llm
    assert 3.5e12 < vision < 5e12  # ViT-bigG + resampler forward on 1024 patches: about 4.3 TFLOP
    assert abs(flops / 1e15 - 0.74) < 0.01  # "about 0.8 PFLOP" in the original's measurement


def test_synthetic_batch_fills_the_length_with_one_image():
    config = bench_config(tiny=True)
    batch = synthetic_batch(config, 300, "cpu")
    ids = batch["input_ids"][0]
    assert ids.shape == (300,) and (ids == config.image_start_id).sum() == 1
    assert (ids == config.image_start_id + 1).sum() == 1 and batch["pixel_values"].shape == (1, 3, 56, 56)
    assert (batch["labels"][0, 150:] == ids[150:]).all() and (batch["labels"][0, :150] == -100).all()


def test_bench_tiny_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--recipe", "official-lora,qlora", "--seq-len", "280,320", "--steps", "1",
                 "--grad-accum", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["recipe"], r["seq_len"]) for r in rows] == [
        ("official-lora", 280), ("official-lora", 320), ("qlora", 280), ("qlora", 320)]
    for r in rows:
        assert r["s_per_it"] > 0 and abs(r["tokens_per_s"] - r["seq_len"] * 2 / r["s_per_it"]) < 1e-6
        assert r["trainable_params"] > 0 and r["tflops"] > 0
    assert report["environment"]["device"] == "cpu" and "| official-lora | 280 |" in capsys.readouterr().out


def test_bf16_model_built_in_place_trains():
    # The GPU path: weights built directly in bf16 (here on the CPU), one training step.
    import torch

    from workbench.bench.run import build_model

    model = build_model("official-lora", tiny=True, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    batch = synthetic_batch(model.base_model.model.config, 300, "cpu")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
