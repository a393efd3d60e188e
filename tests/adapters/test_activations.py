"""The memory estimate against the measured peak RSS of real training steps on the CPU.

Each case trains two AdamW steps of a random model in a fresh process and reads the kernel's
high-water mark (VmHWM) minus the process's RSS before the model existed; the estimate (weights +
trainable states + activations, from `inspect_recipe` with a StepShape) must be within 15%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workbench.adapters.activations import StepShape
from workbench.adapters.inspect import inspect_recipe
from workbench.adapters.recipe import load_recipe
from workbench.bench.workload import bench_config

MID = {"hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8, "kv_channels": 128,
       "intermediate_size": 5504, "visual": {"output_dim": 1024, "width": 256, "heads": 4}}

CASES = [  # (id, config overrides, StepShape)
    ("tiny", {}, StepShape(seq_len=1024, batch_size=8, gradient_checkpointing=False, loss_chunk_size=None)),
    ("tiny-ckpt", {}, StepShape(seq_len=1024, batch_size=8, gradient_checkpointing=True, loss_chunk_size=None)),
    ("mid", MID, StepShape(seq_len=512, batch_size=2, gradient_checkpointing=False)),
    ("mid-ckpt", MID, StepShape(seq_len=512, batch_size=2, gradient_checkpointing=True)),
    ("mid-ckpt-every-2", MID, StepShape(seq_len=512, batch_size=2, gradient_checkpointing=True, checkpoint_every=2)),
]

STEP = """
import json, sys, torch
from workbench.adapters.apply import apply_recipe
from workbench.adapters.recipe import load_recipe
from workbench.bench.workload import bench_config, n_text_tokens, synthetic_batch
from workbench.demo.tiny import init_tiny_weights
from workbench.model.modeling import QWenLMHeadModel
from workbench.train.callbacks import checkpoint_every_kth_block

def status(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

def train(config, b, s, ckpt, every, chunk):
    model = QWenLMHeadModel(config)
    init_tiny_weights(model, n_text_tokens(config) + 217, seed=0)
    model.loss_chunk_size = chunk
    model = apply_recipe(model, load_recipe("official-lora"))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpoint_every_kth_block(model, every)
    model.train()
    one = synthetic_batch(config, s, torch.device("cpu"))
    batch = {"input_ids": one["input_ids"].repeat(b, 1), "labels": one["labels"].repeat(b, 1),
             "pixel_values": one["pixel_values"].repeat(b, 1, 1, 1)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

torch.manual_seed(0)
overrides, b, s, ckpt, every, chunk = json.loads(sys.argv[1])
config = bench_config(True)
config.use_cache = False
# A small step first pages in the code the step runs (libtorch's kernels count in RSS too); then
# the high-water mark is reset (Linux: clear_refs 5) and the measured step starts from here.
train(config, 1, 300, ckpt, every, chunk)
for k, v in overrides.items():
    setattr(config, k, {**config.visual, **v} if k == "visual" else v)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = status("VmRSS")
train(config, b, s, ckpt, every, chunk)
print(json.dumps({"peak": status("VmHWM") - baseline}))
"""


def measured_peak(overrides: dict, shape: StepShape) -> int:
    arg = json.dumps([overrides, shape.batch_size, shape.seq_len, shape.gradient_checkpointing,
                      shape.checkpoint_every, shape.loss_chunk_size])
    # glibc's malloc keeps freed blocks below its (self-raising) mmap threshold in its heaps, so a
    # process's RSS stays at the highest fragmented heap rather than at what is alive; a fixed
    # threshold gives every tensor its own mapping, returned on free, as a GPU's allocator would.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", STEP, arg], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def estimated(tmp_path, overrides: dict, shape: StepShape) -> int:
    config = bench_config(True)
    for k, v in overrides.items():
        setattr(config, k, {**config.visual, **v} if k == "visual" else v)
    config.save_pretrained(tmp_path)
    report = inspect_recipe(tmp_path, load_recipe("official-lora"), "float32", step=shape)
    return report["memory_bytes"]["step_total"]


@pytest.mark.parametrize("overrides,shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_estimate_within_15_percent_of_measured_peak(tmp_path, overrides, shape):
    estimate, peak = estimated(tmp_path, overrides, shape), measured_peak(overrides, shape)
    assert abs(estimate - peak) <= 0.15 * peak, (estimate / 2**20, peak / 2**20)


def test_selective_checkpointing_lies_between():
    from workbench.adapters.activations import estimate_activations
    from workbench.adapters.inspect import meta_model
    from workbench.model.checkpoint import RELEASES_DIR

    model = meta_model(RELEASES_DIR / "Qwen--Qwen-VL-Chat").train()
    acts = [estimate_activations(model, StepShape(seq_len=512, gradient_checkpointing=ckpt, checkpoint_every=k))
            ["activations"] for ckpt, k in ((True, 1), (True, 4), (False, 1))]
    assert acts[0] < acts[1] < acts[2], acts


def test_inspect_prints_the_step_estimate(capsys):
    from workbench.cli.main import main

    assert main(["inspect", "configs/official-lora.yaml", "--seq-len", "1024", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "one micro-batch of 1 x 1024 tokens" in out and "activations" in out and "step total" in out
